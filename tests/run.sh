#!/usr/bin/env bash
# The whole test suite, with its set-up, on a fresh Debian machine with a Rust toolchain (rustup):
#
#     ./tests/run.sh
#
# 1. installs what the tests need and is not a Rust crate (Debian packages, a Python virtualenv with
#    PyPI packages) — every step is skipped when already done, so a second run starts at once;
# 2. checks formatting and lints (rustfmt, clippy with warnings as errors);
# 3. runs every test of the workspace: unit, integration and end-to-end (tests/).
#
# .ci/run calls exactly this script. Set MICROFED_SKIP_SETUP=1 to skip step 1 on a machine you manage.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

say() { printf '\n== %s\n' "$*"; }

# ---- 1. set-up ---------------------------------------------------------------------------------
APT_PACKAGES=(python3-venv)
PIP_PACKAGES=(
  # NVRTC on its own (no GPU, no driver): the CUDA kernels are compiled in CI to prove they build.
  "nvidia-cuda-nvrtc>=13,<14"
)

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
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt
fi

# libnvrtc from the virtualenv, so the CUDA sources are compiled by NVRTC even without a GPU.
nvrtc_dir=$(ls -d "$root"/.venv/lib/python3*/site-packages/nvidia/cu*/lib 2>/dev/null | head -n1 || true)
[[ -n "$nvrtc_dir" ]] && export LD_LIBRARY_PATH="$nvrtc_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MICROFED_PYTHON="$root/.venv/bin/python"

# ---- 2. format and lints -------------------------------------------------------------------------
say "cargo fmt --check"
cargo fmt --all --check

say "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

# ---- 3. tests ------------------------------------------------------------------------------------
say "cargo test"
cargo test --workspace --locked --no-fail-fast
