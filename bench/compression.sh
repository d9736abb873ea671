#!/usr/bin/env bash
# Compression benchmark of federated updates (issue: federated rounds): the same synthetic federation
# (3 labs, 3 imaging styles, the shipped grains model as the base) trained for 10 rounds with dense fp32
# updates and with compressed ones; reports mean IoU per round and bytes per round per device.
#   bench/compression.sh            (uses target/release/microfed, building it if needed)
# Outputs: bench/out/compression/{results.md,results.csv,results.json}; the table goes into
# docs/benchmarks.md by hand, with the machine it ran on.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${MICROFED:-${CARGO_TARGET_DIR:-target}/release/microfed}"
[[ -x "$bin" ]] || cargo build --release -p microfed --bin microfed
data=bench/out/compression-data
for spec in "lab-a optical-etched 1" "lab-b sem-bse 2" "lab-c hazy 3"; do
  set -- $spec
  [[ -f "$data/$1/dataset.toml" ]] || "$bin" synth --structure polycrystal --style "$2" --count 8 \
      --size 192 --seed "$3" --out "$data/$1"
done
"$bin" experiment --config bench/compression.toml
