//! What the demo reports, built from what actually happened: the round summaries the aggregator
//! published and the update messages it accepted (kept in its state folder), the masks and the
//! features CSV the agents wrote.
//!
//! - [`RoundRow`] / [`LabRound`]: one closed round; [`round_row`] reads each accepted update message
//!   (`STATE/round-N/<lab>.msg`) for the lab's hold-out IoU before and after local training and the
//!   compressed update's size (the bytes the lab sent), and checks that they add up to the summary.
//! - [`table_header`] / [`table_line`]: the round table printed as rounds close (Markdown).
//! - [`rounds_csv`], [`write_plot`] (hold-out IoU per lab per round, PNG via
//!   [`crate::study::plot`]), [`score_captures`] (captured images' masks against their truth),
//!   [`summarise_features`] (the features CSV per lab), [`report_markdown`] (`report.md`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::mask::Mask;
use crate::metrics::ConfusionMatrix;
use crate::study::plot::{Chart, Panel, Series};
use crate::wire::protocol::{Envelope, Kind, RoundSummary, UpdateBody};

use super::DemoError;
use super::labs::Capture;

/// One lab's part in one round, as its update message says.
#[derive(Debug, Clone, PartialEq)]
pub struct LabRound {
    /// Mean IoU of the global decoder the round started from, on the lab's hold-out images.
    pub iou_global: Option<f32>,
    /// Mean IoU after the lab's local training, on the same images.
    pub iou_local: Option<f32>,
    /// Size of the compressed update: what the lab sent.
    pub bytes: u64,
    pub samples: u64,
    pub train_loss: f32,
}

/// One closed round.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundRow {
    pub round: u64,
    pub global_version: u64,
    /// One entry per federated lab, in lab order; `None`: no accepted update from it.
    pub labs: Vec<Option<LabRound>>,
    pub update_bytes: u64,
    pub stragglers: Vec<String>,
    pub rejected: BTreeMap<String, u64>,
    pub seconds: f64,
    /// The round ran secure aggregation (the aggregator saw the sum only; no per-lab figures).
    pub secure_aggregation: bool,
}

/// Builds the row of `summary` from the accepted update messages in the aggregator's `state` folder.
/// `labs` are the federated labs' device ids, in table order.
pub fn round_row(
    summary: &RoundSummary,
    labs: &[String],
    state: &Path,
) -> Result<RoundRow, DemoError> {
    let round_err = |message: String| DemoError::Round {
        round: summary.round,
        message,
    };
    let dir = state.join(format!("round-{}", summary.round));
    let mut per_lab: Vec<Option<LabRound>> = vec![None; labs.len()];
    if summary.secure_aggregation {
        // The aggregator holds no lab's update, so no lab's figures: only who is in the sum, and
        // the protocol's bytes shared evenly.
        let n = summary.accepted.len().max(1) as u64;
        for device in &summary.accepted {
            let Some(i) = labs.iter().position(|l| l == device) else {
                return Err(round_err(format!(
                    "{device} is in the secure sum, and it is not a demo lab"
                )));
            };
            per_lab[i] = Some(LabRound {
                iou_global: None,
                iou_local: None,
                bytes: summary.update_bytes / n,
                samples: 0,
                train_loss: f32::NAN,
            });
        }
        return Ok(RoundRow {
            round: summary.round,
            global_version: summary.global_version,
            labs: per_lab,
            update_bytes: summary.update_bytes,
            stragglers: summary.stragglers.clone(),
            rejected: summary.rejected.clone(),
            seconds: summary.seconds,
            secure_aggregation: true,
        });
    }
    let mut total = 0u64;
    for device in &summary.accepted {
        let path = dir.join(format!("{device}.msg"));
        let bytes =
            std::fs::read(&path).map_err(|e| round_err(format!("{}: {e}", path.display())))?;
        let body: UpdateBody = Envelope::from_bytes(&bytes, usize::MAX)
            .and_then(|e| e.body(Kind::Update))
            .map_err(|e| round_err(format!("{}: {e}", path.display())))?;
        let sent = body.compressed.len() as u64;
        total += sent;
        let Some(i) = labs.iter().position(|l| l == device) else {
            return Err(round_err(format!(
                "accepted an update from {device}, which is not a demo lab"
            )));
        };
        per_lab[i] = Some(LabRound {
            iou_global: body.metrics.holdout_mean_iou_before,
            iou_local: body.metrics.holdout_mean_iou,
            bytes: sent,
            samples: body.samples,
            train_loss: body.metrics.train_loss,
        });
    }
    if total != summary.update_bytes {
        return Err(round_err(format!(
            "the accepted updates hold {total} bytes, the round summary says {}",
            summary.update_bytes
        )));
    }
    Ok(RoundRow {
        round: summary.round,
        global_version: summary.global_version,
        labs: per_lab,
        update_bytes: summary.update_bytes,
        stragglers: summary.stragglers.clone(),
        rejected: summary.rejected.clone(),
        seconds: summary.seconds,
        secure_aggregation: false,
    })
}

fn iou(v: Option<f32>) -> String {
    v.map_or("–".into(), |v| format!("{v:.3}"))
}

/// `| round | lab-a (hazy) IoU global→local | … | lab-a bytes | … | global version |` and the rule.
pub fn table_header(labs: &[(String, String)]) -> String {
    let mut h = String::from("| round |");
    for (lab, style) in labs {
        let _ = write!(h, " {lab} ({style}) IoU global→local |");
    }
    for (lab, _) in labs {
        let _ = write!(h, " {lab} bytes sent |");
    }
    h.push_str(" global version |\n|---|");
    for _ in 0..2 * labs.len() {
        h.push_str("---|");
    }
    h.push_str("---|");
    h
}

/// One table line; a lab that sent nothing is marked `straggler`.
pub fn table_line(row: &RoundRow) -> String {
    let mut s = format!("| {} |", row.round);
    for l in &row.labs {
        match l {
            Some(l) => {
                let _ = write!(s, " {} → {} |", iou(l.iou_global), iou(l.iou_local));
            }
            None => s.push_str(" straggler |"),
        }
    }
    for l in &row.labs {
        match l {
            Some(l) => {
                let _ = write!(s, " {} |", l.bytes);
            }
            None => s.push_str(" 0 |"),
        }
    }
    let _ = write!(s, " {} |", row.global_version);
    s
}

/// `rounds.csv`: one row per round, per lab the hold-out IoU before and after local training, the
/// update bytes and samples; then the round's total bytes and seconds. Missing values are empty.
pub fn rounds_csv(rows: &[RoundRow], labs: &[String]) -> String {
    let mut out = String::from("round,global_version");
    for l in labs {
        let _ = write!(
            out,
            ",{l}_iou_global,{l}_iou_local,{l}_update_bytes,{l}_samples"
        );
    }
    out.push_str(",update_bytes,seconds\n");
    for r in rows {
        let _ = write!(out, "{},{}", r.round, r.global_version);
        for l in &r.labs {
            match l {
                Some(l) => {
                    let f = |v: Option<f32>| v.map(|v| v.to_string()).unwrap_or_default();
                    let _ = write!(
                        out,
                        ",{},{},{},{}",
                        f(l.iou_global),
                        f(l.iou_local),
                        l.bytes,
                        l.samples
                    );
                }
                None => out.push_str(",,,0,0"),
            }
        }
        let _ = writeln!(out, ",{},{:.3}", r.update_bytes, r.seconds);
    }
    out
}

/// The learning curves: per lab, the hold-out IoU of the global decoder each round started from,
/// and after local training.
pub fn write_plot(rows: &[RoundRow], labs: &[String], path: &Path) -> Result<(), DemoError> {
    let series = |pick: fn(&LabRound) -> Option<f32>| -> Vec<Series> {
        labs.iter()
            .enumerate()
            .map(|(i, lab)| Series {
                label: lab.clone(),
                points: rows
                    .iter()
                    .filter_map(|r| {
                        let v = r.labs.get(i)?.as_ref().and_then(pick)?;
                        Some((r.round as f64, f64::from(v)))
                    })
                    .collect(),
            })
            .collect()
    };
    let chart = Chart {
        title: "microfed demo: hold-out IoU per lab".into(),
        x_label: "round".into(),
        y_label: "mean IoU".into(),
        panels: vec![
            Panel {
                title: "global, round start".into(),
                series: series(|l| l.iou_global),
            },
            Panel {
                title: "after local training".into(),
                series: series(|l| l.iou_local),
            },
        ],
    };
    chart.save(path).map_err(|e| DemoError::Output {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// How well one lab's captures were segmented, scored against their truth masks (pooled over the
/// images: one confusion matrix).
#[derive(Debug, Clone, PartialEq)]
pub struct CaptureScore {
    pub captures: usize,
    /// Captures with a mask written by the agent.
    pub segmented: usize,
    /// Captures scored (a mask and a truth of the same size).
    pub scored: usize,
    pub mean_iou: Option<f64>,
    /// Why some captures were not scored.
    pub notes: Vec<String>,
}

/// Scores the masks the agent wrote (`output/STEM.mask.png`) against each capture's truth.
pub fn score_captures(output: &Path, captures: &[Capture], classes: usize) -> CaptureScore {
    let mut score = CaptureScore {
        captures: captures.len(),
        segmented: 0,
        scored: 0,
        mean_iou: None,
        notes: Vec::new(),
    };
    let Ok(mut matrix) = ConfusionMatrix::new(classes) else {
        score.notes.push(format!("{classes} classes: no score"));
        return score;
    };
    for c in captures {
        let stem = Path::new(&c.name)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let pred_path = output.join(format!("{stem}.mask.png"));
        let Ok(pred) = Mask::load(&pred_path) else {
            score.notes.push(format!("{}: no mask", c.name));
            continue;
        };
        score.segmented += 1;
        let Some(truth_path) = &c.truth else { continue };
        match Mask::load(truth_path) {
            Ok(truth) => match matrix.add(&truth, &pred) {
                Ok(()) => score.scored += 1,
                Err(e) => score.notes.push(format!("{}: {e}", c.name)),
            },
            Err(e) => score.notes.push(format!("{}: truth: {e}", c.name)),
        }
    }
    if score.scored > 0 {
        score.mean_iou = matrix.mean_iou();
    }
    score
}

/// The features CSV of one lab in a few numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureSummary {
    pub path: PathBuf,
    pub rows: usize,
    /// `(column, mean over the rows with a value)` for the headline columns present.
    pub means: Vec<(String, f64)>,
    /// The `source` column: the file each row measured.
    pub sources: Vec<String>,
}

/// Splits one CSV line (fields with commas or quotes are quoted, `""` is a quote).
fn csv_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                if let Some(f) = fields.last_mut() {
                    f.push('"');
                }
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(String::new()),
            (c, _) => {
                if let Some(f) = fields.last_mut() {
                    f.push(c)
                }
            }
        }
    }
    fields
}

/// Headline columns: grain count, mean equivalent circle diameter, ASTM E112 G, boundary fraction;
/// for phases every area fraction and particle count.
fn headline(column: &str) -> bool {
    matches!(
        column,
        "grains" | "ecd_mean" | "astm_g" | "boundary_fraction"
    ) || column.ends_with("_area_fraction")
        || (column.ends_with("_particles") && !column.ends_with("edge_particles"))
}

/// Reads `path` (a features CSV the pipeline wrote) and averages its headline columns.
pub fn summarise_features(path: &Path) -> Result<FeatureSummary, DemoError> {
    let text = std::fs::read_to_string(path).map_err(|e| DemoError::Output {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = lines.next().map(csv_fields).unwrap_or_default();
    let rows: Vec<Vec<String>> = lines.map(csv_fields).collect();
    let source = header.iter().position(|h| h == "source");
    let means = header
        .iter()
        .enumerate()
        .filter(|(_, h)| headline(h))
        .filter_map(|(i, h)| {
            let vals: Vec<f64> = rows
                .iter()
                .filter_map(|r| r.get(i)?.parse::<f64>().ok())
                .filter(|v| v.is_finite())
                .collect();
            (!vals.is_empty()).then(|| (h.clone(), vals.iter().sum::<f64>() / vals.len() as f64))
        })
        .collect();
    Ok(FeatureSummary {
        path: path.to_owned(),
        rows: rows.len(),
        means,
        sources: source
            .map(|i| rows.iter().filter_map(|r| r.get(i).cloned()).collect())
            .unwrap_or_default(),
    })
}

/// One capture's grain count as the agent measured it (features.csv) beside the truth's.
#[derive(Debug, Clone, PartialEq)]
pub struct GrainCount {
    pub capture: String,
    pub measured: Option<f64>,
    pub truth: Option<u32>,
    /// The model that segmented it (the journal's entry: the base model's file, a global decoder
    /// `…global-N.onnx`, or the lab's fine-tune of one `…global-N-personalised.onnx`).
    pub model: Option<String>,
}

/// The model file name (without its folder and the swap generation) each journalled file was
/// segmented by, by file name.
fn segmented_by(journal: &Path) -> std::collections::HashMap<String, String> {
    let text = std::fs::read_to_string(journal).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let e: crate::pipeline::journal::Entry = serde_json::from_str(l).ok()?;
            let label = e.model?;
            let path = crate::pipeline::slot::label_path(&label);
            let name = Path::new(path).file_name()?.to_string_lossy().into_owned();
            Some((e.file, name))
        })
        .collect()
}

/// Each capture's `grains` from the features CSV (the row whose `source` ends with the capture's
/// name), beside the generator's count and the model that segmented it (from `journal`); captures
/// without a row get `measured: None`.
pub fn grain_counts(features_csv: &Path, journal: &Path, captures: &[Capture]) -> Vec<GrainCount> {
    let models = segmented_by(journal);
    let text = std::fs::read_to_string(features_csv).unwrap_or_default();
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = lines.next().map(csv_fields).unwrap_or_default();
    let rows: Vec<Vec<String>> = lines.map(csv_fields).collect();
    let col = |name: &str| header.iter().position(|h| h == name);
    let (source, grains) = (col("source"), col("grains"));
    captures
        .iter()
        .map(|c| {
            let measured = source.zip(grains).and_then(|(s, g)| {
                rows.iter()
                    .filter(|r| {
                        r.get(s)
                            .is_some_and(|v| v == &c.name || v.ends_with(&format!("/{}", c.name)))
                    })
                    .filter_map(|r| r.get(g)?.parse::<f64>().ok())
                    .next_back()
            });
            GrainCount {
                capture: c.name.clone(),
                measured,
                truth: c.truth_grains,
                model: models.get(&c.name).cloned(),
            }
        })
        .collect()
}

/// Mean of |measured − truth| / truth over the captures with both, in percent.
pub fn grain_count_error(counts: &[GrainCount]) -> Option<f64> {
    let e: Vec<f64> = counts
        .iter()
        .filter_map(|c| {
            let t = f64::from(c.truth?);
            let m = c.measured?;
            (t > 0.0).then(|| (m - t).abs() / t)
        })
        .collect();
    (!e.is_empty()).then(|| 100.0 * e.iter().sum::<f64>() / e.len() as f64)
}

/// What the federation did for one lab: hold-out IoU of global decoders on its own hold-out.
#[derive(Debug, Clone, PartialEq)]
pub struct Gain {
    pub lab: String,
    /// The global the first round started from (the base model's decoder).
    pub first: Option<f32>,
    /// The global the last round started from (from the last round's update).
    pub last_start: Option<f32>,
    /// The global the last round produced, as the lab scored it after the rounds (its status);
    /// None when it was not scored in time or the lab reported another version.
    pub final_global: Option<f32>,
}

impl Gain {
    /// The change from the first round's start to the final global, else to the last round's
    /// start (points of IoU).
    pub fn change(&self) -> Option<f32> {
        self.first
            .zip(self.final_global.or(self.last_start))
            .map(|(a, b)| 100.0 * (b - a))
    }
}

/// Per lab: the hold-out IoU of the global decoder the first round started from (the base model),
/// of the one the last round started from, and of the final global (`finals[i]`: the version a
/// lab last scored and its IoU, counted when it is the last round's global).
pub fn federation_gains(
    rows: &[RoundRow],
    labs: &[String],
    finals: &[Option<(u64, f64)>],
) -> Vec<Gain> {
    let at = |i: usize, r: Option<&RoundRow>| r.and_then(|r| r.labs.get(i)?.as_ref()?.iou_global);
    let last_version = rows.last().map(|r| r.global_version);
    labs.iter()
        .enumerate()
        .map(|(i, l)| Gain {
            lab: l.clone(),
            first: at(i, rows.first()),
            last_start: at(i, rows.last()),
            final_global: finals
                .get(i)
                .copied()
                .flatten()
                .filter(|(v, _)| Some(*v) == last_version)
                .map(|(_, iou)| iou as f32),
        })
        .collect()
}

/// One lab's entry in the report.
#[derive(Debug, Clone)]
pub struct LabReport {
    pub name: String,
    pub style: String,
    pub model: PathBuf,
    /// Where the agent wrote masks, overlays, features JSON and features.csv.
    pub output: PathBuf,
    pub federated: bool,
    pub captures: CaptureScore,
    pub features: Option<FeatureSummary>,
    /// Per capture, grains measured and true (empty for labs without a grain count).
    pub grain_counts: Vec<GrainCount>,
}

/// `report.md`: what ran, the round table, how the captures came out, where everything is.
pub fn report_markdown(
    configuration: &[(String, String)],
    table: &[String],
    gains: &[Gain],
    labs: &[LabReport],
    dense_bytes: usize,
    files: &[(String, PathBuf)],
    style_codes: &str,
) -> String {
    let mut md = String::from("# microfed demo\n\n## Configuration\n\n");
    for (k, v) in configuration {
        let _ = writeln!(md, "- {k}: {v}");
    }
    md.push_str("\n## Federated rounds\n\n");
    md.push_str(
        "IoU is each lab's mean IoU on its own hold-out images (never sent), reported in its update: \
         first for the global decoder the round started from, then after local training. Bytes are \
         the compressed update each lab sent",
    );
    let _ = writeln!(
        md,
        " (a dense fp32 decoder update is {dense_bytes} bytes).\n"
    );
    for l in table {
        md.push_str(l);
        md.push('\n');
    }
    md.push_str(
        "\nWhat federation did for each lab: the hold-out IoU of the global decoder the first round \
         started from (the base model), of the one the last round started from, and of the final \
         global (the last round's, scored by each lab after the rounds); the change is to the \
         final global (to the last round's start where it was not scored).\n\n\
         | lab | round 1 start | last round start | final global | change (points) |\n\
         |---|---|---|---|---|\n",
    );
    for g in gains {
        let change = g.change().map_or("–".into(), |c| format!("{c:+.1}"));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {change} |",
            g.lab,
            iou(g.first),
            iou(g.last_start),
            iou(g.final_global)
        );
    }
    let _ = writeln!(md, "\nStyle codes: {style_codes}\n");
    md.push_str("## Captured micrographs\n\n");
    md.push_str("| lab | style | model | federated | captures | segmented | mean IoU vs truth |\n");
    md.push_str("|---|---|---|---|---|---|---|\n");
    for l in labs {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            l.name,
            l.style,
            l.model.display(),
            if l.federated { "yes" } else { "no" },
            l.captures.captures,
            l.captures.segmented,
            l.captures.mean_iou.map_or("–".into(), |v| format!(
                "{v:.3} ({} images)",
                l.captures.scored
            ))
        );
    }
    md.push_str(
        "\nCaptures arrive while rounds run, so later ones are segmented with newer global \
         decoders.\n\n## Features\n\n",
    );
    for l in labs {
        match &l.features {
            Some(f) => {
                let _ = writeln!(
                    md,
                    "- {}: {} rows in `{}`",
                    l.name,
                    f.rows,
                    f.path.display()
                );
                for (c, m) in &f.means {
                    let _ = writeln!(md, "  - mean {c}: {m:.4}");
                }
            }
            None => {
                let _ = writeln!(md, "- {}: no features CSV", l.name);
            }
        }
    }
    md.push_str(
        "\nLengths are in pixels unless the image carries a pixel size (synthetic images do not).\n",
    );
    let counted: Vec<&LabReport> = labs
        .iter()
        .filter(|l| l.grain_counts.iter().any(|c| c.truth.is_some()))
        .collect();
    if !counted.is_empty() {
        md.push_str(
            "\n## Grain counts\n\nEach capture's grains as the agent measured them (features.csv) \
             beside the synthetic generator's truth, and the model that segmented it (the base \
             model, a global decoder, or the lab's own fine-tune of one: the better of the two on \
             its hold-out goes live).\n\n| lab | capture | measured | truth | segmented by |\n\
             |---|---|---|---|---|\n",
        );
        for l in &counted {
            for c in &l.grain_counts {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} |",
                    l.name,
                    c.capture,
                    c.measured.map_or("–".into(), |v| format!("{v:.0}")),
                    c.truth.map_or("–".into(), |v| v.to_string()),
                    c.model.as_deref().unwrap_or("–")
                );
            }
        }
        md.push('\n');
        for l in &counted {
            if let Some(e) = grain_count_error(&l.grain_counts) {
                let _ = writeln!(
                    md,
                    "- {}: mean |measured − truth| / truth = {e:.1} %",
                    l.name
                );
            }
        }
    }
    md.push_str("\n## Files\n\n");
    for (what, p) in files {
        let _ = writeln!(md, "- {what}: `{}`", p.display());
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::federated::compress::{self, CompressionConfig};
    use crate::wire::protocol::{Header, LocalMetrics};

    fn update(device: &str, values: usize, before: f32, after: f32) -> (Vec<u8>, u64) {
        let layout = compress::decoder_layout(2);
        let n = compress::dense_len(&layout) / 4;
        let v: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 1e-3).collect();
        let compressed = compress::compress(
            &v,
            &layout,
            &CompressionConfig {
                top_k: Some(0.01),
                ..CompressionConfig::default()
            },
            None,
        )
        .unwrap();
        let len = compressed.len() as u64;
        let body = UpdateBody {
            device: device.into(),
            global_version: 0,
            samples: values as u64,
            metrics: LocalMetrics {
                train_loss: 0.5,
                holdout_mean_iou: Some(after),
                holdout_mean_iou_before: Some(before),
                seconds: 1.0,
                restyled_batches: 0,
            },
            compressed,
            norm: 1.0,
        };
        let h = Header {
            fleet: "demo",
            round: 1,
            model_version: "m",
            sender: device,
        };
        let bytes = Envelope::seal(Kind::Update, &h, &body)
            .unwrap()
            .to_bytes()
            .unwrap();
        (bytes, len)
    }

    fn summary(accepted: &[&str], bytes: u64) -> RoundSummary {
        RoundSummary {
            round: 1,
            global_version: 1,
            accepted: accepted.iter().map(|s| s.to_string()).collect(),
            stragglers: vec![],
            rejected: BTreeMap::new(),
            update_bytes: bytes,
            samples: 8,
            seconds: 2.5,
            privacy: None,
            devices: BTreeMap::new(),
            ..RoundSummary::default()
        }
    }

    #[test]
    fn a_round_row_comes_from_the_accepted_messages_and_must_match_the_summary() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("round-1");
        std::fs::create_dir_all(&dir).unwrap();
        let (a, la) = update("lab-a", 4, 0.5, 0.6);
        std::fs::write(dir.join("lab-a.msg"), a).unwrap();
        let labs = vec!["lab-a".to_string(), "lab-b".to_string()];
        let row = round_row(&summary(&["lab-a"], la), &labs, tmp.path()).unwrap();
        let l = row.labs[0].as_ref().unwrap();
        assert_eq!(
            (l.bytes, l.samples, l.iou_global, l.iou_local),
            (la, 4, Some(0.5), Some(0.6))
        );
        assert!(row.labs[1].is_none(), "lab-b sent nothing");
        assert_eq!(
            table_line(&row),
            format!("| 1 | 0.500 → 0.600 | straggler | {la} | 0 | 1 |")
        );
        // A summary that disagrees with the messages is an error, not a silent table.
        assert!(round_row(&summary(&["lab-a"], la + 1), &labs, tmp.path()).is_err());
        // An accepted device without its message is an error naming the round.
        let e = round_row(&summary(&["lab-b"], 0), &labs, tmp.path()).unwrap_err();
        assert!(e.to_string().contains("round 1"), "{e}");

        let csv = rounds_csv(std::slice::from_ref(&row), &labs);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1], format!("1,1,0.5,0.6,{la},4,,,0,0,{la},2.500"));
        let png = tmp.path().join("iou.png");
        write_plot(&[row], &labs, &png).unwrap();
        assert!(image::open(&png).is_ok());
    }

    #[test]
    fn table_header_has_a_column_per_lab_and_measure() {
        let h = table_header(&[
            ("lab-a".into(), "hazy".into()),
            ("lab-b".into(), "sem-bse".into()),
        ]);
        let first = h.lines().next().unwrap();
        assert_eq!(first.matches('|').count(), 7);
        assert_eq!(h.lines().nth(1).unwrap(), "|---|---|---|---|---|---|");
    }

    #[test]
    fn features_are_summarised_from_the_csv() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("features.csv");
        std::fs::write(
            &p,
            "source,kind,grains,ecd_mean,astm_g,edge_grains\n\"a,1.png\",grains,10,4.0,,3\nb.png,grains,20,6.0,,5\n",
        )
        .unwrap();
        let s = summarise_features(&p).unwrap();
        assert_eq!(s.rows, 2);
        assert_eq!(s.sources, vec!["a,1.png", "b.png"]);
        assert_eq!(
            s.means,
            vec![("grains".to_string(), 15.0), ("ecd_mean".to_string(), 5.0)]
        );
    }

    #[test]
    fn gains_count_the_final_global_only_when_it_is_the_last_rounds() {
        let lab = |iou: f32| {
            Some(LabRound {
                iou_global: Some(iou),
                iou_local: None,
                bytes: 1,
                samples: 1,
                train_loss: 0.1,
            })
        };
        let row = |round: u64, ious: [f32; 2]| RoundRow {
            round,
            global_version: round,
            labs: ious.iter().map(|&v| lab(v)).collect(),
            update_bytes: 2,
            stragglers: vec![],
            rejected: BTreeMap::new(),
            seconds: 1.0,
            secure_aggregation: false,
        };
        let rows = [row(1, [0.50, 0.80]), row(2, [0.53, 0.79])];
        let labs = ["a".to_string(), "b".to_string()];
        // Lab a scored global 2 (the last round's), lab b only global 1: its final is unknown.
        let g = federation_gains(&rows, &labs, &[Some((2, 0.56)), Some((1, 0.79))]);
        assert_eq!(g[0].final_global, Some(0.56));
        assert!(
            (g[0].change().unwrap() - 6.0).abs() < 1e-4,
            "to the final global"
        );
        assert_eq!((g[1].last_start, g[1].final_global), (Some(0.79), None));
        assert!(
            (g[1].change().unwrap() + 1.0).abs() < 1e-4,
            "to the last round's start"
        );
        let md = report_markdown(&[], &[], &g, &[], 10, &[], "none");
        assert!(md.contains("| a | 0.500 | 0.530 | 0.560 | +6.0 |"), "{md}");
        assert!(md.contains("| b | 0.800 | 0.790 | – | -1.0 |"), "{md}");
    }

    #[test]
    fn grain_counts_pair_each_capture_with_its_row_and_truth() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("features.csv");
        std::fs::write(
            &p,
            "source,kind,grains\n/in/c.png,grains,9\nd.png,grains,30\n",
        )
        .unwrap();
        let journal = tmp.path().join("journal.jsonl");
        std::fs::write(
            &journal,
            "{\"file\":\"c.png\",\"sha256\":\"00\",\"outcome\":\"segmented\",\"at\":1.0,\
             \"model\":\"/m/model.global-3-personalised.onnx (generation 4)\"}\nnot json\n",
        )
        .unwrap();
        let cap = |name: &str, truth: Option<u32>| Capture {
            source: tmp.path().join(name),
            name: name.into(),
            truth: None,
            truth_grains: truth,
        };
        let caps = [
            cap("c.png", Some(10)),
            cap("d.png", Some(20)),
            cap("e.png", Some(5)),
        ];
        let counts = grain_counts(&p, &journal, &caps);
        assert_eq!(
            counts[0].model.as_deref(),
            Some("model.global-3-personalised.onnx")
        );
        assert_eq!(counts[1].model, None);
        let got: Vec<(Option<f64>, Option<u32>)> =
            counts.iter().map(|c| (c.measured, c.truth)).collect();
        assert_eq!(
            got,
            vec![
                (Some(9.0), Some(10)),
                (Some(30.0), Some(20)),
                (None, Some(5))
            ]
        );
        // (10 % + 50 %) / 2; e.png has no measurement.
        assert!((grain_count_error(&counts).unwrap() - 30.0).abs() < 1e-9);
    }

    #[test]
    fn captures_are_scored_against_their_truth() {
        let tmp = tempfile::tempdir().unwrap();
        let truth = tmp.path().join("t.png");
        Mask::new(2, 2, vec![0, 0, 1, 1]).save_png(&truth).unwrap();
        // Predicted: one boundary pixel missed. IoU class 0 = 2/3, class 1 = 1/2.
        Mask::new(2, 2, vec![0, 0, 0, 1])
            .save_png(&tmp.path().join("c.mask.png"))
            .unwrap();
        let caps = vec![
            Capture {
                source: tmp.path().join("c.png"),
                name: "c.png".into(),
                truth: Some(truth),
                truth_grains: Some(3),
            },
            Capture {
                source: tmp.path().join("d.png"),
                name: "d.png".into(),
                truth: None,
                truth_grains: None,
            },
        ];
        let s = score_captures(tmp.path(), &caps, 2);
        assert_eq!((s.captures, s.segmented, s.scored), (2, 1, 1));
        let want = (2.0 / 3.0 + 0.5) / 2.0;
        assert!((s.mean_iou.unwrap() - want).abs() < 1e-12);
        assert_eq!(s.notes, vec!["d.png: no mask".to_string()]);
    }
}
