#!/usr/bin/env bash
# The agent's segmentation path per engine (issue 16): `microfed segment` on a folder of 2048×1536
# micrographs (tiles of 512, as the agent cuts a capture; masks, overlays and the features CSV
# written), once per engine, interleaved; prints wall time per image and the process's peak resident
# memory (GNU time), a Markdown table.
#
#   tests/peers/segment_memory.sh [MODEL] [IMAGES] [THREADS]   # default models/grains, 6 images, 2 threads
#
# Needs a release build (cargo build --release -p microfed) and GNU time.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL="${1:-models/grains}"
IMAGES="${2:-6}"
THREADS="${3:-2}"
BIN="${MICROFED:-target/release/microfed}"
[[ -x "$BIN" ]] || { echo "no $BIN: cargo build --release -p microfed" >&2; exit 1; }
command -v /usr/bin/time >/dev/null || { echo "GNU time is needed (apt install time)" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$BIN" synth --structure polycrystal --style sem-se --count "$IMAGES" --size 2048x1536 --seed 4242 \
    --out "$tmp/captures" >/dev/null 2>&1
echo "| engine | threads | load | images | s per image | peak RSS MB |"
echo "|---|---|---|---|---|---|"
for pass in 1 2; do
    for engine in kernels tract; do
        load="$(cut -d' ' -f1 /proc/loadavg)"
        rm -rf "$tmp/out"
        start=$(date +%s.%N)
        /usr/bin/time -f "%M" -o "$tmp/rss" "$BIN" segment --model "$MODEL" --device cpu \
            --engine "$engine" --threads "$THREADS" --out "$tmp/out" "$tmp/captures/images" \
            >/dev/null 2>"$tmp/err" || { cat "$tmp/err" >&2; exit 1; }
        end=$(date +%s.%N)
        per="$(python3 -c "print(f'{($end - $start) / $IMAGES:.2f}')")"
        echo "| $engine (pass $pass) | $THREADS | $load | $IMAGES | $per | $(( $(cat "$tmp/rss") / 1024 )) |"
    done
done
