//! [`ModelSlot`]: the runnable model, replaceable while the agent runs.
//!
//! The slot holds an `Arc` to the current [`LoadedModel`]. The segment stage takes a clone of that
//! `Arc` when it starts an image and keeps it until the image is done, so a swap never changes the
//! model under an image in flight: the old model lives until its last image finishes, then drops.
//! Swaps come from the model file changing on disk (the agent watches it) and, later, from federated
//! rounds and the fleet (they hold a clone of the slot and call [`ModelSlot::swap`]).
//!
//! The slot also keeps the run-time health of the running generation ([`RunHealth`]): the segment
//! stage reports each image's outcome ([`ModelSlot::record_outcome`]), and whoever swapped a model in
//! (the fleet) watches [`ModelSlot::health`] to return to the previous model when the new one keeps
//! failing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use crate::model::runtime::Segmenter;

/// How the running generation is doing: consecutive failed images since its last success.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunHealth {
    /// The generation these figures are about (the newest one swapped in).
    pub generation: u64,
    /// Images in a row that failed to segment on it (0 after any success).
    pub consecutive_failures: u64,
    /// Why the last one failed.
    pub last_error: Option<String>,
}

/// A model ready to run, with the generation it was swapped in as (0 for the first).
#[derive(Debug)]
pub struct LoadedModel {
    pub segmenter: Segmenter,
    pub generation: u64,
}

impl LoadedModel {
    /// "path (generation N)", for logs and the journal.
    pub fn label(&self) -> String {
        format!(
            "{} (generation {})",
            self.segmenter.path().display(),
            self.generation
        )
    }
}

/// The model file's path in a [`LoadedModel::label`] (what the journal records), without the
/// generation.
pub fn label_path(label: &str) -> &str {
    label.rsplit_once(" (generation ").map_or(label, |(p, _)| p)
}

/// Why a model was not swapped in.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error(
        "{path}: the new model predicts {found} classes but the agent segments into {expected}; \
         keeping the running model"
    )]
    Classes {
        path: std::path::PathBuf,
        expected: usize,
        found: usize,
    },
}

/// Shared handle to the running model; clones share the same slot.
#[derive(Debug, Clone)]
pub struct ModelSlot {
    current: Arc<RwLock<Arc<LoadedModel>>>,
    generations: Arc<AtomicU64>,
    classes: usize,
    health: Arc<watch::Sender<RunHealth>>,
}

impl ModelSlot {
    /// A slot holding `segmenter` as generation 0. Every later model must predict as many classes.
    pub fn new(segmenter: Segmenter) -> Self {
        let classes = segmenter.classes();
        Self {
            current: Arc::new(RwLock::new(Arc::new(LoadedModel {
                segmenter,
                generation: 0,
            }))),
            generations: Arc::new(AtomicU64::new(0)),
            classes,
            health: Arc::new(watch::Sender::new(RunHealth::default())),
        }
    }

    /// Follows the run-time health of the running generation.
    pub fn health(&self) -> watch::Receiver<RunHealth> {
        self.health.subscribe()
    }

    /// Records how an image went on `generation`. Outcomes of older generations (images that were in
    /// flight during a swap) are ignored: they say nothing about the running model.
    pub fn record_outcome(&self, generation: u64, outcome: Result<(), &str>) {
        self.health.send_if_modified(|h| {
            if generation != h.generation {
                return false;
            }
            match outcome {
                Ok(()) if h.consecutive_failures == 0 => false,
                Ok(()) => {
                    h.consecutive_failures = 0;
                    true
                }
                Err(e) => {
                    h.consecutive_failures += 1;
                    h.last_error = Some(e.to_owned());
                    true
                }
            }
        });
    }

    /// The model to use for the next image.
    pub fn current(&self) -> Arc<LoadedModel> {
        // A poisoned lock only means a panic elsewhere while swapping an Arc: the Arc inside is whole.
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Number of classes every model in this slot predicts.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Replaces the model for images started from now on; returns the new generation.
    pub fn swap(&self, segmenter: Segmenter) -> Result<u64, SlotError> {
        if segmenter.classes() != self.classes {
            return Err(SlotError::Classes {
                path: segmenter.path().to_owned(),
                expected: self.classes,
                found: segmenter.classes(),
            });
        }
        let generation = self.generations.fetch_add(1, Ordering::SeqCst) + 1;
        let new = Arc::new(LoadedModel {
            segmenter,
            generation,
        });
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = new;
        self.health.send_replace(RunHealth {
            generation,
            ..RunHealth::default()
        });
        tracing::info!(
            generation,
            "model swapped in; images in flight finish on the old one"
        );
        Ok(generation)
    }
}
