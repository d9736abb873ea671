//! The last stage: telling the world that a micrograph was segmented.
//!
//! Seam for the federated issue: MQTT publishing (topic and payload schema in docs/protocol.md) will be
//! another [`Publisher`]. The pipeline calls [`Publisher::publish`] once per written result, in order,
//! from one task; a slow publisher makes the writer wait (the channel before it is bounded), and a
//! failed publish is logged and counted but never stops segmentation: the outputs are already on disk.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use crate::features::Features;
use crate::pipeline::outputs::OutputNames;

/// One segmented micrograph, as handed to the publisher.
#[derive(Debug, Clone)]
pub struct SegmentedImage {
    /// The micrograph file.
    pub source: PathBuf,
    /// Its key in the journal (file name in the watched folder).
    pub key: String,
    pub sha256: String,
    pub outputs: OutputNames,
    pub features: Features,
    /// Which model segmented it (path and swap generation).
    pub model: String,
    /// From capture to outputs written.
    pub latency: Duration,
}

/// Why a result could not be published.
#[derive(Debug, thiserror::Error)]
#[error("publishing {key}: {message}")]
pub struct PublishError {
    pub key: String,
    pub message: String,
}

/// Where results go after they are written.
pub trait Publisher: Send + 'static {
    fn publish(
        &mut self,
        result: &SegmentedImage,
    ) -> impl Future<Output = Result<(), PublishError>> + Send;
}

/// Publishes nowhere: logs each result at debug level. The agent's publisher until MQTT exists.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogPublisher;

impl Publisher for LogPublisher {
    async fn publish(&mut self, r: &SegmentedImage) -> Result<(), PublishError> {
        tracing::debug!(
            file = %r.key,
            mask = %r.outputs.mask.display(),
            model = %r.model,
            latency_ms = r.latency.as_secs_f64() * 1e3,
            "segmented"
        );
        Ok(())
    }
}
