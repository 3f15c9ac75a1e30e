"""One-process training step time under DeepSpeed ZeRO stage 3 vs stage 0 (the demo's setting).

With one process ZeRO has nothing to partition, but stage 3 still wraps every module call in gather/release hooks.
This script trains real jobs through the CLI users run::

    python -m storms_dist train configs/demo/synth_tiny.yaml --stage 2 --init-from registry KEY=VALUE...

on one synthetic set (generated once), alternating the stages in ABBA order (``--repeats`` pairs) so load drift
hits both, and reports the median over the steps after ``--warmup`` of the trainer's ``step_s`` (data + forward +
backward + optimizer), ``forward_s`` and ``backward_s``, with the stage-0 / stage-3 ratio. Fixed for every job:
``checkpoint.every_steps=0``, ``checkpoint.resume=false``, ``tracking.enabled=false``, ``data.decoder=pyav``.

    python benchmarks/zero_stage_one_process.py --steps 25 --warmup 5 --repeats 2   # ~5 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo" / "synth_tiny.yaml"
METRICS = ("step_s", "forward_s", "backward_s", "data_s")


def run_job(work: Path, name: str, zero_stage: int, args: argparse.Namespace) -> dict[str, float]:
    overrides = [f"runs_dir={work}", f"name={name}", f"data.root={work / 'data'}", f"deepspeed.zero_stage={zero_stage}",
                 f"stage2.num_steps={args.steps}", f"stage2.num_latents={args.k}", "checkpoint.every_steps=0",
                 "checkpoint.resume=false", "tracking.enabled=false", "data.decoder=pyav"]
    command = [sys.executable, "-m", "storms_dist", "train", str(CONFIG), "--stage", "2", "--init-from", "registry",
               *overrides]
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(work / "torch_extensions")}
    log = work / f"{name}.log"
    with log.open("w") as out:
        subprocess.run(command, check=True, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    rows = [json.loads(line) for line in (work / name / "stage2" / "train_log.jsonl").read_text().splitlines()]
    kept = rows[args.warmup:]
    return {m: statistics.median(r[m] for r in kept) for m in METRICS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the medians (first-epoch decoding)")
    p.add_argument("--repeats", type=int, default=2, help="pairs of jobs, ZeRO-3 first in even pairs (ABBA)")
    p.add_argument("--k", type=int, default=8, help="latent steps (Stage II rollout)")
    p.add_argument("--work-dir", default=str(REPO / "runs" / "bench_zero_stage"))
    args = p.parse_args()
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "storms_dist", "synth", str(CONFIG), f"data.root={work / 'data'}"],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    results: dict[int, list[dict[str, float]]] = {3: [], 0: []}
    for rep in range(args.repeats):
        for stage in (3, 0) if rep % 2 == 0 else (0, 3):
            results[stage].append(run_job(work, f"z{stage}_r{rep}", stage, args))
            print(f"rep {rep} zero_stage {stage}: {results[stage][-1]}", flush=True)
    summary = {stage: {m: statistics.median(r[m] for r in runs) for m in METRICS} for stage, runs in results.items()}
    context = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "k": args.k, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats}
    (work / "results.json").write_text(json.dumps({"context": context, "runs": results, "summary": summary}, indent=2))
    print(f"\n{context}\n\n| metric (median s) | ZeRO-3 | ZeRO-0 | ZeRO-0 / ZeRO-3 |\n|---|---:|---:|---:|")
    for m in METRICS:
        print(f"| {m} | {summary[3][m]:.3f} | {summary[0][m]:.3f} | {summary[0][m] / summary[3][m]:.2f} |")


if __name__ == "__main__":
    main()
