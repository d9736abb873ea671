//! Helpers for the end-to-end tests in `tests/tests/`: they drive the real `microfed` binary on real
//! files, the way a user or an operator would.

pub mod broker;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `microfed` binary built by the same `cargo test` run (cargo builds every binary of the workspace
/// before any test runs; the test executable lives in `target/<profile>/deps/`).
pub fn microfed_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = profile_dir.join(format!("microfed{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} not built: run the tests with `cargo test --workspace`",
        bin.display()
    );
    bin
}

/// Runs `microfed ARGS…` and returns its output; panics with stdout and stderr if it failed and
/// `expect_success` is set.
pub fn microfed(args: &[&str], expect_success: bool) -> Output {
    let out = Command::new(microfed_bin())
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .expect("run microfed");
    if expect_success && !out.status.success() {
        panic!(
            "microfed {} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// A labelled synthetic dataset in `out` (`microfed synth`): `count` micrographs of `size` px of
/// `structure` (polycrystal, precipitates, ...) in imaging `style`, from `seed`.
pub fn synth_labelled(out: &Path, structure: &str, style: &str, count: u32, size: u32, seed: u64) {
    let out = out.to_str().expect("a UTF-8 path");
    let (count, size, seed) = (count.to_string(), size.to_string(), seed.to_string());
    microfed(
        &[
            "synth",
            "--structure",
            structure,
            "--style",
            style,
            "--count",
            &count,
            "--size",
            &size,
            "--seed",
            &seed,
            "--out",
            out,
        ],
        true,
    );
}

/// The real labelled SEM micrographs, when this machine has them (`../shared/data/nasa-super/` beside the
/// repository). Tests that need them print why they skip when this is `None`.
pub fn nasa_super() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = std::env::var_os("MICROFED_NASA_SUPER")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("../shared/data/nasa-super"));
    dir.join("images").is_dir().then_some(dir)
}

/// The classes of nasa-super (its folder is read-only and has no dataset.toml).
pub const NASA_SUPER_CLASSES: &str = r#"name = "nasa-super"
source = "nasa/pretrained-microscopy-models, benchmark_segmentation_data (Stuckner et al. 2022)"
license = "MIT"
[[classes]]
index = 0
name = "gamma matrix"
color = [45, 45, 45]
[[classes]]
index = 1
name = "secondary gamma prime"
color = [230, 160, 40]
[[classes]]
index = 2
name = "tertiary gamma prime"
color = [60, 170, 230]
"#;

/// Writes a randomly initialised reference U-Net with `classes` outputs as ONNX (a model that meets the
/// contract; its masks are arbitrary but deterministic for a seed).
pub fn write_test_model(path: &Path, classes: usize, seed: u64) {
    let params = microfed_kernels::unet::Params::init(classes, seed).expect("U-Net parameters");
    let model =
        microfed::model::onnx::export(&params, &vec![("name".into(), format!("test-{seed}"))])
            .expect("export");
    microfed::model::onnx::save(&model, path).expect("save model");
}

/// PNG bytes of synthetic polycrystal micrograph `index` (8-bit grey, `size`×`size`).
pub fn synth_png(size: u32, seed: u64, index: u64) -> Vec<u8> {
    use microfed::synth::{Structure, Style, SynthParams, generate};
    let params = SynthParams::new(
        Structure::Polycrystal,
        Style::preset("sem-se").expect("preset"),
        size,
        size,
        seed,
    )
    .expect("synth parameters")
    .with_feature_size(16.0)
    .expect("feature size");
    let sample = generate(&params, index);
    let img = image::GrayImage::from_raw(size, size, sample.image_u8()).expect("image size");
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("encode PNG");
    out.into_inner()
}

/// Waits until `done()` holds, checking every 50 ms; false after `timeout`.
pub fn wait_until(timeout: std::time::Duration, mut done: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < end {
        if done() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    done()
}

/// The journal's entries (JSON lines); a torn last line is ignored, as the agent does.
pub fn journal_entries(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("journal line"))
        .collect()
}

/// A running `microfed agent`, with its log in a file (read it with [`AgentProcess::log`]).
pub struct AgentProcess {
    pub child: std::process::Child,
    pub log: PathBuf,
}

impl AgentProcess {
    /// Starts `microfed agent --config CONFIG`, logging at debug level into `log`.
    pub fn start(config: &Path, log: &Path) -> Self {
        Self::start_with_env(config, log, &[])
    }

    /// [`AgentProcess::start`] with extra environment variables (e.g. the fault tests'
    /// `MICROFED_FAIL_WRITES`).
    pub fn start_with_env(config: &Path, log: &Path, env: &[(&str, &Path)]) -> Self {
        let file = std::fs::File::create(log).expect("log file");
        let child = Command::new(microfed_bin())
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .args(["agent", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start microfed agent");
        Self {
            child,
            log: log.to_owned(),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM (through `kill`, so the tests need no libc binding).
    pub fn terminate(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -TERM failed");
    }

    /// Waits for the process to exit, at most `timeout`; kills it and panics if it does not.
    pub fn wait(&mut self, timeout: std::time::Duration) -> std::process::ExitStatus {
        let end = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            if std::time::Instant::now() > end {
                let _ = self.child.kill();
                panic!(
                    "agent did not exit within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        // Never leave an agent running after a failed test.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
