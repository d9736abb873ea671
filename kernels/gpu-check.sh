#!/usr/bin/env bash
# gpu-check.sh: the GPU checks of the CUDA backend, in two verbs.
#
#   kernels/gpu-check.sh build   here (no GPU needed): build the kernels' test suite (the debug test
#                                binary `cargo test --no-run` makes) and the release gpu-check benchmark,
#                                and copy both with the PyTorch peer script into .gpu/ (git-ignored;
#                                carry it). The GPU machine needs no Rust.
#   kernels/gpu-check.sh run     on the GPU machine, from the repository root: the test suite
#                                (kernels/tests/suite: every body on cpu:: and cuda::, a missing GPU
#                                is a failure there), then the benchmark of UNet::decoder_train_step
#                                (gpu-check), then the PyTorch peer, each under a timeout; logs and
#                                JSON go to $OUT (or .gpu/out). About 3-5 minutes.
#
# The suite binary takes libtest's arguments: `.gpu/kernels-suite cuda::` runs only the CUDA half,
# `--nocapture` shows the parity table, MICROFED_SEED=N replays a failure's inputs.
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
    # cargo names the test binary with a hash; it says which in its "Executable" line.
    suite="$(cargo test -p microfed-kernels --no-run --test suite 2>&1 | tee /dev/stderr |
        sed -n 's/.*Executable .*(\(.*\/suite-[0-9a-f]*\)).*/\1/p' | tail -n1)"
    [ -n "$suite" ] && [ -x "$suite" ] || { echo "gpu-check.sh: no suite binary found" >&2; exit 1; }
    mkdir -p .gpu/peers
    cp "$target/release/gpu-check" .gpu/gpu-check
    cp "$suite" .gpu/kernels-suite
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
    # One thread: the cuda:: tests share one device and its stream, and the log reads in order.
    MICROFED_REQUIRE_CUDA=1 timeout 300 .gpu/kernels-suite --test-threads=1 --nocapture 2>&1 |
        tee "$out/suite.log" || rc=$?
    timeout 240 .gpu/gpu-check --out "$out/gpu-check.json" 2>&1 | tee "$out/gpu-check.log" || rc=$((rc ? rc : $?))
    if [ -f .gpu/peers/torch_unet.py ]; then
        PYTHONUNBUFFERED=1 timeout 150 python3 .gpu/peers/torch_unet.py >"$out/torch_unet.json" 2>"$out/torch_unet.log" \
            || echo "torch peer failed: $(tail -3 "$out/torch_unet.log")"
        echo "## PyTorch peer"
        cat "$out/torch_unet.json"
    fi
    echo "suite + gpu-check exit code: $rc"
    exit "$rc"
    ;;
*)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
