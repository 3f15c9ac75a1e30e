"""Stage II variants from one finished demo run's Stage I export (docs/results.md, session 18): each variant is the
demo's `stage2` job with config overrides, trained through the real trainer (DeepSpeed, one-rank torchrun, one
thread, two at a time) and evaluated on the run's eval split beside the Stage I export it starts from.

    python experiments/stage2_variants.py runs/NAME --seed 0 \
        --variant answer_only: --variant anchor_lam1:stage2.align=true [--set eval.split=val] \
        [--start stage1_only/stage1_continued/export]

`--start` is relative to the seed folder; a variant's own export chains (docs/results.md, session 25):
`--start ../stage2_variants/seed0_from_stage1_only_stage1_continued/s1cont600/export`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from storms_dist.config import load_config, replace
from storms_dist.model.build import load_exported
from storms_dist.pipeline import run_eval, run_training, with_seed
from storms_dist.run_config import RunConfig
from storms_dist.targets import STAMP_FILE, vision_fingerprint
from storms_dist.tracking import Tracker
from storms_dist.train.trainer import TrainJob

DEFAULT_START = "storms/stage1/export"  # STORMS's Stage I, the start its Stage II trains from


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"--variant {text!r}: expected NAME:override,override (overrides may be empty)")
    return name, [o for o in overrides.split(",") if o]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir", help="a finished `storms demo` run folder (its config.yaml, seedS/storms/stage1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", action="append", required=True, help="NAME:override,override (stage2.*, model.*)")
    p.add_argument("--set", action="append", default=[], help="override for every variant and the start (eval.split=val)")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--start", default=DEFAULT_START, help="the export every variant starts from, relative to the seed "
                   "folder (e.g. stage1_only/stage1_continued/export: Stage I only's 850-step export)")
    args = p.parse_args()
    run_dir = Path(args.run_dir)
    seed_dir = run_dir / f"seed{args.seed}"
    start_export = seed_dir / args.start
    if not start_export.is_dir():
        raise SystemExit(f"{start_export}: no such export (run `storms demo` with this run name first)")
    # each start gets its own folder, named by its whole path inside the run folder (so two starts never share one,
    # and a chained start such as ../stage2_variants/.../export gets no '..' in its name): the target cache below is
    # restamped for the start's tower
    start_path = os.path.relpath(start_export.resolve(), run_dir.resolve())
    if start_path.startswith(".."):  # a start outside the run folder: named by its absolute path
        start_path = start_export.resolve().as_posix().lstrip("/")
    start_name = start_path.removeprefix(f"seed{args.seed}/").removesuffix("/export").replace("/", "_")
    out_root = run_dir / "stage2_variants" / (f"seed{args.seed}" if args.start == DEFAULT_START else
                                               f"seed{args.seed}_from_{start_name}")
    variants = dict(parse_variant(v) for v in args.variant)
    cfgs = {name: with_seed(load_config(RunConfig, run_dir / "config.yaml", [*args.set, *overrides]), args.seed)
            for name, overrides in variants.items()}

    # Stage I trains the merger, so its export's tower would re-encode the thought videos into another space than
    # the one Stage I aligned to: the variants align to a copy of the run's own cache, restamped for that export.
    targets_dir = out_root / "targets"
    if not targets_dir.is_dir():
        shutil.copytree(seed_dir / "targets", targets_dir)
        stamp_path = targets_dir / STAMP_FILE
        stamp = json.loads(stamp_path.read_text())
        stamp["vision_fingerprint"] = vision_fingerprint(load_exported(start_export)[0])
        stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")

    def train(name: str) -> str:
        cfg = cfgs[name]
        job = TrainJob(name=f"stage2_variant/{name}", stage=2, stage_cfg=cfg.stage2, out_dir=out_root / name,
                       init_from=str(start_export), targets_dir=targets_dir if cfg.stage2.align else None,
                       parent_run_id=None, tags={"method": "storms", "stage2_variant": name})
        return run_training(replace(cfg, launcher="torchrun"), job, threads=1)["export"]

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        exports = dict(zip(variants, pool.map(train, variants)))
    base_cfg = with_seed(load_config(RunConfig, run_dir / "config.yaml", args.set), args.seed)
    tracker = Tracker(base_cfg.tracking, Path(base_cfg.runs_dir), is_main_process=True)
    rows = {"stage1 export (start)": (str(start_export), base_cfg), **{n: (exports[n], cfgs[n]) for n in variants}}
    print(f"| Stage II variant ({base_cfg.eval.split}, seed {args.seed}) | overrides | future_cell | current_cell |")
    print("|---|---|---:|---:|")
    for name, (export, cfg) in rows.items():
        metrics = run_eval(tracker, export, cfg, out_root / name / "eval", name=f"stage2_variant/{name}/eval",
                           parent_run_id=None, tags={"stage2_variant": name}, progress=False)
        by_type = {q: v["accuracy"] for q, v in metrics["by_type"].items()}
        print(f"| {name} | {' '.join(variants.get(name, []))} | {by_type.get('future_cell', float('nan')):.1f} | "
              f"{by_type.get('current_cell', float('nan')):.1f} |", flush=True)


if __name__ == "__main__":
    main()
