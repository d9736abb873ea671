//! `microfed console`: the operator's live page of a fleet (see [`crate::console`]).

use std::path::PathBuf;

use anyhow::Context;

use crate::console::{self, ConsoleConfig};

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  microfed console --config console.toml
  microfed console --example-config > console.toml

The page (devices online/offline, rounds, hold-out IoU per lab, model versions) updates live; /metrics
has the console's own counters. Everything is served from the binary: no asset from the internet.")]
pub struct Args {
    /// The console's configuration (TOML).
    #[arg(long, value_name = "FILE", required_unless_present = "example_config")]
    pub config: Option<PathBuf>,
    /// Print a commented example configuration and exit.
    #[arg(long)]
    pub example_config: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.example_config {
        print!("{}", console::EXAMPLE_CONFIG);
        return Ok(());
    }
    let path = args.config.context("--config is required")?;
    let cfg = ConsoleConfig::load(&path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (addr, task) = console::start(&cfg, stop_rx).await?;
        let scheme = if cfg.web.tls.is_some() {
            "https"
        } else {
            "http"
        };
        println!("console on {scheme}://{addr}/");
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            let _ = stop_tx.send(true);
        });
        task.await.context("the console task")?;
        anyhow::Ok(())
    })
}
