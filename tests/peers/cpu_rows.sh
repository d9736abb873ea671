#!/usr/bin/env bash
# The CPU rows of docs/benchmarks.md (issue 16) in one run: the kernels engine, tract and onnxruntime
# on the same model and shapes, interleaved (kernels, ort, tract per row) so that load changes hit
# all three alike, with each process's peak memory (GNU time's maximum resident set size) and the
# load average before each row. Prints a Markdown table. The "tiled" rows segment a 2048×1536
# micrograph as the agent does (tiles of 512 overlapping by 32, one tile per run, stitched), every
# runtime on the same tiles.
#
#   tests/peers/cpu_rows.sh [MODEL] [RUNS]     # default models/grains/model.onnx, 5 runs
#
# Needs a release build (cargo build --release -p microfed) and onnxruntime in .venv
# (python3 -m venv .venv && .venv/bin/pip install onnxruntime numpy).
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL="${1:-models/grains/model.onnx}"
RUNS="${2:-5}"
BIN="${MICROFED:-target/release/microfed}"
PY="${MICROFED_PYTHON:-.venv/bin/python}"
[[ -x "$BIN" ]] || { echo "no $BIN: cargo build --release -p microfed" >&2; exit 1; }
"$PY" -c "import onnxruntime" || { echo "no onnxruntime in $PY" >&2; exit 1; }
command -v /usr/bin/time >/dev/null || { echo "GNU time is needed (apt install time)" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# median ms and peak RSS (MB) of one command
ours() { # engine threads NxHxW [extra bench flags]
    /usr/bin/time -f "%M" -o "$tmp/rss" "$BIN" model bench "$MODEL" --device cpu --engine "$1" \
        --threads "$2" --shape "$3" --runs "$RUNS" --warmup 1 --json "$tmp/b.json" "${@:4}" >/dev/null 2>&1
    python3 -c "import json; print(round(json.load(open('$tmp/b.json'))['results'][0]['median_ms']))"
    echo $(( $(cat "$tmp/rss") / 1024 ))
}
peer() { # threads N H W [extra bench flags]
    /usr/bin/time -f "%M" -o "$tmp/rss" "$PY" tests/peers/ort.py bench "$MODEL" "$2" "$3" "$4" \
        --threads "$1" --runs "$RUNS" "${@:5}" > "$tmp/o.json"
    python3 -c "import json; print(round(json.load(open('$tmp/o.json'))['median_ms']))"
    echo $(( $(cat "$tmp/rss") / 1024 ))
}
echo "| work | threads | load | kernels ms (MB) | tract ms (MB) | onnxruntime ms (MB) | kernels ÷ ort | kernels vs tract |"
echo "|---|---|---|---|---|---|---|---|"
for row in "1 1 512 512" "2 1 512 512" "2 2 512 512" "2 1 1536 2048" "1 1 1536 2048 tiled" \
    "2 1 1536 2048 tiled"; do
    read -r t n h w tiled <<<"$row"
    flags=()
    [[ -n "${tiled:-}" ]] && flags=(--tile 512 --overlap 32 --tile-batch 1)
    load="$(cut -d' ' -f1 /proc/loadavg)"
    mapfile -t k < <(ours kernels "$t" "${n}x${h}x${w}" "${flags[@]}")
    mapfile -t o < <(peer "$t" "$n" "$h" "$w" "${flags[@]}")
    mapfile -t r < <(ours tract "$t" "${n}x${h}x${w}" "${flags[@]}")
    ratio="$(python3 -c "print(f'{${o[0]}/${k[0]}:.2f}×')")"
    vs="$(python3 -c "print(f'{${r[0]}/${k[0]}:.1f}×')")"
    echo "| ${n}×${h}×${w}${tiled:+ (tiled 512)} | $t | $load | ${k[0]} (${k[1]}) | ${r[0]} (${r[1]}) | ${o[0]} (${o[1]}) | $ratio | $vs |"
done
