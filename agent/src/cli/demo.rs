//! `microfed demo`: broker, aggregator and one agent per lab in one command (see [`crate::demo`]).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::demo::{self, DemoConfig};

/// Run the whole product on this machine: labs of synthetic micrographs (and real SEM images when
/// nasa-super is present) segmented as they are captured, with federated rounds between the labs.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  cargo run --release -- demo
  microfed demo --out /tmp/demo --labs 4 --rounds 8
  microfed demo --quick              (the CI configuration: 2 labs, 2 rounds, tiny images)
  microfed demo --quick --hold 600   (then open the console address it prints)

Output (printed at the start and the end): per lab LAB/segmented/ (masks, overlays, features JSON,
features.csv), rounds.csv, iou-per-round.png and report.md.")]
pub struct Args {
    /// Output folder; a previous demo's output there is replaced.
    #[arg(long, value_name = "DIR", default_value = "demo-out")]
    pub out: PathBuf,
    /// Synthetic labs (1..=5), one imaging style each.
    #[arg(long)]
    pub labs: Option<usize>,
    /// Federated rounds.
    #[arg(long)]
    pub rounds: Option<u64>,
    /// Micrographs captured per synthetic lab.
    #[arg(long)]
    pub captures: Option<usize>,
    /// The CI configuration: 2 labs, 2 rounds, 3 captures of 96 px, 2 training steps per round.
    #[arg(long)]
    pub quick: bool,
    /// nasa-super (real SEM micrographs) to segment as one more lab; default: MICROFED_NASA_SUPER,
    /// else ../shared/data/nasa-super beside the repository, when present.
    #[arg(long, value_name = "DIR", conflicts_with = "no_real")]
    pub real: Option<PathBuf>,
    /// Leave the real SEM images out even when they are present.
    #[arg(long)]
    pub no_real: bool,
    /// Folder with grains/ and precipitates/ (default: ./models, else the source tree's models/).
    #[arg(long, value_name = "DIR")]
    pub models: Option<PathBuf>,
    /// Give up after this many seconds (default: 300 with --quick, else 1800).
    #[arg(long, value_name = "S")]
    pub timeout: Option<u64>,
    /// Where the live console listens (default: a free port on 127.0.0.1; printed at start).
    #[arg(long, value_name = "ADDR", conflicts_with = "no_console")]
    pub console: Option<std::net::SocketAddr>,
    /// Run without the live console.
    #[arg(long)]
    pub no_console: bool,
    /// Keep everything running this many seconds after the last round (to look at the console).
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub hold: u64,
    /// Run every round with secure aggregation: the aggregator merges the sum of the labs'
    /// masked updates and never sees one (docs/privacy.md).
    #[arg(long)]
    pub secure: bool,
    /// Steps of each lab's fine-tune of every new global (the better of the two on its hold-out
    /// goes live); 0 turns it off. Default: 40 (2 with --quick).
    #[arg(long, value_name = "N")]
    pub personalise_steps: Option<u32>,
    /// Labs publish Fourier style codes and train on crops re-styled with each other's (on by
    /// default only with --quick: with the shipped base they cost the other labs 1–3 points).
    #[arg(long)]
    pub style_codes: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let models = args.models.unwrap_or_else(demo::default_models);
    let mut cfg = if args.quick {
        DemoConfig::quick(args.out, models.clone())
    } else {
        DemoConfig::full(args.out, models.clone())
    };
    if let Some(n) = args.labs {
        cfg.labs = n;
    }
    if let Some(n) = args.rounds {
        cfg.rounds = n;
    }
    if let Some(n) = args.captures {
        cfg.captures = n;
    }
    if let Some(s) = args.timeout {
        cfg.timeout = Duration::from_secs(s);
    }
    if args.no_console {
        cfg.console = None;
    } else if let Some(a) = args.console {
        anyhow::ensure!(
            a.ip().is_loopback(),
            "--console {a}: the demo's console serves loopback only (`microfed console` with a \
             token and TLS serves a network)"
        );
        cfg.console = Some(a);
    }
    cfg.hold = Duration::from_secs(args.hold);
    cfg.secure = args.secure;
    cfg.style_codes |= args.style_codes;
    if let Some(n) = args.personalise_steps {
        cfg.personalise_steps = n;
    }
    cfg.real = match (args.no_real, args.real) {
        (true, _) => None,
        (false, Some(dir)) => {
            anyhow::ensure!(
                dir.join("images").is_dir(),
                "--real {}: no images/ folder there",
                dir.display()
            );
            Some(dir)
        }
        (false, None) => demo::default_real(&models),
    };
    let shown = std::path::absolute(&cfg.out).unwrap_or_else(|_| cfg.out.clone());
    println!("microfed demo: outputs go to {}", shown.display());
    let outcome = demo::run(&cfg, &mut |line| println!("{line}")).context("microfed demo")?;
    println!();
    for l in &outcome.labs {
        println!(
            "{}: {} of {} captures segmented{} -> {}",
            l.name,
            l.captures.segmented,
            l.captures.captures,
            l.captures
                .mean_iou
                .map(|v| format!(", mean IoU {v:.3} against the truth"))
                .unwrap_or_default(),
            l.output.display()
        );
    }
    let federated: Vec<String> = outcome
        .labs
        .iter()
        .filter(|l| l.federated)
        .map(|l| l.name.clone())
        .collect();
    for g in demo::report::federation_gains(&outcome.rows, &federated, &outcome.finals) {
        let change = g.change();
        match (g.first, g.last_start, g.final_global, change) {
            (Some(a), Some(b), Some(f), Some(c)) => println!(
                "{}: hold-out IoU of the global decoder {a:.3} at round 1, {b:.3} at the last round's start, {f:.3} for the final global ({c:+.1} points)",
                g.lab,
            ),
            (Some(a), Some(b), None, Some(c)) => println!(
                "{}: hold-out IoU of the global decoder {a:.3} at round 1, {b:.3} at the last round's start ({c:+.1} points; the final global was not scored)",
                g.lab,
            ),
            _ => {}
        }
    }
    for l in &outcome.labs {
        if let Some(e) = demo::report::grain_count_error(&l.grain_counts) {
            let (m, t): (Vec<f64>, Vec<f64>) = l
                .grain_counts
                .iter()
                .filter_map(|c| Some((c.measured?, f64::from(c.truth?))))
                .unzip();
            println!(
                "{}: {:.1} grains per capture measured, {:.1} in the truth (mean error {e:.1} %)",
                l.name,
                m.iter().sum::<f64>() / m.len() as f64,
                t.iter().sum::<f64>() / t.len() as f64
            );
        }
    }
    if let Some(url) = &outcome.console {
        println!("the console ran at {url} (stopped with the demo)");
    }
    println!(
        "done in {:.1} s. Report: {}\nOutputs in {}",
        outcome.seconds,
        outcome.report.display(),
        shown.display()
    );
    Ok(())
}
