//! Counters and latencies of a running pipeline, and the status line built from them.
//!
//! Every stage bumps atomic counters; the write stage records the capture → outputs-written latency
//! of each image in a bounded window, from which the status line takes the throughput of the last
//! minute and the p50 and p99 latencies, and counts it into a Prometheus histogram. [`Stats`] is
//! also the agent's pipeline metrics (`/metrics`, [`crate::prometheus::Collect`]).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::prometheus::{Collect, Exposition, Histogram, LATENCY_BUCKETS};

/// Latencies kept for the percentiles (the most recent ones).
const WINDOW: usize = 4096;

/// Shared counters of one pipeline run.
#[derive(Debug)]
pub struct Stats {
    /// Files handed to the pipeline by the capture stage.
    pub captured: AtomicU64,
    /// Masks written.
    pub segmented: AtomicU64,
    /// Files that could not be decoded or segmented.
    pub failed: AtomicU64,
    /// Failed files moved to the quarantine folder (the agent's policy; `segment` only reports).
    pub quarantined: AtomicU64,
    /// Files skipped because the journal already had them (or they vanished before reading).
    pub skipped: AtomicU64,
    /// Results the publisher refused.
    pub publish_errors: AtomicU64,
    /// Files in the watched folder waiting for their size to settle or for room in the pipeline.
    pub waiting: AtomicU64,
    started: Instant,
    latencies: Mutex<VecDeque<(Instant, Duration)>>,
    /// Every capture → mask latency since start, in seconds (the window above forgets).
    latency_histogram: Histogram,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            captured: AtomicU64::new(0),
            segmented: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            quarantined: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            publish_errors: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            started: Instant::now(),
            latencies: Mutex::new(VecDeque::with_capacity(WINDOW)),
            latency_histogram: Histogram::new(LATENCY_BUCKETS),
        }
    }
}

/// A snapshot for the status line (and tests and benchmarks).
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    /// Captured but not yet finished (decoding, segmenting, writing, or queued between).
    pub in_pipeline: u64,
    pub waiting: u64,
    pub segmented: u64,
    pub failed: u64,
    pub skipped: u64,
    pub publish_errors: u64,
    /// Masks written in the last minute (or since the start, scaled, when younger).
    pub per_minute: f64,
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
}

impl Stats {
    /// Records one finished image.
    pub fn record_latency(&self, latency: Duration) {
        self.latency_histogram.observe(latency.as_secs_f64());
        let mut l = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
        if l.len() == WINDOW {
            l.pop_front();
        }
        l.push_back((Instant::now(), latency));
    }

    /// All latencies in the window, oldest first.
    pub fn latencies(&self) -> Vec<Duration> {
        let l = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
        l.iter().map(|&(_, d)| d).collect()
    }

    pub fn status(&self) -> Status {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (segmented, failed, skipped) =
            (get(&self.segmented), get(&self.failed), get(&self.skipped));
        let now = Instant::now();
        let (per_minute, mut recent) = {
            let l = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
            let minute = Duration::from_secs(60);
            let last_minute = l
                .iter()
                .filter(|(t, _)| now.duration_since(*t) <= minute)
                .count() as f64;
            let age = now.duration_since(self.started).min(minute).as_secs_f64();
            let rate = if age > 0.0 {
                last_minute * 60.0 / age.max(1.0)
            } else {
                0.0
            };
            (rate, l.iter().map(|&(_, d)| d).collect::<Vec<_>>())
        };
        recent.sort();
        Status {
            in_pipeline: get(&self.captured).saturating_sub(segmented + failed + skipped),
            waiting: get(&self.waiting),
            segmented,
            failed,
            skipped,
            publish_errors: get(&self.publish_errors),
            per_minute,
            p50: percentile(&recent, 0.50),
            p99: percentile(&recent, 0.99),
        }
    }
}

impl Collect for Stats {
    fn collect(&self, out: &mut Exposition) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        out.counter(
            "microfed_images_captured_total",
            "Micrographs handed to the pipeline by the capture stage.",
            get(&self.captured),
        );
        out.counter(
            "microfed_images_segmented_total",
            "Micrographs segmented (mask and outputs written).",
            get(&self.segmented),
        );
        out.counter(
            "microfed_images_failed_total",
            "Micrographs that could not be decoded or segmented.",
            get(&self.failed),
        );
        out.counter(
            "microfed_images_quarantined_total",
            "Failed micrographs moved to the quarantine folder.",
            get(&self.quarantined),
        );
        out.counter(
            "microfed_images_skipped_total",
            "Files skipped: already in the journal, or gone before they were read.",
            get(&self.skipped),
        );
        out.counter(
            "microfed_result_publish_errors_total",
            "Per-image results the publisher could not send.",
            get(&self.publish_errors),
        );
        let st = self.status();
        out.gauge(
            "microfed_images_in_pipeline",
            "Micrographs captured and not yet finished.",
            st.in_pipeline as f64,
        );
        out.gauge(
            "microfed_images_waiting",
            "Files in the watched folder waiting to settle or for room in the pipeline.",
            st.waiting as f64,
        );
        out.histogram(
            "microfed_capture_to_mask_seconds",
            "Time from a micrograph's capture to its mask written.",
            &self.latency_histogram,
        );
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Option<Duration>| {
            d.map_or("-".into(), |d| format!("{:.0} ms", d.as_secs_f64() * 1e3))
        };
        write!(
            f,
            "queue {} (+{} settling), {:.1} images/min, latency p50 {} p99 {}, segmented {}, \
             failed {}, skipped {}",
            self.in_pipeline,
            self.waiting,
            self.per_minute,
            ms(self.p50),
            ms(self.p99),
            self.segmented,
            self.failed,
            self.skipped
        )?;
        if self.publish_errors > 0 {
            write!(f, ", publish errors {}", self.publish_errors)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 0.5), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&v, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(percentile(&v[..1], 0.99), Some(Duration::from_millis(1)));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn queue_depth_is_captured_minus_finished() {
        let s = Stats::default();
        s.captured.store(10, Ordering::Relaxed);
        s.segmented.store(6, Ordering::Relaxed);
        s.failed.store(1, Ordering::Relaxed);
        s.record_latency(Duration::from_millis(20));
        s.record_latency(Duration::from_millis(40));
        let st = s.status();
        assert_eq!(st.in_pipeline, 3);
        assert_eq!(st.p50, Some(Duration::from_millis(20)));
        assert_eq!(st.p99, Some(Duration::from_millis(40)));
        assert!(st.to_string().contains("queue 3"), "{st}");
        let text = Exposition::of(&[&s]);
        assert!(
            text.contains("microfed_images_segmented_total 6\n"),
            "{text}"
        );
        assert!(
            text.contains("microfed_capture_to_mask_seconds_bucket{le=\"0.025\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("microfed_capture_to_mask_seconds_count 2\n"),
            "{text}"
        );
        assert!(text.contains("microfed_images_in_pipeline 3\n"), "{text}");
    }
}
