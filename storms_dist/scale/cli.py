"""``storms plan`` and ``storms study``: thin entry points over ``plan.py``, ``study.py`` and ``report.py``.

    storms plan [--backbone NAME | --all] [--nodes N --gpus-per-node G --gpu h200 --frames 32 --max-pixels P
                --k 8 --zero 3 --offload none|optimizer|param --micro-batch 1 --autotp T --hpz H ...]
    storms study SPEC.yaml | CONFIG --sweep KEY=V1,V2 [...] [--cluster debug|local|slurm] [--dry-run]
    storms study report STUDY_ID [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    from storms_dist.scale.plan import GPUS

    p = subparsers.add_parser(
        "plan", help="per-GPU memory, communication and a step-time bound for a job, before queueing it",
        description="Parameters, gradients and optimizer state per GPU (DeepSpeed's estimators), activations with "
                    "and without checkpointing, the rollout's K/V copies, all-gather / reduce-scatter volume per "
                    "step (K+2 passes; with and without ZeRO++), a time-per-step lower bound, whether it fits and "
                    "the largest micro-batch that does. Without --backbone: one line per registry backbone.")
    p.add_argument("--backbone", default=None, help="registry name (default: every backbone, a summary table)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", choices=GPUS, default="h100")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--height", type=int, default=720, help="source video height (resized into --max-pixels)")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--max-pixels", type=int, default=448 * 448)
    p.add_argument("--k", type=int, default=8, help="latent steps K")
    p.add_argument("--mode", choices=("rollout", "single"), default="rollout")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=3)
    p.add_argument("--offload", choices=("none", "optimizer", "param"), default="none")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--no-checkpointing", action="store_true", help="activation checkpointing off")
    p.add_argument("--train-vision", action="store_true", help="the vision tower is trained (default: frozen)")
    p.add_argument("--autotp", type=int, default=1, help="DeepSpeed AutoTP degree")
    p.add_argument("--hpz", type=int, default=None, help="ZeRO++ hpZ size (default: GPUs per node on >1 node)")
    p.add_argument("--qwz", action="store_true", help="ZeRO++ int8 weight all-gathers")
    p.add_argument("--qgz", action="store_true", help="ZeRO++ quantised gradients")
    p.add_argument("--gather-latent-passes", action="store_true")
    return p


def cmd_plan(args) -> int:
    from storms_dist.model.registry import backbone_names
    from storms_dist.scale.plan import (
        SUMMARY_HEADER,
        PlanConfig,
        format_plan,
        make_plan,
        summary_row,
    )

    def config(backbone: str) -> PlanConfig:
        hpz = args.hpz if args.hpz is not None else (args.gpus_per_node if args.nodes > 1 and args.zero == 3 else 1)
        return PlanConfig(backbone=backbone, nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu=args.gpu,
                          frames=args.frames, height=args.height, width=args.width, max_pixels=args.max_pixels,
                          k=args.k, mode=args.mode, zero=args.zero, offload=args.offload, micro_batch=args.micro_batch,
                          grad_accum=args.grad_accum, dtype=args.dtype,
                          activation_checkpointing=not args.no_checkpointing, train_vision=args.train_vision,
                          autotp=args.autotp, hpz=hpz, quantized_weights=args.qwz, quantized_gradients=args.qgz,
                          gather_latent_passes=args.gather_latent_passes)

    try:
        if args.backbone:
            print(format_plan(make_plan(config(args.backbone))))
            return 0
        print(SUMMARY_HEADER)
        for name in backbone_names():
            print(summary_row(make_plan(config(name))))
        return 0
    except ValueError as e:
        print(f"storms plan: error: {e}", file=sys.stderr)
        return 2


def add_study_parser(subparsers) -> argparse.ArgumentParser:
    from storms_dist.scale.study import ThroughputConfig

    p = subparsers.add_parser(
        "study", help="a scaling study: named points through the launcher, one MLflow parent; 'report STUDY_ID'",
        description="Run every point of a study (SPEC.yaml, or CONFIG with --sweep flags) through the launcher and "
                    "log each as a child of one MLflow parent run tagged with the study id, git sha, versions and "
                    "hardware. `storms study report STUDY_ID` writes the Markdown table and plots and logs them to "
                    "the parent run.")
    p.add_argument("target", help="SPEC.yaml (a study spec), a run CONFIG, or 'report'")
    p.add_argument("study_id", nargs="?", default=None, help="with 'report': the study id")
    p.add_argument("--sweep", action="append", metavar="KEY=V1,V2,...",
                   help="a study axis (config keys, launch.nodes, launch.gpus_per_node, throughput.frames, ...)")
    p.add_argument("--name", default=None)
    p.add_argument("--kind", choices=("throughput", "pipeline"), default=None)
    p.add_argument("--cluster", choices=("slurm", "local", "debug"), default=None,
                   help="debug: in this process; local: subprocesses; slurm: sbatch (default: the spec's, else debug)")
    p.add_argument("--gpu", default=None, help="GPU part for the planner columns (h100, h200, a100, b200)")
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default=None)
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted; submit nothing")
    p.add_argument("--no-report", action="store_true", help="do not write the report after a local/debug study")
    p.add_argument("--out", default=None, help="report folder (default: RUNS_DIR/studies/STUDY_ID)")
    for f in fields(ThroughputConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f"tp_{f.name}", type=type(f.default) if f.name != "codec"
                       else str, default=None, help=f"throughput.{f.name} (default {f.default})")
    return p


def cmd_study(args) -> int:
    from storms_dist.config import ConfigError
    from storms_dist.launchers.prepare import LaunchError

    try:
        if args.target == "report":
            return _report(args)
        if args.study_id is not None:  # the optional positional took the first KEY=VALUE override
            if "=" not in args.study_id:
                raise ValueError(f"unexpected argument {args.study_id!r} (a STUDY_ID goes with 'report' only)")
            args.overrides = [args.study_id, *args.overrides]
        from storms_dist.scale.study import load_study, run_study

        is_spec = args.target.endswith((".yaml", ".yml")) and _looks_like_spec(args.target)
        tp = {k[3:]: v for k, v in vars(args).items() if k.startswith("tp_")}
        spec = load_study(args.target if is_spec else None, config=None if is_spec else args.target,
                          sweeps=args.sweep, name=args.name, kind=args.kind, overrides=args.overrides, **tp)
        for key in ("cluster", "partition", "time", "gpu"):
            if getattr(args, key) is not None:
                spec.launch[key] = getattr(args, key)
        spec.launch.setdefault("cluster", "debug")
        result = run_study(spec, dry_run=args.dry_run)
        if args.dry_run:
            return 0
        print(f"storms study: {result['study_id']} (MLflow parent run {result['parent_run_id']})")
        if spec.launch["cluster"] != "slurm" and not args.no_report:
            from storms_dist.scale.report import write_report

            paths = write_report(result["study_id"], tracking=result["tracking"], runs_dir=result["runs_dir"],
                                 out_dir=args.out)
            print(f"report: {paths['markdown']}")
        else:
            print(f"when the jobs are done: storms study report {result['study_id']}")
        failed = [p for p in result["points"] if p.get("status") not in ("ok", "oom", "submitted", "dry-run")]
        return 1 if failed else 0
    except (ValueError, LaunchError, ConfigError, FileNotFoundError) as e:
        print(f"storms study: error: {e}", file=sys.stderr)
        return 2


def _looks_like_spec(path: str) -> bool:
    """A study spec has a top-level ``sweep``/``kind``/``throughput`` key and no run-config sections."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise FileNotFoundError(f"{path}: {e.strerror}") from None
    return isinstance(data, dict) and bool({"sweep", "kind", "throughput", "config", "launch"} & set(data)) \
        and not ({"model", "data", "stage2"} & set(data))


def _report(args) -> int:
    from storms_dist.config import load_config
    from storms_dist.run_config import RunConfig
    from storms_dist.scale.report import write_report

    if not args.study_id:
        raise ValueError("storms study report: a STUDY_ID is required")
    cfg = load_config(RunConfig, None, args.overrides)
    paths = write_report(args.study_id, tracking=cfg.tracking, runs_dir=cfg.runs_dir, out_dir=args.out)
    print(f"report: {paths['markdown']}")
    return 0
