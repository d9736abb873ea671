//! One lab's node: the segmentation pipeline on the watched folder and, when `[federation]` is
//! configured, the device's MQTT connection shared by the round participant, the fleet task, status
//! and results. `microfed agent` and `microfed demo` both run a lab through [`Node`], so the wiring
//! exists once.
//!
//! Map:
//! - [`config`]: the whole `agent.toml` ([`AgentConfig`]), split between the modules that own its
//!   sections.
//! - [`Node::prepare`] (blocking: opens the fleet's model store, loads and optimises the model, loads
//!   the fleet's hold-out) and [`Node::run`] (async: until `stop` turns true, then drains).
//!
//! This is the top of the library's layering: it may use every module below it, none uses it but the
//! command line and the demo.

pub mod config;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

pub use config::{AgentConfig, FederationConfig};

use crate::dataset::TrainingImage;
use crate::federated::edge::participant::{self, AgentModel, FederationSection, ParticipantError};
use crate::fleet::device::{DeviceSettings, FleetDevice, PipelineShape};
use crate::fleet::signing::{SigningError, TrustedKeys};
use crate::fleet::store::Store;
use crate::fleet::{FleetError, FleetSection};
use crate::pipeline::{Agent, LogPublisher, PipelineError, Summary};
use crate::wire::device::{DeviceLink, MqttPublisher, Routes};
use crate::wire::link::LinkError;

/// Why a node could not start or stopped early; each names the part.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("the fleet's model store: {0}")]
    Fleet(#[from] FleetError),
    #[error("[federation.fleet_models] trusted_keys: {0}")]
    TrustedKeys(#[from] SigningError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("the model's version: {0}")]
    ModelVersion(#[source] crate::model::manifest::ManifestError),
    #[error("the device's MQTT connection: {0}")]
    Link(#[from] LinkError),
    #[error(transparent)]
    Federation(#[from] ParticipantError),
    #[error("federated rounds stopped before the node was asked to stop")]
    FederationEnded,
    #[error("the {0} task failed: {1}")]
    Task(&'static str, String),
    #[error("[metrics]: {0}")]
    Metrics(#[from] crate::web::WebError),
}

/// The fleet task's parts, ready before the runtime starts.
#[derive(Debug)]
struct FleetParts {
    section: FleetSection,
    store: Store,
    holdout: Vec<TrainingImage>,
}

/// A lab's node, prepared: the pipeline with its model loaded, and what federation needs.
#[derive(Debug)]
pub struct Node {
    agent: Agent,
    model_path: PathBuf,
    federation: Option<FederationSection>,
    fleet: Option<FleetParts>,
    metrics: Option<crate::web::ListenSection>,
}

/// How long the participant may take to stop after the pipeline drained.
const FEDERATION_STOP: Duration = Duration::from_secs(60);
/// How long closing the MQTT connection may take.
const LINK_CLOSE: Duration = Duration::from_secs(10);

/// Starts `/metrics` for the node's parts; it stops with the node.
async fn serve_metrics(
    section: &crate::web::ListenSection,
    sources: Vec<Arc<dyn crate::prometheus::Collect>>,
    stop: watch::Receiver<bool>,
) -> Result<(), NodeError> {
    let (addr, _) = crate::web::start(
        "metrics",
        section,
        Arc::new(crate::web::MetricsSite { sources }),
        stop,
    )
    .await?;
    tracing::info!(%addr, "serving /metrics");
    Ok(())
}

impl Node {
    /// Validates `config`, opens the fleet's model store (with a fleet, the model that runs is the
    /// store's current version, so what the fleet installed last survives a restart; the configured
    /// model is adopted as the store's first version), loads the model and the fleet's hold-out.
    /// Blocking (tract optimises the model here): call it before the runtime starts or from a
    /// blocking thread.
    pub fn prepare(config: AgentConfig) -> Result<Self, NodeError> {
        config.validate().map_err(PipelineError::from)?;
        let AgentConfig {
            mut pipeline,
            federation,
            metrics,
        } = config;
        let (federation, fleet_section) = match federation {
            Some(f) => (Some(f.participant), f.fleet_models),
            None => (None, None),
        };
        let mut store = None;
        if let (Some(f), Some(section)) = (&federation, &fleet_section) {
            let (s, running) = crate::fleet::open_store(&f.state, section, &pipeline.model.path)?;
            if running != pipeline.model.path {
                tracing::info!(model = %running.display(), "running the fleet's current model version");
            }
            pipeline.model.path = running;
            // The fleet owns model changes: a file watcher on a store folder would only see
            // versions being pruned.
            pipeline.model.reload_on_change = false;
            store = Some(s);
        }
        let model_path = pipeline.model.path.clone();
        let agent = Agent::new(pipeline)?;
        let fleet = match (&federation, fleet_section, store) {
            (Some(f), Some(section), Some(store)) => Some(FleetParts {
                holdout: crate::fleet::load_holdout(
                    &f.labelled,
                    f.holdout_fraction,
                    f.seed,
                    &agent.settings().info.normalisation,
                )?,
                section,
                store,
            }),
            _ => None,
        };
        Ok(Self {
            agent,
            model_path,
            federation,
            fleet,
            metrics,
        })
    }

    /// The pipeline (settings, model slot, statistics) before it runs.
    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// Runs until `stop` turns true, then drains: everything captured is written and journalled,
    /// the participant and the fleet task stop, the connection closes. Federated rounds that end on
    /// their own before `stop` are a failure of the node ([`NodeError::FederationEnded`] or the
    /// participant's error), reported after the pipeline drained.
    pub async fn run(self, stop: watch::Receiver<bool>) -> Result<Summary, NodeError> {
        let shutdown = {
            let mut s = stop.clone();
            async move {
                let _ = s.wait_for(|v| *v).await;
            }
        };
        let Self {
            agent,
            model_path,
            federation,
            fleet,
            metrics,
        } = self;
        let Some(f) = federation else {
            if let Some(m) = &metrics {
                serve_metrics(m, vec![agent.stats()], stop.clone()).await?;
            }
            return Ok(agent.run(LogPublisher, shutdown).await?);
        };
        // One MQTT connection for the device: federated rounds, results and status share it.
        let model_version =
            crate::model::manifest::sha256_file(&model_path).map_err(NodeError::ModelVersion)?;
        let (device, routes) = DeviceLink::connect(&f.broker, &f.fleet, &f.device, &model_version)?;
        if let Some(m) = &metrics {
            serve_metrics(
                m,
                vec![agent.stats(), Arc::new(device.clone())],
                stop.clone(),
            )
            .await?;
        }
        // The fleet task announces a new base model here; the participant follows it. Without a
        // fleet the sender lives as long as the participant (a closed channel would end its wait).
        let (base_tx, base_rx) = watch::channel(model_path.clone());
        let model = AgentModel::of(&agent, model_path, base_rx);
        let Routes {
            rounds: rounds_rx,
            fleet: fleet_rx,
        } = routes;
        let mut idle_base = None;
        let fleet_task = match fleet {
            Some(parts) => {
                let settings = agent.settings();
                let fleet = FleetDevice::new(
                    DeviceSettings {
                        fleet: f.fleet.clone(),
                        device: f.device.clone(),
                        groups: parts.section.groups.clone(),
                        trusted: TrustedKeys::parse(&parts.section.trusted_keys)?,
                        holdout_margin: parts.section.holdout_margin,
                        max_runtime_failures: parts.section.max_runtime_failures,
                    },
                    parts.store,
                    agent.model_slot(),
                    PipelineShape {
                        batch: settings.batch,
                        tile: settings.tile,
                        normalisation: settings.info.normalisation,
                        classes: settings.info.classes.clone(),
                    },
                    parts.holdout,
                    device.status.clone(),
                    base_tx,
                );
                Some(tokio::spawn(crate::fleet::device::run(
                    fleet,
                    device.clone(),
                    fleet_rx,
                    stop.clone(),
                )))
            }
            None => {
                // No fleet section: model versions and commands are not read.
                drop(fleet_rx);
                idle_base = Some(base_tx);
                None
            }
        };
        let mut rounds = tokio::spawn(participant::run(
            f,
            model,
            device.clone(),
            rounds_rx,
            stop.clone(),
        ));
        let pipeline = agent.run(
            MqttPublisher {
                device: device.clone(),
            },
            shutdown,
        );
        tokio::pin!(pipeline);
        let (summary, federation) = tokio::select! {
            s = &mut pipeline => {
                let r = tokio::time::timeout(FEDERATION_STOP, &mut rounds).await;
                (s, r.map_err(|_| NodeError::Task("federation", "did not stop within 60 s".into())))
            }
            r = &mut rounds => {
                let early = !*stop.borrow();
                if early {
                    tracing::error!("federated rounds stopped on their own; draining the pipeline");
                }
                let s = pipeline.await;
                (s, Ok(r).and_then(|r| match (early, r) {
                    (true, Ok(Ok(()))) => Err(NodeError::FederationEnded),
                    (_, r) => Ok(r),
                }))
            }
        };
        if let Some(t) = fleet_task
            && let Err(e) = t.await
        {
            tracing::error!(error = %e, "fleet task failed");
        }
        let _ = tokio::time::timeout(LINK_CLOSE, device.close()).await;
        drop(idle_base);
        let summary = summary?;
        match federation? {
            Ok(Ok(())) => Ok(summary),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(NodeError::Task("federation", e.to_string())),
        }
    }
}
