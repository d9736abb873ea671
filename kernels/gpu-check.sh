#!/usr/bin/env bash
# gpu-check.sh: the GPU checks of the CUDA backend, in three verbs.
#
#   kernels/gpu-check.sh build   here (no GPU needed): release-build the gpu-check program and copy it
#                                with the PyTorch peer script into .gpu/ (git-ignored; carry it).
#   kernels/gpu-check.sh run     on the GPU machine, from the repository root: the parity suite and the
#                                decoder-step benchmark (gpu-check), then the PyTorch peer, each under
#                                a timeout; logs and JSON go to $OUT (or .gpu/out). About 2-4 minutes.
#   kernels/gpu-check.sh nvrtc   here or in CI (no GPU needed): installs NVRTC 13 and 12 from PyPI into
#                                .venv/ and runs tests/cuda_compile.rs with each, so every kernel is
#                                compiled for sm_87 + sm_90 (NVRTC 13) and sm_72 (NVRTC 12; CUDA 13
#                                dropped Volta).
#
# Device call (one command, carrying .gpu):  bash kernels/gpu-check.sh run
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
verb="${1:-}"

case "$verb" in
build)
    target="${CARGO_TARGET_DIR:-$root/target}"
    cargo build --release -p microfed-kernels --bin gpu-check
    mkdir -p .gpu/peers
    cp "$target/release/gpu-check" .gpu/gpu-check
    peer=""
    for p in "${MICROFED_PEERS:-}" "$root/shared/peers" "$root/../shared/peers" /work/shared/peers; do
        if [ -n "$p" ] && [ -f "$p/torch_unet.py" ]; then peer="$p/torch_unet.py"; break; fi
    done
    if [ -n "$peer" ]; then cp "$peer" .gpu/peers/torch_unet.py; else echo "note: torch_unet.py not found, the peer will be skipped"; fi
    ls -l .gpu .gpu/peers
    ;;
run)
    out="${OUT:-$root/.gpu/out}"
    mkdir -p "$out"
    # Compiled kernels are cached inside the run's own folder (a fresh machine has no cache).
    export MICROFED_KERNEL_CACHE="$root/.gpu/kernel-cache"
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv || true
    rc=0
    timeout 300 .gpu/gpu-check --out "$out/gpu-check.json" 2>&1 | tee "$out/gpu-check.log" || rc=$?
    if [ -f .gpu/peers/torch_unet.py ]; then
        PYTHONUNBUFFERED=1 timeout 150 python3 .gpu/peers/torch_unet.py >"$out/torch_unet.json" 2>"$out/torch_unet.log" \
            || echo "torch peer failed: $(tail -3 "$out/torch_unet.log")"
        echo "## PyTorch peer"
        cat "$out/torch_unet.json"
    fi
    echo "gpu-check exit code: $rc"
    exit "$rc"
    ;;
nvrtc)
    py="${PYTHON:-python3}"
    mkdir -p .venv
    [ -d .venv/nvrtc13/nvidia ] || "$py" -m pip install -q --target .venv/nvrtc13 nvidia-cuda-nvrtc
    [ -d .venv/nvrtc12/nvidia ] || "$py" -m pip install -q --target .venv/nvrtc12 nvidia-cuda-nvrtc-cu12
    lib13="$(dirname "$(find .venv/nvrtc13 -name 'libnvrtc.so.13' | head -1)")"
    lib12="$(dirname "$(find .venv/nvrtc12 -name 'libnvrtc.so.12' | head -1)")"
    MICROFED_REQUIRE_ARCHS=87,90 LD_LIBRARY_PATH="$lib13" \
        cargo test -p microfed-kernels --test cuda_compile -- --nocapture
    MICROFED_REQUIRE_ARCHS=72 LD_LIBRARY_PATH="$lib12" \
        cargo test -p microfed-kernels --test cuda_compile -- --nocapture
    ;;
*)
    echo "usage: $0 build|run|nvrtc" >&2
    exit 2
    ;;
esac
