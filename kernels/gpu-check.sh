#!/usr/bin/env bash
# gpu-check.sh: the GPU checks of the CUDA backend, in three verbs.
#
#   kernels/gpu-check.sh build   here (no GPU needed): release-build the gpu-check program and copy it
#                                with the PyTorch peer script into .gpu/ (git-ignored; carry it).
#   kernels/gpu-check.sh run     on the GPU machine, from the repository root: the parity suite and the
#                                decoder-step benchmark (gpu-check), then the PyTorch peer, each under
#                                a timeout; logs and JSON go to $OUT (or .gpu/out). About 2-4 minutes.
#
# Compiling every kernel with NVRTC without a GPU (sm_72, sm_87, sm_90) is part of the test suite:
# tests/run.sh installs NVRTC 13 and 12 from PyPI and runs kernels/tests/cuda_compile.rs with each.
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
*)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
