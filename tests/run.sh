#!/usr/bin/env bash
# The whole test suite, with its set-up, on a fresh Debian machine with a Rust toolchain (rustup):
#
#     ./tests/run.sh
#
# 1. installs what the tests need and is not a Rust crate (Debian packages, a Python virtualenv with
#    PyPI packages) — every step is skipped when already done, so a second run starts at once;
# 2. checks formatting and lints (rustfmt, clippy with warnings as errors);
# 3. checks the edge-board build (cross/check.sh): the aarch64 release binary with its glibc floor,
#    the unit tests under qemu-aarch64, the Debian package and its test;
# 4. runs every test of the workspace: unit, integration and end-to-end (tests/), then the README's
#    main command (`cargo run -- demo`, at the --quick size).
#
# .ci/run calls exactly this script. Set MICROFED_SKIP_SETUP=1 to skip step 1 on a machine you manage.
# Measured on a fresh clone, 2-core VM (2026-12-07): 2354 s in all; clippy 4m20, the host dependencies
# 11m02 (built once, by the advisory step, for every later host step), the aarch64 release build 11m38,
# the qemu tests 5m27 (build 1m48), the host test build 2m08 and its run ~4 min, the demo and NVRTC 12 ~1 min.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

say() { printf '\n== %s\n' "$*"; }

# ---- 1. set-up ---------------------------------------------------------------------------------
# mosquitto: the real broker of the federation tests (started by the tests themselves, on free ports,
# with broker-config/mosquitto/); openssl: broker-config/mosquitto/make-certs.sh makes their TLS CA;
# chromium: the headless browser that renders the operator's console (tests/tests/console_chromium.rs).
APT_PACKAGES=(python3-venv mosquitto openssl chromium)
PIP_PACKAGES=(
  # An independent ONNX runtime: checks that our ONNX files are valid, and the CPU peer in benchmarks.
  "onnxruntime>=1.20" numpy
)
# NVRTC on its own (no GPU, no driver needed), so the CUDA kernels are really compiled here:
# CUDA 13's for sm_87 (Orin) and sm_90 (H100), CUDA 12's for sm_72 (Xavier; CUDA 13 dropped Volta).
NVRTC13="nvidia-cuda-nvrtc>=13,<14"
NVRTC12="nvidia-cuda-nvrtc-cu12>=12.4,<13"

if [[ "${MICROFED_SKIP_SETUP:-0}" != 1 ]]; then
  say "set-up: Debian packages"
  missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    sudo_cmd=(); [[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi

  say "set-up: Python virtualenv .venv"
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  stamp=".venv/.microfed-$(printf '%s\n' "${PIP_PACKAGES[@]}" | sha256sum | cut -c1-16)"
  if [[ ! -e "$stamp" ]]; then
    .venv/bin/pip install -q --disable-pip-version-check "${PIP_PACKAGES[@]}"
    touch "$stamp"
  fi
  [[ -d .venv/nvrtc13/nvidia ]] || .venv/bin/pip install -q --disable-pip-version-check --target .venv/nvrtc13 "$NVRTC13"
  [[ -d .venv/nvrtc12/nvidia ]] || .venv/bin/pip install -q --disable-pip-version-check --target .venv/nvrtc12 "$NVRTC12"
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt
fi

# libnvrtc from the virtualenv, so the CUDA sources are compiled by NVRTC even without a GPU; the
# compile test then insists on the architectures named, instead of skipping.
lib_of() { local f; f=$(find "$1" -name "$2" 2>/dev/null | head -n1); [[ -n "$f" ]] && dirname "$f"; }
nvrtc13_dir=$(lib_of .venv/nvrtc13 'libnvrtc.so.13' || true)
nvrtc12_dir=$(lib_of .venv/nvrtc12 'libnvrtc.so.12' || true)
if [[ -n "$nvrtc13_dir" ]]; then
  export LD_LIBRARY_PATH="$root/$nvrtc13_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export MICROFED_REQUIRE_ARCHS=87,90
fi
export MICROFED_PYTHON="$root/.venv/bin/python"
# The console test renders the page in Chromium; here it is installed, so a missing one is a failure.
export MICROFED_REQUIRE_CHROMIUM="${MICROFED_REQUIRE_CHROMIUM:-1}"
# A test run builds each crate once: incremental caches would only add gigabytes of disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# ---- 2. format and lints -------------------------------------------------------------------------
say "cargo fmt --check"
cargo fmt --all --check

say "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

# Dependency advisories, offline: Cargo.lock against the RustSec snapshot in ../shared/advisory-db
# (MICROFED_ADVISORY_DB to point elsewhere); fails on any advisory not accepted with a reason in
# advisories-accepted.toml (tests/tests/advisories.rs).
# Every cargo command below selects the whole workspace (--workspace with --test NAME for a single
# test): a narrower selection (-p) resolves other features for shared dependencies and would compile
# them, and our crates above them, a second time (measured ~1.5 min per narrower step here).
say "dependency advisories (RustSec snapshot, offline)"
cargo test --workspace --test advisories --locked

# ---- 3. the edge-board build ---------------------------------------------------------------------
# The arm64 package is the board's; the amd64 one (MICROFED_CROSS_ARCHES="arm64 amd64") costs a second
# release build of everything, so CI leaves it to a release job: cross/check.sh builds it by default.
say "edge boards: aarch64 build, glibc floor, qemu tests, .deb (cross/check.sh)"
export MICROFED_CROSS_ARCHES="${MICROFED_CROSS_ARCHES:-arm64}"
cross/check.sh
export MICROFED_DEB_DIR="${MICROFED_DEB_DIR:-${CARGO_TARGET_DIR:-$root/target}/debian}"

# The aarch64 build (release binary, qemu tests) and the host release folder that served it (build
# scripts, proc macros) take 8-12 GB that the host tests below never read. On a machine short of disk
# (CI's), drop them once their checks passed; the .deb files stay for step 4's test.
target_dir="${CARGO_TARGET_DIR:-$root/target}"
free_gib=$(df --output=avail -BG "$target_dir" | tail -n1 | tr -dc '0-9')
if ((free_gib < ${MICROFED_MIN_FREE_GIB:-30})); then
  say "only ${free_gib} GiB free: removing the aarch64 and release build products (checks done) before the host tests"
  rm -rf "$target_dir/aarch64-unknown-linux-gnu" "$target_dir/zig-amd64" "$target_dir/release"
fi
df -h "$target_dir" | tail -n1

# ---- 4. tests ------------------------------------------------------------------------------------
say "cargo test"
cargo test --workspace --locked --no-fail-fast
df -h "$target_dir" | tail -n1

# The README's first command exactly as a new user types it, at CI's size (--quick) and in the profile
# the tests just built (a second release build of everything would cost CI ~12 minutes): it fails if
# `cargo run` at the root cannot tell which binary to run, or if the demo cannot finish.
say "the README's main command: cargo run -- demo --quick"
cargo run --locked -- demo --quick

if [[ -n "$nvrtc12_dir" ]]; then
  say "CUDA kernels compiled by CUDA 12's NVRTC for sm_72 (Jetson Xavier)"
  LD_LIBRARY_PATH="$root/$nvrtc12_dir" MICROFED_REQUIRE_ARCHS=72 \
    cargo test --workspace --locked --test cuda_compile
fi
