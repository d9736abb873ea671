//! The `microfed` command line: one clap-derived `Args` struct and one `run` function per subcommand,
//! each in its own file here. `main` parses, sets up logging, and calls [`run`].

use clap::{Parser, Subcommand};

use crate::telemetry::LogFormat;

pub mod agent;
pub mod aggregate;
pub mod console;
pub mod dataset;
pub mod demo;
pub mod eval;
pub mod experiment;
pub mod features;
pub mod finetune;
pub mod fleet;
pub mod model;
pub mod pretrain;
pub mod segment;
pub mod synth;

/// microfed: federated segmentation of material micrographs.
///
/// Labs train one segmentation model together without any image leaving the lab. This tool makes
/// labelled synthetic micrographs, checks datasets, scores predicted masks and measures microstructures.
#[derive(Debug, Parser)]
#[command(
    name = "microfed",
    version,
    propagate_version = true,
    max_term_width = 100
)]
#[command(after_help = "Examples:
  microfed demo
  microfed synth --structure polycrystal --style sem-se --count 8 --size 512 --seed 1 --out data/sem-se
  microfed dataset check data/sem-se
  microfed dataset import ~/lab/annotated --out data/ours
  microfed finetune --data data/ours --from models/precipitates --out models/ours
  microfed features data/sem-se/masks/*.png --pixel-size 0.25
  microfed eval --pred predicted/ --truth data/sem-se/masks
  microfed model check models/grains/model.onnx
  microfed segment images/ --model models/grains --out segmented/
  microfed agent --config agent.toml
  microfed aggregate --config aggregator.toml
  microfed console --config console.toml
  microfed fleet push models/grains --to all --key fleet.key --config fleet.toml

Logs: RUST_LOG=debug for more detail; --log-format json for log collectors.")]
pub struct Cli {
    /// How log lines are written to stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate labelled synthetic micrographs in the imaging style of a lab.
    Synth(synth::Args),
    /// Work with datasets (folders of images/, masks/ and dataset.toml).
    Dataset(dataset::Args),
    /// Score predicted masks against the truth: IoU, Dice, pixel accuracy, boundary F1.
    Eval(eval::Args),
    /// Measure microstructure figures from masks: grain size, ASTM E112 number, phase fractions.
    Features(features::Args),
    /// Inspect segmentation models (ONNX): does a file meet the microfed U-Net contract?
    Model(model::Args),
    /// Train the reference U-Net on labelled datasets (a base model): model.onnx + manifest.toml.
    Pretrain(pretrain::Args),
    /// Fine-tune a model on your own labelled micrographs (defaults for a new material, before/after).
    Finetune(finetune::Args),
    /// Segment micrographs: files or folders, with a progress bar.
    Segment(segment::Args),
    /// Run the agent: watch the microscope's folder and segment every micrograph as it is captured.
    Agent(agent::Args),
    /// Run federated rounds for a fleet: announce, collect the labs' updates, publish the new decoder.
    Aggregate(aggregate::Args),
    /// The operator's live web page of the fleet and its rounds (read-only MQTT client).
    Console(console::Args),
    /// Fleet model versions: sign and push base models, roll back, show every device's status.
    Fleet(fleet::Args),
    /// Compare federation strategies, compression and aggregation in-process (no broker).
    Experiment(experiment::Args),
    /// The whole product on this machine: broker, aggregator and labs, with federated rounds.
    Demo(demo::Args),
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Synth(args) => synth::run(args),
        Command::Dataset(args) => dataset::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Features(args) => features::run(args),
        Command::Model(args) => model::run(args),
        Command::Pretrain(args) => pretrain::run(args),
        Command::Finetune(args) => finetune::run(args),
        Command::Segment(args) => segment::run(args),
        Command::Agent(args) => agent::run(args),
        Command::Aggregate(args) => aggregate::run(args),
        Command::Console(args) => console::run(args),
        Command::Experiment(args) => experiment::run(args),
        Command::Fleet(args) => fleet::run(args),
        Command::Demo(args) => demo::run(args),
    }
}
