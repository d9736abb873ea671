#!/usr/bin/env bash
# The exact commands that make microfed's shipped base models. Run from anywhere:
#
#   models/make.sh                    # everything: data, grains, precipitates, nasa-super fine-tune
#   models/make.sh grains             # one step: data-grains | grains | data-precipitates |
#                                     #           precipitates | precipitates-nasa | score
#   QUICK=1 models/make.sh            # a short smoke version (small data, 2 epochs) into $WORK/quick
#
# Settings (environment): DEVICE (auto|cpu|cuda[:N], default auto), WORK (synthetic data and quick
# outputs, default data/base-models, not committed), NASA_SUPER (the real nasa-super folder),
# EPOCHS (per model), BATCH, CROP.
#
# Models (each folder: model.onnx, manifest.toml, training_log.csv, checkpoint/):
#  1. models/grains: polycrystal grain interior / grain boundary. Trained on synthetic micrographs in
#     4 of the 5 imaging styles (optical-etched, sem-se, sem-bse, fast-scan); `hazy` is held out
#     entirely, so its test set measures how the model copes with a lab it has never seen. A
#     separate test set of every style (other seeds) is written beside the training data.
#  2. models/precipitates: γ matrix / secondary γ′ / tertiary γ′, trained the same way on synthetic
#     precipitate micrographs (same 4 styles; hazy held out).
#  3. models/precipitates-nasa: the precipitates model with its decoder fine-tuned (encoder frozen)
#     on REAL SEM images: nasa-super spots 1-4 (12 images, models/nasa-super-train.txt). Spots 5-7
#     (6 images, models/nasa-super-test.txt) are never seen: split by spot, because images of one
#     spot (0° and 180°, neighbouring fields) are too alike to test on each other.
#
# Every run resumes from its checkpoint when started again (a killed job loses at most one epoch);
# add --fresh to a pretrain line to start over. Each step skips what is already there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DEVICE="${DEVICE:-auto}"
WORK="${WORK:-data/base-models}"
NASA_SUPER="${NASA_SUPER:-$ROOT/../shared/data/nasa-super}"
QUICK="${QUICK:-0}"

TRAIN_STYLES=(optical-etched sem-se sem-bse fast-scan)
ALL_STYLES=(optical-etched sem-se sem-bse hazy fast-scan)

if [[ "$QUICK" == 1 ]]; then
    # Smoke version: proves the recipe end to end in minutes on a 2-core CPU; not a usable model.
    TRAIN_COUNT=4; TEST_COUNT=2; SIZE=256
    EPOCHS="${EPOCHS:-2}"; BATCH="${BATCH:-4}"; CROP="${CROP:-128}"; STEPS=(--steps-per-epoch 4)
    FT_EPOCHS="${EPOCHS}"
    OUT="$WORK/quick"
else
    TRAIN_COUNT=48; TEST_COUNT=8; SIZE=512
    EPOCHS="${EPOCHS:-40}"; BATCH="${BATCH:-8}"; CROP="${CROP:-256}"; STEPS=()
    # A CPU budget: cap the steps per epoch (e.g. STEPS_PER_EPOCH=50 with CROP=128).
    [[ -n "${STEPS_PER_EPOCH:-}" ]] && STEPS=(--steps-per-epoch "$STEPS_PER_EPOCH")
    FT_EPOCHS="${FT_EPOCHS:-30}"
    OUT="models"
fi

# One release build; then the binary directly (cargo run would re-check the build each time).
# MICROFED=path/to/microfed uses an existing build instead of making a release build.
if [[ -z "${MICROFED:-}" ]]; then
    cargo build --release -q -p microfed
    MICROFED="${CARGO_TARGET_DIR:-$ROOT/target}/release/microfed"
fi

# synth STRUCTURE SPLIT STYLE COUNT SEED: one synthetic dataset folder, unless already there.
synth() {
    local dir="$WORK/$1/$2/$3"
    [[ -f "$dir/dataset.toml" ]] && return 0
    "$MICROFED" synth --structure "$1" --style "$3" --count "$4" --size "$SIZE" --seed "$5" \
        --out "$dir"
}

# data STRUCTURE SEED_BASE: training sets (4 styles) and test sets (all 5 styles). Each style gets
# its own seeds, so the training set holds 4×TRAIN_COUNT different specimens, and test seeds never
# meet training seeds.
data() {
    local i=0
    for style in "${TRAIN_STYLES[@]}"; do
        synth "$1" train "$style" "$TRAIN_COUNT" $(( $2 + i )); i=$(( i + 1 ))
    done
    i=0
    for style in "${ALL_STYLES[@]}"; do
        synth "$1" test "$style" "$TEST_COUNT" $(( $2 + 500 + i )); i=$(( i + 1 ))
    done
}

train_dirs() { for style in "${TRAIN_STYLES[@]}"; do echo "$WORK/$1/train/$style"; done; }

step_grains() {
    # shellcheck disable=SC2046
    "$MICROFED" pretrain --data $(train_dirs polycrystal) \
        --name grains --epochs "$EPOCHS" --batch "$BATCH" --crop "$CROP" "${STEPS[@]}" \
        --optimizer adamw --lr 2e-3 --class-weights auto --dice-weight 0.5 \
        --val-fraction 0.15 --patience 8 --seed 1 --device "$DEVICE" --out "$OUT/grains"
}

step_precipitates() {
    # shellcheck disable=SC2046
    "$MICROFED" pretrain --data $(train_dirs precipitates) \
        --name precipitates --epochs "$EPOCHS" --batch "$BATCH" --crop "$CROP" "${STEPS[@]}" \
        --optimizer adamw --lr 2e-3 --class-weights auto --dice-weight 0.5 \
        --val-fraction 0.15 --patience 8 --seed 2 --device "$DEVICE" --out "$OUT/precipitates"
}

step_precipitates_nasa() {
    # Decoder-only fine-tuning on real images: lower learning rate, the encoder stays as pretrained
    # (that is what federated rounds exchange too). Normalisation comes from the initial model's
    # manifest.
    "$MICROFED" pretrain --data "$NASA_SUPER" --classes models/nasa-super-classes.toml \
        --images-from models/nasa-super-train.txt \
        --init "$OUT/precipitates/model.onnx" --decoder-only \
        --name precipitates-nasa --epochs "$FT_EPOCHS" --batch "$BATCH" --crop "$CROP" "${STEPS[@]}" \
        --optimizer adamw --lr 5e-4 --class-weights auto --dice-weight 0.5 \
        --val-fraction 0.15 --patience 8 --seed 3 --device "$DEVICE" --out "$OUT/precipitates-nasa"
}

test_dirs() { for style in "${ALL_STYLES[@]}"; do echo "$WORK/$1/test/$style"; done; }

# Scores of the shipped models through tract (the agent's runtime), for the model cards: every
# synthetic style's test set (hazy never seen in training), and the real nasa-super images.
step_score() {
    local nasa=(--data "$NASA_SUPER" --classes models/nasa-super-classes.toml)
    "$MICROFED" model score "$OUT/grains" --data $(test_dirs polycrystal) --json "$OUT/grains/scores.json"
    "$MICROFED" model score "$OUT/precipitates" --data $(test_dirs precipitates) \
        --json "$OUT/precipitates/scores-synthetic.json"
    if [[ -d "$NASA_SUPER" ]]; then
        "$MICROFED" model score "$OUT/precipitates" "${nasa[@]}" --images-from models/nasa-super-test.txt \
            --json "$OUT/precipitates/scores-nasa-test-half.json"
        "$MICROFED" model score "$OUT/precipitates-nasa" "${nasa[@]}" --images-from models/nasa-super-test.txt \
            --json "$OUT/precipitates-nasa/scores-nasa-test-half.json"
    fi
}

run_step() {
    case "$1" in
        score) step_score ;;
        data-grains) data polycrystal 1000 ;;
        data-precipitates) data precipitates 2000 ;;
        grains) step_grains ;;
        precipitates) step_precipitates ;;
        precipitates-nasa) step_precipitates_nasa ;;
        *) echo "unknown step $1" >&2; exit 2 ;;
    esac
}

if [[ $# -eq 0 ]]; then
    set -- data-grains grains data-precipitates precipitates precipitates-nasa score
fi
for step in "$@"; do
    echo "== $step" >&2
    SECONDS=0
    run_step "$step"
    echo "== $step took ${SECONDS}s" >&2
done
