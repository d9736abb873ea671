//! The participant's training thread: local training blocks for seconds to minutes, so it runs on a
//! thread of its own with the [`LocalTrainer`] (on whichever backend `[federation] device_kind`
//! picks), and the round loop stays responsive: it sends a [`Job`] and selects on the reply.
//!
//! The thread takes a round's training before any hold-out scoring (and the personalised
//! fine-tune that goes with it) queued beside it: an update is due by the round's deadline, a
//! decision on what segments is not.

use std::sync::Arc;

use microfed_kernels::Backend;
use microfed_kernels::unet::Params;
use tokio::sync::oneshot;

use crate::federated::edge::cache::FeatureCache;
use crate::federated::edge::local::{LocalError, LocalTrainer, RoundPlan};
pub use crate::federated::edge::round::Personalised;
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

/// What the thread answers to a score: hold-out mean IoU of each decoder (None: no hold-out
/// images), and the personalised fine-tune of the last one with the seconds it took, when asked
/// for.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreOutcome {
    pub scores: Vec<Option<f64>>,
    pub personalised: Option<(Personalised, f32)>,
}

pub type ScoreReply = oneshot::Sender<Result<ScoreOutcome, LocalError>>;

/// What the thread is asked to do.
#[derive(Debug)]
enum Work {
    Train(Job),
    /// Score decoders on the hold-out images (the gate before a global goes live); with a plan,
    /// first fine-tune the last one on the lab's own images and score that too.
    Score {
        decoders: Vec<Vec<f32>>,
        personalise: Option<RoundPlan>,
        reply: ScoreReply,
    },
}

/// A [`LocalTrainer`] on any backend, behind one object.
pub trait RoundTrainer: Send {
    fn train(&mut self, job: &Job) -> Result<Trained, LocalError>;
    /// Hold-out mean IoU of `decoder` (None: no hold-out images).
    fn score(&mut self, decoder: &[f32]) -> Result<Option<f64>, LocalError>;
    /// `global` fine-tuned on the lab's own images ([`LocalTrainer::personalise`]).
    fn personalise(&mut self, global: &[f32], plan: &RoundPlan) -> Result<Vec<f32>, LocalError>;
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

    fn personalise(&mut self, global: &[f32], plan: &RoundPlan) -> Result<Vec<f32>, LocalError> {
        LocalTrainer::personalise(self, global, plan)
    }
}

/// Scores `decoders`, and with `plan` the last one fine-tuned on the lab's images.
fn score_all(
    trainer: &mut dyn RoundTrainer,
    decoders: &[Vec<f32>],
    plan: Option<&RoundPlan>,
) -> Result<ScoreOutcome, LocalError> {
    let scores = decoders
        .iter()
        .map(|d| trainer.score(d))
        .collect::<Result<Vec<_>, _>>()?;
    let personalised = match (plan, decoders.last()) {
        (Some(plan), Some(candidate)) => {
            // A fine-tune that fails (diverges) leaves the global to be judged on its own.
            let t0 = std::time::Instant::now();
            match trainer
                .personalise(candidate, plan)
                .and_then(|values| Ok((trainer.score(&values)?, values)))
            {
                Ok((score, values)) => {
                    Some((Personalised { values, score }, t0.elapsed().as_secs_f32()))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "personalising the new global failed; judging the global alone");
                    None
                }
            }
        }
        _ => None,
    };
    Ok(ScoreOutcome {
        scores,
        personalised,
    })
}

/// The next piece of work: the oldest round to train if one is queued, else the oldest score.
fn next_work(queue: &mut std::collections::VecDeque<Work>) -> Option<Work> {
    let at = queue
        .iter()
        .position(|w| matches!(w, Work::Train(_)))
        .unwrap_or(0);
    queue.remove(at)
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
                let mut queue = std::collections::VecDeque::new();
                loop {
                    if queue.is_empty() {
                        match inbox.recv() {
                            Ok(w) => queue.push_back(w),
                            Err(_) => return,
                        }
                    }
                    queue.extend(inbox.try_iter());
                    match next_work(&mut queue) {
                        Some(Work::Train(job)) => {
                            let r = trainer.train(&job);
                            let _ = job.reply.send(r);
                        }
                        Some(Work::Score {
                            decoders,
                            personalise,
                            reply,
                        }) => {
                            let r = score_all(trainer.as_mut(), &decoders, personalise.as_ref());
                            let _ = reply.send(r);
                        }
                        None => {}
                    }
                }
            })
            .map_err(TrainerError::Thread)?;
        Ok(Self { jobs })
    }

    /// Scores `decoders` on the hold-out images, in order, after any work queued before (and after
    /// any round queued before it starts); with `personalise`, the last decoder is also fine-tuned
    /// on the lab's own images and the result scored. The answer comes on the returned receiver
    /// (closed if the thread has stopped).
    pub fn score(
        &self,
        decoders: Vec<Vec<f32>>,
        personalise: Option<RoundPlan>,
    ) -> oneshot::Receiver<Result<ScoreOutcome, LocalError>> {
        let (reply, rx) = oneshot::channel();
        let _ = self.jobs.send(Work::Score {
            decoders,
            personalise,
            reply,
        });
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::federated::edge::local::LocalOptimizer;
    use std::sync::Mutex;

    fn plan(round: u64) -> RoundPlan {
        RoundPlan {
            round,
            epochs: 1,
            steps_per_epoch: 1,
            learning_rate: 1e-3,
            prox_mu: 0.0,
            optimizer: LocalOptimizer::Adam,
        }
    }

    /// A trainer whose decoder is one number: training adds 1, personalising adds 10, the score
    /// is the value itself; what it was asked is written down in order.
    struct Fake(Arc<Mutex<Vec<String>>>);

    impl RoundTrainer for Fake {
        fn train(&mut self, job: &Job) -> Result<Trained, LocalError> {
            self.0
                .lock()
                .unwrap()
                .push(format!("train {}", job.plan.round));
            Ok(Trained {
                local: vec![job.global[0] + 1.0],
                loss: 0.0,
                iou_before: None,
                iou_after: None,
                seconds: 0.0,
                restyled_batches: 0,
            })
        }
        fn score(&mut self, decoder: &[f32]) -> Result<Option<f64>, LocalError> {
            self.0.lock().unwrap().push(format!("score {}", decoder[0]));
            Ok(Some(f64::from(decoder[0])))
        }
        fn personalise(&mut self, global: &[f32], _: &RoundPlan) -> Result<Vec<f32>, LocalError> {
            self.0
                .lock()
                .unwrap()
                .push(format!("personalise {}", global[0]));
            Ok(vec![global[0] + 10.0])
        }
    }

    /// A fine-tune that diverges must not keep a good global out: it is judged on its own.
    #[test]
    fn a_failed_fine_tune_leaves_the_global_to_be_scored_alone() {
        struct Diverges;
        impl RoundTrainer for Diverges {
            fn train(&mut self, _: &Job) -> Result<Trained, LocalError> {
                unreachable!()
            }
            fn score(&mut self, d: &[f32]) -> Result<Option<f64>, LocalError> {
                Ok(Some(f64::from(d[0])))
            }
            fn personalise(&mut self, _: &[f32], p: &RoundPlan) -> Result<Vec<f32>, LocalError> {
                Err(LocalError::Diverged {
                    round: p.round,
                    loss: f32::NAN,
                })
            }
        }
        let out = score_all(&mut Diverges, &[vec![0.5], vec![0.75]], Some(&plan(3))).unwrap();
        assert_eq!(out.scores, vec![Some(0.5), Some(0.75)]);
        assert_eq!(out.personalised, None);
    }

    #[test]
    fn a_queued_round_is_trained_before_a_queued_score() {
        let (tx, _rx) = oneshot::channel();
        let (tx2, _rx2) = oneshot::channel();
        let mut q = std::collections::VecDeque::from([
            Work::Score {
                decoders: vec![],
                personalise: None,
                reply: tx,
            },
            Work::Train(Job {
                global: vec![0.0],
                plan: plan(4),
                styles: None,
                reply: tx2,
            }),
        ]);
        assert!(matches!(next_work(&mut q), Some(Work::Train(_))));
        assert!(matches!(next_work(&mut q), Some(Work::Score { .. })));
        assert!(next_work(&mut q).is_none());
    }

    #[test]
    fn a_score_with_a_plan_fine_tunes_the_candidate_and_scores_it_too() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let thread = TrainingThread::spawn(Box::new(Fake(log.clone()))).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let out = rt
            .block_on(thread.score(vec![vec![1.0], vec![2.0]], Some(plan(9))))
            .unwrap()
            .unwrap();
        assert_eq!(out.scores, vec![Some(1.0), Some(2.0)]);
        let (p, _) = out.personalised.unwrap();
        assert_eq!((p.values, p.score), (vec![12.0], Some(12.0)));
        let plain = rt
            .block_on(thread.score(vec![vec![3.0]], None))
            .unwrap()
            .unwrap();
        assert_eq!(plain.personalised, None);
        assert_eq!(
            *log.lock().unwrap(),
            ["score 1", "score 2", "personalise 2", "score 12", "score 3"]
        );
        let trained = rt
            .block_on(thread.submit(vec![5.0], plan(1), None))
            .unwrap()
            .unwrap();
        assert_eq!(trained.local, vec![6.0]);
    }
}
