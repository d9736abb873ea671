#!/usr/bin/env python3
"""What a lab would deploy against staying alone, paired by seed (docs/results.md).

The federation's global fine-tuned by each lab with AdamW ("FedAvg → AdamW 240 steps", its
final-personalised pick, from transfer-personal*.toml: one seed per file) against local-only with
AdamW (transfer-adamw-{b,c,d}.toml: seeds 1-3, 4, 5), per lab, on T1 (its own style) and T2 (the
other labs' styles): mean ± sd of each and the paired difference with a 95 % t interval.

    python3 experiments/personal_vs_local.py >> docs/results/transfer-personal-summary.md
"""
import math
import pathlib
import statistics
import tomllib

from transfer_summary import RESULTS, T95, load, pick

HERE = pathlib.Path(__file__).resolve().parent
PERSONAL = ["transfer-personal", "transfer-personal-b", "transfer-personal-c", "transfer-personal-d",
            "transfer-personal-e"]
LOCAL = ["transfer-adamw-b", "transfer-adamw-c", "transfer-adamw-d"]


def main():
    labs = [l["name"] for l in tomllib.loads((HERE / "transfer2.toml").read_text())["labs"]]
    deployed = load([c for c in PERSONAL if (RESULTS / c / "results.json").is_file()])
    alone = load([c for c in LOCAL if (RESULTS / c / "results.json").is_file()])
    fed = deployed.get("FedAvg → AdamW 240 steps", [])
    loc = alone.get("local only, AdamW", [])
    n = min(len(fed), len(loc))
    print(f"\nThe global fine-tuned by each lab (AdamW 1e-3, 240 steps, kept on validation) against "
          f"local-only AdamW, paired by seed ({n} seeds), points:\n")
    print("| lab | test | global + fine-tune | local only, AdamW | difference [95 % interval] |"
          " fine-tune kept |")
    print("|---|---|---|---|---|---|")
    for l, lab in enumerate(labs):
        for t in ("t1", "t2"):
            a = [pick(s, l, "final-personalised") for s in fed[:n]]
            b = [pick(s, l, "final") for s in loc[:n]]
            va = [100 * p["tests"][t] for p in a]
            vb = [100 * p["tests"][t] for p in b]
            d = [x - y for x, y in zip(va, vb)]
            m = statistics.mean(d)
            h = T95.get(n - 1, 1.96) * statistics.stdev(d) / math.sqrt(n) if n > 1 else float("nan")
            kept = sum(1 for p in a if p["personalised"])
            print(f"| {lab} | {t.upper()} | {statistics.mean(va):.1f} ± {statistics.stdev(va):.1f} | "
                  f"{statistics.mean(vb):.1f} ± {statistics.stdev(vb):.1f} | "
                  f"{m:+.1f} [{m - h:+.1f}, {m + h:+.1f}] | {kept} of {n} |")


if __name__ == "__main__":
    main()
