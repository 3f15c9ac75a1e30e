"""What a launch submits: the options, the checks made before anything is submitted, and the stage plan.

A pipeline is, in order (each stage ``afterok`` on the one before)::

    synth    only when data.root lacks the manifests and the config has a ``synth`` section (1 CPU task)
    stage0   only for a random-init registry backbone without model.init_from (the embedded default)
    targets  thought-video targets, a job array: one task per part of the samples (1 task, <= 1 GPU each)
    stage1   Stage I: alignment + answer CE          (nodes x tasks_per_node ranks, one per GPU)
    stage2   Stage II: answer CE through the rollout (same)
    eval     accuracy and latency of the Stage II export, logged to MLflow (1 task, <= 1 GPU)

A stage whose outputs are complete (``summary.json`` + ``export/``; eval: ``eval/summary.json``) is skipped, so a
second launch of the same run continues where the first stopped, and finished stages are never repeated.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CLUSTERS = ("slurm", "local", "debug")
STAGES = ("synth", "stage0", "targets", "stage1", "stage2", "eval")


class LaunchError(ValueError):
    """Something is wrong before submission (config, data, paths, options). The message is one line."""


# ---- options ----
@dataclass(kw_only=True)
class LaunchOptions:
    cluster: str = "slurm"
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None
    """Ranks per node for training jobs; default: gpus_per_node (one task per GPU), or 1 without GPUs."""
    cpus_per_task: int | None = None
    """Default: 8 with GPUs, 1 without."""
    partition: str | None = None
    time: str = "4:00:00"
    """Slurm time limit of every job (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM[:SS])."""
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    mem: str | None = None
    """Memory per node, Slurm syntax (e.g. 64G); default: the cluster's."""
    targets_shards: int = 8
    """Tasks of the thought-video targets job array."""
    stage0: str = "auto"
    """auto: only for a random-init backbone without model.init_from; yes / no: force."""
    signal_delay_s: int = 120
    """USR2 this long before the time limit: the trainer saves a checkpoint and the job is requeued."""
    max_timeouts: int = 3
    """Requeues after a time limit, per job (preemptions are not counted)."""
    gpu: str | None = None
    """The GPU part the memory check plans for (``storms plan --gpu``): h100, h200, a100, b200; default h100."""
    plan_check: bool = True
    """Run ``storms plan`` on every training stage first and refuse a job that cannot fit."""

    def __post_init__(self):
        if self.cluster not in CLUSTERS:
            raise LaunchError(f"--cluster: {self.cluster!r} is not one of {', '.join(CLUSTERS)}")
        if self.nodes < 1:
            raise LaunchError(f"--nodes: expected >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise LaunchError(f"--gpus-per-node: expected >= 0, got {self.gpus_per_node}")
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            raise LaunchError(f"--tasks-per-node: expected >= 1, got {self.tasks_per_node}")
        if self.gpus_per_node and self.tasks_per_node not in (None, self.gpus_per_node):
            raise LaunchError(f"--tasks-per-node {self.tasks_per_node} with --gpus-per-node {self.gpus_per_node}: "
                              "training runs one task per GPU; leave --tasks-per-node out")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise LaunchError(f"--cpus-per-task: expected >= 1, got {self.cpus_per_task}")
        if self.targets_shards < 1:
            raise LaunchError(f"--targets-shards: expected >= 1, got {self.targets_shards}")
        if self.stage0 not in ("auto", "yes", "no"):
            raise LaunchError(f"--stage0: expected auto, yes or no, got {self.stage0!r}")
        if self.cluster != "slurm" and self.nodes > 1:
            raise LaunchError(f"--nodes {self.nodes}: the {self.cluster} executor runs on this machine only; "
                              "use --cluster slurm")
        if self.gpu is not None and self.gpu not in ("h100", "h200", "a100", "b200"):
            raise LaunchError(f"--gpu: expected one of h100, h200, a100, b200, got {self.gpu!r}")
        parse_time_minutes(self.time)  # validates

    @property
    def ranks_per_node(self) -> int:
        return self.gpus_per_node or self.tasks_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def time_minutes(self) -> int:
        return parse_time_minutes(self.time)

    @property
    def cpus(self) -> int:
        return self.cpus_per_task or (8 if self.gpus_per_node else 1)

    def to_json(self) -> dict:
        return asdict(self)


_TIME_FORMATS = (
    (re.compile(r"^(\d+)$"), lambda m: int(m[1])),
    (re.compile(r"^(\d+):(\d{1,2})$"), lambda m: int(m[1]) + int(m[2]) / 60),
    (re.compile(r"^(\d+):(\d{1,2}):(\d{1,2})$"), lambda m: 60 * int(m[1]) + int(m[2]) + int(m[3]) / 60),
    (re.compile(r"^(\d+)-(\d{1,2})$"), lambda m: 1440 * int(m[1]) + 60 * int(m[2])),
    (re.compile(r"^(\d+)-(\d{1,2}):(\d{1,2})$"), lambda m: 1440 * int(m[1]) + 60 * int(m[2]) + int(m[3])),
    (re.compile(r"^(\d+)-(\d{1,2}):(\d{1,2}):(\d{1,2})$"),
     lambda m: 1440 * int(m[1]) + 60 * int(m[2]) + int(m[3]) + int(m[4]) / 60),
)


def parse_time_minutes(text: str | int) -> int:
    """Slurm's time syntax -> whole minutes (rounded up; at least 1)."""
    text = str(text).strip()
    for pattern, minutes in _TIME_FORMATS:
        match = pattern.match(text)
        if match:
            return max(1, math.ceil(minutes(match)))
    raise LaunchError(f"--time: {text!r} is not a Slurm time (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS)")


# ---- sweeps ----
def expand_sweep(sweeps: list[str] | None) -> list[list[tuple[str, str]]]:
    """``["model.num_latents=4,8", "optim.lr=1e-4,3e-4"]`` -> the grid, one list of (key, value) per point."""
    if not sweeps:
        return [[]]
    axes = []
    for text in sweeps:
        key, sep, values = text.partition("=")
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not items:
            raise LaunchError(f"--sweep {text!r}: expected KEY=V1,V2,..., e.g. model.num_latents=4,8,16")
        if key in (k for k, _ in axes):
            raise LaunchError(f"--sweep: {key} given twice")
        axes.append((key, items))
    keys = [k for k, _ in axes]
    return [list(zip(keys, point)) for point in itertools.product(*(items for _, items in axes))]


def point_suffix(point: list[tuple[str, str]]) -> str:
    """``[("model.num_latents", "4")] -> "num_latents4"``: a folder-safe suffix for the run name."""
    parts = []
    for key, value in point:
        safe = re.sub(r"[^A-Za-z0-9.+-]", "_", value)
        parts.append(f"{key.rsplit('.', 1)[-1]}{safe}")
    return "-".join(parts)


# ---- config loading and checks ----
def load_resolved_config(config_path: str | None, overrides: list[str]):
    """The run config with every path made absolute (jobs may start elsewhere), plus whether it asks for a
    synthetic data set (an explicit ``synth`` section or ``synth.*`` override)."""
    from storms_dist.cli import resolve_config_path
    from storms_dist.config import (
        ConfigError,
        from_dict,
        load_config,
        read_yaml,
        to_dict,
    )
    from storms_dist.run_config import RunConfig

    path = resolve_config_path(config_path)
    try:
        cfg = load_config(RunConfig, path, overrides)
        raw = read_yaml(path) if path is not None else {}
    except ConfigError as e:
        raise LaunchError(str(e)) from None
    wants_synth = "synth" in raw or any(o.split("=", 1)[0].split(".")[0] == "synth" for o in overrides)
    data = to_dict(cfg)
    data["runs_dir"] = str(Path(cfg.runs_dir).expanduser().resolve())
    data["data"]["root"] = str(Path(cfg.data.root).expanduser().resolve())
    init = cfg.model.init_from
    if init and (Path(init).expanduser().exists() or init.startswith((".", "/", "~"))):
        data["model"]["init_from"] = str(Path(init).expanduser().resolve())
    uri = cfg.tracking.tracking_uri
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        data["tracking"]["tracking_uri"] = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return from_dict(RunConfig, data), wants_synth


def _manifest_splits(cfg, with_stage0: bool) -> list[str]:
    splits = [cfg.stage1.split, cfg.stage2.split, cfg.eval.split]
    if with_stage0:
        splits.insert(0, cfg.stage0.split)
    return list(dict.fromkeys(splits))


def needs_stage0(cfg, opts: LaunchOptions) -> bool:
    if opts.stage0 != "auto":
        return opts.stage0 == "yes"
    from storms_dist.model.registry import get_backbone

    return cfg.model.init_from is None and get_backbone(cfg.model.backbone).checkpoint is None


def check_data(cfg, wants_synth: bool, with_stage0: bool) -> bool:
    """Raises LaunchError when the data cannot be there in time; returns whether a synth job must make it."""
    from storms_dist.data.manifest import ManifestError, read_manifest

    root = Path(cfg.data.root)
    missing = [s for s in _manifest_splits(cfg, with_stage0) if not cfg.data.manifest_path(s).is_file()]
    if wants_synth:
        from storms_dist.data.synth import STAMP_NAME, is_complete

        if is_complete(root, cfg.synth):
            return False
        if root.exists() and any(root.iterdir()) and not (root / STAMP_NAME).is_file():
            raise LaunchError(f"data.root {root} is not empty and was not made by storms synth; the config's synth "
                              "section would have to overwrite it: point data.root at an empty or synth folder")
        return True
    if missing:
        if not root.is_dir():
            raise LaunchError(f"data.root {root} does not exist (generate a synthetic set with `storms synth CONFIG`, "
                              "or point data.root at your data)")
        names = ", ".join(str(cfg.data.manifest_path(s).name) for s in missing)
        raise LaunchError(f"data.root {root} has no {names} (the {', '.join(missing)} manifest"
                          f"{'s' if len(missing) > 1 else ''})")
    if cfg.stage1.align:
        path = cfg.data.manifest_path(cfg.stage1.split)
        try:
            samples = read_manifest(path, on_error="skip")
        except (OSError, ManifestError) as e:
            raise LaunchError(f"{path}: {e}") from None
        if not any(s.thought_video is not None for s in samples):
            raise LaunchError(f"{path}: no sample has a thought_video, but Stage I aligns with thought-video targets "
                              "(stage1.align=true)")
    return False


def check_paths(cfg) -> None:
    from storms_dist.model.registry import get_backbone

    init = cfg.model.init_from
    if init is not None and not Path(init).is_dir():
        raise LaunchError(f"model.init_from {init} does not exist (an exported STORMS/HF folder is expected)")
    checkpoint = get_backbone(cfg.model.backbone).checkpoint
    if checkpoint and checkpoint.startswith((".", "/", "~")) and not Path(checkpoint).expanduser().exists():
        raise LaunchError(f"model.backbone {cfg.model.backbone}: checkpoint {checkpoint} does not exist")


def check_cluster(opts: LaunchOptions, *, dry_run: bool) -> None:
    if opts.cluster != "slurm" or dry_run:
        return
    if shutil.which("sbatch") is None:
        raise LaunchError("sbatch not found: this is not a Slurm login node (use --cluster local, or --dry-run to "
                          "see the sbatch scripts)")
    if opts.partition:
        out = subprocess.run(["sinfo", "-h", "-p", opts.partition, "-o", "%P"], capture_output=True, text=True,
                             check=False)
        if out.returncode != 0 or not out.stdout.strip():
            raise LaunchError(f"--partition {opts.partition}: no such partition (see `sinfo -s`)")


def _mem_gib(text: str | None) -> float | None:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)B?", (text or "").strip().upper())
    if not match:
        return None
    return float(match[1]) * {"": 1 / 1024, "K": 2**-20, "M": 1 / 1024, "G": 1, "T": 1024}[match[2]]


def check_fits(cfg, opts: LaunchOptions, *, with_stage0: bool) -> None:
    """``storms plan`` for every training stage of the pipeline on the job's resources: a stage whose planned
    peak exceeds the device's usable memory is refused here, in one line, instead of dying of OOM in the queue."""
    if not opts.plan_check:
        return
    from storms_dist.scale.plan import GiB, make_plan, plan_config_for_run

    memory = None
    if not opts.gpus_per_node:  # CPU ranks share the node's memory: --mem, else this machine's
        per_node = _mem_gib(opts.mem)
        memory = per_node / opts.ranks_per_node if per_node else None
    for stage in ((0,) if with_stage0 else ()) + (1, 2):
        try:
            plan = make_plan(plan_config_for_run(cfg, nodes=opts.nodes, gpus_per_node=opts.gpus_per_node,
                                                 gpu=opts.gpu, stage=stage, memory_gib=memory,
                                                 ranks_per_node=opts.ranks_per_node))
        except ValueError as e:
            raise LaunchError(f"storms plan: {e}") from None
        if not plan.fits:
            c = plan.cfg
            raise LaunchError(
                f"stage{stage} cannot fit: storms plan puts its peak at {plan.memory['peak'] / GiB:.1f} GiB per "
                f"{'GPU' if opts.gpus_per_node else 'rank'} ({c.gpu}, {c.nodes}x{c.gpus_per_node}, ZeRO-{c.zero}, "
                f"micro-batch {c.micro_batch}) but {plan.usable_bytes / GiB:.1f} GiB are usable; largest micro-batch "
                f"that fits: {plan.max_micro_batch} (more nodes, deepspeed.offload_optimizer, "
                f"model.activation_checkpointing or a smaller stage{stage}.micro_batch_size; `storms plan --backbone "
                f"{c.backbone}` shows the breakdown, --no-plan-check submits anyway)")


# ---- the stage plan ----
@dataclass
class StagePlan:
    name: str
    kind: str  # synth | train | targets | eval
    spec: dict[str, Any]
    depends_on: list[str] = field(default_factory=list)
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    array: int | None = None
    done: bool = False
    out_dir: str = ""


def build_plan(cfg, opts: LaunchOptions, *, with_synth: bool, parent_run_id: str | None,
               tags: dict[str, str] | None = None) -> list[StagePlan]:
    from storms_dist.config import to_dict
    from storms_dist.pipeline import job_to_json
    from storms_dist.train.trainer import TrainJob

    from .stages import eval_done, training_done

    run_dir = cfg.run_dir.resolve()
    cfg_dict = to_dict(cfg)
    tags = {"pipeline": cfg.name, **(tags or {})}
    base = {"run_dir": str(run_dir), "config": cfg_dict, "parent_run_id": parent_run_id, "tags": tags}
    single = {"nodes": 1, "tasks_per_node": 1, "gpus_per_node": min(opts.gpus_per_node, 1),
              "cpus_per_task": opts.cpus}
    train_res = {"nodes": opts.nodes, "tasks_per_node": opts.ranks_per_node, "gpus_per_node": opts.gpus_per_node,
                 "cpus_per_task": opts.cpus}
    plan: list[StagePlan] = []

    def add(stage: StagePlan) -> StagePlan:
        stage.depends_on = [plan[-1].name] if plan else []
        plan.append(stage)
        return stage

    if with_synth:
        add(StagePlan("synth", "synth", {**base, "kind": "synth", "stage": "synth"}, nodes=1, tasks_per_node=1,
                      gpus_per_node=0, cpus_per_task=max(opts.cpus, cfg.synth.workers), out_dir=cfg.data.root))

    def train_job(name: str, stage: int, init_from: str | None, targets: Path | None = None) -> TrainJob:
        return TrainJob(name=f"{cfg.name}/{name}", stage=stage, stage_cfg=cfg.stage(stage), out_dir=run_dir / name,
                        init_from=init_from, targets_dir=targets, parent_run_id=parent_run_id,
                        tags={"method": "storms", **tags})

    init_from = cfg.model.init_from
    if needs_stage0(cfg, opts):
        job = train_job("stage0", 0, init_from)
        add(StagePlan("stage0", "train", {**base, "kind": "train", "stage": "stage0", "job": job_to_json(job)},
                      **train_res, done=training_done(job.out_dir), out_dir=str(job.out_dir)))
        init_from = str(job.out_dir / "export")

    stage1 = train_job("stage1", 1, init_from, run_dir / "targets")
    stage1_spec = {**base, "kind": "train", "stage": "stage1", "job": job_to_json(stage1)}
    if cfg.stage1.align:
        count = opts.targets_shards
        targets = {"init_from": init_from, "split": cfg.stage1.split, "parts_dir": str(run_dir / "targets.parts"),
                   "out_dir": str(run_dir / "targets"),
                   "num_latents": cfg.model.num_latents if cfg.stage1.num_latents is None else cfg.stage1.num_latents}
        add(StagePlan("targets", "targets", {**base, "kind": "targets", "stage": "targets", "targets": targets},
                      **single, array=count, done=training_done(stage1.out_dir), out_dir=targets["out_dir"]))
        stage1_spec["merge_targets"] = {"parts_dir": targets["parts_dir"], "out_dir": targets["out_dir"],
                                        "count": count}
    add(StagePlan("stage1", "train", stage1_spec, **train_res, done=training_done(stage1.out_dir),
                  out_dir=str(stage1.out_dir)))
    stage2 = train_job("stage2", 2, str(stage1.out_dir / "export"))
    add(StagePlan("stage2", "train", {**base, "kind": "train", "stage": "stage2", "job": job_to_json(stage2)},
                  **train_res, done=training_done(stage2.out_dir), out_dir=str(stage2.out_dir)))
    eval_dir = run_dir / "eval"
    add(StagePlan("eval", "eval", {**base, "kind": "eval", "stage": "eval",
                                   "eval": {"export": str(stage2.out_dir / "export"), "out_dir": str(eval_dir)}},
                  **single, done=eval_done(eval_dir), out_dir=str(eval_dir)))
    return plan


def config_fingerprint(cfg_dict: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(cfg_dict, sort_keys=True).encode()).hexdigest()[:16]
