//! The ONNX files we write are checked against two runtimes that are not ours:
//! - tract's logits (and skip features) equal our kernels' forward within 1e-4 (max abs) on random inputs
//!   of several sizes;
//! - onnxruntime (PyPI, in the virtualenv that tests/run.sh makes) agrees with tract within 1e-4: an
//!   independent proof that the export is valid ONNX.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use microfed::model::onnx::{self, OnnxError};
use microfed::model::runtime::{Outputs, Segmenter};
use microfed_kernels::cpu::CpuBackend;
use microfed_kernels::unet::{Params, UNet};
use microfed_kernels::{Backend, Shape};
use rand::{Rng, SeedableRng};

const SIZES: [(usize, usize, usize); 3] = [(1, 16, 16), (2, 32, 48), (1, 64, 80)];

fn random_input(n: usize, h: usize, w: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n * h * w)
        .map(|_| rng.random_range(-2.0f32..2.0))
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Parameters with larger-than-default biases, so that ReLUs are neither all on nor all off.
fn params(classes: usize, seed: u64) -> Params {
    Params::init(classes, seed).unwrap()
}

fn export_to(dir: &Path, p: &Params) -> std::path::PathBuf {
    let path = dir.join("unet.onnx");
    let model = onnx::export(p, &vec![("name".into(), "test".into())]).unwrap();
    onnx::save(&model, &path).unwrap();
    path
}

#[test]
fn tract_logits_and_skip_features_equal_our_kernels() {
    let tmp = tempfile::tempdir().unwrap();
    let p = params(3, 7);
    let path = export_to(tmp.path(), &p);
    let report = onnx::check_contract(&path).unwrap();
    let back = onnx::load_params(&onnx::load(&path).unwrap(), &path).unwrap();
    assert_eq!(
        back, p,
        "parameters must survive the ONNX round trip bit for bit"
    );
    assert_eq!(report.num_classes, 3);
    assert_eq!(
        report.decoder_parameters + report.encoder_parameters,
        p.len()
    );

    let seg = Segmenter::load(&path).unwrap();
    let cpu = Arc::new(CpuBackend::new());
    let mut net = UNet::new(cpu.clone(), &p).unwrap();
    for (i, &(n, h, w)) in SIZES.iter().enumerate() {
        let x = random_input(n, h, w, 100 + i as u64);
        let xs = Shape::new(n, 1, h, w);
        let ours = cpu.download(net.forward(&x, xs).unwrap()).unwrap();
        let theirs = seg.logits(&x, n, h, w).unwrap();
        let d = max_abs_diff(&ours, &theirs);
        let scale = ours.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        eprintln!("[{n},1,{h},{w}]: max |kernels − tract| = {d:.2e} (logits up to {scale:.3})");
        assert!(d <= 1e-4, "[{n},1,{h},{w}]: logits differ by {d}");
        assert!(
            scale > 1e-3,
            "degenerate logits: the comparison would prove nothing"
        );

        let ours = net.encode(&x, xs).unwrap();
        let theirs = seg.run(&x, n, h, w, Outputs::Features).unwrap();
        assert_eq!(theirs.len(), 5);
        for (s, (ours, (shape, theirs))) in ours.iter().zip(&theirs).enumerate() {
            let expect = [n, microfed_kernels::unet::CHANNELS[s], h >> s, w >> s];
            assert_eq!(shape.as_slice(), expect.as_slice(), "enc{s} shape");
            let d = max_abs_diff(&cpu.download(ours).unwrap(), theirs);
            assert!(d <= 1e-4, "[{n},1,{h},{w}] enc{s} differs by {d}");
        }
    }
}

#[test]
fn patched_decoder_weights_change_tract_exactly_like_our_kernels() {
    let tmp = tempfile::tempdir().unwrap();
    let p = params(2, 3);
    let path = export_to(tmp.path(), &p);
    let mut proto = onnx::load(&path).unwrap();
    // A new global decoder: another initialisation's decoder tensors.
    let other = params(2, 99);
    let decoder: Vec<(String, Vec<f32>)> = other
        .tensors
        .iter()
        .filter(|t| t.name.starts_with("decoder."))
        .map(|t| (t.name.clone(), t.data.clone()))
        .collect();
    onnx::patch_initializers(&mut proto, &decoder).unwrap();
    let seg = Segmenter::from_proto(&proto, &path).unwrap();

    let mut expected = p.clone();
    expected.set_decoder_flat(&other.decoder_flat()).unwrap();
    let cpu = Arc::new(CpuBackend::new());
    let mut net = UNet::new(cpu.clone(), &expected).unwrap();
    let x = random_input(1, 32, 32, 5);
    let ours = cpu
        .download(net.forward(&x, Shape::new(1, 1, 32, 32)).unwrap())
        .unwrap();
    let d = max_abs_diff(&ours, &seg.logits(&x, 1, 32, 32).unwrap());
    assert!(d <= 1e-4, "patched model differs by {d}");

    // A patch of the wrong size is refused, naming the tensor.
    let err = onnx::patch_initializers(&mut proto, &[("decoder.head.bias".into(), vec![0.0; 5])])
        .unwrap_err();
    assert!(err.to_string().contains("decoder.head.bias"), "{err}");
}

#[test]
fn contract_check_explains_every_mismatch() {
    let tmp = tempfile::tempdir().unwrap();
    let path = export_to(tmp.path(), &params(2, 1));
    let mut proto = onnx::load(&path).unwrap();
    let graph = proto.graph.as_mut().unwrap();
    graph.input[0].name = "input.1".into();
    graph
        .initializer
        .retain(|t| t.name != "decoder.1.conv2.weight");
    for n in &mut graph.node {
        for o in &mut n.output {
            if o == "enc2" {
                *o = "features_2".into();
            }
        }
    }
    let bad = tmp.path().join("bad.onnx");
    onnx::save(&proto, &bad).unwrap();
    let err = onnx::check_contract(&bad).unwrap_err();
    let OnnxError::Contract { problems, .. } = &err else {
        panic!("contract error expected, got {err}")
    };
    let text = err.to_string();
    assert!(text.contains("bad.onnx"), "{text}");
    assert!(
        problems
            .iter()
            .any(|p| p.contains("input") && p.contains("input.1")),
        "{text}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("decoder.1.conv2.weight")),
        "{text}"
    );
    assert!(problems.iter().any(|p| p.contains("enc2")), "{text}");

    std::fs::write(tmp.path().join("junk.onnx"), b"not a protobuf at all").unwrap();
    let err = onnx::check_contract(&tmp.path().join("junk.onnx")).unwrap_err();
    assert!(err.to_string().contains("junk.onnx"), "{err}");
}

/// The Python interpreter with onnxruntime: the virtualenv made by tests/run.sh.
fn onnxruntime_python() -> Option<String> {
    let python = std::env::var("MICROFED_PYTHON").ok().or_else(|| {
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
        venv.exists().then(|| venv.display().to_string())
    })?;
    let ok = Command::new(&python)
        .args(["-c", "import onnxruntime"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    ok.then_some(python)
}

/// Runs `model` on `x` ([n, 1, h, w]) with onnxruntime (tests/peers/ort.py) and returns its logits.
fn onnxruntime_logits(
    python: &str,
    model: &Path,
    x: &[f32],
    n: usize,
    h: usize,
    w: usize,
) -> Vec<f32> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/peers/ort.py");
    let tmp = tempfile::tempdir().unwrap();
    let (input, output) = (tmp.path().join("in.f32"), tmp.path().join("out.f32"));
    std::fs::write(
        &input,
        x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
    )
    .unwrap();
    let out = Command::new(python)
        .arg(&script)
        .args(["run", model.to_str().unwrap(), input.to_str().unwrap()])
        .args([n.to_string(), h.to_string(), w.to_string()])
        .arg(&output)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "onnxruntime on {}: {}",
        model.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(&output)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn onnxruntime_agrees_with_tract() {
    let Some(python) = onnxruntime_python() else {
        // In CI the set-up installs onnxruntime, so its absence there is a failure, not a skip.
        assert!(
            std::env::var_os("CI").is_none(),
            "onnxruntime is missing in CI: tests/run.sh should install it"
        );
        eprintln!("skipped: no Python with onnxruntime (run ./tests/run.sh once to make .venv)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let path = export_to(tmp.path(), &params(3, 11));
    let seg = Segmenter::load(&path).unwrap();
    for (i, &(n, h, w)) in SIZES.iter().enumerate() {
        let x = random_input(n, h, w, 200 + i as u64);
        let theirs = onnxruntime_logits(&python, &path, &x, n, h, w);
        let d = max_abs_diff(&seg.logits(&x, n, h, w).unwrap(), &theirs);
        eprintln!("[{n},1,{h},{w}]: max |tract − onnxruntime| = {d:.2e}");
        assert!(
            d <= 1e-4,
            "[{n},1,{h},{w}]: tract and onnxruntime differ by {d}"
        );
    }
}

#[test]
fn model_check_command_accepts_our_export_and_explains_a_broken_one() {
    let tmp = tempfile::tempdir().unwrap();
    let good = export_to(tmp.path(), &params(2, 4));
    let out = Command::new(env!("CARGO_BIN_EXE_microfed"))
        .args(["model", "check", "--run"])
        .arg(&good)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("decoder parameters   783874"), "{text}");
    assert!(text.contains("tract run            ok"), "{text}");

    let mut proto = onnx::load(&good).unwrap();
    proto
        .graph
        .as_mut()
        .unwrap()
        .initializer
        .retain(|t| t.name != "decoder.head.weight");
    let bad = tmp.path().join("no-head.onnx");
    onnx::save(&proto, &bad).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_microfed"))
        .args(["model", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no-head.onnx") && err.contains("decoder.head.weight"),
        "{err}"
    );
}

/// Every model shipped in `models/`: the manifest's sha256 matches, the file meets the contract, and
/// tract, our kernels and onnxruntime agree on it within 1e-4.
#[test]
fn every_shipped_model_agrees_across_three_runtimes() {
    use microfed::model::manifest::ModelManifest;
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
    let mut manifests: Vec<_> = std::fs::read_dir(&models)
        .unwrap()
        .map(|e| e.unwrap().path().join("manifest.toml"))
        .filter(|p| p.is_file())
        .collect();
    manifests.sort();
    assert!(
        !manifests.is_empty(),
        "no shipped model under {}",
        models.display()
    );
    let python = onnxruntime_python();
    let cpu = Arc::new(CpuBackend::new());
    for manifest_path in manifests {
        let manifest = ModelManifest::load(&manifest_path).unwrap();
        manifest.verify_model(&manifest_path).unwrap();
        let path = manifest.model_path(&manifest_path);
        let report = onnx::check_contract(&path).unwrap();
        assert_eq!(
            report.num_classes,
            manifest.classes.len(),
            "{}",
            path.display()
        );
        let params = onnx::load_params(&onnx::load(&path).unwrap(), &path).unwrap();
        let seg = Segmenter::load(&path).unwrap();
        let mut net = UNet::new(cpu.clone(), &params).unwrap();
        let (n, h, w) = (1, 64, 96);
        let x = random_input(n, h, w, 300);
        let ours = cpu
            .download(net.forward(&x, Shape::new(n, 1, h, w)).unwrap())
            .unwrap();
        let tract = seg.logits(&x, n, h, w).unwrap();
        let d = max_abs_diff(&ours, &tract);
        eprintln!("{}: max |kernels − tract| = {d:.2e}", path.display());
        assert!(
            d <= 1e-4,
            "{}: kernels and tract differ by {d}",
            path.display()
        );
        let Some(python) = &python else {
            assert!(
                std::env::var_os("CI").is_none(),
                "onnxruntime is missing in CI"
            );
            continue;
        };
        let ort = onnxruntime_logits(python, &path, &x, n, h, w);
        let d = max_abs_diff(&tract, &ort);
        eprintln!("{}: max |tract − onnxruntime| = {d:.2e}", path.display());
        assert!(
            d <= 1e-4,
            "{}: tract and onnxruntime differ by {d}",
            path.display()
        );
    }
}
