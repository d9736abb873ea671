#!/usr/bin/env bash
# Reproduces docs/results.md: makes the synthetic labs with `microfed synth`, then runs each
# experiment with `microfed experiment`: the optimiser and loss sweeps, the IID gate, the demo's labs,
# the synthetic and the nasa-super federations. The demo's own numbers: `microfed demo` (release).
#
#   experiments/run.sh                 # all of them, in that order
#   experiments/run.sh gate-iid        # some of them (sweep-optimiser | sweep-loss | gate-iid | gate-iid2-a | gate-iid2-b |
#                                      #   demo-labs | sweep-demo | synthetic | nasa-super | transfer | transfer-b | transfer-c | transfer-d |
#                                      #   transfer-recipe | transfer2 | transfer2-b | transfer-ceiling | transfer3 |
#                                      #   transfer-adamw | transfer-adamw-b | transfer-per-image | transfer-per-image-b |
#                                      #   nasa-super2 | nasa-super2-b | transfer-personal | transfer-personal-b |
#                                      #   transfer-personal-c | transfer-fedadam | sweep-demo-grains40 |
#                                      #   sweep-demo-grains40-b | transfer-personal-d | transfer-personal-e |
#                                      #   transfer-adamw-c | transfer-adamw-d | transfer2-c | transfer2-d |
#                                      #   transfer2-e | transfer2-f | transfer2-g | transfer2-h | sweep-demo-e | sweep-demo-grains40-c |
#                                      #   sweep-demo-grains40-d | sweep-demo-grains40-e … -p |
#                                      #   transfer4-a … -l | transfer5-a | transfer5-b | transfer6-a | transfer6-b | transfer6-c |
#                                      #   transfer7-a … -z | transfer8-a | transfer8-b | transfer9-a … -d, -f … -j |
#                                      #   transfer10-a … -h | transfer11-a … -e)
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
# synth_sized folder style count seed size grain: images of one mean grain diameter (px).
synth_sized() {
    local out="data/$1"
    if [[ -f "$out/dataset.toml" && $(ls "$out/images" | wc -l) -eq $3 ]]; then return; fi
    rm -rf "$out"
    "$MICROFED" synth --structure polycrystal --style "$2" --count "$3" --size "$5" --seed "$4" \
        --feature-size "$6" --out "$out"
}

# The transfer grids' one-style base model, trained once into models/NAME: base_model NAME SEED [pretrain flags].
base_model() {
    local name=$1 seed=$2
    shift 2
    if [[ -f "models/$name/model.onnx" ]]; then return; fi
    nice "$MICROFED" pretrain --data data/transfer/base-sem-se --name "$name" \
        --epochs "${BASE_EPOCHS:-10}" --steps-per-epoch 50 --batch 8 --crop 128 \
        --optimizer adamw --lr 2e-3 --class-weights auto --dice-weight 0.5 \
        --val-fraction 0.15 --patience 8 --seed "$seed" --device "${DEVICE:-auto}" \
        "$@" --out "models/$name"
}

which=("${@:-sweep-optimiser sweep-loss gate-iid gate-iid2-a gate-iid2-b demo-labs sweep-demo synthetic nasa-super transfer transfer-b transfer-c transfer-d transfer-recipe transfer2 transfer2-b transfer-ceiling transfer3 transfer-adamw transfer-adamw-b transfer-per-image transfer-per-image-b nasa-super2 nasa-super2-b transfer-personal transfer-personal-b transfer-personal-c transfer-fedadam sweep-demo-grains40 sweep-demo-grains40-b transfer-personal-d transfer-personal-e transfer-adamw-c transfer-adamw-d transfer2-c transfer2-d transfer2-e transfer2-f transfer2-g transfer2-h sweep-demo-e sweep-demo-grains40-c sweep-demo-grains40-d transfer4-a transfer4-b transfer4-c transfer4-d transfer4-e transfer4-f transfer4-g transfer4-h transfer4-i transfer4-j transfer4-k transfer4-l transfer5-a transfer5-b transfer6-a transfer6-b transfer6-c transfer7-a transfer7-b transfer7-c transfer7-d transfer7-e transfer7-f transfer7-g transfer7-h transfer7-i transfer7-j transfer7-k transfer7-l transfer7-m transfer7-n transfer7-o transfer7-p transfer7-q transfer7-r transfer7-s transfer7-t transfer7-u transfer7-v transfer7-w transfer7-x transfer7-y transfer7-z transfer8-a transfer8-b transfer9-a transfer9-b transfer9-c transfer9-d transfer9-f transfer9-g transfer9-h transfer9-i transfer9-j transfer10-a transfer10-b transfer10-c transfer10-d transfer10-e transfer10-g transfer10-f transfer10-h transfer11-a transfer11-b transfer11-c transfer11-d transfer11-e}")
for fed in ${which[*]}; do
    case "$fed" in
        gate-iid|gate-iid2-a|gate-iid2-b)
            # Four labs, one style (sem-se): random draws of the same generator, 12 images each.
            for i in 1 2 3 4; do make_lab_at "gate-iid/lab-$i" sem-se 12 $((5200 + i)); done
            ;;
        demo-labs|sweep-demo|sweep-demo-e|sweep-demo-grains40|sweep-demo-grains40-[b-p])
            # What `microfed demo` synthesises with its defaults (seed 7: labs 700, 701, 702).
            make_lab_at demo-labs/hazy hazy 10 700
            make_lab_at demo-labs/sem-bse sem-bse 10 701
            make_lab_at demo-labs/optical-etched optical-etched 10 702
            if [[ "$fed" == sweep-demo-grains40* && ! -f ../data/base-models/grains-40/model.onnx ]]; then
                # models/make.sh's grains recipe with 4x the steps, into a folder of its own.
                MICROFED="$MICROFED" ../models/make.sh data-grains
                W=../data/base-models/polycrystal/train
                nice "$MICROFED" pretrain --data $W/optical-etched $W/sem-se $W/sem-bse $W/fast-scan \
                    --name grains --epochs 40 --batch 8 --crop 128 --steps-per-epoch 50 \
                    --optimizer adamw --lr 2e-3 --class-weights auto --dice-weight 0.5 \
                    --val-fraction 0.15 --patience 8 --seed 1 --device "${DEVICE:-auto}" \
                    --out ../data/base-models/grains-40
            fi
            ;;
        synthetic|sweep-optimiser|sweep-loss)
            make_lab sem-se 12 5101
            make_lab optical-etched 12 5102
            make_lab sem-bse 12 5103
            make_lab hazy 7 5104
            ;;
        transfer|transfer-b|transfer-c|transfer-d|transfer-recipe|transfer2|transfer2-b|transfer-ceiling|transfer3|transfer-adamw|transfer-adamw-b|transfer-per-image|transfer-per-image-b|transfer-personal|transfer-personal-b|transfer-personal-c|transfer-fedadam|transfer-personal-d|transfer-personal-e|transfer-adamw-c|transfer-adamw-d|transfer2-c|transfer2-d|transfer2-e|transfer2-f|transfer2-g|transfer2-h|transfer4-[a-l]|transfer5-a|transfer5-b|transfer6-a|transfer6-b|transfer6-c|transfer7-[a-z]|transfer8-a|transfer8-b|transfer9-[a-df-j]|transfer10-[a-h]|transfer11-[a-e])
            # The comparison of issue 15: a base model trained on ONE style (sem-se, grains of 40 px,
            # 32 images of 512²); three donor labs with 16 labelled images each, all of one grain
            # size per lab (sem-se 30 px, optical-etched 40 px, sem-bse 55 px); the target lab
            # (hazy, the style most unlike the base model's) with 5 labelled images (3 train, 2
            # validate), grains of 40 px. Test sets: 12 images per style spanning all three
            # sizes (T1 own style, T2 the other labs' styles), and fast-scan, which nobody trains
            # on (T3). Seeds 6000+ meet no other experiment's.
            synth_sized transfer/base-sem-se sem-se 32 6000 512 40
            synth_sized transfer/sem-se sem-se 16 6101 256 30
            synth_sized transfer/optical-etched optical-etched 16 6102 256 40
            synth_sized transfer/sem-bse sem-bse 16 6103 256 55
            synth_sized transfer/hazy hazy 5 6104 256 40
            # The decoder's ceiling on the hazy style with ample labels (transfer-ceiling.toml).
            synth_sized transfer/hazy-ample hazy 16 6105 256 40
            # A target lab the decoder can learn, with few labels (transfer3.toml).
            synth_sized transfer/optical-few optical-etched 5 6107 256 40
            i=0
            for style in sem-se optical-etched sem-bse hazy fast-scan; do
                for grain in 30 40 55; do
                    synth_sized "transfer/test/$style-$grain" "$style" 4 $((6200 + 10 * i + grain / 10)) 256 "$grain"
                done
                i=$((i + 1))
            done
            # The grains recipe (models/make.sh) on one style: AdamW 2e-3, warm-up and cosine,
            # 10 epochs × 50 steps of 8 crops of 128 px, class weights, 0.5 × soft Dice.
            base_model base-sem-se 1
            # The same base model from a second seed: how far the base model alone moves a run.
            if [[ "$fed" == transfer11-[de] ]]; then base_model base-sem-se-seed2 2; fi
            # The same base model with each image standardised by its own mean and std.
            if [[ "$fed" == transfer-per-image* ]]; then
                base_model base-sem-se-per-image 1 --per-image-normalisation
            fi
            ;;
        nasa-super|nasa-super2|nasa-super2-b)
            [[ -d ../../shared/data/nasa-super/images ]] || { echo "nasa-super not found beside the repository (shared/data/nasa-super)" >&2; exit 1; }
            ;;
        *) echo "unknown experiment $fed (sweep-optimiser | sweep-loss | gate-iid | gate-iid2-a | gate-iid2-b | demo-labs | sweep-demo | synthetic | nasa-super | transfer | transfer-b | transfer-c | transfer-d | transfer-recipe | transfer2 | transfer2-b | transfer-ceiling | transfer3 | transfer-adamw | transfer-adamw-b | transfer-per-image | transfer-per-image-b | nasa-super2 | nasa-super2-b | transfer-personal | transfer-personal-b | transfer-personal-c | transfer-fedadam | sweep-demo-grains40 | sweep-demo-grains40-b | transfer-personal-d | transfer-personal-e | transfer-adamw-c | transfer-adamw-d | transfer2-c | transfer2-d | transfer2-e | transfer2-f | sweep-demo-e | sweep-demo-grains40-c | sweep-demo-grains40-d | sweep-demo-grains40-e … -p | transfer4-a … -l | transfer5-a | transfer5-b | transfer6-a | transfer6-b | transfer6-c | transfer7-a … -z | transfer8-a | transfer8-b | transfer9-a … -d, -f … -j | transfer10-a … -h | transfer11-a … -e)" >&2; exit 2 ;;
    esac
    start=$SECONDS
    nice "$MICROFED" experiment --config "$fed.toml"
    echo "$fed: $((SECONDS - start)) s"
done
# The transfer grid's tables across its four processes (paired by seed): docs/results.md quotes them.
if [[ " ${which[*]} " == *" transfer "* || " ${which[*]} " == *" transfer-"[bcd]" "* ]]; then
    python3 transfer_summary.py > ../docs/results/transfer-summary.md
fi
if [[ " ${which[*]} " == *" transfer2"* ]]; then
    # Seeds 1-3 (transfer2, transfer2-b) and 4-5 (transfer2-c, transfer2-d) of the same grid, and
    # FedProx and feature-stats codes (transfer2-e, transfer2-f: seeds 1-5).
    python3 transfer_summary.py transfer2 transfer2-b transfer2-c transfer2-d transfer2-e transfer2-f \
        > ../docs/results/transfer2-summary.md
fi
if [[ " ${which[*]} " == *" transfer5-"* || " ${which[*]} " == *" transfer4-"* || " ${which[*]} " == *" transfer6-"* ]]; then
    # The grid's core on today's base model (transfer5-a/-b, 5 seeds) and what else was tried for
    # the target lab and the gap to centralised (transfer4-a … -l; -j, -k, -l: seeds 1-5 of one run;
    # transfer6-a/-b/-c: feature alignment), paired by seed.
    python3 transfer_summary.py transfer5-a transfer5-b transfer4-a transfer4-b transfer4-c transfer4-d \
        transfer4-e transfer4-f transfer4-g transfer4-h transfer4-i transfer4-j transfer4-k transfer4-l \
        transfer6-a transfer6-b transfer6-c > ../docs/results/transfer5-summary.md
fi
if [[ " ${which[*]} " == *" transfer7-"* || " ${which[*]} " == *" transfer8-"* ]]; then
    # Optimiser moments shared by the labs, centralised and local AdamW (transfer7-a … -z; seeds of one
    # run split over files: -i, -m, -n; -t, -v, -z; -s, -w; -r, -j, -c and -y), paired by seed with
    # today's FedAvg and local only (transfer5-a/-b); then what a lab deploys against staying alone,
    # with a fine-tune as long as local-only's training (960 steps) and the agent's (240; transfer8-a/-b).
    python3 transfer_summary.py transfer5-a transfer5-b $(printf 'transfer7-%s ' {a..z}) transfer8-a transfer8-b \
        "--reference=FedAvg, AdamW 1e-3, moments shared, 32 steps" > ../docs/results/transfer7-summary.md
    python3 personal_vs_local.py transfer7 >> ../docs/results/transfer7-summary.md
    python3 personal_vs_local.py transfer8 >> ../docs/results/transfer7-summary.md
fi
if [[ " ${which[*]} " == *" transfer9-"* ]]; then
    # Shorter rounds and a server rate on the shared-moments recipe (8 steps × 120 rounds: transfer9-a,
    # -d, seeds 1, 2-3; 4 steps × 240 rounds: -c, -f, -g, seeds 1, 2-3, 4-5, and merged unweighted: -j,
    # seed 1; server rate 2: -b), and the centralised runs that match the short rounds (-h on samples,
    # -i on steps; seed 1), paired by seed with the 32-step run (transfer7-i, -m, -n), centralised
    # AdamW on the 8-step samples (transfer7-c, -y) and local-only AdamW (transfer7-r, -j, -y).
    python3 transfer_summary.py transfer7-i transfer7-m transfer7-n transfer7-c transfer7-r transfer7-j \
        transfer7-y $(printf 'transfer9-%s ' a d c f g j b h i) \
        "--reference=FedAvg, AdamW 1e-3, moments shared, 32 steps" > ../docs/results/transfer9-summary.md
fi
if [[ " ${which[*]} " == *" transfer10-"* ]]; then
    # Style codes on the 4-step recipe, all run on one machine (session 18's AMD EPYC: its base model is
    # not session 17's, so these pair only with each other): without codes (-d, -e, -f: seeds 1, 2-3, 4),
    # balanced re-styling with feature-stats codes (-b, -g, -h) and Fourier band-32 codes (-a, seed 1), and
    # FedST's uniform rule with Fourier codes (-c, seed 1).
    python3 transfer_summary.py transfer10-d transfer10-e transfer10-f transfer10-a transfer10-b transfer10-g transfer10-h \
        transfer10-c "--reference=FedAvg 4×240, no codes" > ../docs/results/transfer10-summary.md
fi
if [[ " ${which[*]} " == *" transfer11-"* ]]; then
    # Balanced feature-stats codes (-a: seeds 1-3, -b: 4-5; -c: merged unweighted, seed 1) on session 17's
    # machine type (Intel Xeon with AVX-512), paired by seed with session 17's runs there: without codes
    # (transfer9-c, -f, -g; unweighted transfer9-j), local-only and centralised AdamW (transfer7-c, -j, -r,
    # -y; transfer9-h, -i).
    python3 transfer_summary.py transfer9-c transfer9-f transfer9-g transfer11-a transfer11-b transfer9-j transfer11-c \
        transfer7-c transfer7-j transfer7-r transfer7-y transfer9-h transfer9-i \
        "--reference=FedAvg, AdamW 1e-3, moments shared, 4 steps × 240 rounds" > ../docs/results/transfer11-summary.md
    # The same pair on a base model from a second seed (-d without codes, -e balanced codes; seed 1).
    python3 transfer_summary.py transfer11-d transfer11-e \
        "--reference=FedAvg, AdamW 1e-3, moments shared, 4 steps × 240 rounds, base seed 2" \
        > ../docs/results/transfer11-base-seed2-summary.md
fi
if [[ " ${which[*]} " == *" transfer3 "* ]]; then
    python3 transfer_summary.py transfer3 > ../docs/results/transfer3-summary.md
fi
if [[ " ${which[*]} " == *" transfer-adamw"* ]]; then
    # Local-only with AdamW beside the second grid (paired by seed; FedAvg with AdamW when its run
    # is there: it was stopped at round 7 of seed 1 in docs/results.md).
    python3 transfer_summary.py transfer2 transfer2-b transfer-adamw transfer-adamw-b > ../docs/results/transfer-adamw-summary.md
fi
if [[ " ${which[*]} " == *" transfer-personal"* ]]; then
    python3 transfer_summary.py transfer2 transfer2-b transfer-adamw-b transfer-adamw-c transfer-adamw-d \
        transfer-personal transfer-personal-b transfer-personal-c transfer-personal-d transfer-personal-e \
        > ../docs/results/transfer-personal-summary.md
    python3 personal_vs_local.py >> ../docs/results/transfer-personal-summary.md
fi
if [[ " ${which[*]} " == *" nasa-super2"* ]]; then
    python3 transfer_summary.py nasa-super2 nasa-super2-b > ../docs/results/nasa-super2-summary.md
fi
if [[ " ${which[*]} " == *" transfer-per-image"* ]]; then
    python3 transfer_summary.py transfer-per-image transfer-per-image-b > ../docs/results/transfer-per-image-summary.md
fi
