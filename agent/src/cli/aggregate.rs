//! `microfed aggregate`: run federated rounds for a fleet (see [`crate::federated::server::aggregator`]).

use std::path::PathBuf;

use anyhow::Context;

use crate::federated::server::aggregator::{self, Aggregator, AggregatorConfig};
use crate::federated::server::scaleout::{self, Role};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example configuration (commented): `microfed aggregate --example-config`.

With no [broker] section the embedded broker (rumqttd) starts on loopback and its port is printed:
agents on the same machine connect to it. A fleet uses a real broker (broker-config/).

Scale-out: with [scale_out] role = \"worker\" the process only sums its share of the updates for the
coordinator (role = \"coordinator\"), which runs the rounds (docs/architecture.md)."
)]
pub struct Args {
    /// The aggregator's configuration (TOML).
    #[arg(long, value_name = "FILE", required_unless_present = "example_config")]
    pub config: Option<PathBuf>,
    /// Print a commented example configuration and exit.
    #[arg(long)]
    pub example_config: bool,
}

pub const EXAMPLE_CONFIG: &str = include_str!("../../aggregator.example.toml");

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.example_config {
        print!("{EXAMPLE_CONFIG}");
        return Ok(());
    }
    let path = args.config.context("--config is required")?;
    let cfg = AggregatorConfig::load(&path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let state = runtime.block_on(async {
        let agg = Aggregator::open(cfg.clone())
            .with_context(|| format!("opening the aggregator state in {}", cfg.state.display()))?;
        let (link, inbox, settings) = aggregator::connect(&cfg)?;
        if cfg.broker.is_none() {
            println!(
                "embedded broker listening on {}:{}",
                settings.host, settings.port
            );
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        if let Some(m) = &cfg.metrics {
            let site = crate::web::MetricsSite {
                sources: vec![agg.metrics()],
            };
            let (addr, _) =
                crate::web::start("metrics", m, std::sync::Arc::new(site), stop_rx.clone())
                    .await
                    .context("[metrics]")?;
            let scheme = if m.tls.is_some() { "https" } else { "http" };
            println!("metrics on {scheme}://{addr}/metrics");
            tracing::info!(%addr, "serving /metrics");
        }
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("stopping after the current step");
            let _ = stop_tx.send(true);
        });
        let state = match cfg.scale_out.as_ref().map(|s| s.role) {
            None => agg.run(&link, inbox, stop_rx).await?,
            Some(Role::Coordinator) => {
                scaleout::run_coordinator(agg, &link, inbox, stop_rx).await?
            }
            Some(Role::Worker) => scaleout::run_worker(agg, &link, inbox, stop_rx).await?,
        };
        link.disconnect().await;
        anyhow::Ok(state)
    })?;
    if cfg.scale_out.as_ref().map(|s| s.role) == Some(Role::Worker) {
        // A worker keeps no history: the coordinator's summaries are the record.
        println!(
            "worker {}: round {}, {} updates summed here ({}), rejected {:?}",
            cfg.id,
            state.round,
            state.accepted.len(),
            state.accepted.keys().cloned().collect::<Vec<_>>().join(" "),
            state.rejected
        );
        return Ok(());
    }
    println!("| round | global version | accepted | stragglers | rejected | update bytes | s |");
    println!("|---|---|---|---|---|---|---|");
    for s in &state.history {
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.1} |",
            s.round,
            s.global_version,
            s.accepted.join(" "),
            s.stragglers.join(" "),
            s.rejected
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" "),
            s.update_bytes,
            s.seconds
        );
    }
    Ok(())
}
