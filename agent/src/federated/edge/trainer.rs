//! The participant's training thread: local training blocks for seconds to minutes, so it runs on a
//! thread of its own with the [`LocalTrainer`] (on whichever backend `[federation] device_kind`
//! picks), and the round loop stays responsive: it sends a [`Job`] and selects on the reply.

use std::sync::Arc;

use microfed_kernels::Backend;
use microfed_kernels::unet::Params;
use tokio::sync::oneshot;

use crate::federated::edge::cache::FeatureCache;
use crate::federated::edge::local::{LocalError, LocalTrainer, RoundPlan};
use crate::federated::edge::style::{RestyleConfig, StyleCode};
use crate::train::backend::{BackendError, OnBackend, on_backend};

/// What the training thread reports for one round.
#[derive(Debug)]
pub struct Trained {
    pub local: Vec<f32>,
    pub loss: f32,
    pub iou_before: Option<f64>,
    pub iou_after: Option<f64>,
    pub seconds: f32,
    pub restyled_batches: u64,
}

/// One round's work for the training thread.
#[derive(Debug)]
pub struct Job {
    pub global: Vec<f32>,
    pub plan: RoundPlan,
    /// Other labs' codes, when they changed since the last job (the trainer keeps them).
    pub styles: Option<(Vec<StyleCode>, RestyleConfig)>,
    pub reply: oneshot::Sender<Result<Trained, LocalError>>,
}

/// Hold-out mean IoU of each decoder (None: no hold-out images).
pub type ScoreReply = oneshot::Sender<Result<Vec<Option<f64>>, LocalError>>;

/// What the thread is asked to do.
#[derive(Debug)]
enum Work {
    Train(Job),
    /// Score decoders on the hold-out images (the gate before a global goes live).
    Score {
        decoders: Vec<Vec<f32>>,
        reply: ScoreReply,
    },
}

/// A [`LocalTrainer`] on any backend, behind one object.
pub trait RoundTrainer: Send {
    fn train(&mut self, job: &Job) -> Result<Trained, LocalError>;
    /// Hold-out mean IoU of `decoder` (None: no hold-out images).
    fn score(&mut self, decoder: &[f32]) -> Result<Option<f64>, LocalError>;
}

impl<B: Backend> RoundTrainer for LocalTrainer<B> {
    fn train(&mut self, job: &Job) -> Result<Trained, LocalError> {
        let t0 = std::time::Instant::now();
        if let Some((codes, config)) = &job.styles {
            self.set_styles(codes.clone(), *config)?;
        }
        let iou_before = self.holdout_iou(&job.global)?;
        let (local, loss) = self.train_round(&job.global, &job.plan)?;
        let iou_after = self.holdout_iou(&local)?;
        Ok(Trained {
            local,
            loss,
            iou_before,
            iou_after,
            seconds: t0.elapsed().as_secs_f32(),
            restyled_batches: self.restyled_batches(),
        })
    }

    fn score(&mut self, decoder: &[f32]) -> Result<Option<f64>, LocalError> {
        self.holdout_iou(decoder)
    }
}

/// How the lab trains: the base model's parameters, its labelled images' features, and the batch.
#[derive(Debug)]
pub struct TrainerSetup<'a> {
    pub params: &'a Params,
    pub cache: FeatureCache,
    pub batch: usize,
    pub crop: usize,
    pub seed: u64,
    /// Weight of the soft-Dice term of the local loss.
    pub dice_weight: f32,
    /// Class-weighted cross-entropy (as the base models were trained).
    pub class_weighted: bool,
}

impl OnBackend for TrainerSetup<'_> {
    type Output = Result<Box<dyn RoundTrainer>, LocalError>;
    fn run<B: Backend + 'static>(self, backend: Arc<B>) -> Self::Output {
        let mut t = LocalTrainer::new(
            backend,
            self.params,
            self.cache,
            self.batch,
            self.crop,
            self.seed,
        )?;
        t.set_dice_weight(self.dice_weight);
        t.set_class_weighting(self.class_weighted);
        Ok(Box::new(t))
    }
}

/// Why the training thread could not start.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Local(#[from] LocalError),
    #[error("cannot start the training thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// The training thread, ready for jobs; it ends when this handle is dropped.
#[derive(Debug)]
pub struct TrainingThread {
    jobs: std::sync::mpsc::Sender<Work>,
}

impl TrainingThread {
    /// Opens the backend `device_kind` names, builds the trainer and starts its thread.
    pub fn start(device_kind: &str, setup: TrainerSetup<'_>) -> Result<Self, TrainerError> {
        let trainer = on_backend(device_kind, setup)??;
        Self::spawn(trainer)
    }

    /// Starts the thread around any [`RoundTrainer`].
    pub fn spawn(mut trainer: Box<dyn RoundTrainer>) -> Result<Self, TrainerError> {
        let (jobs, inbox) = std::sync::mpsc::channel::<Work>();
        std::thread::Builder::new()
            .name("local-training".into())
            .spawn(move || {
                while let Ok(work) = inbox.recv() {
                    match work {
                        Work::Train(job) => {
                            let r = trainer.train(&job);
                            let _ = job.reply.send(r);
                        }
                        Work::Score { decoders, reply } => {
                            let r = decoders.iter().map(|d| trainer.score(d)).collect();
                            let _ = reply.send(r);
                        }
                    }
                }
            })
            .map_err(TrainerError::Thread)?;
        Ok(Self { jobs })
    }

    /// Scores `decoders` on the hold-out images, in order, after any job queued before; the result
    /// comes on the returned receiver (closed if the thread has stopped).
    pub fn score(
        &self,
        decoders: Vec<Vec<f32>>,
    ) -> oneshot::Receiver<Result<Vec<Option<f64>>, LocalError>> {
        let (reply, rx) = oneshot::channel();
        let _ = self.jobs.send(Work::Score { decoders, reply });
        rx
    }

    /// Hands a round to the thread; the result comes on the returned receiver (closed if the thread
    /// has stopped).
    pub fn submit(
        &self,
        global: Vec<f32>,
        plan: RoundPlan,
        styles: Option<(Vec<StyleCode>, RestyleConfig)>,
    ) -> oneshot::Receiver<Result<Trained, LocalError>> {
        let (reply, rx) = oneshot::channel();
        let _ = self.jobs.send(Work::Train(Job {
            global,
            plan,
            styles,
            reply,
        }));
        rx
    }
}
