//! Secure aggregation in one process (every device and the server by function calls): the measurements of docs/privacy-secagg-dp.md and the tests.

use super::*;

/// Where devices vanish in [`simulate`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dropouts {
    /// Devices (by index) that vanish after sending their shares, before their masked input.
    pub before_masked: Vec<usize>,
    /// Devices that vanish after sending their masked input (their input is still in the sum).
    pub after_masked: Vec<usize>,
}

/// What [`simulate`] measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimReport {
    pub devices: usize,
    pub len: usize,
    pub ring_bits: u32,
    pub threshold: usize,
    /// Mean bytes one device sent (CBOR messages), over devices that finished.
    pub device_sent: f64,
    /// Mean bytes one device received.
    pub device_received: f64,
    /// Bytes of the masked input alone (one device).
    pub masked_bytes: usize,
    /// Bytes of the same update sent in the clear as dense int8 through [`crate::federated::compress`].
    pub plain_int8_bytes: usize,
    /// Seconds of device-side computation, mean per device.
    pub device_seconds: f64,
    /// Seconds of server-side unmasking.
    pub server_seconds: f64,
    pub aggregate: Aggregate,
    /// The sum of the contributors' own int8 codes, added up from the devices' side (what the
    /// aggregate must equal; the server never sees these).
    pub expected_codes: Vec<i32>,
}

/// Runs a whole round in one process: `inputs[i]` is device `i`'s update; bytes are counted as the
/// CBOR encoding of each message (what an envelope body carries). Deterministic for a `seed`.
pub fn simulate(
    inputs: &[Vec<f32>],
    clip: f32,
    threshold: Option<usize>,
    dropouts: &Dropouts,
    seed: u64,
) -> Result<SimReport, SecAggError> {
    let n = inputs.len();
    let len = inputs.first().map_or(0, Vec::len);
    let mut config = SecAggConfig::new(n, len, clip);
    if let Some(t) = threshold {
        config.threshold = t;
    }
    let names: Vec<String> = (0..n).map(|i| format!("dev-{i:05}")).collect();
    let mut clients: Vec<SecAggClient> = names
        .iter()
        .zip(inputs)
        .enumerate()
        .map(|(i, (d, x))| {
            SecAggClient::with_rng(
                d,
                x.clone(),
                ChaCha20Rng::seed_from_u64(seed.wrapping_mul(1_000_003) + i as u64),
            )
        })
        .collect();
    let index: BTreeMap<String, usize> = names
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, d)| (d, i))
        .collect();
    let mut server = SecAggServer::new(1, config, &names)?;
    let mut sent = vec![0usize; n];
    let mut received = vec![0usize; n];
    let mut seconds = vec![0f64; n];
    let mut gone = vec![false; n];
    let mut masked_bytes = 0;
    let mut outbox = server.start();
    let nobody = Vec::new();
    for step in 0..4 {
        // Devices work in parallel within a step, as they would in a fleet.
        let mut inbox: Vec<Option<ServerMessage>> = vec![None; n];
        for (to, msg) in outbox {
            let i = index[&to];
            if !gone[i] {
                inbox[i] = Some(msg);
            }
        }
        let answers = clients
            .par_iter_mut()
            .zip(inbox)
            .map(|(c, msg)| -> Result<_, SecAggError> {
                let Some(msg) = msg else { return Ok(None) };
                let bytes_in = to_cbor("server message", &msg)?.len();
                let started = Instant::now();
                let answer = c.handle(msg)?;
                let secs = started.elapsed().as_secs_f64();
                let bytes_out = match &answer {
                    Some(a) => to_cbor("device message", a)?.len(),
                    None => 0,
                };
                Ok(Some((answer, bytes_in, bytes_out, secs)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (i, a) in answers.into_iter().enumerate() {
            let Some((answer, bytes_in, bytes_out, secs)) = a else {
                continue;
            };
            received[i] += bytes_in;
            sent[i] += bytes_out;
            seconds[i] += secs;
            if let Some(a) = answer {
                if let ClientMessage::Masked { values, .. } = &a {
                    masked_bytes = values.len();
                }
                server.receive(&names[i], a)?;
            }
        }
        // Vanish after this step's message: step 1 = shares sent, step 2 = masked input sent.
        let vanish = match step {
            1 => &dropouts.before_masked,
            2 => &dropouts.after_masked,
            _ => &nobody,
        };
        for &i in vanish {
            if let Some(g) = gone.get_mut(i) {
                *g = true;
            }
        }
        outbox = server.advance()?;
    }
    let aggregate = server
        .result()
        .cloned()
        .ok_or_else(|| invalid("server", "result", "no aggregate after step 4"))?;
    let finished: Vec<usize> = (0..n).filter(|&i| !gone[i]).collect();
    let mut expected_codes = vec![0i32; len];
    for c in &clients {
        if aggregate.contributors.iter().any(|d| d == c.device()) {
            expected_codes
                .iter_mut()
                .zip(c.codes())
                .for_each(|(e, &x)| *e += i32::from(x));
        }
    }
    let mean =
        |v: &[f64]| finished.iter().map(|&i| v[i]).sum::<f64>() / finished.len().max(1) as f64;
    let layout = [crate::federated::compress::TensorSpan {
        name: "update".into(),
        len,
    }];
    let plain = crate::federated::compress::compress(
        &inputs[0],
        &layout,
        &crate::federated::compress::CompressionConfig {
            quantize: crate::federated::compress::Quantize::Int8,
            ..Default::default()
        },
        None,
    )
    .map_err(|e| invalid("plain baseline", "compress", e.to_string()))?;
    Ok(SimReport {
        devices: n,
        len,
        ring_bits: server.config().ring_bits,
        threshold: server.config().threshold,
        device_sent: mean(&sent.iter().map(|&b| b as f64).collect::<Vec<_>>()),
        device_received: mean(&received.iter().map(|&b| b as f64).collect::<Vec<_>>()),
        masked_bytes,
        plain_int8_bytes: plain.len(),
        device_seconds: mean(&seconds),
        server_seconds: server.compute_seconds,
        aggregate,
        expected_codes,
    })
}
