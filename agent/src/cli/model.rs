//! `microfed model check FILE.onnx`: does an ONNX file meet the microfed U-Net contract?
//!
//! Prints what it found (classes, parameter counts, opset) or every mismatch at once, so that a user who
//! exports a U-Net from PyTorch can fix all of them in one go (see `models/README.md`). With
//! `--run`, it also runs the model once through tract on a blank 64×64 image, which catches graphs that
//! parse but cannot execute.

use std::path::PathBuf;

use anyhow::Context;

use crate::model::{onnx, runtime::Segmenter};

/// Inspect segmentation models.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: ModelCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum ModelCommand {
    /// Check an ONNX file against the contract: input `image` [N,1,H,W], output `logits` [N,K,H,W], skip
    /// features `enc0`…`enc4`, decoder weights `decoder.*` with the reference shapes.
    #[command(after_help = "Example:\n  microfed model check models/grains/model.onnx --run")]
    Check(CheckArgs),
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The ONNX file.
    pub file: PathBuf,
    /// Also run the model once with tract on a 64×64 input.
    #[arg(long)]
    pub run: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        ModelCommand::Check(a) => check(a),
    }
}

fn check(args: CheckArgs) -> anyhow::Result<()> {
    let report = onnx::check_contract(&args.file)?;
    println!("{}: meets the microfed U-Net contract", args.file.display());
    println!("  classes (K)          {}", report.num_classes);
    println!("  encoder parameters   {}", report.encoder_parameters);
    println!("  decoder parameters   {}", report.decoder_parameters);
    println!("  opset                {}", report.opset);
    if args.run {
        let seg = Segmenter::load(&args.file)?;
        let logits = seg
            .logits(&vec![0.0; 64 * 64], 1, 64, 64)
            .with_context(|| format!("running {} with tract", args.file.display()))?;
        anyhow::ensure!(
            logits.iter().all(|v| v.is_finite()),
            "{}: tract produced non-finite logits",
            args.file.display()
        );
        println!(
            "  tract run            ok ([1, {}, 64, 64] logits, all finite)",
            seg.classes()
        );
    }
    Ok(())
}
