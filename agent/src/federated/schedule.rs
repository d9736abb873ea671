//! The local learning rate across rounds, shared by the aggregator (which announces each round's
//! rate), experiments and the demo.

use serde::{Deserialize, Serialize};

/// How the learning rate decays after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    /// The base rate in every round.
    #[default]
    Constant,
    /// Half a cosine from the base rate to `floor` × it over the rounds after the warm-up up to
    /// `rounds`; `floor` × it afterwards.
    Cosine,
    /// × `factor` every `every` rounds after the warm-up (FedST: × 0.927 every 2 rounds).
    Step,
}

/// The learning rate across rounds: `base × factor(round)`. A fine-tuning that starts from a
/// converged base model needs a gentle start (warm-up) and, for FedAvg with several local steps on
/// non-IID labs, a rate that decays (Li et al., ICLR 2020: with a constant rate FedAvg converges to
/// a point away from the optimum).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrSchedule {
    /// Rounds 1..=warmup_rounds ramp linearly: round r uses base × r / (warmup_rounds + 1).
    #[serde(default)]
    pub warmup_rounds: u64,
    #[serde(default)]
    pub decay: Decay,
    /// Cosine: the round at which the rate reaches `floor` × base (usually the planned rounds).
    #[serde(default)]
    pub rounds: u64,
    /// Cosine: the last rate as a fraction of the base.
    #[serde(default = "default_floor")]
    pub floor: f32,
    /// Step: the factor and how many rounds between two steps.
    #[serde(default = "default_step_factor")]
    pub factor: f32,
    #[serde(default = "default_step_every")]
    pub every: u64,
}

fn default_floor() -> f32 {
    0.01
}
fn default_step_factor() -> f32 {
    0.927
}
fn default_step_every() -> u64 {
    2
}

impl Default for LrSchedule {
    /// The base rate in every round.
    fn default() -> Self {
        Self {
            warmup_rounds: 0,
            decay: Decay::Constant,
            rounds: 0,
            floor: default_floor(),
            factor: default_step_factor(),
            every: default_step_every(),
        }
    }
}

impl LrSchedule {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.floor > 0.0 && self.floor <= 1.0) {
            return Err(format!(
                "schedule.floor must be in (0, 1], not {}",
                self.floor
            ));
        }
        if !(self.factor > 0.0 && self.factor <= 1.0) {
            return Err(format!(
                "schedule.factor must be in (0, 1], not {}",
                self.factor
            ));
        }
        if self.every == 0 {
            return Err("schedule.every must be at least 1".into());
        }
        if self.decay == Decay::Cosine && self.rounds <= self.warmup_rounds {
            return Err(format!(
                "schedule: a cosine decay needs rounds ({}) > warmup_rounds ({})",
                self.rounds, self.warmup_rounds
            ));
        }
        Ok(())
    }

    /// The multiplier of the base rate in `round` (1-based; round 0 is treated as round 1).
    pub fn factor(&self, round: u64) -> f32 {
        let r = round.max(1);
        if r <= self.warmup_rounds {
            return r as f32 / (self.warmup_rounds + 1) as f32;
        }
        // Rounds after the warm-up, from 0.
        let t = r - self.warmup_rounds - 1;
        match self.decay {
            Decay::Constant => 1.0,
            Decay::Step => self
                .factor
                .powi((t / self.every).min(i32::MAX as u64) as i32),
            Decay::Cosine => {
                let span = self.rounds.saturating_sub(self.warmup_rounds + 1).max(1);
                let x = (t as f64 / span as f64).min(1.0);
                let floor = f64::from(self.floor);
                (floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * x).cos())) as f32
            }
        }
    }

    /// `base × factor(round)`.
    pub fn rate(&self, base: f32, round: u64) -> f32 {
        base * self.factor(round)
    }
}
