//! Training checkpoints: everything needed to continue a run exactly where it stopped.
//!
//! Map:
//! - [`Checkpoint`]: the parameters, the optimiser's state (absent in a best-weights file), the
//!   [`TrainState`] (epochs done, best metric, patience counter, the per-epoch history) and the
//!   run's identity (the settings a resumed run must share).
//! - [`Checkpoint::save`]: atomic write (temporary file, fsync, rename): a run killed mid-write leaves
//!   the previous checkpoint intact.
//! - [`Checkpoint::load`]: reads and checks one; [`CheckpointError`] names the file.
//!
//! File format (version [`FORMAT_VERSION`]), all integers little-endian:
//! ```text
//! 8 bytes  magic "MFEDCKPT"
//! u32      format version
//! u64      header length H
//! H bytes  JSON header: state, identity, tensor names and shapes, optimiser step counts and buffer
//!          counts, SHA-256 of the payload
//! payload  f32 little-endian: every parameter tensor in order, then each tensor's optimiser buffers
//! ```
//! Raw floats rather than JSON numbers keep a 2 M-parameter network at 8 MB per copy and bit-exact;
//! the SHA-256 catches a damaged payload that still has the right length.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use microfed_kernels::unet::{OptimizerState, ParamTensor, Params};

/// Magic bytes at the start of a checkpoint file.
pub const MAGIC: &[u8; 8] = b"MFEDCKPT";
/// The format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Errors reading or writing a checkpoint; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: corrupt checkpoint: {problem} (delete it or start over with --fresh)")]
    Corrupt { path: PathBuf, problem: String },
    #[error(
        "{path}: checkpoint format version {found}, this microfed reads version {FORMAT_VERSION} \
         (start over with --fresh)"
    )]
    Version { path: PathBuf, found: u32 },
}

/// One finished epoch, as logged and written to `training_log.csv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: usize,
    /// Mean training loss over the epoch's steps.
    pub loss: f64,
    pub cross_entropy: f64,
    pub dice: f64,
    /// Learning rate at the epoch's last step.
    pub lr: f64,
    /// Validation mean IoU, per-class IoU and boundary F1 (absent without validation images).
    pub val_mean_iou: Option<f64>,
    pub val_class_iou: Vec<Option<f64>>,
    pub val_boundary_f1: Option<f64>,
    /// Wall time of the epoch (training and validation).
    pub seconds: f64,
}

/// Where a run stands after an epoch.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TrainState {
    /// Epochs finished.
    pub epoch: usize,
    /// Optimiser steps taken (drives the learning-rate schedule).
    pub step: u64,
    /// Best validation mean IoU so far and the epoch that reached it.
    pub best_mean_iou: Option<f64>,
    pub best_epoch: usize,
    /// Epochs since the best one (early stopping compares it with the patience).
    pub epochs_without_improvement: usize,
    /// Set when early stopping ended the run.
    pub stopped_early: bool,
    pub history: Vec<EpochRecord>,
    /// Training wall time summed over all sessions of the run.
    pub seconds: f64,
}

/// A checkpoint in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub state: TrainState,
    /// Settings a resumed run must share (name → value as text).
    pub identity: BTreeMap<String, String>,
    pub params: Params,
    /// `None` in a weights-only file (the best epoch's parameters).
    pub optimizer: Option<OptimizerState>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    state: TrainState,
    identity: BTreeMap<String, String>,
    classes: usize,
    tensors: Vec<(String, Vec<usize>)>,
    optimizer: Option<HeaderOptim>,
    payload_sha256: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderOptim {
    steps: Vec<u32>,
    buffers: Vec<usize>,
}

impl Checkpoint {
    /// Writes the checkpoint atomically to `path` (via `path` + `.tmp`).
    pub fn save(&self, path: &Path) -> Result<(), CheckpointError> {
        let io = |source| CheckpointError::Io {
            path: path.to_owned(),
            source,
        };
        let mut payload: Vec<u8> = Vec::with_capacity(4 * self.params.len() * 3);
        let mut put = |v: &[f32]| v.iter().for_each(|x| payload.extend(x.to_le_bytes()));
        for t in &self.params.tensors {
            put(&t.data);
        }
        if let Some(opt) = &self.optimizer {
            for bufs in &opt.buffers {
                bufs.iter().for_each(|b| put(b));
            }
        }
        let header = Header {
            state: self.state.clone(),
            identity: self.identity.clone(),
            classes: self.params.classes,
            tensors: self
                .params
                .tensors
                .iter()
                .map(|t| (t.name.clone(), t.shape.clone()))
                .collect(),
            optimizer: self.optimizer.as_ref().map(|o| HeaderOptim {
                steps: o.steps.clone(),
                buffers: o.buffers.iter().map(Vec::len).collect(),
            }),
            payload_sha256: hex::encode(Sha256::digest(&payload)),
        };
        let json = serde_json::to_vec(&header).map_err(|e| io(std::io::Error::other(e)))?;
        let tmp = tmp_path(path);
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(MAGIC)?;
            f.write_all(&FORMAT_VERSION.to_le_bytes())?;
            f.write_all(&(json.len() as u64).to_le_bytes())?;
            f.write_all(&json)?;
            f.write_all(&payload)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(io)
    }

    /// Reads and checks a checkpoint.
    pub fn load(path: &Path) -> Result<Self, CheckpointError> {
        let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io {
            path: path.to_owned(),
            source,
        })?;
        let corrupt = |problem: String| CheckpointError::Corrupt {
            path: path.to_owned(),
            problem,
        };
        if bytes.len() < 20 || &bytes[..8] != MAGIC {
            return Err(corrupt(
                "not a microfed checkpoint (bad magic bytes)".into(),
            ));
        }
        let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if version != FORMAT_VERSION {
            return Err(CheckpointError::Version {
                path: path.to_owned(),
                found: version,
            });
        }
        let mut len8 = [0u8; 8];
        len8.copy_from_slice(&bytes[12..20]);
        let hlen = u64::from_le_bytes(len8);
        let body = &bytes[20..];
        if hlen > body.len() as u64 {
            return Err(corrupt(format!(
                "header of {hlen} bytes but only {} follow (truncated?)",
                body.len()
            )));
        }
        let (json, payload) = body.split_at(hlen as usize);
        let header: Header = serde_json::from_slice(json)
            .map_err(|e| corrupt(format!("header is not valid: {e}")))?;
        let n_params: usize = header
            .tensors
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        let n_opt: usize = header.optimizer.as_ref().map_or(0, |o| {
            o.buffers
                .iter()
                .zip(&header.tensors)
                .map(|(nb, (_, s))| nb * s.iter().product::<usize>())
                .sum()
        });
        let want = 4 * (n_params + n_opt);
        if payload.len() != want {
            return Err(corrupt(format!(
                "payload is {} bytes, the header describes {want} (truncated?)",
                payload.len()
            )));
        }
        if hex::encode(Sha256::digest(payload)) != header.payload_sha256 {
            return Err(corrupt("payload SHA-256 does not match the header".into()));
        }
        let mut floats = payload
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        let mut take = |n: usize| -> Vec<f32> { floats.by_ref().take(n).collect() };
        let tensors: Vec<ParamTensor> = header
            .tensors
            .iter()
            .map(|(name, shape)| ParamTensor {
                name: name.clone(),
                shape: shape.clone(),
                data: take(shape.iter().product()),
            })
            .collect();
        let params = Params {
            classes: header.classes,
            tensors,
        };
        params
            .validate()
            .map_err(|e| corrupt(format!("parameters: {e}")))?;
        let optimizer = match &header.optimizer {
            None => None,
            Some(o) => {
                if o.steps.len() != params.tensors.len() || o.buffers.len() != params.tensors.len()
                {
                    return Err(corrupt(
                        "optimiser state does not cover every tensor".into(),
                    ));
                }
                let buffers = o
                    .buffers
                    .iter()
                    .zip(&params.tensors)
                    .map(|(&nb, t)| (0..nb).map(|_| take(t.data.len())).collect())
                    .collect();
                Some(OptimizerState {
                    steps: o.steps.clone(),
                    buffers,
                })
            }
        };
        Ok(Self {
            state: header.state,
            identity: header.identity,
            params,
            optimizer,
        })
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}
