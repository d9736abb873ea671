#!/usr/bin/env python3
"""What a lab would deploy against staying alone, paired by seed (docs/results.md).

The federation's global fine-tuned by each lab with AdamW (its final-personalised pick) against
local-only with AdamW (its final decoder), per lab, on T1 (its own style) and T2 (the other labs'
styles): mean ± sd of each and the paired difference with a 95 % t interval. Three comparisons:

- `transfer2` (default): the second grid's FedAvg, then 240 AdamW steps ("FedAvg → AdamW 240 steps",
  transfer-personal*.toml: one seed per file) against local-only AdamW with 8 steps a round
  (transfer-adamw-{b,c,d}.toml: seeds 1-3, 4, 5).
- `transfer7`: FedAvg over AdamW with the labs' moments shared, 32 steps a round, then 960 AdamW
  steps, local-only's whole budget (transfer7-s, -w: seeds 1, 2-3) against local-only
  AdamW with 32 steps a round (transfer7-r, -y: seeds 1, 2-5).
- `transfer8`: the same global, then 240 AdamW steps, the agent's `[federation.personalise]` length
  (transfer8-a, -b: seeds 1, 2), against local-only AdamW with 8 steps a round, 240 in all
  (transfer7-j, -y: seeds 1, 2-5).

    python3 experiments/personal_vs_local.py >> docs/results/transfer-personal-summary.md
    python3 experiments/personal_vs_local.py transfer7 >> docs/results/transfer7-summary.md
    python3 experiments/personal_vs_local.py transfer8 >> docs/results/transfer7-summary.md
"""
import math
import pathlib
import statistics
import sys
import tomllib

from transfer_summary import T95, load, pick, pm

HERE = pathlib.Path(__file__).resolve().parent
COMPARISONS = {
    "transfer2": {
        "labs": "transfer2.toml",
        "deployed": (["transfer-personal", "transfer-personal-b", "transfer-personal-c",
                      "transfer-personal-d", "transfer-personal-e"], "FedAvg → AdamW 240 steps"),
        "alone": (["transfer-adamw-b", "transfer-adamw-c", "transfer-adamw-d"], "local only, AdamW"),
        "what": "AdamW 1e-3, 240 steps",
    },
    "transfer7": {
        "labs": "transfer5-a.toml",
        "deployed": (["transfer7-s", "transfer7-w"],
                     "FedAvg, AdamW 1e-3, moments shared, 32 steps → AdamW 960 steps"),
        "alone": (["transfer7-r", "transfer7-y"], "local only, AdamW 1e-3, 32 steps"),
        "what": "the shared-moments global; AdamW 1e-3, 960 steps",
    },
    "transfer8": {
        "labs": "transfer5-a.toml",
        "deployed": (["transfer8-a", "transfer8-b"],
                     "FedAvg, AdamW 1e-3, moments shared, 32 steps → AdamW 240 steps"),
        "alone": (["transfer7-j", "transfer7-y"], "local only, AdamW 1e-3"),
        "what": "the shared-moments global; AdamW 1e-3, 240 steps",
    },
}


def main():
    which = sys.argv[1] if len(sys.argv) > 1 else "transfer2"
    if which not in COMPARISONS:
        sys.exit(f"unknown comparison {which!r}: one of {', '.join(COMPARISONS)}")
    c = COMPARISONS[which]
    labs = [l["name"] for l in tomllib.loads((HERE / c["labs"]).read_text())["labs"]]
    fed = load(c["deployed"][0]).get(c["deployed"][1], [])
    loc = load(c["alone"][0]).get(c["alone"][1], [])
    n = min(len(fed), len(loc))
    if n == 0:
        sys.exit(f"{which}: no seed has both runs ({c['deployed'][1]!r}, {c['alone'][1]!r})")
    print(f"\nThe global fine-tuned by each lab ({c['what']}, kept on validation) against "
          f"{c['alone'][1]}, paired by seed ({n} seeds), points:\n")
    print("| lab | test | global + fine-tune | local only, AdamW | difference [95 % interval] |"
          " fine-tune kept |")
    print("|---|---|---|---|---|---|")
    for l, lab in enumerate(labs):
        for t in ("t1", "t2"):
            a = [pick(s, l, "final-personalised") for s in fed[:n]]
            b = [pick(s, l, "final") for s in loc[:n]]
            va = [p["tests"][t] for p in a]
            vb = [p["tests"][t] for p in b]
            d = [100 * (x - y) for x, y in zip(va, vb)]
            m = statistics.mean(d)
            diff = f"{m:+.1f}"
            if n > 1:
                h = T95.get(n - 1, 1.96) * statistics.stdev(d) / math.sqrt(n)
                diff += f" [{m - h:+.1f}, {m + h:+.1f}]"
            kept = sum(1 for p in a if p["personalised"])
            print(f"| {lab} | {t.upper()} | {pm(va)} | {pm(vb)} | {diff} | {kept} of {n} |")


if __name__ == "__main__":
    main()
