"""The STORMS pipeline: synthetic data -> Stage 0 -> thought-video targets -> Stage I -> Stage II -> eval, plus the
baselines from the same Stage 0 checkpoint with the same step budget, and the demo report.

Training jobs run in this process (one rank) or under torchrun (``nproc`` ranks); either way through DeepSpeed.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from storms_dist.config import dump, from_dict, to_dict
from storms_dist.run_config import RunConfig
from storms_dist.train.signals import Preempted
from storms_dist.train.trainer import StageConfig, TrainJob


# ---- data ----
def ensure_synth(cfg: RunConfig, *, progress: bool = True) -> Path:
    """Generate the synthetic set into ``data.root`` (a no-op when a complete set with the same config is there)."""
    from storms_dist.data.synth import generate

    generate(cfg.synth, Path(cfg.data.root), progress=progress)
    return Path(cfg.data.root)


# ---- training ----
def job_to_json(job: TrainJob) -> dict:
    return {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(job).items()},
            "stage_cfg": to_dict(job.stage_cfg)}


def job_from_json(data: dict) -> TrainJob:
    return TrainJob(
        name=data["name"], stage=data["stage"], stage_cfg=from_dict(StageConfig, data["stage_cfg"], prefix="stage"),
        out_dir=Path(data["out_dir"]), init_from=data["init_from"],
        targets_dir=None if data["targets_dir"] is None else Path(data["targets_dir"]),
        parent_run_id=data["parent_run_id"], tags=data.get("tags", {}),
    )


def run_training(cfg: RunConfig, job: TrainJob) -> dict:
    """Train one job; returns its summary. Multi-rank jobs run under torchrun in a subprocess."""
    if cfg.nproc == 1 and cfg.launcher == "inprocess":
        from storms_dist.train.trainer import Trainer

        trainer = Trainer(cfg, job)
        try:
            return trainer.train()
        finally:
            trainer.close()
            del trainer
            gc.collect()
    job.out_dir.mkdir(parents=True, exist_ok=True)
    dump(cfg, job.out_dir / "run_config.yaml")
    (job.out_dir / "job.json").write_text(json.dumps(job_to_json(job), indent=2) + "\n")
    from storms_dist.train.distributed import free_port

    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cfg.nproc}",
               f"--master_port={free_port()}", "-m", "storms_dist", "train", str(job.out_dir / "run_config.yaml"),
               "--job", str(job.out_dir / "job.json")]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    (job.out_dir / "preempted.json").unlink(missing_ok=True)
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        marker = job.out_dir / "preempted.json"
        if marker.is_file():  # the ranks saved a checkpoint after a preemption signal: resumable
            raise Preempted(json.loads(marker.read_text())["step"])
        raise subprocess.CalledProcessError(result.returncode, command)
    return json.loads((job.out_dir / "summary.json").read_text())


def method_jobs(cfg: RunConfig, method: str, *, seed_dir: Path, stage0_export: str, targets_dir: Path,
                parent_run_id: str | None) -> list[TrainJob]:
    """The training jobs of one demo method, all starting from the Stage 0 export with the same step budget."""
    budget = cfg.stage1.num_steps + cfg.stage2.num_steps
    tags = {"method": method}

    def job(name, stage, stage_cfg, init_from, targets=None):
        return TrainJob(name=f"{method}/{name}", stage=stage, stage_cfg=stage_cfg,
                        out_dir=seed_dir / method / name, init_from=init_from, targets_dir=targets,
                        parent_run_id=parent_run_id, tags=tags)

    with_steps = lambda stage_cfg, **changes: StageConfig(**{**to_dict(stage_cfg), **changes,  # noqa: E731
                                                              "trainable": stage_cfg.trainable})
    if method == "storms":
        stage1 = job("stage1", 1, cfg.stage1, stage0_export, targets_dir)
        stage2 = job("stage2", 2, cfg.stage2, str(stage1.out_dir / "export"))
        return [stage1, stage2]
    if method == "stage1_only":
        return [job("stage1", 1, with_steps(cfg.stage1, num_steps=budget), stage0_export, targets_dir)]
    if method == "stage2_only":
        return [job("stage2", 2, with_steps(cfg.stage2, num_steps=budget), stage0_export)]
    if method == "sft_k0":
        return [job("sft", 2, with_steps(cfg.stage2, num_steps=budget, num_latents=0, mode="single"), stage0_export)]
    raise ValueError(f"unknown method {method!r}")


def stage0_job(cfg: RunConfig, seed_dir: Path, parent_run_id: str | None) -> TrainJob:
    return TrainJob(name="stage0", stage=0, stage_cfg=cfg.stage0, out_dir=seed_dir / "stage0", init_from=None,
                    parent_run_id=parent_run_id, tags={"method": "stage0"})


def with_seed(cfg: RunConfig, seed: int) -> RunConfig:
    return from_dict(RunConfig, {**to_dict(cfg), "seed": seed})


# ---- eval ----
def run_eval(tracker, export_dir: str, cfg: RunConfig, out_dir: Path, *, name: str, parent_run_id: str | None,
             tags: dict, progress: bool = True) -> dict:
    """Evaluate an export and record it as an MLflow run: accuracy overall / per type, latency, predictions."""
    from storms_dist.eval.evaluate import evaluate

    with tracker.run(name, parent_run_id=parent_run_id, tags={"split": cfg.eval.split, **tags}):
        metrics = evaluate(export_dir, cfg.data, cfg.eval, out_dir, progress=progress)
        tracker.log_params({"export": export_dir, "num_latents": metrics["num_latents"], "split": cfg.eval.split})
        flat = {"accuracy": metrics["overall"]["accuracy"],
                **{f"accuracy.{q}": v["accuracy"] for q, v in metrics["by_type"].items()}}
        if metrics["latency_ms_per_item"] is not None:
            flat["latency_ms_per_item"] = metrics["latency_ms_per_item"]
        tracker.log_metrics(flat, step=0)
        tracker.log_artifact(out_dir / "metrics.json")
        tracker.log_artifact(out_dir / "predictions.jsonl")
    return metrics


# ---- the demo ----
def run_demo(cfg: RunConfig, *, progress: bool = True) -> dict[str, Path]:
    from storms_dist.eval.report import print_table, write_report
    from storms_dist.tracking import Tracker

    started = time.time()
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    dump(cfg, run_dir / "config.yaml")
    tracker = Tracker(cfg.tracking, Path(cfg.runs_dir), is_main_process=True)
    with tracker.run(f"{cfg.name}/pipeline", tags={"pipeline": "demo"}) as parent_id:
        tracker.log_artifact(run_dir / "config.yaml")
        ensure_synth(cfg, progress=progress)
        results: dict[str, list[dict]] = {m: [] for m in cfg.demo.methods}
        latency: dict[str, list[dict]] = {m: [] for m in cfg.demo.methods}
        for seed in cfg.demo.seeds:
            seed_cfg = with_seed(cfg, seed)
            seed_dir = run_dir / f"seed{seed}"
            stage0 = run_training(seed_cfg, stage0_job(seed_cfg, seed_dir, parent_id))
            for method in cfg.demo.methods:
                jobs = method_jobs(seed_cfg, method, seed_dir=seed_dir, stage0_export=stage0["export"],
                                   targets_dir=seed_dir / "targets", parent_run_id=parent_id)
                for job in jobs:
                    summary = run_training(seed_cfg, job)
                metrics = run_eval(tracker, summary["export"], cfg, seed_dir / method / "eval",
                                   name=f"{method}/eval", parent_run_id=parent_id, tags={"method": method},
                                   progress=progress)
                results[method].append(metrics)
                latency[method].append({"latency_ms_per_item": metrics["latency_ms_per_item"],
                                        "num_latents": metrics["num_latents"]})
        context = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
                   "date": time.strftime("%Y-%m-%d"), "backbone": cfg.model.backbone,
                   "num_latents": cfg.model.num_latents, "seeds": list(cfg.demo.seeds),
                   "steps": {"stage0": cfg.stage0.num_steps, "stage1": cfg.stage1.num_steps,
                             "stage2": cfg.stage2.num_steps},
                   "split": cfg.eval.split, "wall_time_min": round((time.time() - started) / 60, 1)}
        paths = write_report(run_dir, results=results, latency=latency, qtypes=_qtypes(results),
                             dynamics_qtypes=list(cfg.demo.dynamics_qtypes), context=context)
        print_table(results=results, latency=latency, qtypes=_qtypes(results),
                    dynamics_qtypes=list(cfg.demo.dynamics_qtypes))
        for path in paths.values():
            tracker.log_artifact(path)
    return paths


def _qtypes(results: dict[str, list[dict]]) -> list[str]:
    seen: list[str] = []
    for runs in results.values():
        for metrics in runs:
            seen += [q for q in metrics["by_type"] if q not in seen]
    return seen
