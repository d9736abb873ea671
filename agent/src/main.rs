// TEMPORARY wiring for the synth helper's worktree; the main agent wires the real CLI.
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "microfed", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Synth(microfed::cli::synth::Args),
}

fn main() -> anyhow::Result<()> {
    microfed::telemetry::init(microfed::telemetry::LogFormat::Human);
    match Cli::parse().command {
        Command::Synth(args) => microfed::cli::synth::run(args),
    }
}
