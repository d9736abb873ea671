//! Compression of decoder updates (local − global) before they go over MQTT.
//!
//! A lab's update is 783,874 `f32` values (3.1 MB) for a 2-class decoder; a Jetson on a lab network
//! or a metered link should not send that every round. Each stage below is optional and the dense
//! fp32 encoding is the exact baseline:
//! 1. **error feedback** ([`Residual`]): what earlier rounds dropped or rounded is added to this round's
//!    update first, so nothing is lost for good, only delayed (Seide et al. 2014, Karimireddy et al.
//!    2019). Afterwards the residual is exactly `(update + old residual) − decompress(bytes)`.
//! 2. **top-k** per tensor: keep the `round(fraction · len)` coordinates of largest magnitude (at least
//!    one per non-empty tensor), chosen with `select_nth_unstable` (linear time, not a full sort).
//! 3. **quantization**: symmetric per-tensor int8 (scale = max|v| / 127) or int4 (max|v| / 7),
//!    round to nearest.
//! 4. **zstd** over everything after the fixed header.
//!
//! Map: [`TensorSpan`] / [`decoder_layout`] (how the flat vector splits into named tensors),
//! [`CompressionConfig`] / [`Quantize`], [`Residual`], [`compress`] / [`decompress`], [`dense_len`],
//! [`top_k_count`], [`CompressError`].
//!
//! Wire format (self-describing, version 1; all integers little-endian, varints are LEB128):
//! ```text
//! "MFUP" | version u8 = 1 | flags u8 | tensor count varint | body (zstd frame if flags.ZSTD)
//! flags: bit 0 ZSTD, bit 1 SPARSE, bits 2-3 values (0 f32, 1 int8, 2 int4), bits 4-7 zero
//! body, per tensor in layout order:
//!   len varint | kept varint
//!   if SPARSE and 0 < kept < len: index coding u8 (0 = gaps, 1 = bitmap), then either
//!     kept varints, each `index − previous index − 1` (the first is the index itself), or
//!     ceil(len / 8) bytes, bit i (LSB first) set when coordinate i is kept
//!   if quantized and kept > 0: scale f32
//!   values: kept × f32 | kept × i8 in −127..=127 | ceil(kept / 2) bytes of two's-complement
//!           nibbles in −7..=7, low nibble first, the unused last nibble zero
//! ```
//! The encoder picks whichever index coding is smaller, so a body never exceeds a bound computed from
//! the layout, which is the capacity [`decompress`] allows zstd (no decompression bombs). Decoding
//! checks every length, index and value and returns [`CompressError::Malformed`] rather than panicking
//! on any input.

use std::cmp::Ordering;
use std::path::{Path, PathBuf};

use crate::fsio::{FsError, write_atomic};
// The settings travel in round announcements, so the wire schema owns them; their checks and
// their use are here.
pub use crate::wire::protocol::{CompressionConfig, Quantize};

/// One named tensor of the flat decoder vector: `len` consecutive values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpan {
    /// e.g. `decoder.2.conv1.weight`, `decoder.head.bias`.
    pub name: String,
    /// Number of `f32` values.
    pub len: usize,
}

/// The tensors of the decoder and head of a `classes`-class U-Net, in the order of
/// [`microfed_kernels::unet::Params::decoder_flat`]: each convolution's weight
/// (`c_out · c_in · k · k`) then its bias (`c_out`).
pub fn decoder_layout(classes: usize) -> Vec<TensorSpan> {
    microfed_kernels::unet::layer_specs(classes)
        .into_iter()
        .skip(microfed_kernels::unet::FIRST_DECODER_TENSOR / 2)
        .flat_map(|(name, conv)| {
            [
                TensorSpan {
                    name: format!("{name}.weight"),
                    len: conv.weight_len(),
                },
                TensorSpan {
                    name: format!("{name}.bias"),
                    len: conv.c_out,
                },
            ]
        })
        .collect()
}

/// Bytes of the update as dense `f32` (the baseline compression ratios are quoted against).
pub fn dense_len(layout: &[TensorSpan]) -> usize {
    4 * total_len(layout)
}

fn total_len(layout: &[TensorSpan]) -> usize {
    layout.iter().map(|t| t.len).sum()
}

/// How many coordinates top-k keeps in a tensor of `len` values: `round(fraction · len)`, at least one
/// when `len > 0` (every tensor, the head's two biases included, sends its largest change), at most
/// `len`. Rounding to nearest rather than up keeps `0.3 · 10` at 3 despite `0.3f32` being a hair
/// above 0.3.
pub fn top_k_count(len: usize, fraction: f32) -> usize {
    if len == 0 {
        return 0;
    }
    let k = (f64::from(fraction) * len as f64).round();
    if k.is_nan() || k < 1.0 {
        1
    } else if k >= len as f64 {
        len
    } else {
        k as usize
    }
}

impl Quantize {
    /// Largest code magnitude, or `None` for `f32`.
    fn levels(self) -> Option<f32> {
        match self {
            Quantize::None => None,
            Quantize::Int8 => Some(127.0),
            Quantize::Int4 => Some(7.0),
        }
    }
    fn code(self) -> u8 {
        match self {
            Quantize::None => 0,
            Quantize::Int8 => 1,
            Quantize::Int4 => 2,
        }
    }
    fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Quantize::None),
            1 => Some(Quantize::Int8),
            2 => Some(Quantize::Int4),
            _ => None,
        }
    }
}

impl CompressionConfig {
    /// Checks each field's range; the error names the field.
    pub fn validate(&self) -> Result<(), CompressError> {
        if let Some(f) = self.top_k
            && !(f.is_finite() && f > 0.0 && f <= 1.0)
        {
            return Err(CompressError::Config {
                field: "top_k",
                problem: format!("{f} is not a fraction in (0, 1]"),
            });
        }
        if let Some(level) = self.zstd_level {
            let range = zstd::compression_level_range();
            if !range.contains(&level) {
                return Err(CompressError::Config {
                    field: "zstd_level",
                    problem: format!(
                        "{level} is outside zstd's range {}..={}",
                        range.start(),
                        range.end()
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Errors compressing, decompressing, or loading/saving a residual.
#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    #[error("compression config: {field}: {problem}")]
    Config {
        field: &'static str,
        problem: String,
    },
    #[error("{what} has {got} values, the decoder layout has {expected}")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("{what}: {tensor}[{index}] is {value}, not a finite number")]
    NonFinite {
        what: &'static str,
        tensor: String,
        index: usize,
        value: f32,
    },
    #[error("tensor {tensor} has {len} values, more than the 2^32 − 1 the index coding supports")]
    TensorTooLarge { tensor: String, len: usize },
    #[error("error feedback is enabled but no residual was given")]
    MissingResidual,
    #[error("compressed update: {0}")]
    Malformed(String),
    #[error("zstd: {0}")]
    Zstd(std::io::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {problem}")]
    ResidualFile { path: PathBuf, problem: String },
    #[error(transparent)]
    Write(#[from] FsError),
}

fn malformed(msg: impl Into<String>) -> CompressError {
    CompressError::Malformed(msg.into())
}

/// Error feedback memory: per coordinate, what compression has not yet delivered. It is added to the
/// next update before compressing, so a coordinate that top-k skipped keeps growing until it is sent,
/// and rounding errors do not accumulate as bias.
#[derive(Debug, Clone, PartialEq)]
pub struct Residual {
    values: Vec<f32>,
}

/// First 8 bytes of a residual file; the last byte is the format version.
const RESIDUAL_MAGIC: &[u8; 8] = b"MFRESID\x01";

impl Residual {
    /// A zero residual of `len` coordinates.
    pub fn new(len: usize) -> Self {
        Self {
            values: vec![0.0; len],
        }
    }

    /// The residual saved at `path` by [`Residual::save`], or zeros when there is no such file (first
    /// round). A file of another length, a damaged file or a non-finite value is an error naming the
    /// file.
    pub fn load(path: &Path, len: usize) -> Result<Self, CompressError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::new(len)),
            Err(source) => {
                return Err(CompressError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let bad = |problem: String| CompressError::ResidualFile {
            path: path.to_owned(),
            problem,
        };
        if bytes.len() < 16 || &bytes[..8] != RESIDUAL_MAGIC {
            return Err(bad("not a microfed residual file (bad header)".into()));
        }
        let count = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        if count != len as u64 {
            return Err(bad(format!(
                "holds {count} values, the decoder has {len} (a residual of another model?)"
            )));
        }
        let body = &bytes[16..];
        if body.len() as u64 != 4 * count {
            return Err(bad(format!(
                "{} bytes of values, expected {} (truncated?)",
                body.len(),
                4 * count
            )));
        }
        let values: Vec<f32> = body
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!("value {i} is {}", values[i])));
        }
        Ok(Self { values })
    }

    /// Writes the residual to `path` atomically (temporary file in the same folder, flushed, renamed),
    /// so a crash leaves the old residual or the new one.
    pub fn save(&self, path: &Path) -> Result<(), CompressError> {
        write_atomic(path, &self.to_bytes())?;
        Ok(())
    }

    /// The file [`Residual::save`] writes and [`Residual::load`] reads.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(16 + 4 * self.values.len());
        bytes.extend_from_slice(RESIDUAL_MAGIC);
        bytes.extend_from_slice(&(self.values.len() as u64).to_le_bytes());
        for v in &self.values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        bytes
    }

    /// The residual values, in decoder-flat order.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Number of coordinates.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether it has no coordinates.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Euclidean norm (in `f64`), for logging how much is still owed.
    pub fn l2_norm(&self) -> f64 {
        self.values
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt()
    }

    /// Forgets everything owed (e.g. when the federation restarts from a new base model).
    pub fn clear(&mut self) {
        self.values.fill(0.0);
    }
}

const MAGIC: &[u8; 4] = b"MFUP";
const VERSION: u8 = 1;
const FLAG_ZSTD: u8 = 1;
const FLAG_SPARSE: u8 = 2;
const QUANT_SHIFT: u8 = 2;
const QUANT_MASK: u8 = 0b1100;
const KNOWN_FLAGS: u8 = FLAG_ZSTD | FLAG_SPARSE | QUANT_MASK;
const CODING_GAPS: u8 = 0;
const CODING_BITMAP: u8 = 1;

/// Compresses `update` (decoder-flat order, split by `layout`) into self-describing bytes.
///
/// With `cfg.error_feedback`, `residual` is required: it is added to the update first and replaced by
/// `(update + old residual) − decompress(bytes)`, bit for bit. Without error feedback a given residual
/// is neither read nor changed. NaN or infinite values (in the update, or in update + residual) are
/// rejected and leave the residual untouched.
pub fn compress(
    update: &[f32],
    layout: &[TensorSpan],
    cfg: &CompressionConfig,
    residual: Option<&mut Residual>,
) -> Result<Vec<u8>, CompressError> {
    cfg.validate()?;
    let total = total_len(layout);
    if update.len() != total {
        return Err(CompressError::Length {
            what: "update",
            expected: total,
            got: update.len(),
        });
    }
    check_finite("update", update, layout)?;
    let mut residual = if cfg.error_feedback {
        let r = residual.ok_or(CompressError::MissingResidual)?;
        if r.len() != total {
            return Err(CompressError::Length {
                what: "residual",
                expected: total,
                got: r.len(),
            });
        }
        Some(r)
    } else {
        None
    };
    // What is compressed: the update plus everything owed from earlier rounds.
    let x: Vec<f32> = match &residual {
        Some(r) => update.iter().zip(&r.values).map(|(u, r)| u + r).collect(),
        None => update.to_vec(),
    };
    if residual.is_some() {
        check_finite("update + residual", &x, layout)?;
    }

    let sparse = cfg.top_k.is_some();
    let flags = (if cfg.zstd_level.is_some() {
        FLAG_ZSTD
    } else {
        0
    }) | (if sparse { FLAG_SPARSE } else { 0 })
        | (cfg.quantize.code() << QUANT_SHIFT);
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(flags);
    put_varint(&mut out, layout.len() as u64);

    let mut body = Vec::with_capacity(body_bound(layout).min(dense_len(layout) + 64));
    // Decoded value of each coordinate, for the new residual: 0 where nothing was sent.
    let mut decoded = residual.as_ref().map(|_| vec![0.0f32; total]);
    let mut offset = 0;
    for span in layout {
        let t = &x[offset..offset + span.len];
        if span.len > u32::MAX as usize {
            return Err(CompressError::TensorTooLarge {
                tensor: span.name.clone(),
                len: span.len,
            });
        }
        let kept_idx: Option<Vec<u32>> = cfg.top_k.map(|f| top_k_indices(t, f));
        let kept: Vec<f32> = match &kept_idx {
            Some(idx) => idx.iter().map(|&i| t[i as usize]).collect(),
            None => t.to_vec(),
        };
        put_varint(&mut body, span.len as u64);
        put_varint(&mut body, kept.len() as u64);
        if let Some(idx) = &kept_idx
            && !idx.is_empty()
            && idx.len() < span.len
        {
            put_indices(&mut body, idx, span.len);
        }
        let sent = put_values(&mut body, &kept, cfg.quantize);
        if let Some(dec) = decoded.as_mut() {
            let dec = &mut dec[offset..offset + span.len];
            match &kept_idx {
                Some(idx) => idx
                    .iter()
                    .zip(&sent)
                    .for_each(|(&i, &v)| dec[i as usize] = v),
                None => dec.copy_from_slice(&sent),
            }
        }
        offset += span.len;
    }
    match cfg.zstd_level {
        Some(level) => {
            out.extend(zstd::bulk::compress(&body, level).map_err(CompressError::Zstd)?);
        }
        None => out.extend(body),
    }
    // Only now that nothing can fail: the residual becomes what this message does not deliver.
    if let (Some(r), Some(dec)) = (residual.as_mut(), decoded) {
        for ((r, &xv), d) in r.values.iter_mut().zip(&x).zip(dec) {
            *r = xv - d;
        }
    }
    Ok(out)
}

/// Decodes bytes made by [`compress`] back into a dense update of `layout`'s length (zeros where top-k
/// sent nothing). Every length, index, code and value is checked; any inconsistency, truncation or
/// trailing byte is a [`CompressError::Malformed`] naming the tensor, never a panic.
pub fn decompress(bytes: &[u8], layout: &[TensorSpan]) -> Result<Vec<f32>, CompressError> {
    if let Some(t) = layout.iter().find(|t| t.len > u32::MAX as usize) {
        return Err(CompressError::TensorTooLarge {
            tensor: t.name.clone(),
            len: t.len,
        });
    }
    let mut r = Reader::new(bytes);
    if r.take(4, "magic")? != MAGIC {
        return Err(malformed("not a microfed update (bad magic)"));
    }
    let version = r.u8("version")?;
    if version != VERSION {
        return Err(malformed(format!(
            "format version {version}, this build reads {VERSION}"
        )));
    }
    let flags = r.u8("flags")?;
    if flags & !KNOWN_FLAGS != 0 {
        return Err(malformed(format!("unknown flags {flags:#010b}")));
    }
    let quantize = Quantize::from_code((flags & QUANT_MASK) >> QUANT_SHIFT)
        .ok_or_else(|| malformed(format!("unknown value coding in flags {flags:#010b}")))?;
    let sparse = flags & FLAG_SPARSE != 0;
    let count = r.varint("tensor count")?;
    if count != layout.len() as u64 {
        return Err(malformed(format!(
            "{count} tensors, the decoder layout has {}",
            layout.len()
        )));
    }
    let inflated;
    let body = if flags & FLAG_ZSTD != 0 {
        inflated = zstd::bulk::decompress(r.rest(), body_bound(layout))
            .map_err(|e| malformed(format!("zstd body: {e}")))?;
        &inflated[..]
    } else {
        r.rest()
    };
    let mut r = Reader::new(body);
    let mut out = vec![0.0f32; total_len(layout)];
    let mut offset = 0;
    for span in layout {
        let name = &span.name;
        let len = r.varint(name)?;
        if len != span.len as u64 {
            return Err(malformed(format!(
                "{name}: {len} values, the layout has {}",
                span.len
            )));
        }
        let len = span.len;
        let kept = r.varint(name)?;
        if kept > len as u64 {
            return Err(malformed(format!("{name}: {kept} kept values of {len}")));
        }
        let kept = kept as usize;
        if !sparse && kept != len {
            return Err(malformed(format!(
                "{name}: {kept} values of {len} in a dense update"
            )));
        }
        let dst = &mut out[offset..offset + len];
        let indices = if sparse && kept > 0 && kept < len {
            Some(read_indices(&mut r, name, kept, len)?)
        } else {
            None
        };
        let values = read_values(&mut r, name, kept, quantize)?;
        match indices {
            Some(idx) => idx
                .iter()
                .zip(values)
                .for_each(|(&i, v)| dst[i as usize] = v),
            // No indices: every value was sent, or none (a sparse tensor with kept = 0).
            None if kept == len => dst.copy_from_slice(&values),
            None => {}
        }
        offset += len;
    }
    if !r.rest().is_empty() {
        return Err(malformed(format!(
            "{} bytes after the last tensor",
            r.rest().len()
        )));
    }
    Ok(out)
}

fn check_finite(what: &'static str, v: &[f32], layout: &[TensorSpan]) -> Result<(), CompressError> {
    let Some(i) = v.iter().position(|x| !x.is_finite()) else {
        return Ok(());
    };
    let (mut tensor, mut index) = (String::from("?"), i);
    let mut start = 0;
    for span in layout {
        if i < start + span.len {
            tensor = span.name.clone();
            index = i - start;
            break;
        }
        start += span.len;
    }
    Err(CompressError::NonFinite {
        what,
        tensor,
        index,
        value: v[i],
    })
}

/// Indices (ascending) of the `top_k_count` largest magnitudes; ties go to the lower index so the
/// choice is deterministic.
fn top_k_indices(t: &[f32], fraction: f32) -> Vec<u32> {
    let k = top_k_count(t.len(), fraction);
    let mut idx: Vec<u32> = (0..t.len() as u32).collect();
    if k < t.len() {
        let by_magnitude = |a: &u32, b: &u32| -> Ordering {
            t[*b as usize]
                .abs()
                .total_cmp(&t[*a as usize].abs())
                .then(a.cmp(b))
        };
        idx.select_nth_unstable_by(k - 1, by_magnitude);
        idx.truncate(k);
        idx.sort_unstable();
    }
    idx
}

/// Upper bound on the body's size: per tensor two varints, a coding byte, the smaller index coding
/// (at most the bitmap), a scale and 4 bytes per value.
fn body_bound(layout: &[TensorSpan]) -> usize {
    layout
        .iter()
        .map(|t| 10 + 10 + 1 + t.len.div_ceil(8) + 4 + 4 * t.len)
        .sum()
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    (64 - v.max(1).leading_zeros() as usize).div_ceil(7)
}

/// Writes ascending indices as gaps or a bitmap, whichever is smaller.
fn put_indices(out: &mut Vec<u8>, idx: &[u32], len: usize) {
    let gaps = |prev: &mut i64, i: u32| -> u64 {
        let g = (i64::from(i) - *prev - 1) as u64;
        *prev = i64::from(i);
        g
    };
    let mut prev = -1i64;
    let gap_bytes: usize = idx.iter().map(|&i| varint_len(gaps(&mut prev, i))).sum();
    let bitmap_bytes = len.div_ceil(8);
    if gap_bytes <= bitmap_bytes {
        out.push(CODING_GAPS);
        let mut prev = -1i64;
        for &i in idx {
            put_varint(out, gaps(&mut prev, i));
        }
    } else {
        out.push(CODING_BITMAP);
        let start = out.len();
        out.resize(start + bitmap_bytes, 0);
        for &i in idx {
            out[start + i as usize / 8] |= 1 << (i % 8);
        }
    }
}

/// Writes the values in the chosen coding and returns what the receiver will decode them as.
fn put_values(out: &mut Vec<u8>, v: &[f32], q: Quantize) -> Vec<f32> {
    let Some(levels) = q.levels() else {
        for x in v {
            out.extend_from_slice(&x.to_le_bytes());
        }
        return v.to_vec();
    };
    if v.is_empty() {
        return Vec::new();
    }
    let max = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let scale = max / levels;
    out.extend_from_slice(&scale.to_le_bytes());
    // A scale that underflowed to zero (values within 127 subnormal steps of 0) sends zeros; the
    // clamp guards the subnormal range, where `max / scale` can come out above `levels`.
    let codes: Vec<i8> = v
        .iter()
        .map(|&x| {
            if scale > 0.0 {
                (x / scale).round().clamp(-levels, levels) as i8
            } else {
                0
            }
        })
        .collect();
    match q {
        Quantize::Int8 => out.extend(codes.iter().map(|&c| c as u8)),
        _ => out.extend(
            codes
                .chunks(2)
                .map(|p| (p[0] as u8 & 0x0F) | ((*p.get(1).unwrap_or(&0) as u8 & 0x0F) << 4)),
        ),
    }
    codes.iter().map(|&c| dequantize(c, scale)).collect()
}

/// The one definition of a code's value, shared by the encoder (for the residual) and the decoder,
/// so that error feedback is exact.
fn dequantize(code: i8, scale: f32) -> f32 {
    f32::from(code) * scale
}

fn read_indices(
    r: &mut Reader<'_>,
    name: &str,
    kept: usize,
    len: usize,
) -> Result<Vec<u32>, CompressError> {
    let coding = r.u8(name)?;
    let mut idx = Vec::with_capacity(kept.min(r.remaining()));
    match coding {
        CODING_GAPS => {
            let mut next = 0u64; // smallest index the next one may take
            for _ in 0..kept {
                let i = next
                    .checked_add(r.varint(name)?)
                    .filter(|&i| i < len as u64)
                    .ok_or_else(|| malformed(format!("{name}: index beyond {len} values")))?;
                idx.push(i as u32);
                next = i + 1;
            }
        }
        CODING_BITMAP => {
            let bits = r.take(len.div_ceil(8), name)?;
            for (b, &byte) in bits.iter().enumerate() {
                for bit in 0..8 {
                    if byte & (1 << bit) != 0 {
                        let i = 8 * b + bit;
                        if i >= len {
                            return Err(malformed(format!(
                                "{name}: bitmap marks index {i} of {len} values"
                            )));
                        }
                        idx.push(i as u32);
                    }
                }
            }
            if idx.len() != kept {
                return Err(malformed(format!(
                    "{name}: bitmap marks {} values, the header says {kept}",
                    idx.len()
                )));
            }
        }
        other => {
            return Err(malformed(format!("{name}: unknown index coding {other}")));
        }
    }
    Ok(idx)
}

fn read_values(
    r: &mut Reader<'_>,
    name: &str,
    kept: usize,
    q: Quantize,
) -> Result<Vec<f32>, CompressError> {
    if kept == 0 {
        return Ok(Vec::new());
    }
    let scale = match q {
        Quantize::None => 1.0,
        _ => {
            let s = r.f32(name)?;
            if !(s.is_finite() && s >= 0.0) {
                return Err(malformed(format!("{name}: scale {s}")));
            }
            s
        }
    };
    let bad_code = |c: i32| malformed(format!("{name}: code {c} outside the symmetric range"));
    match q {
        Quantize::None => {
            let raw = r.take(4 * kept, name)?;
            raw.chunks_exact(4)
                .enumerate()
                .map(|(i, c)| {
                    let v = f32::from_le_bytes(c.try_into().expect("4 bytes"));
                    if v.is_finite() {
                        Ok(v)
                    } else {
                        // Well-formed but not a number: the aggregator counts these apart.
                        Err(CompressError::NonFinite {
                            what: "received update",
                            tensor: name.to_owned(),
                            index: i,
                            value: v,
                        })
                    }
                })
                .collect()
        }
        Quantize::Int8 => r
            .take(kept, name)?
            .iter()
            .map(|&b| match b as i8 {
                -128 => Err(bad_code(-128)),
                c => Ok(dequantize(c, scale)),
            })
            .collect(),
        Quantize::Int4 => {
            let raw = r.take(kept.div_ceil(2), name)?;
            if kept % 2 == 1 && raw[raw.len() - 1] >> 4 != 0 {
                return Err(malformed(format!("{name}: unused last nibble is not zero")));
            }
            raw.iter()
                .flat_map(|&b| [b & 0x0F, b >> 4])
                .take(kept)
                .map(|n| match n {
                    8 => Err(bad_code(-8)),
                    n => Ok(dequantize(((n << 4) as i8) >> 4, scale)),
                })
                .collect()
        }
    }
}

/// Bounds-checked reading of the wire format.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }
    fn rest(&self) -> &'a [u8] {
        &self.bytes[self.pos..]
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], CompressError> {
        if n > self.remaining() {
            return Err(malformed(format!(
                "{what}: truncated ({n} bytes needed at offset {}, {} left)",
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8, CompressError> {
        Ok(self.take(1, what)?[0])
    }
    fn f32(&mut self, what: &str) -> Result<f32, CompressError> {
        Ok(f32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
    }
    fn varint(&mut self, what: &str) -> Result<u64, CompressError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8(what)?;
            let part = u64::from(b & 0x7F);
            if shift == 63 && part > 1 {
                break;
            }
            v |= part << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(malformed(format!("{what}: varint overflows 64 bits")))
    }
}

/// An upper bound on one update message (envelope included) under `compression`, from the wire
/// format in [`this module`]: per tensor two varints, a coding byte, at most the
/// bitmap of kept indices, a scale and the values; zstd's worst-case expansion; 2 kB of envelope.
pub fn single_frame_bound(layout: &[TensorSpan], compression: &CompressionConfig) -> usize {
    let body: usize = layout
        .iter()
        .map(|t| {
            let kept = match compression.top_k {
                Some(f) => top_k_count(t.len, f),
                None => t.len,
            };
            let index = if kept < t.len {
                1 + t.len.div_ceil(8)
            } else {
                0
            };
            let values = match compression.quantize {
                Quantize::None => 4 * kept,
                Quantize::Int8 => kept,
                Quantize::Int4 => kept.div_ceil(2),
            };
            20 + index + 4 + values
        })
        .sum();
    let body = if compression.zstd_level.is_some() {
        zstd::zstd_safe::compress_bound(body)
    } else {
        body
    };
    body + 2048
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, Normal};

    fn small_layout() -> Vec<TensorSpan> {
        [
            ("a.weight", 300),
            ("a.bias", 3),
            ("b.weight", 1000),
            ("empty", 0),
            ("b.bias", 1),
        ]
        .into_iter()
        .map(|(n, len)| TensorSpan {
            name: n.into(),
            len,
        })
        .collect()
    }

    fn gaussian(len: usize, sigma: f32, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = Normal::new(0.0f32, sigma).unwrap();
        (0..len).map(|_| n.sample(&mut rng)).collect()
    }

    fn cfg(top_k: Option<f32>, quantize: Quantize, zstd: Option<i32>) -> CompressionConfig {
        CompressionConfig {
            top_k,
            error_feedback: false,
            quantize,
            zstd_level: zstd,
        }
    }

    #[test]
    fn decoder_layout_matches_the_unet_parameters() {
        let layout = decoder_layout(2);
        let p = microfed_kernels::unet::Params::init(2, 0).unwrap();
        let dec = &p.tensors[microfed_kernels::unet::FIRST_DECODER_TENSOR..];
        assert_eq!(layout.len(), dec.len());
        for (s, t) in layout.iter().zip(dec) {
            assert_eq!((s.name.as_str(), s.len), (t.name.as_str(), t.data.len()));
        }
        assert_eq!(total_len(&layout), 783_874);
        assert_eq!(dense_len(&layout), 4 * 783_874);
        assert_eq!(layout.last().unwrap().name, "decoder.head.bias");
    }

    #[test]
    fn dense_round_trip_is_exact_with_and_without_zstd() {
        let layout = small_layout();
        let u = gaussian(total_len(&layout), 0.01, 1);
        for z in [None, Some(3)] {
            let bytes = compress(&u, &layout, &cfg(None, Quantize::None, z), None).unwrap();
            let back = decompress(&bytes, &layout).unwrap();
            assert_eq!(
                back.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                u.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
        // Dense uncompressed = header + two varints per tensor + 4 bytes per value.
        let bytes = compress(&u, &layout, &CompressionConfig::default(), None).unwrap();
        let varints: usize = layout.iter().map(|t| 2 * varint_len(t.len as u64)).sum();
        assert_eq!(bytes.len(), 7 + varints + dense_len(&layout));
    }

    #[test]
    fn int8_and_int4_errors_are_at_most_half_a_step() {
        let layout = small_layout();
        let u = gaussian(total_len(&layout), 0.3, 2);
        for (q, levels) in [(Quantize::Int8, 127.0f32), (Quantize::Int4, 7.0)] {
            let back = decompress(
                &compress(&u, &layout, &cfg(None, q, None), None).unwrap(),
                &layout,
            )
            .unwrap();
            let mut off = 0;
            for span in &layout {
                let t = &u[off..off + span.len];
                let scale = t.iter().fold(0.0f32, |m, v| m.max(v.abs())) / levels;
                for (a, b) in t.iter().zip(&back[off..off + span.len]) {
                    assert!(
                        (a - b).abs() <= scale / 2.0 * (1.0 + 1e-5),
                        "{q:?} {}: {a} → {b}, scale {scale}",
                        span.name
                    );
                }
                // The largest magnitude is a whole code and comes back (almost) exactly.
                if let Some(m) = t.iter().map(|v| v.abs()).reduce(f32::max) {
                    let i = t.iter().position(|v| v.abs() == m).unwrap();
                    assert!((t[i] - back[off + i]).abs() <= m * 1e-6);
                }
                off += span.len;
            }
        }
    }

    #[test]
    fn top_k_keeps_exactly_the_k_largest_magnitudes() {
        let layout = small_layout();
        let u = gaussian(total_len(&layout), 1.0, 3);
        let bytes = compress(&u, &layout, &cfg(Some(0.1), Quantize::None, None), None).unwrap();
        let back = decompress(&bytes, &layout).unwrap();
        let mut off = 0;
        for span in &layout {
            let t = &u[off..off + span.len];
            let b = &back[off..off + span.len];
            let k = top_k_count(span.len, 0.1);
            let mut mags: Vec<f32> = t.iter().map(|v| v.abs()).collect();
            mags.sort_by(|a, b| b.total_cmp(a));
            let sent: Vec<usize> = (0..span.len).filter(|&i| b[i] != 0.0).collect();
            assert_eq!(sent.len(), k, "{}", span.name);
            for &i in &sent {
                assert_eq!(b[i], t[i]);
                assert!(t[i].abs() >= mags[k - 1]);
            }
            for i in (0..span.len).filter(|i| b[*i] == 0.0) {
                assert!(t[i].abs() <= mags[k - 1]);
            }
            off += span.len;
        }
        assert_eq!(top_k_count(300, 0.1), 30);
        assert_eq!(top_k_count(3, 0.1), 1);
        assert_eq!(top_k_count(10, 0.3), 3);
        assert_eq!(top_k_count(10, 1.0), 10);
        assert_eq!(top_k_count(0, 0.5), 0);
    }

    #[test]
    fn both_index_codings_round_trip() {
        // 50 % kept: the bitmap is smaller; 1 % kept: gaps are smaller. Check which one was chosen by
        // the body size of a single tensor.
        let layout = vec![TensorSpan {
            name: "t".into(),
            len: 10_000,
        }];
        let u = gaussian(10_000, 1.0, 4);
        for (frac, coding) in [(0.5, CODING_BITMAP), (0.01, CODING_GAPS)] {
            let bytes =
                compress(&u, &layout, &cfg(Some(frac), Quantize::Int8, None), None).unwrap();
            // Header 7 bytes, len varint 2, kept varint, then the coding byte.
            let at = 7 + 2 + varint_len(top_k_count(10_000, frac) as u64);
            assert_eq!(bytes[at], coding, "fraction {frac}");
            let back = decompress(&bytes, &layout).unwrap();
            assert_eq!(
                back.iter().filter(|v| **v != 0.0).count(),
                top_k_count(10_000, frac)
            );
        }
    }

    #[test]
    fn error_feedback_residual_is_exactly_what_was_not_delivered() {
        let layout = small_layout();
        let n = total_len(&layout);
        let c = CompressionConfig {
            error_feedback: true,
            ..cfg(Some(0.05), Quantize::Int4, Some(1))
        };
        let mut r = Residual::new(n);
        for round in 0..3 {
            let u = gaussian(n, 0.1, 10 + round);
            let x: Vec<f32> = u.iter().zip(r.values()).map(|(a, b)| a + b).collect();
            let bytes = compress(&u, &layout, &c, Some(&mut r)).unwrap();
            let sent = decompress(&bytes, &layout).unwrap();
            for i in 0..n {
                assert_eq!(r.values()[i].to_bits(), (x[i] - sent[i]).to_bits(), "{i}");
            }
        }
        assert!(matches!(
            compress(&vec![0.0; n], &layout, &c, None),
            Err(CompressError::MissingResidual)
        ));
    }

    #[test]
    fn error_feedback_delivers_the_sum_of_updates_over_rounds() {
        let layout = small_layout();
        let n = total_len(&layout);
        let u = gaussian(n, 0.1, 5);
        let u_norm = u.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
        let rounds = 200;
        let run = |ef: bool| -> (f64, f64) {
            let c = CompressionConfig {
                error_feedback: ef,
                ..cfg(Some(0.1), Quantize::Int4, None)
            };
            let mut r = Residual::new(n);
            let mut sent_sum = vec![0.0f64; n];
            let mut max_residual = 0.0f64;
            for _ in 0..rounds {
                let bytes = compress(&u, &layout, &c, Some(&mut r)).unwrap();
                for (s, v) in sent_sum
                    .iter_mut()
                    .zip(decompress(&bytes, &layout).unwrap())
                {
                    *s += f64::from(v);
                }
                max_residual = max_residual.max(r.l2_norm());
            }
            let err = sent_sum
                .iter()
                .zip(&u)
                .map(|(s, u)| (s - rounds as f64 * f64::from(*u)).powi(2))
                .sum::<f64>()
                .sqrt();
            (err / (rounds as f64 * u_norm), max_residual)
        };
        let (rel_ef, max_res) = run(true);
        let (rel_plain, _) = run(false);
        println!(
            "after {rounds} rounds of top-10 % + int4: relative error of the summed updates {rel_ef:.4} \
             with error feedback (max residual norm {max_res:.3} = {:.1}× |u|), {rel_plain:.4} without",
            max_res / u_norm
        );
        // Without feedback 90 % of the coordinates are never sent; with it the error is only what is
        // still owed, a bounded residual, so it shrinks like 1/rounds.
        assert!(rel_plain > 0.5, "{rel_plain}");
        assert!(rel_ef < 0.05, "{rel_ef}");
        assert!(max_res < 20.0 * u_norm, "residual grew to {max_res}");
    }

    #[test]
    fn top1pct_int8_zstd_is_over_32x_smaller_than_dense_on_the_real_decoder() {
        let layout = decoder_layout(2);
        let u = gaussian(total_len(&layout), 1e-3, 6);
        let dense = dense_len(&layout);
        let mut report = Vec::new();
        for (label, c) in [
            ("dense f32 + zstd", cfg(None, Quantize::None, Some(3))),
            ("int8 + zstd", cfg(None, Quantize::Int8, Some(3))),
            ("top 1 % + int8", cfg(Some(0.01), Quantize::Int8, None)),
            (
                "top 1 % + int8 + zstd",
                cfg(Some(0.01), Quantize::Int8, Some(3)),
            ),
        ] {
            let t0 = std::time::Instant::now();
            let bytes = compress(&u, &layout, &c, None).unwrap();
            let t1 = std::time::Instant::now();
            let back = decompress(&bytes, &layout).unwrap();
            let t2 = std::time::Instant::now();
            assert_eq!(back.len(), u.len());
            println!(
                "{label}: compress {:.1} ms, decompress {:.1} ms (test build)",
                (t1 - t0).as_secs_f64() * 1e3,
                (t2 - t1).as_secs_f64() * 1e3
            );
            report.push((label, bytes.len()));
        }
        for (label, len) in &report {
            println!(
                "{label}: {len} bytes, {:.1}× smaller than dense {dense}",
                dense as f64 / *len as f64
            );
        }
        let best = report.last().unwrap().1;
        assert!(
            dense >= 32 * best,
            "only {:.1}×",
            dense as f64 / best as f64
        );
    }

    #[test]
    fn non_finite_and_misshapen_input_is_rejected() {
        let layout = small_layout();
        let n = total_len(&layout);
        let mut u = vec![0.5f32; n];
        u[301] = f32::NAN;
        match compress(&u, &layout, &CompressionConfig::default(), None) {
            Err(CompressError::NonFinite { tensor, index, .. }) => {
                assert_eq!((tensor.as_str(), index), ("a.bias", 1));
            }
            other => panic!("{other:?}"),
        }
        // An infinite sum with the residual is caught too, and leaves the residual as it was.
        let u = vec![f32::MAX; n];
        let mut r = Residual::new(n);
        r.values[0] = f32::MAX;
        let c = CompressionConfig {
            error_feedback: true,
            ..Default::default()
        };
        assert!(matches!(
            compress(&u, &layout, &c, Some(&mut r)),
            Err(CompressError::NonFinite { .. })
        ));
        assert_eq!(r.values()[0], f32::MAX);
        assert!(matches!(
            compress(&u[1..], &layout, &CompressionConfig::default(), None),
            Err(CompressError::Length { .. })
        ));
        for bad in [0.0, -0.1, 1.5, f32::NAN] {
            assert!(cfg(Some(bad), Quantize::None, None).validate().is_err());
        }
        assert!(cfg(None, Quantize::None, Some(1000)).validate().is_err());
    }

    #[test]
    fn arbitrary_truncated_and_flipped_bytes_never_panic() {
        let layout = small_layout();
        let n = total_len(&layout);
        let u = gaussian(n, 0.1, 7);
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let configs = [
            cfg(None, Quantize::None, None),
            cfg(Some(0.02), Quantize::Int4, None),
            cfg(Some(0.6), Quantize::Int8, None),
            cfg(Some(0.02), Quantize::Int8, Some(1)),
        ];
        for c in &configs {
            let good = compress(&u, &layout, c, None).unwrap();
            for cut in 0..good.len() {
                assert!(
                    decompress(&good[..cut], &layout).is_err(),
                    "prefix of {cut}"
                );
            }
            let mut extra = good.clone();
            extra.push(0);
            assert!(decompress(&extra, &layout).is_err());
            for _ in 0..2000 {
                let mut b = good.clone();
                let i = rng.random_range(0..b.len());
                b[i] ^= 1 << rng.random_range(0..8);
                if let Ok(v) = decompress(&b, &layout) {
                    assert_eq!(v.len(), n);
                    assert!(v.iter().all(|x| x.is_finite()));
                }
            }
        }
        for _ in 0..3000 {
            let len = rng.random_range(0..200);
            let mut b: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            if rng.random_bool(0.5) && b.len() >= 6 {
                // Past the magic and version, into the interesting parts.
                b[..5].copy_from_slice(b"MFUP\x01");
                b[5] &= KNOWN_FLAGS;
            }
            let _ = decompress(&b, &layout);
        }
        // The wrong layout is caught, not misread.
        let good = compress(&u, &layout, &configs[0], None).unwrap();
        assert!(decompress(&good, &decoder_layout(2)).is_err());
    }

    #[test]
    fn config_reads_in_the_documented_names() {
        let c: CompressionConfig = serde_json::from_str(
            r#"{"top_k": 0.01, "error_feedback": true, "quantize": "int8", "zstd_level": 3}"#,
        )
        .unwrap();
        assert_eq!(
            c,
            CompressionConfig {
                error_feedback: true,
                ..cfg(Some(0.01), Quantize::Int8, Some(3))
            }
        );
        c.validate().unwrap();
        let c: CompressionConfig = toml::from_str("quantize = \"int4\"").unwrap();
        assert_eq!(c.quantize, Quantize::Int4);
        assert_eq!(c.top_k, None);
        assert_eq!(
            serde_json::from_str::<CompressionConfig>("{}").unwrap(),
            CompressionConfig::default()
        );
        assert!(serde_json::from_str::<CompressionConfig>(r#"{"quantize": "int2"}"#).is_err());
        assert!(serde_json::from_str::<CompressionConfig>(r#"{"topk": 0.1}"#).is_err());
    }

    #[test]
    fn residual_saves_loads_and_rejects_other_lengths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("residual.bin");
        assert_eq!(Residual::load(&path, 5).unwrap(), Residual::new(5));
        let mut r = Residual::new(5);
        r.values.copy_from_slice(&[1.0, -2.0, 0.5, 0.0, 3.25]);
        r.save(&path).unwrap();
        assert_eq!(Residual::load(&path, 5).unwrap(), r);
        let e = Residual::load(&path, 6).unwrap_err().to_string();
        assert!(e.contains("residual.bin") && e.contains('5'), "{e}");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(Residual::load(&path, 5).is_err());
        // No temporary file is left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
