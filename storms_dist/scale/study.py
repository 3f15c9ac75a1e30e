"""``storms study``: named points over backbone x nodes x GPUs x K x frames (any config key), each submitted
through the launcher (debug = in-process, local, slurm) and logged as a child of one MLflow parent run.

Two kinds of point:

- ``throughput``: the real Trainer (DeepSpeed engine, data path, rollout) on fixed-shape synthetic video written
  for the point; ``warmup`` steps are dropped, ``steps`` are measured. Logged: tokens/s per device, frames/s,
  TFLOP/s per device, MFU (GPUs with a known peak), peak memory (CUDA: max allocated; CPU: the process's peak RSS
  above its RSS before the model was built), the data-loading share, and the planner's prediction for the same
  job with its error. An out-of-memory error is the point's ``status`` (oom), not a crash of the study.
- ``pipeline``: the whole STORMS pipeline (``storms launch``), its parent run made a child of the study's.

Every run carries ``tags.study_id``; ``storms study report STUDY_ID`` reads them back (``report.py``).
"""

from __future__ import annotations

import ctypes
import datetime as dt
import gc
import itertools
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

POINT_KEYS_LAUNCH = ("nodes", "gpus_per_node", "tasks_per_node", "gpu")


@dataclass(kw_only=True)
class ThroughputConfig:
    steps: int = 5
    """Measured optimizer steps (after the warm-up)."""
    warmup: int = 1
    """Steps run and dropped first (allocator, gloo/NCCL buffers, DeepSpeed's first-step work)."""
    frames: int = 8
    height: int = 112
    width: int = 112
    num_videos: int = 4
    """Distinct synthetic clips (noise, fixed shape); decoded every step (data.cache_decoded off)."""
    codec: Literal["h264", "vp9", "mjpeg"] = "h264"

    def __post_init__(self):
        for key in ("steps", "frames", "height", "width", "num_videos"):
            if getattr(self, key) < 1:
                raise ValueError(f"throughput.{key}: expected >= 1, got {getattr(self, key)}")
        if self.warmup < 0:
            raise ValueError(f"throughput.warmup: expected >= 0, got {self.warmup}")
        if self.frames % 2:
            raise ValueError(f"throughput.frames: expected an even count (temporal patch 2), got {self.frames}")


@dataclass(kw_only=True)
class StudySpec:
    name: str
    config: str | None = None
    """Base run config (default: the embedded demo config)."""
    kind: Literal["throughput", "pipeline"] = "throughput"
    overrides: list[str] = field(default_factory=list)
    sweep: dict[str, list] = field(default_factory=dict)
    """KEY -> values; the grid of all combinations. Keys: config keys, ``launch.{nodes,gpus_per_node,
    tasks_per_node,gpu}``, ``throughput.*``."""
    throughput: ThroughputConfig = field(default_factory=ThroughputConfig)
    launch: dict[str, Any] = field(default_factory=dict)
    """LaunchOptions fields shared by every point (cluster, partition, time, ...) plus ``gpu`` (the planner's part)."""

    def __post_init__(self):
        if not self.name or "/" in self.name or "'" in self.name:
            raise ValueError(f"name: expected a non-empty name without '/' or quotes, got {self.name!r}")
        for key, values in self.sweep.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"sweep.{key}: expected a non-empty list of values, got {values!r}")
            if key.startswith("throughput.") and key.split(".", 1)[1] not in {f.name for f in fields(ThroughputConfig)}:
                raise ValueError(f"sweep.{key}: unknown throughput key; valid: "
                                 f"{', '.join(f.name for f in fields(ThroughputConfig))}")
            if key.startswith("launch.") and key.split(".", 1)[1] not in POINT_KEYS_LAUNCH:
                raise ValueError(f"sweep.{key}: expected one of launch.{', launch.'.join(POINT_KEYS_LAUNCH)}")

    def points(self) -> list[dict[str, Any]]:
        keys = list(self.sweep)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(self.sweep[k] for k in keys))]


def point_name(point: dict[str, Any]) -> str:
    import re

    parts = [("" if k == "model.backbone" else k.rsplit(".", 1)[-1]) + re.sub(r"[^A-Za-z0-9.+-]", "_", str(v))
             for k, v in point.items()]
    return "-".join(parts) or "base"


def load_study(path: str | None, *, config: str | None = None, sweeps: list[str] | None = None, name: str | None = None,
               kind: str | None = None, overrides: list[str] | None = None, **throughput: Any) -> StudySpec:
    """A StudySpec from SPEC.yaml, or from CONFIG + ``--sweep KEY=V1,V2`` flags."""
    import yaml

    from storms_dist.config import parse_override

    data: dict[str, Any] = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(data) - {f.name for f in fields(StudySpec)}
        if unknown:
            raise ValueError(f"{path}: unknown key {min(unknown)!r}; valid keys: "
                             f"{', '.join(f.name for f in fields(StudySpec))}")
    if config is not None:
        data["config"] = config
    for text in sweeps or []:
        key, sep, values = text.partition("=")
        if not sep or not key or not values.strip(","):
            raise ValueError(f"--sweep {text!r}: expected KEY=V1,V2,..., e.g. model.backbone=qwen2_5_vl-micro,"
                             "qwen2_5_vl-tiny")
        data.setdefault("sweep", {})[key] = [parse_override(f"{key}={v.strip()}")[1] for v in values.split(",")
                                             if v.strip()]
    data["name"] = name or data.get("name") or Path(data.get("config") or "study").stem
    if kind is not None:
        data["kind"] = kind
    data["overrides"] = [*data.get("overrides", []), *(overrides or [])]
    tp = {**data.get("throughput", {}), **{k: v for k, v in throughput.items() if v is not None}}
    unknown = set(tp) - {f.name for f in fields(ThroughputConfig)}
    if unknown:
        raise ValueError(f"throughput: unknown key {min(unknown)!r}; valid keys: "
                         f"{', '.join(f.name for f in fields(ThroughputConfig))}")
    data["throughput"] = ThroughputConfig(**tp)
    return StudySpec(**data)


# ---- provenance ----
def provenance() -> dict[str, str]:
    import deepspeed
    import torch
    import transformers

    root = Path(__file__).resolve().parents[2]
    sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                         text=True, check=False).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False).stdout.strip()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return {"git_sha": sha + ("+dirty" if dirty else ""), "version.torch": torch.__version__,
            "version.deepspeed": deepspeed.__version__, "version.transformers": transformers.__version__,
            "version.python": platform.python_version(), "hardware.cpu": cpu,
            "hardware.cpu_count": str(os.cpu_count()), "hardware.gpu": gpu, "hardware.host": platform.node()}


# ---- memory measurement (CPU): peak RSS above the RSS before the model is built ----
def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field_name)).split()[1])


class PeakMemory:
    """CUDA: ``max_memory_allocated`` since ``start``. CPU: VmHWM - VmRSS at ``start``, after resetting the
    high-water mark (``/proc/self/clear_refs``) and pinning glibc's mmap threshold so freed tensors leave RSS."""

    def start(self) -> None:
        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, so large frees go back to the OS
            libc.malloc_trim(0)
        except OSError:
            pass
        self.base = _status_kib("VmRSS") * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS

    def peak_bytes(self) -> float:
        import torch

        if torch.cuda.is_available():
            return float(torch.cuda.max_memory_allocated() - self.base)
        return float(_status_kib("VmHWM") * 1024 - self.base)


# ---- one throughput point (runs inside a launcher job) ----
def write_synthetic_videos(root: Path, tp: ThroughputConfig, seed: int = 0) -> None:
    import numpy as np

    from storms_dist.data.manifest import Sample, write_manifest
    from storms_dist.data.video_io import write_video

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(tp.num_videos):
        path = root / "videos" / f"{i:04d}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file():
            frames = rng.integers(0, 256, size=(tp.frames, tp.height, tp.width, 3), dtype=np.uint8)
            write_video(path, frames, fps=8.0, codec=tp.codec)
        samples.append(Sample(uid=f"tput-{i:04d}", video=str(path.relative_to(root)), question="Which way does it move?",
                              options=("left", "right", "up", "down"), answer="ABCD"[i % 4], qtype="throughput",
                              thought_video=None, split="train", root=root))
    write_manifest(root / "train.jsonl", samples)


def point_config(config: dict, tp: ThroughputConfig, out_dir: Path):
    """The run config a throughput point trains: Stage II (the rollout) on the point's synthetic clips."""
    import copy

    from storms_dist.config import from_dict
    from storms_dist.run_config import RunConfig

    data = copy.deepcopy(config)
    data["data"].update(root=str(out_dir / "data"), train_manifest="train.jsonl", cache_decoded=False)
    data["data"]["frames"] = {**data["data"].get("frames", {}), "fps": None, "num_frames": tp.frames,
                              "min_frames": min(tp.frames, 4), "max_frames": tp.frames}
    data["stage2"] = {**data["stage2"], "num_steps": tp.warmup + tp.steps, "split": "train"}
    data["checkpoint"] = {**data.get("checkpoint", {}), "resume": False}
    return from_dict(RunConfig, data)


def run_throughput_point(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from storms_dist.config import flatten
    from storms_dist.launchers.stages import export_distributed_env
    from storms_dist.scale.plan import make_plan, plan_config_for_run
    from storms_dist.tracking import Tracker
    from storms_dist.train.trainer import Trainer, TrainJob

    export_distributed_env()
    tp = ThroughputConfig(**spec["throughput"])
    out_dir = Path(spec["out_dir"])
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    cfg = point_config(spec["config"], tp, out_dir)
    if rank == 0:
        write_synthetic_videos(Path(cfg.data.root), tp, seed=cfg.seed)
    else:  # the other ranks wait for the clips (no process group yet)
        import time

        while not (Path(cfg.data.root) / "train.jsonl").is_file():
            time.sleep(0.2)
    res = spec["resources"]
    plan = make_plan(plan_config_for_run(cfg, nodes=res["nodes"], gpus_per_node=res["gpus_per_node"], gpu=res["gpu"],
                                         height=tp.height, width=tp.width, ranks_per_node=res["ranks_per_node"]))
    tracker = Tracker(cfg.tracking, Path(cfg.runs_dir), is_main_process=rank == 0)
    tags = {"study_id": spec["study_id"], "study_point": spec["point_name"], "study_kind": "throughput",
            **{f"point.{k}": str(v) for k, v in spec["point"].items()}}
    run_id = tracker.start_run(f"{spec['study_id']}/{spec['point_name']}", parent_run_id=spec.get("parent_run_id"),
                               tags=tags)
    tracker.log_params({**flatten(cfg), **{f"throughput.{k}": v for k, v in asdict(tp).items()},
                        "resources.world_size": world, "resources.gpu": res["gpu"]})
    # host-side one-offs (process group + shm op, tokenizer, model classes) happen before the measurement starts:
    # the planner predicts device memory, which they are not part of
    import deepspeed.runtime.engine  # modules the engine imports lazily: tens of MB, once
    import deepspeed.runtime.zero.stage3  # noqa: F401
    import torch._dynamo  # ~140 MB of modules DeepSpeed pulls in on first use

    from storms_dist.model.build import _hf_classes, build_tokenizer
    from storms_dist.train.distributed import init_distributed

    init_distributed(timeout_s=cfg.robustness.dist_timeout_s)
    build_tokenizer(None)
    _hf_classes(plan.shape.family)
    _warm_decoder(cfg)
    _warm_autograd()
    memory = PeakMemory()
    memory.start()
    history: list[dict] = []
    status, error, trainer = "ok", "", None
    try:
        trainer = Trainer(cfg, TrainJob(name=f"{spec['study_id']}/{spec['point_name']}", stage=2,
                                        stage_cfg=cfg.stage2, out_dir=out_dir / "job"))
        batches = iter(trainer.sampler)
        for step in range(tp.warmup + tp.steps):
            metrics = trainer.train_step(batches)
            history.append(metrics)
            tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, float)}, step=step + 1)
    except (torch.OutOfMemoryError, MemoryError) as e:
        status, error = "oom", str(e).splitlines()[0][:300] if str(e) else type(e).__name__
    except RuntimeError as e:
        # CUDA: "CUDA out of memory"; CPU allocator: "DefaultCPUAllocator: can't allocate memory"
        if "out of memory" not in str(e).lower() and "can't allocate memory" not in str(e):
            tracker.set_tags({"status": "failed"})
            tracker.end_run("FAILED")
            raise
        status, error = "oom", str(e).splitlines()[0][:300]
    finally:
        if trainer is not None:
            trainer.close()
    peak = memory.peak_bytes()
    result = summarize(history[tp.warmup:], tp=tp, world=world, status=status)
    result.update(peak_mem_gib=peak / 2**30, plan_peak_gib=plan.memory["peak"] / 2**30,
                  plan_fits=float(plan.fits), plan_time_lower_bound_s=plan.time_s["lower_bound"],
                  num_params_b=plan.shape.total / 1e9)
    result["plan_error"] = (result["plan_peak_gib"] - result["peak_mem_gib"]) / result["peak_mem_gib"] \
        if status == "ok" and peak > 0 else float("nan")
    # "study." keys: the per-step metrics above use the trainer's names (step_s, tflops_per_device, ...)
    tracker.log_metrics({f"study.{k}": float(v) for k, v in result.items() if isinstance(v, (int, float))}, step=0)
    tracker.set_tags({"status": status, **({"error": error} if error else {})})
    tracker.end_run("FINISHED")
    result.update(status=status, error=error, run_id=run_id, point=spec["point_name"])
    print(f"[storms study] {spec['point_name']}: {status} " + ", ".join(
        f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float)), flush=True)
    return result


def _warm_decoder(cfg) -> None:
    """Decode one clip: the codec libraries' first-use allocations are host memory, outside the plan."""
    from storms_dist.data.dataset import load_video_inputs
    from storms_dist.data.manifest import read_manifest
    from storms_dist.data.preprocess import VisionSpec
    from storms_dist.model.registry import get_backbone
    from storms_dist.scale.shapes import _hf_config

    sample = read_manifest(cfg.data.manifest_path("train"))[0]
    spec = VisionSpec.from_hf_config(_hf_config(get_backbone(cfg.model.backbone))[0])
    load_video_inputs(sample.root / sample.video, spec, cfg.data)


def _warm_autograd() -> None:
    """One tiny backward + AdamW step + SDPA call: autograd's worker threads and the kernels' first-use buffers."""
    import torch

    layer = torch.nn.Linear(16, 16)
    optimizer = torch.optim.AdamW(layer.parameters())
    x = layer(torch.randn(2, 4, 16)).view(2, 1, 4, 16)
    torch.nn.functional.scaled_dot_product_attention(x, x, x).sum().backward()
    optimizer.step()


def summarize(history: list[dict], *, tp: ThroughputConfig, world: int, status: str) -> dict[str, float]:
    if status != "ok" or not history:
        return {}
    step_s = sum(m["step_s"] for m in history)
    samples = sum(m["samples_per_s"] * m["step_s"] for m in history)  # samples over all ranks
    tokens = sum(m["tokens_per_s"] * m["step_s"] for m in history)
    out = {"step_s": step_s / len(history), "tokens_per_s_per_device": tokens / step_s / world,
           "frames_per_s": samples * tp.frames / step_s,
           "tflops_per_device": sum(m["tflops_per_device"] * m["step_s"] for m in history) / step_s,
           "data_share": sum(m["data_s"] for m in history) / step_s}
    if all("mfu" in m for m in history):
        out["mfu"] = sum(m["mfu"] * m["step_s"] for m in history) / step_s
    return out


# ---- the study: submit every point ----
def study_id_for(name: str) -> str:
    return f"{name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run_study(spec: StudySpec, *, dry_run: bool = False, out=None) -> dict[str, Any]:
    """Validate every point, open the parent run, submit the points (slurm: at once; local/debug: in turn)."""
    from storms_dist.launchers.prepare import (
        LaunchOptions,
        StagePlan,
        load_resolved_config,
    )

    out = out or sys.stdout
    base_launch = {k: v for k, v in spec.launch.items() if k != "gpu"}
    study_id = study_id_for(spec.name)
    prepared = []
    for point in spec.points() or [{}]:
        name = point_name(point)
        cfg_over = [f"{k}={v}" for k, v in point.items() if not k.startswith(("launch.", "throughput."))]
        launch = {**base_launch, **{k[7:]: v for k, v in point.items() if k.startswith("launch.") and k != "launch.gpu"}}
        gpu = point.get("launch.gpu", spec.launch.get("gpu"))
        opts = LaunchOptions(**launch)
        tp = ThroughputConfig(**{**asdict(spec.throughput),
                                 **{k[11:]: v for k, v in point.items() if k.startswith("throughput.")}})
        cfg, _ = load_resolved_config(spec.config, [*spec.overrides, *cfg_over, f"name={spec.name}-{name}"])
        prepared.append((point, name, opts, tp, cfg, gpu, cfg_over))
    cluster = prepared[0][2].cluster
    print(f"storms study: {study_id}: {len(prepared)} {spec.kind} point(s) on {cluster}"
          f"{' (dry run: nothing submitted)' if dry_run else ''}", file=out)
    parent = None if dry_run else _start_parent(spec, study_id, prepared[0][4])
    results = []
    for i, (point, name, opts, tp, cfg, gpu, cfg_over) in enumerate(prepared, 1):
        run_dir = cfg.run_dir.resolve()
        if spec.kind == "pipeline":
            results.append(_submit_pipeline(spec, cfg_over, name, opts, study_id, parent, dry_run, out))
            continue
        from storms_dist.config import to_dict

        res = {"nodes": opts.nodes, "gpus_per_node": opts.gpus_per_node, "gpu": gpu, "ranks_per_node": opts.ranks_per_node}
        job_spec = {"kind": "throughput", "stage": name, "run_dir": str(run_dir), "out_dir": str(run_dir),
                    "config": to_dict(cfg), "throughput": asdict(tp), "study_id": study_id, "point": point,
                    "point_name": name, "parent_run_id": parent, "resources": res}
        stage = StagePlan(name, "throughput", job_spec, nodes=opts.nodes, tasks_per_node=opts.ranks_per_node,
                          gpus_per_node=opts.gpus_per_node, cpus_per_task=opts.cpus, out_dir=str(run_dir))
        print(f"[{i}/{len(prepared)}] {name}: {opts.world_size} rank(s), {tp.warmup}+{tp.steps} steps, "
              f"{tp.frames} frames {tp.height}x{tp.width}; {_plan_line(cfg, res, tp)}", file=out, flush=True)
        results.append(_submit_throughput(stage, opts, run_dir, name, dry_run, out))
    if parent is not None and cluster != "slurm":
        _end_parent(spec, prepared[0][4], parent)
    return {"study_id": study_id, "parent_run_id": parent, "points": results,
            "tracking": prepared[0][4].tracking, "runs_dir": prepared[0][4].runs_dir}


def _plan_line(cfg, res: dict, tp: ThroughputConfig) -> str:
    from storms_dist.scale.plan import GiB, make_plan, plan_config_for_run

    plan = make_plan(plan_config_for_run(cfg, nodes=res["nodes"], gpus_per_node=res["gpus_per_node"], gpu=res["gpu"],
                                         height=tp.height, width=tp.width, ranks_per_node=res["ranks_per_node"]))
    return (f"plan: peak {plan.memory['peak'] / GiB:.2f} GiB per {plan.cfg.gpu} rank, "
            f"{'fits' if plan.fits else 'DOES NOT FIT (kept: the point reports oom)'}, step >= "
            f"{plan.time_s['lower_bound']:.3g} s")


def _start_parent(spec: StudySpec, study_id: str, cfg) -> str | None:
    import json

    from storms_dist.tracking import Tracker

    tracker = Tracker(cfg.tracking, Path(cfg.runs_dir), is_main_process=True)
    run_id = tracker.start_run(f"study/{study_id}", tags={"study_id": study_id, "study_role": "parent",
                                                          "study_kind": spec.kind, **provenance()})
    spec_dict = {**asdict(spec), "throughput": asdict(spec.throughput)}
    tracker.log_params({"study.name": spec.name, "study.config": spec.config, "study.kind": spec.kind,
                        "study.sweep": json.dumps(spec.sweep), "study.overrides": " ".join(spec.overrides)})
    tracker.log_text(json.dumps(spec_dict, indent=2, default=str), "study_spec.json")
    tracker.flush()
    return run_id


def _end_parent(spec: StudySpec, cfg, parent: str) -> None:
    from storms_dist.tracking import Tracker

    tracker = Tracker(cfg.tracking, Path(cfg.runs_dir), is_main_process=True)
    tracker.start_run(f"study/{spec.name}", run_id=parent)
    tracker.end_run("FINISHED")


def _submit_throughput(stage, opts, run_dir: Path, name: str, dry_run: bool, out) -> dict[str, Any]:
    from storms_dist.launchers.stages import StageJob
    from storms_dist.launchers.submit import make_executor, sbatch_scripts, stage_folder

    if dry_run:
        for stage_name, text in sbatch_scripts([stage], opts, run_dir, name):
            print(f"\n# ----- {stage_name}: sbatch {run_dir / 'slurm' / stage_name / '%j_submission.sh'}\n{text}",
                  file=out)
        return {"point": name, "status": "dry-run"}
    executor = make_executor(opts.cluster, stage_folder(run_dir, stage), stage, opts, name)
    job = executor.submit(StageJob(stage.spec))
    if opts.cluster == "slurm":
        print(f"  submitted job {job.job_id}", file=out)
        return {"point": name, "status": "submitted", "job_id": job.job_id}
    results = job.results()
    return results[0]


def _submit_pipeline(spec: StudySpec, cfg_over: list[str], name: str, opts, study_id: str, parent: str | None,
                     dry_run: bool, out) -> dict[str, Any]:
    from storms_dist.launchers.cli import launch

    tags = {"study_id": study_id, "study_point": name, "study_kind": "pipeline"}
    if parent:
        tags["mlflow.parentRunId"] = parent  # the pipeline's parent run nests under the study's
    from storms_dist.launchers.cli import PipelineFailed

    try:
        run_dirs = launch(spec.config, [*spec.overrides, *cfg_over, f"name={spec.name}-{name}"], opts,
                          dry_run=dry_run, out=out, extra_tags=tags)
    except PipelineFailed as e:  # a failed point is a result of the study, not the end of it
        return {"point": name, "status": "failed", "run_dir": str(e.run_dirs[-1])}
    done = "dry-run" if dry_run else ("submitted" if opts.cluster == "slurm" else "ok")
    return {"point": name, "status": done, "run_dir": str(run_dirs[0])}
