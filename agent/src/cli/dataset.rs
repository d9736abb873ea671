//! `microfed dataset`: work with dataset folders.
//!
//! `microfed dataset check DIR [--classes FILE]` decodes every image and mask of `DIR` and prints
//! EVERY problem found (missing or orphan masks, duplicate stems, unreadable files, size mismatches,
//! class indices out of range), then a summary with the share of each class. It exits non-zero when
//! there is any problem, so it can guard a training script:
//!
//! ```text
//! microfed dataset check /data/nasa-super --classes nasa-classes.toml && microfed train ...
//! ```

use std::path::PathBuf;

use anyhow::bail;

use crate::dataset::Dataset;

/// Inspect dataset folders (`DIR/images`, `DIR/masks`, `DIR/dataset.toml`).
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: DatasetCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum DatasetCommand {
    /// Validate every file of a dataset folder and list all problems at once.
    Check(CheckArgs),
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The dataset folder, holding `images/` and `masks/` with matching file stems.
    pub dir: PathBuf,
    /// Classes file (same form as `dataset.toml`) to use instead of `DIR/dataset.toml`, e.g. for a
    /// read-only folder that has none.
    #[arg(long, value_name = "FILE")]
    pub classes: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        DatasetCommand::Check(a) => check(a),
    }
}

fn check(args: CheckArgs) -> anyhow::Result<()> {
    let report = Dataset::check(&args.dir, args.classes.as_deref());
    for p in &report.problems {
        println!("problem: {p}");
    }
    for s in &report.skipped {
        println!("skipped (not an image): {}", s.display());
    }
    println!(
        "{}: {} image/mask pair(s), {} problem(s)",
        args.dir.display(),
        report.pairs.len(),
        report.problems.len()
    );
    if let (Some(m), Some(shares)) = (&report.manifest, report.class_shares()) {
        println!("class shares of labelled pixels:");
        for (c, share) in m.classes.iter().zip(shares) {
            println!("  {:>3}  {:<32} {:>7.4}", c.index, c.name, share);
        }
        let ignored = report.class_pixels[usize::from(crate::dataset::IGNORE)];
        if ignored > 0 {
            println!("  ignored (255): {ignored} pixel(s)");
        }
    }
    if !report.is_ok() {
        bail!(
            "{} problem(s) in dataset {}",
            report.problems.len(),
            args.dir.display()
        );
    }
    Ok(())
}
