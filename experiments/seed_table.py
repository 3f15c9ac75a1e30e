"""Paired seed table from grid_recipe.py logs (docs/results.md, session 9): the last val accuracy of each run,
mean ± 95 % t-interval per method, and the paired difference (same synthetic set, Stage 0 and training seed).

    python experiments/seed_table.py --baseline 'runs/exp/flow_k0_s{s}.log' \
        --method 'runs/exp/flow_s1jn_s{s}.log' --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from storms_dist.eval.metrics import ci95, mean_std


def last_accuracy(log: Path, qtype: str) -> float:
    if not log.is_file():
        raise SystemExit(f"{log}: no such log (expected a grid_recipe.py method run's output)")
    values = re.findall(rf"'{qtype}': ([0-9.]+)", log.read_text())
    if not values:
        raise SystemExit(f"{log}: no '{qtype}' accuracy in this log (is the run finished?)")
    return float(values[-1])


def mean_ci(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.1f} ± {ci95(std, len(values)):.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="log path pattern with {s} for the seed")
    p.add_argument("--method", required=True, help="log path pattern with {s} for the seed")
    p.add_argument("--seeds", nargs="+", required=True)
    p.add_argument("--qtype", default="future_cell")
    args = p.parse_args()
    base = [last_accuracy(Path(args.baseline.format(s=s)), args.qtype) for s in args.seeds]
    method = [last_accuracy(Path(args.method.format(s=s)), args.qtype) for s in args.seeds]
    diff = [m - b for b, m in zip(base, method)]
    print("| seed | baseline | method | difference |\n|---|---:|---:|---:|")
    for s, b, m, d in zip(args.seeds, base, method, diff):
        print(f"| {s} | {b:.1f} | {m:.1f} | {d:+.1f} |")
    print(f"| mean ± 95 % CI (n = {len(diff)}) | {mean_ci(base)} | {mean_ci(method)} | {mean_ci(diff)} |")


if __name__ == "__main__":
    main()
