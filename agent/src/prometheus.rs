//! Prometheus metrics: counters, gauges and histograms, and their text exposition (format 0.0.4).
//!
//! Map:
//! - [`Counter`], [`Gauge`], [`Histogram`]: lock-free values the owning module updates where the
//!   event happens (the pipeline's write stage, the aggregator's update checks, the outbox).
//! - [`Collect`]: anything that writes its metric families into an [`Exposition`] at scrape time.
//!   There is no process-wide registry: `microfed demo` runs several labs in one process, and each
//!   part hands its own collector to the listener that serves it ([`crate::web`]).
//! - [`Exposition`]: the text format, written family by family (`# HELP`, `# TYPE`, samples), with
//!   label values escaped. Names follow Prometheus's conventions: a `microfed_` prefix, the unit in
//!   the name (`_seconds`, `_bytes`), `_total` on counters; a name that breaks them is a bug in our
//!   code, caught by the tests of each collector (debug assertions here).
//!
//! Why hand-written rather than a client crate: the exposition is a few dozen lines, the values are
//! plain atomics, and nothing here allocates per event.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// The media type of the exposition (`Content-Type` of `/metrics`).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A value that only goes up.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (an `f64`, stored as its bits).
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// Observations counted into fixed buckets (upper bounds, ascending), with their sum and count.
#[derive(Debug)]
pub struct Histogram {
    bounds: Vec<f64>,
    /// Per bucket (not cumulative); the last one is `+Inf`.
    counts: Vec<AtomicU64>,
    sum_bits: AtomicU64,
}

/// Capture → mask latency of one micrograph, seconds: tens of milliseconds on a GPU board, seconds
/// for a large image on a CPU.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A federated round, seconds: from a few seconds (demo) to an hour (deadline-bound fleets).
pub const ROUND_BUCKETS: &[f64] = &[
    1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

impl Histogram {
    /// Buckets with these upper bounds (finite, strictly ascending; `+Inf` is added).
    pub fn new(bounds: &[f64]) -> Self {
        debug_assert!(
            bounds.windows(2).all(|w| w[0] < w[1]) && bounds.iter().all(|b| b.is_finite()),
            "histogram bounds must be finite and ascending: {bounds:?}"
        );
        Self {
            bounds: bounds.to_vec(),
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_bits: AtomicU64::new(0f64.to_bits()),
        }
    }

    /// Counts `v` (a NaN is not counted: it would poison the sum forever).
    pub fn observe(&self, v: f64) {
        if v.is_nan() {
            return;
        }
        let i = self
            .bounds
            .iter()
            .position(|&b| v <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let mut cur = self.sum_bits.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(cur) + v).to_bits();
            match self.sum_bits.compare_exchange_weak(
                cur,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(seen) => cur = seen,
            }
        }
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    pub fn sum(&self) -> f64 {
        f64::from_bits(self.sum_bits.load(Ordering::Relaxed))
    }

    /// `(upper bound, cumulative count)` per bucket, `+Inf` last.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut acc = 0;
        self.counts
            .iter()
            .enumerate()
            .map(|(i, c)| {
                acc += c.load(Ordering::Relaxed);
                (self.bounds.get(i).copied().unwrap_or(f64::INFINITY), acc)
            })
            .collect()
    }
}

/// Something that writes metric families at scrape time.
pub trait Collect: Send + Sync {
    fn collect(&self, out: &mut Exposition);
}

/// The type line of a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricType {
    Counter,
    Gauge,
    Histogram,
}

/// The text exposition being written.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

/// Labels of one sample: `(name, value)` pairs.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    /// The exposition of every collector, in order.
    pub fn of(sources: &[&dyn Collect]) -> String {
        let mut out = Self::new();
        for s in sources {
            s.collect(&mut out);
        }
        out.text
    }

    pub fn into_text(self) -> String {
        self.text
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines. Its samples must follow at once.
    pub fn family(&mut self, name: &str, kind: MetricType, help: &str) {
        debug_assert!(valid_name(name), "invalid metric name {name:?}");
        debug_assert!(
            (kind == MetricType::Counter) == name.ends_with("_total"),
            "{name}: counters, and only counters, end in _total"
        );
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let kind = match kind {
            MetricType::Counter => "counter",
            MetricType::Gauge => "gauge",
            MetricType::Histogram => "histogram",
        };
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    /// One sample line.
    pub fn sample(&mut self, name: &str, labels: Labels<'_>, value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                debug_assert!(valid_label(k), "invalid label name {k:?}");
                if i > 0 {
                    self.text.push(',');
                }
                self.text.push_str(k);
                self.text.push_str("=\"");
                for c in v.chars() {
                    match c {
                        '\\' => self.text.push_str("\\\\"),
                        '"' => self.text.push_str("\\\""),
                        '\n' => self.text.push_str("\\n"),
                        c => self.text.push(c),
                    }
                }
                self.text.push('"');
            }
            self.text.push('}');
        }
        self.text.push(' ');
        self.text.push_str(&number(value));
        self.text.push('\n');
    }

    /// A counter family of one unlabelled sample.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, MetricType::Counter, help);
        self.sample(name, &[], value as f64);
    }

    /// A gauge family of one unlabelled sample.
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.family(name, MetricType::Gauge, help);
        self.sample(name, &[], value);
    }

    /// A histogram family: `_bucket{le=…}` (cumulative, `+Inf` last), `_sum`, `_count`.
    pub fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.family(name, MetricType::Histogram, help);
        let buckets = h.cumulative();
        let count = buckets.last().map_or(0, |b| b.1);
        let bucket = format!("{name}_bucket");
        for (le, n) in buckets {
            self.sample(&bucket, &[("le", &number(le))], n as f64);
        }
        self.sample(&format!("{name}_sum"), &[], h.sum());
        self.sample(&format!("{name}_count"), &[], count as f64);
    }
}

/// A sample value as the format writes it: integers without a fraction, `+Inf`, `-Inf`, `NaN`.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        // Rust's shortest round-trip form, never an exponent: what Go's ParseFloat reads back.
        format!("{v}")
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`.
pub fn valid_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`, not starting with `__` (reserved).
fn valid_label(s: &str) -> bool {
    let mut c = s.chars();
    !s.starts_with("__")
        && c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_inf() {
        let h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.1, 0.5, 3.0, f64::NAN] {
            h.observe(v);
        }
        assert_eq!(h.cumulative(), vec![(0.1, 2), (1.0, 3), (f64::INFINITY, 4)]);
        assert_eq!(h.count(), 4);
        assert!((h.sum() - 3.65).abs() < 1e-12);
        let mut e = Exposition::new();
        e.histogram("microfed_x_seconds", "An example.", &h);
        assert_eq!(
            e.into_text(),
            "# HELP microfed_x_seconds An example.\n# TYPE microfed_x_seconds histogram\n\
             microfed_x_seconds_bucket{le=\"0.1\"} 2\nmicrofed_x_seconds_bucket{le=\"1\"} 3\n\
             microfed_x_seconds_bucket{le=\"+Inf\"} 4\nmicrofed_x_seconds_sum 3.65\n\
             microfed_x_seconds_count 4\n"
        );
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut e = Exposition::new();
        e.family(
            "microfed_y_total",
            MetricType::Counter,
            "Line one\nback\\slash",
        );
        e.sample("microfed_y_total", &[("reason", "a\"b\\c\nd")], 3.0);
        assert_eq!(
            e.into_text(),
            "# HELP microfed_y_total Line one\\nback\\\\slash\n# TYPE microfed_y_total counter\n\
             microfed_y_total{reason=\"a\\\"b\\\\c\\nd\"} 3\n"
        );
    }

    #[test]
    fn names_and_numbers_follow_the_format() {
        assert!(valid_name("microfed_images_segmented_total"));
        assert!(!valid_name("9lives") && !valid_name("a-b") && !valid_name(""));
        assert!(valid_label("le") && !valid_label("__name__") && !valid_label("a.b"));
        assert_eq!(number(2.0), "2");
        assert_eq!(number(0.25), "0.25");
        assert_eq!(number(1e21), "1000000000000000000000");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(f64::NAN), "NaN");
    }

    #[test]
    fn counters_and_gauges_hold_their_values() {
        let c = Counter::default();
        c.inc();
        c.add(4);
        assert_eq!(c.get(), 5);
        let g = Gauge::default();
        g.set(-2.5);
        assert_eq!(g.get(), -2.5);
    }
}
