//! Who re-styles towards whom: the chance that a lab re-styles a batch or crop, and which other
//! lab's code it then takes ([`RestyleTarget`]).

use super::*;

/// Which other lab's code a re-styled batch or crop takes, and how often a lab re-styles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestyleTarget {
    /// With chance `probability`, any other lab's code, each as likely (FedST). A lab with few
    /// images re-styles as often as one with many, away from its own (rare) style.
    #[default]
    Uniform,
    /// So that the federation's training sees every lab's style about equally often: a lab with
    /// more than an equal share of the federation's training images (its own count and the
    /// `images` of the codes) re-styles just its excess, towards the styles short of an equal share,
    /// in proportion to their shortfall; a lab at or below an equal share keeps its own style.
    /// `probability` caps the chance, so a large lab never trains on other styles only.
    ///
    /// The counts are what the codes say: a lab that under-states its count draws the others'
    /// re-styling towards its style (as an over-stated count weighs its update in FedAvg).
    Balance,
}

/// One lab's re-styling decisions over an ordered list of other labs' codes: re-style with chance
/// `chance` (capped at draw time), then take code `i` uniformly ([`RestyleTarget::Uniform`]) or by
/// the weights' cumulative sums.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RestylePlan {
    chance: f32,
    codes: usize,
    /// Empty: uniform over `codes`.
    cumulative: Vec<f64>,
}

impl RestylePlan {
    /// A lab that never re-styles, over `codes` codes.
    fn keep_own(codes: usize) -> Self {
        Self {
            chance: 0.0,
            codes,
            cumulative: Vec::new(),
        }
    }

    /// The plan of a lab with `own_images` training images, given the other labs' codes (their
    /// `images`) and `config`.
    pub fn new(own_images: usize, codes: &[StyleCode], config: &RestyleConfig) -> Self {
        let n = codes.len();
        match config.target {
            RestyleTarget::Uniform => Self {
                chance: config.probability,
                codes: n,
                cumulative: Vec::new(),
            },
            RestyleTarget::Balance => {
                // f64 counts: a hostile u32::MAX neither overflows nor sizes anything.
                let own = own_images as f64;
                let others: Vec<f64> = codes.iter().map(|c| f64::from(c.images)).collect();
                let total = own + others.iter().sum::<f64>();
                let styles = (n + 1) as f64;
                if n == 0 || total <= 0.0 {
                    return Self::keep_own(n);
                }
                let equal = 1.0 / styles;
                let own_share = own / total;
                // The excess of the own style, as a chance of its crops: (w − 1/S) / w.
                let excess = if own_share > equal {
                    (own_share - equal) / own_share
                } else {
                    0.0
                };
                let shortfall: Vec<f64> = others
                    .iter()
                    .map(|&c| (equal - c / total).max(0.0))
                    .collect();
                let sum: f64 = shortfall.iter().sum();
                if excess <= 0.0 || sum <= 0.0 {
                    return Self::keep_own(n);
                }
                let mut acc = 0.0;
                let cumulative = shortfall
                    .iter()
                    .map(|s| {
                        acc += s / sum;
                        acc
                    })
                    .collect();
                Self {
                    chance: (excess as f32).min(config.probability),
                    codes: n,
                    cumulative,
                }
            }
        }
    }

    /// The chance that a batch or crop is re-styled (before any cap at draw time).
    pub fn chance(&self) -> f32 {
        self.chance
    }

    /// The chance that a re-styled batch or crop takes code `i`.
    #[cfg(test)]
    fn weight(&self, i: usize) -> f64 {
        if i >= self.codes {
            return 0.0;
        }
        if self.cumulative.is_empty() {
            return 1.0 / self.codes as f64;
        }
        self.cumulative[i] - if i == 0 { 0.0 } else { self.cumulative[i - 1] }
    }

    /// Which code re-styles the next batch or crop, if any, with the chance capped at `cap`
    /// (0 turns re-styling off). Without codes nothing is drawn from `rng`; with uniform targets the
    /// draws are those of FedST's rule (a chance, then an index), so runs pair with earlier ones.
    pub fn pick(&self, rng: &mut impl Rng, cap: f32) -> Option<usize> {
        if self.codes == 0 || rng.random::<f32>() >= self.chance.min(cap) {
            return None;
        }
        if self.cumulative.is_empty() {
            return Some(rng.random_range(0..self.codes));
        }
        let u = rng.random::<f64>();
        Some(
            self.cumulative
                .iter()
                .position(|&c| u < c)
                .unwrap_or(self.codes - 1),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(device: &str, images: u32) -> StyleCode {
        StyleCode {
            device: device.into(),
            kind: StyleKind::FeatureStats,
            model_version: "m".into(),
            images,
            noise_sigma: 0.0,
            window: 0,
            band: 0,
            values: Vec::new(),
        }
    }

    fn balance(probability: f32) -> RestyleConfig {
        RestyleConfig {
            probability,
            mix: 1.0,
            target: RestyleTarget::Balance,
        }
    }

    #[test]
    fn uniform_is_fedst_rule() {
        let codes = [code("a", 12), code("b", 3)];
        let p = RestylePlan::new(12, &codes, &RestyleConfig::default());
        assert_eq!(p.chance(), 0.5);
        assert_eq!((p.weight(0), p.weight(1), p.weight(2)), (0.5, 0.5, 0.0));
        // The same draws as `random::<f32>() < p`, then `random_range(0..n)`.
        let (mut a, mut b) = (seeded_rng(7), seeded_rng(7));
        for _ in 0..1000 {
            let old = (a.random::<f32>() < 0.5).then(|| a.random_range(0..2));
            assert_eq!(p.pick(&mut b, 0.5), old);
        }
    }

    #[test]
    fn balance_moves_the_large_labs_excess_to_the_short_styles() {
        // Three donors of 12 images, a target of 3: each donor re-styles (12/39 − 1/4)/(12/39) of
        // its crops, all towards the target; the target keeps its own style.
        let donor = RestylePlan::new(
            12,
            &[code("d2", 12), code("d3", 12), code("t", 3)],
            &balance(1.0),
        );
        assert!((donor.chance() - 0.1875).abs() < 1e-6, "{}", donor.chance());
        assert_eq!(donor.weight(0), 0.0);
        assert_eq!(donor.weight(2), 1.0);
        let target = RestylePlan::new(
            3,
            &[code("a", 12), code("b", 12), code("c", 12)],
            &balance(1.0),
        );
        assert_eq!(target.chance(), 0.0);
        // The pooled mix: 36 × (1 − 0.1875) = 29.25 donor-style images, 3 + 36 × 0.1875 = 9.75
        // target-style ones: a quarter each.
        assert!(((3.0 + 36.0 * f64::from(donor.chance())) / 39.0 - 0.25).abs() < 1e-6);
        // Two short styles share by their shortfall: 1/4 − 2/28 against 1/4 − 4/28.
        let p = RestylePlan::new(
            11,
            &[code("a", 11), code("b", 2), code("c", 4)],
            &balance(1.0),
        );
        let (w2, w3) = (p.weight(1), p.weight(2));
        assert!((w2 / w3 - (0.25 - 2.0 / 28.0) / (0.25 - 4.0 / 28.0)).abs() < 1e-9);
        assert!((w2 + w3 - 1.0).abs() < 1e-12 && p.weight(0) == 0.0);
        // The draws follow the weights.
        let mut rng = seeded_rng(3);
        let mut n = [0usize; 3];
        for _ in 0..20_000 {
            if let Some(i) = p.pick(&mut rng, 1.0) {
                n[i] += 1;
            }
        }
        let all = (n[0] + n[1] + n[2]) as f64;
        assert_eq!(n[0], 0);
        assert!(
            (all / 20_000.0 - f64::from(p.chance())).abs() < 0.02,
            "{n:?}"
        );
        assert!((n[1] as f64 / all - w2).abs() < 0.02, "{n:?}");
    }

    #[test]
    fn balance_is_capped_and_quiet_when_styles_are_even() {
        let even = RestylePlan::new(5, &[code("a", 5), code("b", 5)], &balance(1.0));
        assert_eq!(even.chance(), 0.0);
        // One huge lab beside a small one would re-style almost everything: the cap holds it.
        let big = RestylePlan::new(1000, &[code("a", 1)], &balance(0.3));
        assert_eq!(big.chance(), 0.3);
        // A cap of 0 at draw time (the personalised fine-tune) turns it off.
        let mut rng = seeded_rng(1);
        assert!((0..100).all(|_| big.pick(&mut rng, 0.0).is_none()));
        // No codes: nothing drawn.
        let none = RestylePlan::new(4, &[], &balance(1.0));
        let (mut a, b) = (seeded_rng(9), seeded_rng(9));
        assert_eq!(none.pick(&mut a, 1.0), None);
        assert_eq!(a, b);
    }

    #[test]
    fn hostile_counts_neither_overflow_nor_break_the_plan() {
        let huge = RestylePlan::new(
            0,
            &[code("a", u32::MAX), code("b", u32::MAX)],
            &balance(1.0),
        );
        assert_eq!(huge.chance(), 0.0);
        let p = RestylePlan::new(
            usize::MAX,
            &[code("a", u32::MAX), code("b", 0)],
            &balance(0.5),
        );
        assert!(p.chance().is_finite() && p.chance() <= 0.5);
        let mut rng = seeded_rng(2);
        for _ in 0..100 {
            assert!(p.pick(&mut rng, 1.0).is_none_or(|i| i < 2));
        }
    }
}
