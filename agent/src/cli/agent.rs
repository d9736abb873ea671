//! `microfed agent --config agent.toml`: segment every micrograph as the microscope writes it.
//!
//! The binary side is thin: read and validate the configuration, load the model, start a tokio
//! runtime, and run [`crate::pipeline::Agent`] until SIGINT or SIGTERM. The first signal drains the
//! pipeline (everything captured is written and journalled, exit status 0); a second one exits at
//! once (status 130), which is safe too: unjournalled files are processed again at the next start.

use std::path::PathBuf;

use anyhow::Context;

use crate::pipeline::{Agent, AgentConfig, LogPublisher};

/// Watch a folder and segment every micrograph written into it.
#[derive(Debug, clap::Args)]
#[command(after_help = "Example configuration (commented): `microfed agent --example-config`.")]
pub struct Args {
    /// The agent configuration (TOML).
    #[arg(long, value_name = "FILE", required_unless_present = "example_config")]
    pub config: Option<PathBuf>,
    /// Print a commented example configuration and exit.
    #[arg(long)]
    pub example_config: bool,
}

/// The commented example shipped as `agent/agent.example.toml`.
pub const EXAMPLE_CONFIG: &str = include_str!("../../agent.example.toml");

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.example_config {
        print!("{EXAMPLE_CONFIG}");
        return Ok(());
    }
    let path = args.config.context("--config is required")?;
    let config = AgentConfig::load(&path)?;
    let agent =
        Agent::new(config).with_context(|| format!("starting the agent ({})", path.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        // The async side only watches files and moves messages; the heavy stages have their own threads.
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let summary = runtime.block_on(agent.run(LogPublisher, shutdown_signal()))?;
    tracing::info!(
        segmented = summary.segmented,
        failed = summary.failed,
        skipped = summary.skipped,
        "agent stopped"
    );
    Ok(())
}

/// Completes on the first SIGINT or SIGTERM; a second signal ends the process at once.
async fn shutdown_signal() {
    wait_for_signal().await;
    tokio::spawn(async {
        wait_for_signal().await;
        eprintln!(
            "second signal: exiting without draining (unjournalled files are redone at the next start)"
        );
        std::process::exit(130);
    });
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the agent");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
