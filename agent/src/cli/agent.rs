//! `microfed agent --config agent.toml`: segment every micrograph as the microscope writes it.
//!
//! The binary side is thin: read and validate the configuration, load the model, start a tokio
//! runtime, and run the lab's [`Node`] (the pipeline and, when configured, federated rounds and the fleet
//! task) until SIGINT or SIGTERM. The first signal drains the
//! pipeline (everything captured is written and journalled, exit status 0); a second one exits at
//! once (status 130), which is safe too: unjournalled files are processed again at the next start.

use std::path::PathBuf;

use anyhow::Context;

use crate::node::{AgentConfig, Node};

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
    let node = Node::prepare(config)
        .with_context(|| format!("starting the agent ({})", path.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        // The async side only watches files and moves messages; the heavy stages have their own threads.
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let summary = runtime.block_on(async {
        // Listen before anything runs, so that a SIGTERM during start-up drains instead of killing.
        let signals = Signals::new();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            signals.shutdown().await;
            let _ = stop_tx.send(true);
        });
        node.run(stop_rx).await
    })?;
    tracing::info!(
        segmented = summary.segmented,
        failed = summary.failed,
        skipped = summary.skipped,
        "agent stopped"
    );
    Ok(())
}

/// SIGINT and SIGTERM, registered when created.
struct Signals {
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let listen = |kind: SignalKind| {
                signal(kind)
                    .inspect_err(
                        |e| tracing::warn!(error = %e, ?kind, "cannot listen for a signal"),
                    )
                    .ok()
            };
            Self {
                interrupt: listen(SignalKind::interrupt()),
                terminate: listen(SignalKind::terminate()),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        match (&mut self.interrupt, &mut self.terminate) {
            (Some(i), Some(t)) => {
                tokio::select! {
                    _ = i.recv() => {}
                    _ = t.recv() => {}
                }
            }
            (Some(i), None) => {
                i.recv().await;
            }
            (None, Some(t)) => {
                t.recv().await;
            }
            (None, None) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }

    /// Completes on the first signal; a second one ends the process at once.
    async fn shutdown(mut self) {
        self.next().await;
        tokio::spawn(async move {
            self.next().await;
            eprintln!(
                "second signal: exiting without draining (unjournalled files are redone at the next start)"
            );
            std::process::exit(130);
        });
    }
}
