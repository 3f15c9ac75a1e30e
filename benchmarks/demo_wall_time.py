"""Wall time of `storms demo` per phase (the issue-9 budget: `make demo` <= 10 min on 2 cores, install included).

Runs each variant's `storms demo` one after another on this machine (never two at once: they share the 2 cores),
then prints the phase timeline read off the run folder's files: Stage 0, each training job (start = its
config.yaml, end = its summary.json), the evaluations and the report. `--fresh-clone` also times `make demo` in a
`git clone` of HEAD (venv, install, synthetic set and pipeline), the number the budget is about.

    python benchmarks/demo_wall_time.py --variant shared: \\
        --variant separate:demo.share_stage1=false,stage1.num_steps=900,stage2.num_steps=300 [--fresh-clone]

Variants run with `eval.split=val`; the fresh clone runs the README command as it is (test split).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timeline(run_dir: Path) -> list[tuple[float, float, str]]:
    """(start s, end s, phase) from the run folder's files, relative to the run's config.yaml."""
    t0 = (run_dir / "config.yaml").stat().st_mtime
    rows = []
    for seed_dir in sorted(run_dir.glob("seed*")):
        for job_dir in sorted(p.parent for p in seed_dir.rglob("summary.json")):
            start = (job_dir / "config.yaml").stat().st_mtime
            rows.append((start - t0, (job_dir / "summary.json").stat().st_mtime - t0,
                         f"{seed_dir.name}/{job_dir.relative_to(seed_dir)}"))
        evals = [p.stat().st_mtime for p in seed_dir.glob("*/eval/metrics.json")]
        if evals:
            last_train = max(end for _, end, name in rows if name.startswith(seed_dir.name))
            rows.append((last_train, max(evals) - t0, f"{seed_dir.name}/evaluations"))
    rows.append((0.0, (run_dir / "report.md").stat().st_mtime - t0, "pipeline (config written -> report)"))
    return sorted(rows)


def print_timeline(title: str, wall_s: float, rows) -> None:
    print(f"\n### {title}: {wall_s / 60:.2f} min wall\n")
    print("| phase | start s | end s | s |\n|---|---:|---:|---:|")
    for start, end, name in rows:
        print(f"| {name} | {start:.0f} | {end:.0f} | {end - start:.0f} |")


def timed(command: list[str], cwd: Path, log: Path) -> float:
    started = time.perf_counter()
    with open(log, "w") as out:
        result = subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {result.returncode}); see {log}")
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", default=[], help="NAME:override,override (may be empty)")
    p.add_argument("--fresh-clone", action="store_true", help="also time `make demo` in a git clone of HEAD")
    p.add_argument("--keep-clone", type=Path, default=None,
                   help="clone into this (new) folder and keep it, e.g. to compare its exports; default: a temp dir")
    args = p.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    print(f"{platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"commit {commit}")
    for variant in args.variant:
        name, _, overrides = variant.partition(":")
        run_name = f"bench_demo_{name}"
        command = [str(REPO / ".venv/bin/storms"), "demo", f"name={run_name}", "eval.split=val",
                   *[o for o in overrides.split(",") if o]]
        wall = timed(command, REPO, REPO / "runs" / f"{run_name}.log")
        print_timeline(f"variant {name} ({overrides or 'the committed default'})", wall,
                       timeline(REPO / "runs" / run_name))
    if args.fresh_clone:
        with tempfile.TemporaryDirectory(prefix="storms_fresh_") as tmp:
            clone = args.keep_clone.resolve() if args.keep_clone else Path(tmp) / "storms_dist"
            subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
            env_python = os.environ.get("PYTHON", "python3")
            wall = timed(["make", "demo", f"PYTHON={env_python}"], clone, Path(tmp) / "make_demo.log")
            print_timeline("fresh clone: `make demo` (install, synth, pipeline; test split)", wall,
                           timeline(clone / "runs" / "demo"))
            print("\n" + "\n".join((clone / "runs" / "demo" / "report.md").read_text().splitlines()[:40]))


if __name__ == "__main__":
    sys.exit(main())
