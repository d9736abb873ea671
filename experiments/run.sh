#!/usr/bin/env bash
# Reproduces docs/results.md: makes the synthetic labs with `microfed synth`, then runs each
# experiment with `microfed experiment`: the optimiser and loss sweeps, the IID gate, the demo's labs,
# the synthetic and the nasa-super federations. The demo's own numbers: `microfed demo` (release).
#
#   experiments/run.sh                 # all of them, in that order
#   experiments/run.sh gate-iid        # some of them (sweep-optimiser | sweep-loss | gate-iid |
#                                      #   demo-labs | synthetic | nasa-super)
#
# MICROFED names the binary (default: the release build, `cargo build --release -p microfed`).
# Outputs: docs/results/<federation>/results.{md,csv,json}, docs/images/results-<federation>-*.png.
# The synthetic labs and the feature caches go to experiments/data and experiments/cache (ignored
# by git). nasa-super is read from shared/data/nasa-super beside the repository (never copied).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
MICROFED="${MICROFED:-${CARGO_TARGET_DIR:-$here/../target}/release/microfed}"
[[ -x "$MICROFED" ]] || { echo "no microfed binary at $MICROFED (cargo build --release -p microfed, or set MICROFED)" >&2; exit 1; }

# One lab per imaging style: 12 images of 256² (8 training, 4 hold-out); hazy, the style the base
# model never saw, has only 7 (3 training, 4 hold-out). Seeds differ from the base model's (2000+).
make_lab_at() { # folder style count seed
    local out="data/$1"
    if [[ -f "$out/dataset.toml" && $(ls "$out/images" | wc -l) -eq $3 ]]; then return; fi
    rm -rf "$out"
    "$MICROFED" synth --structure polycrystal --style "$2" --count "$3" --size 256 --seed "$4" --out "$out"
}
make_lab() { # style count seed
    make_lab_at "synthetic/$1" "$@"
}

which=("${@:-sweep-optimiser sweep-loss gate-iid demo-labs synthetic nasa-super}")
for fed in ${which[*]}; do
    case "$fed" in
        gate-iid)
            # Four labs, one style (sem-se): random draws of the same generator, 12 images each.
            for i in 1 2 3 4; do make_lab_at "gate-iid/lab-$i" sem-se 12 $((5200 + i)); done
            ;;
        demo-labs)
            # What `microfed demo` synthesises with its defaults (seed 7: labs 700, 701, 702).
            make_lab_at demo-labs/hazy hazy 10 700
            make_lab_at demo-labs/sem-bse sem-bse 10 701
            make_lab_at demo-labs/optical-etched optical-etched 10 702
            ;;
        synthetic|sweep-optimiser|sweep-loss)
            make_lab sem-se 12 5101
            make_lab optical-etched 12 5102
            make_lab sem-bse 12 5103
            make_lab hazy 7 5104
            ;;
        nasa-super)
            [[ -d ../../shared/data/nasa-super/images ]] || { echo "nasa-super not found beside the repository (shared/data/nasa-super)" >&2; exit 1; }
            ;;
        *) echo "unknown experiment $fed (sweep-optimiser | sweep-loss | gate-iid | demo-labs | synthetic | nasa-super)" >&2; exit 2 ;;
    esac
    start=$SECONDS
    nice "$MICROFED" experiment --config "$fed.toml"
    echo "$fed: $((SECONDS - start)) s"
done
