//! `microfed agent --config agent.toml`: segment every micrograph as the microscope writes it.
//!
//! The binary side is thin: read and validate the configuration, load the model, start a tokio
//! runtime, and run [`crate::pipeline::Agent`] until SIGINT or SIGTERM. The first signal drains the
//! pipeline (everything captured is written and journalled, exit status 0); a second one exits at
//! once (status 130), which is safe too: unjournalled files are processed again at the next start.

use std::path::PathBuf;

use anyhow::Context;

use crate::federated::device::{DeviceLink, MqttPublisher, Routes};
use crate::fleet::device::{DeviceSettings, FleetDevice, PipelineShape};
use crate::fleet::signing::TrustedKeys;
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
    let mut config = AgentConfig::load(&path)?;
    // With a fleet, the model that runs is the store's current version (what the fleet installed
    // last survives a restart); the configured model is adopted as the store's first version.
    let fleet_store = match config
        .federation
        .as_ref()
        .and_then(|f| Some((f, f.fleet_models.as_ref()?)))
    {
        Some((f, fleet)) => {
            let (store, running) = crate::fleet::open_store(f, fleet, &config.model.path)
                .context("opening the fleet's model store")?;
            if running != config.model.path {
                tracing::info!(model = %running.display(), "running the fleet's current model version");
            }
            config.model.path = running;
            // The fleet owns model changes: a file watcher on a store folder would only see versions
            // being pruned.
            config.model.reload_on_change = false;
            Some(store)
        }
        None => None,
    };
    let federation = config.federation.clone();
    let model_path = config.model.path.clone();
    let agent = Agent::new(config.clone())
        .with_context(|| format!("starting the agent ({})", path.display()))?;
    let fleet_holdout = match (&federation, &fleet_store) {
        (Some(f), Some(_)) => Some(
            crate::fleet::load_holdout(f, &agent.settings().info.normalisation)
                .context("loading the hold-out that new model versions are scored on")?,
        ),
        _ => None,
    };
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
        let shutdown = async move {
            signals.shutdown().await;
            let _ = stop_tx.send(true);
        };
        let Some(f) = federation else {
            return anyhow::Ok(agent.run(LogPublisher, shutdown).await?);
        };
        // One MQTT connection for the device: federated rounds, results and status share it.
        let model_version = crate::model::manifest::sha256_file(&model_path)?;
        let (device, routes) = DeviceLink::connect(&f.broker, &f.fleet, &f.device, &model_version)?;
        let settings = agent.settings();
        // The fleet task announces a new base model here; the participant follows it.
        let (base_tx, base_rx) = tokio::sync::watch::channel(model_path.clone());
        let model =
            crate::federated::participant::AgentModel::of(&agent, model_path.clone(), base_rx);
        let Routes {
            rounds: rounds_rx,
            fleet: fleet_rx,
        } = routes;
        let fleet_task = match (f.fleet_models.clone(), fleet_store, fleet_holdout) {
            (Some(section), Some(store), Some(holdout)) => {
                let fleet = FleetDevice::new(
                    DeviceSettings {
                        fleet: f.fleet.clone(),
                        device: f.device.clone(),
                        groups: section.groups.clone(),
                        trusted: TrustedKeys::parse(&section.trusted_keys)?,
                        holdout_margin: section.holdout_margin,
                        max_runtime_failures: section.max_runtime_failures,
                    },
                    store,
                    agent.model_slot(),
                    PipelineShape {
                        batch: settings.batch,
                        tile: settings.tile,
                        normalisation: settings.info.normalisation,
                        classes: settings.info.classes.clone(),
                    },
                    holdout,
                    device.status.clone(),
                    base_tx,
                );
                Some(tokio::spawn(crate::fleet::device::run(
                    fleet,
                    device.clone(),
                    fleet_rx,
                    stop_rx.clone(),
                )))
            }
            _ => {
                // No fleet section: model versions and commands are not read.
                drop(fleet_rx);
                None
            }
        };
        let rounds = tokio::spawn(crate::federated::participant::run(
            f,
            model,
            device.clone(),
            rounds_rx,
            stop_rx,
        ));
        let summary = agent
            .run(
                MqttPublisher {
                    device: device.clone(),
                },
                shutdown,
            )
            .await;
        match rounds.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "federation stopped"),
            Err(e) => tracing::error!(error = %e, "federation task failed"),
        }
        if let Some(t) = fleet_task
            && t.await.is_err()
        {
            tracing::error!("fleet task failed");
        }
        device.close().await;
        anyhow::Ok(summary?)
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
