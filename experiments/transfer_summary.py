#!/usr/bin/env python3
"""A transfer grid's summary tables (docs/results.md) from the results of its configs.

A grid runs as several `microfed experiment` processes (transfer, transfer-b, -c, -d; transfer2,
transfer2-b: the CPU step uses one core); their runs share labs, splits and seeds, so they pair by
seed across the files. The configs are the arguments (default: the first grid's four).
This prints, in points: the mean validation IoU over labs at the last round; per lab T1/T2/T3 at
the last round and at the lab's best-validation checkpoint, for every run and its personalised
decoders; and every run minus FedAvg, paired by seed, with 95 % t intervals.

    python3 experiments/transfer_summary.py > docs/results/transfer-summary.md
    python3 experiments/transfer_summary.py transfer2 transfer2-b > docs/results/transfer2-summary.md

`--reference=NAME` pairs every run with the run NAME instead of FedAvg.
"""
import json
import math
import pathlib
import statistics
import sys
import tomllib

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE.parent / "docs" / "results"
CONFIGS = ["transfer", "transfer-b", "transfer-c", "transfer-d"]
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
       10: 2.228}


def load(configs):
    runs = {}
    for c in configs:
        path = RESULTS / c / "results.json"
        if not path.is_file():
            continue
        for seeds in json.loads(path.read_text()):
            if seeds:
                # A run split over configs (one seed per file, in seed order) is joined.
                runs.setdefault(seeds[0]["name"], []).extend(seeds)
    return runs


def pick(run, lab, selection):
    for p in run.get("picks", []):
        if p["lab"] == lab and p["selection"] == selection:
            return p
    return None


def pm(values):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    m = 100 * statistics.mean(values)
    if len(values) < 2:
        return f"{m:.1f}"
    return f"{m:.1f} ± {100 * statistics.stdev(values):.1f}"


def paired(a, b):
    d = [x - y for x, y in zip(a, b) if x is not None and y is not None]
    if not d:
        return "–"
    m = 100 * statistics.mean(d)
    if len(d) < 2:
        return f"{m:+.1f} (1 seed)"
    h = 100 * T95.get(len(d) - 1, 1.96) * statistics.stdev(d) / math.sqrt(len(d))
    return f"{m:+.1f} [{m - h:+.1f}, {m + h:+.1f}]"


def rows(runs):
    """(label, seeds, final selection, best selection) for every run and personalised variant."""
    out = []
    for name, seeds in runs.items():
        out.append((name, seeds, "final", "best-validation"))
        if any(pick(s, 0, "final-personalised") for s in seeds):
            out.append((name + " → personalised", seeds, "final-personalised",
                        "best-validation-personalised"))
    return out


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--reference=")]
    refs = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--reference=")]
    reference = refs[-1] if refs else "FedAvg"
    configs = args or CONFIGS
    global LABS
    # The labs of the grid, in order, from its first config.
    LABS = [l["name"] for l in tomllib.loads((HERE / f"{configs[0]}.toml").read_text())["labs"]]
    runs = load(configs)
    if reference not in runs:
        raise SystemExit(f"no results of {reference!r} yet (run experiments/run.sh with its config)")
    ref = runs[reference]
    short = "FedAvg's" if reference == "FedAvg" else "ref.'s"
    if reference != "FedAvg":
        print(f"Paired differences are against the run {reference!r} (ref.).\n")
    print("Mean validation IoU over the four labs, last round (points, mean ± sd over seeds):\n")
    print("| run | seeds | " + " | ".join(LABS) + f" | mean | mean − {short} |")
    print("|---|---|" + "---|" * (len(LABS) + 2))
    means = lambda seeds: [s["rounds"][-1]["mean_iou"] for s in seeds]
    for name, seeds in runs.items():
        cells = [pm([s["rounds"][-1]["lab_iou"][l] for s in seeds]) for l in range(len(LABS))]
        diff = "" if seeds is ref else paired(means(seeds), means(ref))
        print(f"| {name} | {len(seeds)} | " + " | ".join(cells) + f" | {pm(means(seeds))} | {diff} |")
    for l, lab in enumerate(LABS):
        print(f"\n{lab}: test IoU (T1 own style, T2 the other labs' styles, T3 fast-scan), points\n")
        print("| run | T1 final | T2 final | T3 final | T1 best-val | T2 best-val | T3 best-val |"
              f" T1 − {short} (final) | T2 − {short} (final) | T1 − {short} (best-val) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for label, seeds, fin, best in rows(runs):
            v = lambda sel, t: [(pick(s, l, sel) or {}).get("tests", {}).get(t) for s in seeds]
            r = lambda sel, t: [(pick(s, l, sel) or {}).get("tests", {}).get(t) for s in ref]
            cells = [pm(v(fin, t)) for t in ("t1", "t2", "t3")]
            cells += [pm(v(best, t)) for t in ("t1", "t2", "t3")]
            if seeds is ref and fin == "final":
                cells += ["", "", ""]
            else:
                cells += [paired(v(fin, "t1"), r("final", "t1")),
                          paired(v(fin, "t2"), r("final", "t2")),
                          paired(v(best, "t1"), r("best-validation", "t1"))]
            print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
