//! Segmenting every micrograph as it is captured: the agent's pipeline.
//!
//! ```text
//!  capture ──▶ decode ──▶ segment ──▶ write ──▶ publish
//!  (async,     (thread)   (thread,    (thread)   (async task,
//!   notify)               tract)                  Publisher)
//! ```
//! Stages are joined by bounded tokio channels ([`config::QueueSection`]): when a stage is slow the
//! one before it waits, so a burst of captures queues up as paths in the capture stage and nothing is
//! dropped. Decoding, inference and writing are blocking work and run on their own threads, never on
//! the async executor; inference uses tract's own thread pool for its matrix products.
//!
//! Data flows one way. A file that fails to decode or segment travels on as [`Item::Failed`] to the
//! write stage, the only owner of the journal and the features CSV, which quarantines it (agent) or
//! reports it (`microfed segment`). Nothing here panics on bad input; a panic inside the model on one
//! image is caught and that image is failed like any other.
//!
//! Shutdown: the capture stage stops on the shutdown signal and drops its sender; every later stage
//! finishes what is queued and stops when its input closes, so in-flight work finishes and is
//! journalled. Files not yet captured stay in the folder and are found again at the next start.
//!
//! Map:
//! - [`config`]: `agent.toml`. [`capture`]: the watched folder. [`tiling`]: tiles, batching, stitching.
//! - [`journal`]: exactly-once across crashes. [`outputs`]: atomic outputs, CSV, quarantine.
//! - [`slot`]: [`ModelSlot`], the swappable model. [`publish`]: the [`Publisher`] seam (a log line, or MQTT through `crate::wire::device`).
//! - [`stats`]: counters and the status line.
//! - Here: [`ModelInfo`] (classes, normalisation: the seam for the model manifest), [`Settings`],
//!   [`Pipeline`] (the stages over any source of captures), [`Agent`] (watch folder + model file +
//!   status line around a pipeline).

pub mod capture;
pub mod config;
pub mod journal;
pub mod outputs;
pub mod publish;
pub mod slot;
pub mod stats;
pub mod tiling;

use std::collections::HashSet;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use crate::classes::ClassDef;
use crate::features::{FeatureKind, FeatureOptions, GrainClasses, grain_features, phase_features};
use crate::mask::Mask;
use crate::micrograph::{Micrograph, Normalisation};
use crate::model::runtime::{Outputs, RuntimeError, Segmenter};

pub use capture::Capture;
pub use config::PipelineConfig;
pub use publish::{LogPublisher, Publisher, SegmentedImage};
pub use slot::{LoadedModel, ModelSlot};
pub use stats::{Stats, Status};

use journal::{Entry, Journal, JournalError, Outcome};
use outputs::{FeatureTable, OutputError, OutputNames};

/// Errors that stop a pipeline or an agent before or while it runs (single bad files never do).
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Model(#[from] RuntimeError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error(transparent)]
    Capture(#[from] capture::CaptureError),
    #[error("{path}: cannot create the folder: {source}")]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("model {path} predicts {model} classes but the configuration lists {config}")]
    ClassCount {
        path: PathBuf,
        model: usize,
        config: usize,
    },
    #[error("the {0} stage stopped unexpectedly")]
    Stage(&'static str),
    #[error("cannot start the {stage} thread: {source}")]
    Thread {
        stage: &'static str,
        source: std::io::Error,
    },
}

/// What the pipeline needs to know about the model beyond its weights: the classes it predicts,
/// what to measure, and how its inputs are normalised.
///
/// Seam: today this comes from the agent configuration (with defaults). When the model manifest
/// (`ModelManifest`, beside the ONNX file) exists, [`ModelInfo::resolve`] should read it and let the
/// configuration override it only where the user says so.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub classes: Vec<ClassDef>,
    pub feature_kind: FeatureKind,
    pub normalisation: Normalisation,
}

/// Distinct display colours for classes nobody named.
const PALETTE: [[u8; 3]; 8] = [
    [70, 70, 70],
    [255, 214, 0],
    [40, 200, 240],
    [240, 120, 30],
    [120, 220, 80],
    [200, 60, 200],
    [230, 40, 40],
    [60, 90, 230],
];

impl ModelInfo {
    /// Classes from the configuration, or `K` unnamed ones from the model; the feature kind from the
    /// configuration or guessed from the class names. Errors when the counts disagree.
    pub fn resolve(
        model: &config::ModelSection,
        segmenter: &Segmenter,
    ) -> Result<Self, PipelineError> {
        let k = segmenter.classes();
        let named = !model.classes.is_empty();
        let classes = if named {
            if model.classes.len() != k {
                return Err(PipelineError::ClassCount {
                    path: segmenter.path().to_owned(),
                    model: k,
                    config: model.classes.len(),
                });
            }
            model.classes.clone()
        } else {
            (0..k)
                .map(|c| ClassDef {
                    index: c as u8,
                    name: format!("class {c}"),
                    color: PALETTE[c % PALETTE.len()],
                })
                .collect()
        };
        let feature_kind = model
            .features
            .kind()
            .unwrap_or_else(|| FeatureKind::guess(&classes, named));
        Ok(Self {
            classes,
            feature_kind,
            normalisation: model.normalisation,
        })
    }
}

/// What to do with a file that cannot be segmented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Move it to this folder with `NAME.error.txt` beside it, and journal it (the agent).
    Quarantine(PathBuf),
    /// Leave it where it is and report it (`microfed segment`, whose inputs belong to the user).
    Report,
}

/// Everything the stages need, fixed for a run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub output: PathBuf,
    pub journal: PathBuf,
    pub failures: FailurePolicy,
    pub info: ModelInfo,
    /// Overrides the pixel size of every image (else TIFF tags, else pixels).
    pub pixel_size_um: Option<f64>,
    /// Grains: [`crate::features::FeatureOptions::neck_ratio`].
    pub neck_ratio: f64,
    pub tile: usize,
    pub overlap: usize,
    pub batch: usize,
    /// Threads for tract's matrix products.
    pub threads: usize,
    pub queues: config::QueueSection,
}

impl Settings {
    /// Settings of the agent from its configuration and the loaded model.
    pub fn from_config(
        config: &PipelineConfig,
        segmenter: &Segmenter,
    ) -> Result<Self, PipelineError> {
        Ok(Self {
            output: config.folders.output.clone(),
            journal: config.folders.journal_path(),
            failures: FailurePolicy::Quarantine(config.folders.quarantine.clone()),
            info: ModelInfo::resolve(&config.model, segmenter)?,
            pixel_size_um: config.model.pixel_size_um,
            neck_ratio: config.model.grain_neck_ratio,
            tile: config.tiling.tile,
            overlap: config.tiling.overlap,
            batch: config.tiling.batch,
            threads: resolve_threads(config.model.threads),
            queues: config.queues,
        })
    }
}

/// `0` means every core.
pub fn resolve_threads(threads: usize) -> usize {
    if threads == 0 {
        std::thread::available_parallelism().map_or(1, usize::from)
    } else {
        threads
    }
}

/// What flows from decode onwards.
#[derive(Debug)]
pub enum Item {
    Decoded {
        capture: Capture,
        sha256: String,
        micrograph: Micrograph,
    },
    Segmented {
        capture: Capture,
        sha256: String,
        micrograph: Micrograph,
        mask: Mask,
        model: String,
    },
    Failed {
        capture: Capture,
        sha256: String,
        reason: String,
    },
}

/// Counts of a finished run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Summary {
    pub segmented: u64,
    pub failed: u64,
    pub skipped: u64,
    /// `(file, reason)` of each failure, in order.
    pub failures: Vec<(String, String)>,
}

/// The stages over any source of captures (the watched folder, or a list of files).
#[derive(Debug)]
pub struct Pipeline {
    settings: Arc<Settings>,
    slot: ModelSlot,
    stats: Arc<Stats>,
    journal: Journal,
    table: FeatureTable,
    /// Where a capture whose outputs could not be written goes back to (the folder watcher).
    retry: Option<mpsc::UnboundedSender<PathBuf>>,
}

impl Pipeline {
    /// Creates the output folders, sweeps temporaries a crash left, opens the journal and reconciles
    /// the features CSV with it.
    pub fn new(settings: Settings, slot: ModelSlot) -> Result<Self, PipelineError> {
        let mkdir = |p: &Path| {
            std::fs::create_dir_all(p).map_err(|source| PipelineError::Folder {
                path: p.to_owned(),
                source,
            })
        };
        mkdir(&settings.output)?;
        if let FailurePolicy::Quarantine(q) = &settings.failures {
            mkdir(q)?;
            crate::fsio::remove_stale_temporaries(q).map_err(OutputError::from)?;
        }
        let swept =
            crate::fsio::remove_stale_temporaries(&settings.output).map_err(OutputError::from)?;
        if swept > 0 {
            tracing::info!(files = swept, "removed temporary outputs left by a crash");
        }
        let journal = Journal::open(&settings.journal)?;
        let table = FeatureTable::open(&settings.output.join("features.csv"), &journal.files())?;
        tracing::info!(
            journal = %journal.path().display(),
            entries = journal.len(),
            "journal opened: files in it are not processed again"
        );
        Ok(Self {
            settings: Arc::new(settings),
            slot,
            stats: Arc::new(Stats::default()),
            journal,
            table,
            retry: None,
        })
    }

    /// A capture whose outputs could not be written (not the file's fault) is sent back on the
    /// returned receiver, for the folder watcher to capture again later. Without it, such a file
    /// waits for the next start.
    pub fn send_back_failed_writes(&mut self) -> mpsc::UnboundedReceiver<PathBuf> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.retry = Some(tx);
        rx
    }

    pub fn slot(&self) -> ModelSlot {
        self.slot.clone()
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Runs every stage until `captures` closes and everything queued is written and published.
    pub async fn run<P: Publisher>(
        self,
        captures: mpsc::Receiver<Capture>,
        mut publisher: P,
    ) -> Result<Summary, PipelineError> {
        let Self {
            settings,
            slot,
            stats,
            journal,
            table,
            retry,
        } = self;
        let q = settings.queues;
        let (decoded_tx, decoded_rx) = mpsc::channel(q.decoded);
        let (segmented_tx, segmented_rx) = mpsc::channel(q.segmented);
        let (written_tx, mut written_rx) = mpsc::channel::<SegmentedImage>(q.written);
        // (file, hash) pairs between decode and journal, so a file captured twice while in flight
        // is not segmented twice. The journal itself is only touched by the write stage.
        let journal = Arc::new(Mutex::new(journal));
        let in_flight = Arc::new(Mutex::new(HashSet::<(String, String)>::new()));

        let decode = {
            let (settings, stats, journal, in_flight) = (
                settings.clone(),
                stats.clone(),
                journal.clone(),
                in_flight.clone(),
            );
            spawn_stage("decode", move || {
                decode_stage(
                    captures, decoded_tx, &settings, &stats, &journal, &in_flight,
                )
            })?
        };
        let segment = {
            let settings = settings.clone();
            spawn_stage("segment", move || {
                segment_stage(decoded_rx, segmented_tx, &settings, &slot)
            })?
        };
        let write = {
            let (settings, stats) = (settings.clone(), stats.clone());
            spawn_stage("write", move || {
                let mut writer = Writer {
                    settings: &settings,
                    stats: &stats,
                    journal: &journal,
                    in_flight: &in_flight,
                    table,
                    summary: Summary::default(),
                    retry,
                };
                writer.run(segmented_rx, written_tx);
                writer.summary
            })?
        };
        while let Some(result) = written_rx.recv().await {
            if let Err(e) = publisher.publish(&result).await {
                stats.publish_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "publish failed; the outputs are on disk");
            }
        }
        decode.await.map_err(|_| PipelineError::Stage("decode"))?;
        segment.await.map_err(|_| PipelineError::Stage("segment"))?;
        let mut summary = write.await.map_err(|_| PipelineError::Stage("write"))?;
        // Skips happen in the decode stage; the counter is the one record of them.
        summary.skipped = stats.skipped.load(Ordering::Relaxed);
        Ok(summary)
    }
}

/// Runs `f` on a named thread; the receiver yields its result (an error if it panicked).
fn spawn_stage<T: Send + 'static>(
    stage: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<oneshot::Receiver<T>, PipelineError> {
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name(format!("microfed-{stage}"))
        .spawn(move || match catch_unwind(AssertUnwindSafe(f)) {
            Ok(v) => {
                let _ = tx.send(v);
            }
            Err(_) => tracing::error!(stage, "stage panicked; stopping the pipeline"),
        })
        .map_err(|source| PipelineError::Thread { stage, source })?;
    Ok(rx)
}

fn decode_stage(
    mut rx: mpsc::Receiver<Capture>,
    tx: mpsc::Sender<Item>,
    settings: &Settings,
    stats: &Stats,
    journal: &Mutex<Journal>,
    in_flight: &Mutex<HashSet<(String, String)>>,
) {
    while let Some(capture) = rx.blocking_recv() {
        let bytes = match crate::micrograph::read_file(&capture.path) {
            Ok(b) => b,
            Err(e @ crate::micrograph::MicrographError::TooLarge { .. }) => {
                // Never read whole: hashed as a stream for the journal, then quarantined.
                let Ok(sha256) = journal::sha256_file(&capture.path) else {
                    stats.skipped.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let item = Item::Failed {
                    capture,
                    sha256,
                    reason: e.to_string(),
                };
                if tx.blocking_send(item).is_err() {
                    break;
                }
                continue;
            }
            Err(e) => {
                // Gone or unreadable before we got to it (moved away by the user): nothing to do.
                tracing::warn!(file = %capture.path.display(), error = %e, "cannot read; skipped");
                stats.skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        let sha256 = journal::sha256_hex(&bytes);
        let key = (capture.key.clone(), sha256.clone());
        let done = journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_done(&key.0, &key.1);
        if done
            || !in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key)
        {
            tracing::debug!(file = %capture.key, "already processed; skipped");
            stats.skipped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let item = match Micrograph::decode(&bytes, &capture.path, &settings.info.normalisation) {
            Ok(micrograph) => Item::Decoded {
                capture,
                sha256,
                micrograph,
            },
            Err(e) => Item::Failed {
                capture,
                sha256,
                reason: e.to_string(),
            },
        };
        if tx.blocking_send(item).is_err() {
            break;
        }
    }
}

fn segment_stage(
    mut rx: mpsc::Receiver<Item>,
    tx: mpsc::Sender<Item>,
    settings: &Settings,
    slot: &ModelSlot,
) {
    let executor = tiling::executor(settings.threads).unwrap_or_else(|| {
        tracing::warn!(
            threads = settings.threads,
            "cannot start tract's thread pool; running single-threaded"
        );
        tract_linalg::multithread::Executor::SingleThread
    });
    while let Some(item) = rx.blocking_recv() {
        let out = match item {
            Item::Decoded {
                capture,
                sha256,
                micrograph,
            } => {
                // The model is fixed for this image even if a swap happens meanwhile.
                let model = slot.current();
                let result = catch_unwind(AssertUnwindSafe(|| {
                    tiling::segment_logits(
                        &model.segmenter,
                        &micrograph,
                        settings.tile,
                        settings.overlap,
                        settings.batch,
                        &executor,
                    )
                    .and_then(|l| l.to_mask())
                }));
                // The slot keeps the running model's health (the fleet returns to the previous
                // model when a new one keeps failing).
                let outcome = match &result {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(panic) => Err(panic_message(panic)),
                };
                slot.record_outcome(
                    model.generation,
                    outcome.as_ref().map(|_| ()).map_err(String::as_str),
                );
                match result {
                    Ok(Ok(mask)) => Item::Segmented {
                        capture,
                        sha256,
                        micrograph,
                        mask,
                        model: model.label(),
                    },
                    Ok(Err(e)) => Item::Failed {
                        capture,
                        sha256,
                        reason: format!("segmentation failed: {e}"),
                    },
                    Err(panic) => Item::Failed {
                        capture,
                        sha256,
                        reason: format!(
                            "segmentation failed: internal error in the model runtime: {}",
                            panic_message(&panic)
                        ),
                    },
                }
            }
            other => other,
        };
        if tx.blocking_send(out).is_err() {
            break;
        }
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// The write stage: owner of the journal, the features CSV and the quarantine.
struct Writer<'a> {
    settings: &'a Settings,
    stats: &'a Stats,
    journal: &'a Mutex<Journal>,
    in_flight: &'a Mutex<HashSet<(String, String)>>,
    table: FeatureTable,
    summary: Summary,
    retry: Option<mpsc::UnboundedSender<PathBuf>>,
}

impl Writer<'_> {
    fn run(&mut self, mut rx: mpsc::Receiver<Item>, tx: mpsc::Sender<SegmentedImage>) {
        while let Some(item) = rx.blocking_recv() {
            let (key, sha) = match &item {
                Item::Decoded {
                    capture, sha256, ..
                }
                | Item::Segmented {
                    capture, sha256, ..
                }
                | Item::Failed {
                    capture, sha256, ..
                } => (capture.key.clone(), sha256.clone()),
            };
            let published = match item {
                Item::Segmented {
                    capture,
                    sha256,
                    micrograph,
                    mask,
                    model,
                } => match self.write(&capture, &sha256, &micrograph, &mask, &model) {
                    Ok(r) => Some(r),
                    Err(reason) => {
                        // Not the micrograph's fault (a full disk, a removed folder): it is not
                        // quarantined or journalled; the watcher captures it again later (the
                        // agent), or the next start does.
                        self.stats.failed.fetch_add(1, Ordering::Relaxed);
                        self.summary.failed += 1;
                        self.summary
                            .failures
                            .push((capture.key.clone(), reason.clone()));
                        let again = self
                            .retry
                            .as_ref()
                            .is_some_and(|tx| tx.send(capture.path.clone()).is_ok());
                        tracing::error!(
                            file = %capture.key,
                            error = %reason,
                            "cannot write the outputs; the file is left in place{}",
                            if again { " and tried again later" } else { " for the next start" }
                        );
                        None
                    }
                },
                Item::Failed {
                    capture,
                    sha256,
                    reason,
                } => {
                    self.fail(&capture, &sha256, &reason);
                    None
                }
                Item::Decoded {
                    capture, sha256, ..
                } => {
                    self.fail(
                        &capture,
                        &sha256,
                        "internal error: reached the writer unsegmented",
                    );
                    None
                }
            };
            self.in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&(key, sha));
            if let Some(r) = published
                && tx.blocking_send(r).is_err()
            {
                break;
            }
        }
    }

    /// Features, then mask, overlay and JSON (each atomically), the CSV row, and last the journal.
    fn write(
        &mut self,
        capture: &Capture,
        sha256: &str,
        micrograph: &Micrograph,
        mask: &Mask,
        model: &str,
    ) -> Result<SegmentedImage, String> {
        let s = self.settings;
        let info = &s.info;
        let opts = FeatureOptions {
            pixel_size_um: s.pixel_size_um.or(micrograph.pixel_size_um),
            neck_ratio: s.neck_ratio,
            ..FeatureOptions::default()
        };
        let features = match info.feature_kind {
            FeatureKind::Grains => grain_features(
                &capture.key,
                mask,
                info.classes.len(),
                GrainClasses::from_classes(&info.classes),
                &opts,
            ),
            FeatureKind::Phases => {
                let names: Vec<String> = info.classes.iter().map(|c| c.name.clone()).collect();
                phase_features(&capture.key, mask, &names, &opts)
            }
        }
        .map_err(|e| format!("measuring features: {e}"))?;
        let names = OutputNames::for_source(&s.output, &capture.path);
        let e = |e: OutputError| e.to_string();
        let mask_png = outputs::mask_png(mask, &names.mask).map_err(e)?;
        crate::fsio::write_atomic(&names.mask, &mask_png).map_err(|e| e.to_string())?;
        let over = outputs::overlay(&micrograph.unit_pixels(), mask, &info.classes);
        crate::fsio::write_atomic(
            &names.overlay,
            &outputs::rgb_png(&over, &names.overlay).map_err(e)?,
        )
        .map_err(|e| e.to_string())?;
        let json = serde_json::to_string_pretty(&features).map_err(|e| e.to_string())? + "\n";
        crate::fsio::write_atomic(&names.features, json.as_bytes()).map_err(|e| e.to_string())?;
        self.table
            .append(&features.csv_header(), &features.to_csv_row())
            .map_err(e)?;
        let latency = capture.captured_at.elapsed();
        self.journal_entry(Entry {
            file: capture.key.clone(),
            sha256: sha256.to_owned(),
            outcome: Outcome::Segmented,
            at: crate::fsio::now_unix(),
            mask: names
                .mask
                .file_name()
                .map(|n| n.to_string_lossy().into_owned()),
            reason: None,
            model: Some(model.to_owned()),
            latency_ms: Some(latency.as_secs_f64() * 1e3),
        })?;
        self.stats.segmented.fetch_add(1, Ordering::Relaxed);
        self.stats.record_latency(latency);
        self.summary.segmented += 1;
        tracing::info!(
            file = %capture.key,
            latency_ms = (latency.as_secs_f64() * 1e3).round(),
            "segmented"
        );
        Ok(SegmentedImage {
            source: capture.path.clone(),
            key: capture.key.clone(),
            sha256: sha256.to_owned(),
            outputs: names,
            features,
            model: model.to_owned(),
            latency,
        })
    }

    fn journal_entry(&mut self, entry: Entry) -> Result<(), String> {
        self.journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .append(&entry)
            .map_err(|e| e.to_string())
    }

    fn fail(&mut self, capture: &Capture, sha256: &str, reason: &str) {
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        self.summary.failed += 1;
        self.summary
            .failures
            .push((capture.key.clone(), reason.to_owned()));
        match &self.settings.failures {
            FailurePolicy::Report => {
                tracing::warn!(file = %capture.key, reason, "cannot segment");
            }
            FailurePolicy::Quarantine(dir) => match outputs::quarantine(&capture.path, dir, reason)
            {
                Ok(to) => {
                    self.stats.quarantined.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(file = %capture.key, quarantined = %to.display(), reason, "cannot segment; quarantined");
                    let entry = Entry {
                        file: capture.key.clone(),
                        sha256: sha256.to_owned(),
                        outcome: Outcome::Quarantined,
                        at: crate::fsio::now_unix(),
                        mask: None,
                        reason: Some(reason.to_owned()),
                        model: None,
                        latency_ms: None,
                    };
                    if let Err(e) = self.journal_entry(entry) {
                        tracing::error!(error = %e, "cannot journal a quarantined file");
                    }
                }
                Err(e) => tracing::error!(
                    file = %capture.key,
                    reason,
                    error = %e,
                    "cannot segment, and cannot quarantine it either; left in place"
                ),
            },
        }
    }
}

/// The agent: a watched folder feeding a [`Pipeline`], the model file watched for replacements, and
/// a status line.
#[derive(Debug)]
pub struct Agent {
    config: PipelineConfig,
    pipeline: Pipeline,
}

impl Agent {
    /// Validates the configuration, loads and prepares the model, opens the journal. Blocking (tract
    /// optimises the model here): call it before the runtime starts or from a blocking thread.
    pub fn new(config: PipelineConfig) -> Result<Self, PipelineError> {
        config.validate()?;
        // Where the network runs is decided once per process (every later model — a new global
        // decoder, a fleet version — runs there too), with the reason logged.
        let choice = crate::model::runtime::select_engine(config.model.device)?;
        if !crate::model::runtime::set_process_engine(choice.engine) {
            tracing::debug!("the inference engine was already chosen for this process");
        }
        crate::model::runtime::set_process_engine_kind(
            config.model.engine,
            resolve_threads(config.model.threads),
        );
        crate::model::runtime::set_process_precision(config.model.precision);
        let segmenter = Segmenter::load(&config.model.path)?;
        let settings = Settings::from_config(&config, &segmenter)?;
        tracing::info!(
            device = segmenter.engine().name(),
            engine = segmenter.engine_name(),
            engine_reason = segmenter.engine_reason(),
            reason = %choice.reason,
            threads = settings.threads,
            model = %config.model.path.display(),
            classes = settings.info.classes.len(),
            features = ?settings.info.feature_kind,
            "model loaded"
        );
        segmenter.prepare(
            settings.batch,
            settings.tile,
            settings.tile,
            Outputs::Logits,
        )?;
        std::fs::create_dir_all(&config.folders.watch).map_err(|source| PipelineError::Folder {
            path: config.folders.watch.clone(),
            source,
        })?;
        let pipeline = Pipeline::new(settings, ModelSlot::new(segmenter))?;
        Ok(Self { config, pipeline })
    }

    /// The pipeline's settings (classes, normalisation, batch, tile).
    pub fn settings(&self) -> &Settings {
        self.pipeline.settings()
    }

    /// The swappable model (for federated rounds, the fleet, and tests).
    pub fn model_slot(&self) -> ModelSlot {
        self.pipeline.slot()
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.pipeline.stats()
    }

    /// Runs until `shutdown` completes, then drains: everything captured is written and journalled.
    pub async fn run<P: Publisher>(
        self,
        publisher: P,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<Summary, PipelineError> {
        let Self {
            config,
            mut pipeline,
        } = self;
        let stats = pipeline.stats();
        let slot = pipeline.slot();
        let (stop_tx, stop_rx) = watch::channel(false);
        let (capture_tx, capture_rx) = mpsc::channel(config.queues.captured);
        let retries = capture::Retries {
            paths: pipeline.send_back_failed_writes(),
            after: config.capture.retry_after(),
        };
        let mut watcher = tokio::spawn(capture::watch_folder(
            config.folders.watch.clone(),
            capture::CaptureFilter::new(&config.capture.extensions),
            config.capture.settle(),
            capture_tx,
            stop_rx.clone(),
            stats.clone(),
            retries,
        ));
        let model_watch = config.model.reload_on_change.then(|| {
            tokio::spawn(watch_model_file(
                config.model.path.clone(),
                config.capture.settle(),
                slot,
                pipeline.settings().clone(),
                stop_rx.clone(),
            ))
        });
        let status = (config.status.interval_s > 0).then(|| {
            tokio::spawn(status_lines(
                stats.clone(),
                Duration::from_secs(config.status.interval_s),
                stop_rx.clone(),
            ))
        });
        let pipeline = tokio::spawn(pipeline.run(capture_rx, publisher));

        // Stop on the shutdown signal, or when the watcher gives up (then report why).
        let watcher_result = tokio::select! {
            _ = shutdown => {
                tracing::info!("shutting down: finishing the micrographs already captured");
                let _ = stop_tx.send(true);
                (&mut watcher).await
            }
            r = &mut watcher => {
                let _ = stop_tx.send(true);
                r
            }
        };
        let summary = pipeline
            .await
            .map_err(|_| PipelineError::Stage("pipeline"))?;
        for task in [model_watch, status].into_iter().flatten() {
            let _ = task.await;
        }
        watcher_result.map_err(|_| PipelineError::Stage("capture"))??;
        let summary = summary?;
        tracing::info!(status = %stats.status(), "stopped");
        Ok(summary)
    }
}

async fn status_lines(stats: Arc<Stats>, every: Duration, mut stop: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(every);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ticker.tick() => tracing::info!(status = %stats.status(), "status"),
            _ = stop.changed() => break,
        }
    }
}

/// Watches the model file and swaps a new model in once the file has been quiet for `settle`.
/// A file that does not load, or predicts another number of classes, is logged and ignored.
async fn watch_model_file(
    path: PathBuf,
    settle: Duration,
    slot: ModelSlot,
    settings: Settings,
    mut stop: watch::Receiver<bool>,
) {
    use notify::Watcher;
    let Some(dir) = path.parent().map(Path::to_owned) else {
        return;
    };
    let name = path.file_name().map(|n| n.to_owned());
    let (tx, mut rx) = mpsc::channel::<()>(64);
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res
            && !matches!(ev.kind, notify::EventKind::Access(_))
            && ev.paths.iter().any(|p| p.file_name() == name.as_deref())
        {
            let _ = tx.try_send(());
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the model file; swaps only through the model slot");
            return;
        }
    };
    if let Err(e) = watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
        tracing::warn!(folder = %dir.display(), error = %e, "cannot watch the model's folder");
        return;
    }
    let mut current = std::fs::read(&path)
        .map(|b| journal::sha256_hex(&b))
        .unwrap_or_default();
    let mut changed: Option<Instant> = None;
    let mut ticker = tokio::time::interval(
        (settle / 4).clamp(Duration::from_millis(10), Duration::from_millis(250)),
    );
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            Some(()) = rx.recv() => changed = Some(Instant::now()),
            _ = ticker.tick() => {}
        }
        let Some(t) = changed else { continue };
        if t.elapsed() < settle {
            continue;
        }
        changed = None;
        let (p, s) = (path.clone(), settings.clone());
        let loaded = tokio::task::spawn_blocking(move || -> Result<(String, Segmenter), String> {
            let bytes = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            let sha = journal::sha256_hex(&bytes);
            let seg = Segmenter::load(&p).map_err(|e| e.to_string())?;
            seg.prepare(s.batch, s.tile, s.tile, Outputs::Logits)
                .map_err(|e| e.to_string())?;
            Ok((sha, seg))
        })
        .await;
        match loaded {
            Ok(Ok((sha, _))) if sha == current => {}
            Ok(Ok((sha, seg))) => match slot.swap(seg) {
                Ok(_) => current = sha,
                Err(e) => tracing::error!(error = %e, "model file changed"),
            },
            Ok(Err(e)) => {
                tracing::error!(error = %e, "model file changed but cannot be loaded; keeping the running model")
            }
            Err(_) => tracing::error!("model loader stopped unexpectedly"),
        }
    }
}
