//! `microfed dataset`: work with dataset folders.
//!
//! `microfed dataset import SRC --out DIR` writes a lab's folder out as a dataset folder (see
//! [`crate::dataset::import`]).
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
use crate::dataset::import::{ImportOptions, import};

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
    /// Convert a lab's labelled folder into a dataset folder: images and masks paired by stem in the
    /// common layouts (images/ + masks/, train/ + train_annot/, NAME + NAME_mask or NAME_label),
    /// colour, RGBA and palette masks mapped to class indices through the classes' colours, 16-bit
    /// index masks; writes OUT/images, OUT/masks (class-index PNGs) and OUT/dataset.toml.
    #[command(after_help = "\
Examples:
  microfed dataset import ~/lab/annotated --classes classes.toml --out data/ours
  microfed dataset import ~/lab/annotated --out data/ours   # classes made from the mask colours

Classes file (color is optional: a default palette; give it for colour masks):
  [[classes]]
  index = 0
  name = \"matrix\"
  color = [0, 0, 0]")]
    Import(ImportArgs),
}

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The lab's folder of images and masks.
    pub src: PathBuf,
    /// Output dataset folder.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Classes file (dataset.toml form); default: SRC/dataset.toml, else made from the masks.
    #[arg(long, value_name = "FILE")]
    pub classes: Option<PathBuf>,
    /// Largest per-channel difference between a mask colour and its class colour (default 24).
    #[arg(long, value_name = "0-255")]
    pub tolerance: Option<u8>,
    /// Dataset name (default: SRC's folder name).
    #[arg(long)]
    pub name: Option<String>,
    /// Write colours that match no class as ignore (255) instead of refusing.
    #[arg(long)]
    pub ignore_unmapped: bool,
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The dataset folder, holding `images/` and `masks/` with matching file stems (or any layout
    /// `import` reads; colour masks are read through the classes' colours).
    pub dir: PathBuf,
    /// Classes file (same form as `dataset.toml`) to use instead of `DIR/dataset.toml`, e.g. for a
    /// read-only folder that has none.
    #[arg(long, value_name = "FILE")]
    pub classes: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        DatasetCommand::Check(a) => check(a),
        DatasetCommand::Import(a) => import_folder(a),
    }
}

fn import_folder(args: ImportArgs) -> anyhow::Result<()> {
    let opts = ImportOptions {
        classes: args.classes,
        tolerance: args.tolerance,
        name: args.name,
        ignore_unmapped: args.ignore_unmapped,
    };
    let r = import(&args.src, &args.out, &opts)?;
    for p in &r.images_without_mask {
        println!("no mask, not imported: {}", p.display());
    }
    for p in &r.masks_without_image {
        println!("no image, not imported: {}", p.display());
    }
    for (enc, n) in &r.encodings {
        println!("{n} mask(s): {enc}");
    }
    if r.transparent > 0 {
        println!(
            "{} transparent pixel(s) written as ignore (255)",
            r.transparent
        );
    }
    for (c, n) in &r.unmapped {
        println!("unmapped colour {c:?}: {n} pixel(s) written as ignore (255)");
    }
    if r.classes_inferred {
        println!(
            "classes made from the masks (rename them in {}):",
            args.out.join("dataset.toml").display()
        );
    }
    let total: u64 = r.class_pixels.iter().sum::<u64>().max(1);
    for (c, n) in r.manifest.classes.iter().zip(&r.class_pixels) {
        println!(
            "  {:>3}  {:<32} {:?}  {:>7.4}",
            c.index,
            c.name,
            c.color,
            *n as f64 / total as f64
        );
    }
    println!(
        "{}: {} image/mask pair(s) imported into {}",
        args.src.display(),
        r.pairs.len(),
        args.out.display()
    );
    Ok(())
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
