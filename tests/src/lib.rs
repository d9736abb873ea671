//! Helpers for the end-to-end tests in `tests/tests/`: they drive the real `microfed` binary on real
//! files, the way a user or an operator would.

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
