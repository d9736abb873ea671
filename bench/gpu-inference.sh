#!/usr/bin/env bash
# GPU inference through tract-cuda against the PyTorch peer, plus the demo on a GPU machine.
#
#   bench/gpu-inference.sh build   here (no GPU needed): release-build microfed and copy it, the PyTorch
#                                  peer and this script's inputs into .gpu/ (git-ignored; carry it).
#   bench/gpu-inference.sh run     on the GPU machine, from the repository root (device tool:
#                                  `bash bench/gpu-inference.sh run`, carry [".gpu"]). About 3 minutes.
#
# What `run` does, each step under a timeout, logs and JSON into $OUT (or .gpu/out):
#  1. `microfed model bench` on the GPU (tract-cuda) for the reference U-Net (models/grains) at
#     1×512², 8×512² and 1×2048², with the GPU's logits compared to the CPU's on the first shape;
#     then the kernels engine on the GPU (`--engine kernels`: our CUDA kernels, same shapes and check),
#     in fp32 and in TF32 (`--precision tf32`);
#     then tract-cuda again with MICROFED_GPU_KEEP_MAXPOOL=1 (max-pools on tract-cuda's CPU fallback);
#     (MICROFED_GPU_QUICK=1 runs only steps 1 and 3);
#  2. the same network on that machine's CPU (tract, every core) at 1×512², for scale;
#  3. the PyTorch peer (../shared/peers/torch_unet.py: eager fp32 and TF32, same shapes);
#  4. `microfed demo --quick` with everything on the GPU: tract-cuda segmentation, our CUDA kernels for
#     the decoder fine-tuning.
# tract-cuda dlopens cuBLAS and cuDNN: the GPU machine has them inside PyTorch's wheels, so their folders
# are put on LD_LIBRARY_PATH (a Jetson has them from JetPack).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
case "${1:-}" in
build)
    target="${CARGO_TARGET_DIR:-$root/target}"
    cargo build --release -p microfed
    mkdir -p .gpu/peers
    cp "$target/release/microfed" .gpu/microfed
    # Without its line tables (360 MB → 50 MB) and compressed (→ ~12 MB): the device tool carries at
    # most 64 MiB with the working tree (its three ONNX models alone are 24 MB).
    strip .gpu/microfed
    rm -f .gpu/microfed.xz
    xz -T2 -6 .gpu/microfed
    for p in "${MICROFED_PEERS:-}" "$root/../shared/peers" /work/shared/peers; do
        if [ -n "$p" ] && [ -f "$p/torch_unet.py" ]; then cp "$p/torch_unet.py" .gpu/peers/; break; fi
    done
    ls -l .gpu .gpu/peers
    ;;
run)
    out="${OUT:-$root/.gpu/out}"
    mkdir -p "$out"
    [ -x .gpu/microfed ] || { xz -dk .gpu/microfed.xz && chmod +x .gpu/microfed; }
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv || true
    libs=$(python3 - <<'PY' 2>/dev/null || true
import glob, os
try:
    import nvidia
    base = os.path.dirname(nvidia.__path__[0] if hasattr(nvidia, "__path__") else nvidia.__file__)
except Exception:
    base = None
dirs = set()
for root in filter(None, [base] + __import__("site").getsitepackages()):
    for so in glob.glob(os.path.join(root, "nvidia", "*", "lib", "lib*.so*")):
        dirs.add(os.path.dirname(so))
    for so in glob.glob(os.path.join(root, "torch", "lib", "lib*.so*")):
        dirs.add(os.path.dirname(so))
print(":".join(sorted(dirs)))
PY
)
    echo "CUDA libraries from Python wheels: ${libs:-none}"
    export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export MICROFED_KERNEL_CACHE="$root/.gpu/kernel-cache"
    rc=0
    echo "## 1. tract-cuda"
    timeout 170 .gpu/microfed model bench models/grains/model.onnx --device cuda \
        --shape 1x512x512 --shape 8x512x512 --shape 1x2048x2048 --runs 30 --warmup 5 \
        --json "$out/tract-cuda.json" 2>&1 | tee "$out/tract-cuda.log" || rc=$?
    echo "## 1a. the kernels engine on the GPU (our CUDA kernels; probe against tract's CPU at load)"
    timeout 170 .gpu/microfed model bench models/grains/model.onnx --device cuda --engine kernels \
        --shape 1x512x512 --shape 8x512x512 --shape 1x2048x2048 --runs 30 --warmup 5 \
        --json "$out/kernels-cuda.json" 2>&1 | tee "$out/kernels-cuda.log" || rc=$?
    echo "## 1a'. the same in TF32 (tensor cores; the probe's TF32 bound; PyTorch's TF32 row is the peer)"
    timeout 120 .gpu/microfed model bench models/grains/model.onnx --device cuda --engine kernels \
        --precision tf32 --shape 1x512x512 --shape 8x512x512 --shape 1x2048x2048 --runs 30 --warmup 5 \
        --json "$out/kernels-cuda-tf32.json" 2>&1 | tee "$out/kernels-cuda-tf32.log" || rc=$?
    echo "## 1b. tract-cuda with the max-pools left to its CPU fallback (what the rewrite buys)"
    MICROFED_GPU_KEEP_MAXPOOL=1 timeout 120 .gpu/microfed model bench models/grains/model.onnx --device cuda \
        --shape 1x512x512 --shape 8x512x512 --shape 1x2048x2048 --runs 20 --warmup 3 --no-check \
        --json "$out/tract-cuda-keep-maxpool.json" 2>&1 | grep -v "INFO" | tee "$out/tract-cuda-keep-maxpool.log" || true
    quick="${MICROFED_GPU_QUICK:-0}"
    if [ "$quick" != 1 ]; then
    echo "## 2. tract on this machine's CPU"
    timeout 60 .gpu/microfed model bench models/grains/model.onnx --device cpu \
        --shape 1x512x512 --runs 5 --warmup 1 --json "$out/tract-cpu.json" 2>&1 | tee "$out/tract-cpu.log" || true
    fi
    if [ -f .gpu/peers/torch_unet.py ]; then
        echo "## 3. PyTorch peer"
        PYTHONUNBUFFERED=1 timeout 120 python3 .gpu/peers/torch_unet.py >"$out/torch_unet.json" 2>"$out/torch_unet.log" \
            || echo "torch peer failed: $(tail -3 "$out/torch_unet.log")"
        cat "$out/torch_unet.json"
    fi
    if [ "$quick" != 1 ]; then
    echo "## 4. microfed demo --quick on the GPU"
    RUST_LOG=warn,microfed=info timeout 90 .gpu/microfed demo --quick --no-real --out "$out/demo" >"$out/demo.log" 2>&1 || echo "demo exit code $?"
    grep -v "^\s*$" "$out/demo.log" | grep -iE "engine|device|\| |done in|captures segmented|error" | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-220 | head -40
    rm -rf "$out/demo/lab-"*/incoming "$out/demo/lab-"*/labelled "$out/demo/lab-"*/microscope 2>/dev/null || true
    fi
    echo "tract-cuda bench exit code: $rc"
    exit "$rc"
    ;;
*)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
