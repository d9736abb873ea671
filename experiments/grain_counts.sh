#!/usr/bin/env bash
# Grain counts of a grains model on unseen synthetic micrographs of every style, against the
# generator's truth, with grains as plain connected interiors (--neck-ratio 0) and split at
# boundary gaps (0.5, the default): docs/results.md, "Grain counts".
#
#     experiments/grain_counts.sh [MODEL_DIR] [COUNT] [SIZE]
#     RATIO=0.4 experiments/grain_counts.sh      # another neck ratio than the default 0.5
#
# MODEL_DIR defaults to models/grains; 6 images of 512² per style, seed 900 (models/make.sh trains
# on seeds 1000-1003 and tests on 1500-1504). Needs the release binary (cargo build --release) and
# python3. Takes ~15 s on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-models/grains}
count=${2:-6}
size=${3:-512}
bin=${MICROFED:-target/release/microfed}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
styles=(optical-etched sem-se sem-bse fast-scan hazy)
for st in "${styles[@]}"; do
  d="$work/$st"
  "$bin" synth --style "$st" --count "$count" --size "$size" --seed 900 --out "$d" >/dev/null 2>&1
  "$bin" segment --model "$model" --out "$d/pred" "$d"/images/*.png >/dev/null 2>&1
  for r in 0 ${RATIO:-0.5}; do
    "$bin" features --kind grains --neck-ratio "$r" --json "$d/pred-$r.json" "$d"/pred/*.mask.png >/dev/null 2>&1
    "$bin" features --kind grains --neck-ratio "$r" --json "$d/truth-$r.json" "$d"/masks/*.png >/dev/null 2>&1
  done
done
python3 - "$work" "$model" "${styles[@]}" <<'EOF'
import glob, json, os, sys
work, model, styles = sys.argv[1], sys.argv[2], sys.argv[3:]
print(f"model {model}: grains per image (mean) and mean |measured - truth| / truth")
rr = os.environ.get("RATIO", "0.5")
print(f"| style | truth | truth mask, {rr} | measured, 0 | measured, {rr} | error, 0 | error, {rr} |")
print("|---|---|---|---|---|---|---|")
for st in styles:
    d = f"{work}/{st}"
    truth = [json.load(open(f))["grains"] for f in sorted(glob.glob(f"{d}/truth/*.json"))]
    grains = lambda name: [f["grains"] for f in json.load(open(f"{d}/{name}.json"))]
    t5, p0, p5 = grains(f"truth-{rr}"), grains("pred-0"), grains(f"pred-{rr}")
    err = lambda p: 100 * sum(abs(a - b) / b for a, b in zip(p, truth)) / len(truth)
    mean = lambda v: sum(v) / len(v)
    print(f"| {st} | {mean(truth):.1f} | {mean(t5):.1f} | {mean(p0):.1f} | {mean(p5):.1f} | "
          f"{err(p0):.1f} % | {err(p5):.1f} % |")
EOF
