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

from storms_dist.config import dump, from_dict, replace, to_dict
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
        reuse_targets=data.get("reuse_targets", False),
    )


def run_training(cfg: RunConfig, job: TrainJob, *, threads: int | None = None) -> dict:
    """Train one job; returns its summary. Multi-rank jobs run under torchrun in a subprocess, at ``threads`` torch
    threads per rank (default: OMP_NUM_THREADS, else 1)."""
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
    env = {**os.environ, "OMP_NUM_THREADS": str(threads) if threads else os.environ.get("OMP_NUM_THREADS", "1")}
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
    """The training jobs of one demo method, in order, all starting from the Stage 0 export with the same step budget.

    A one-stage method trains the whole budget at Stage I's peak lr; ``stage2.lr`` is the lr of STORMS's Stage II
    *continuation* only (a gentle Stage II keeps what Stage I aligned: docs/results.md, session 16), so a low
    value there does not handicap the baselines. ``stage2.align`` (an alignment anchor in STORMS's Stage II, on
    Stage I's cache) never reaches Stage II only or K=0: those baselines see no thought video.

    With ``demo.share_stage1`` Stage I only is STORMS's own Stage I job (the same folder: trained once) followed by
    ``stage2.num_steps`` more Stage I steps on Stage II's lr schedule, aligned to the same cache: the two methods
    differ only in the objective of their last ``stage2.num_steps`` steps, a paired comparison."""
    budget = cfg.stage1.num_steps + cfg.stage2.num_steps

    def job(owner, name, stage, stage_cfg, init_from, targets=None, *, reuse_targets=False):
        # owner: the method whose folder (and MLflow tag) the job belongs to; STORMS owns the shared Stage I
        return TrainJob(name=f"{owner}/{name}", stage=stage, stage_cfg=stage_cfg, out_dir=seed_dir / owner / name,
                        init_from=init_from, targets_dir=targets, parent_run_id=parent_run_id,
                        tags={"method": owner}, reuse_targets=reuse_targets)

    with_steps = lambda stage_cfg, **changes: StageConfig(**{**to_dict(stage_cfg), **changes,  # noqa: E731
                                                              "trainable": stage_cfg.trainable})
    storms_stage1 = job("storms", "stage1", 1, cfg.stage1, stage0_export, targets_dir)
    if method == "storms":
        stage2 = job(method, "stage2", 2, cfg.stage2, str(storms_stage1.out_dir / "export"),
                     targets_dir if cfg.stage2.align else None)
        return [storms_stage1, stage2]
    if method == "stage1_only" and cfg.demo.share_stage1:
        continued = with_steps(cfg.stage1, num_steps=cfg.stage2.num_steps, lr=cfg.stage2.lr)
        return [storms_stage1, job(method, "stage1_continued", 1, continued, str(storms_stage1.out_dir / "export"),
                                   targets_dir, reuse_targets=True)]
    if method == "stage1_only":
        return [job(method, "stage1", 1, with_steps(cfg.stage1, num_steps=budget), stage0_export, targets_dir)]
    if method == "stage2_only":
        return [job(method, "stage2", 2, with_steps(cfg.stage2, num_steps=budget, lr=cfg.stage1.lr, align=False),
                    stage0_export)]
    if method == "sft_k0":
        return [job(method, "sft", 2, with_steps(cfg.stage2, num_steps=budget, lr=cfg.stage1.lr, num_latents=0,
                                                 align=False, mode="single"), stage0_export)]
    raise ValueError(f"unknown method {method!r}")


STEP_COST = {"single": 0.75, "rollout": 1.0, "joint": 1.25}
"""Relative CPU cost of one optimizer step per forward mode (qwen2_5_vl-tiny, one thread, K=8: 0.15 / 0.20 /
0.25 s, measured 2026-12-05): orders the demo's jobs, nothing else."""


def job_order(chains: dict[str, list[TrainJob]]) -> tuple[dict[Path, TrainJob], dict[Path, Path | None],
                                                          dict[Path, float]]:
    """The distinct jobs of the methods' chains (a job several chains share, i.e. the same ``out_dir``, once), the job
    each one waits for (its predecessor in its chain), and each job's priority: its own estimated cost plus the
    longest remaining chain after it (the critical path), so the longest dependent work starts first."""
    jobs: dict[Path, TrainJob] = {}
    after: dict[Path, Path | None] = {}
    for chain in chains.values():
        for previous, job in zip([None, *chain], chain):
            waits_for = None if previous is None else previous.out_dir
            if after.setdefault(job.out_dir, waits_for) != waits_for:
                raise ValueError(f"{job.out_dir}: shared by two chains that train it from different starts")
            jobs.setdefault(job.out_dir, job)

    def path_cost(key: Path) -> float:
        job = jobs[key]
        own = job.stage_cfg.num_steps * STEP_COST.get(job.stage_cfg.mode, 1.0)
        return own + max((path_cost(k) for k, w in after.items() if w == key), default=0.0)

    return jobs, after, {key: path_cost(key) for key in jobs}


def train_methods(cfg: RunConfig, chains: dict[str, list[TrainJob]], *, parallel: int,
                  job_cfgs: dict[str, RunConfig] | None = None) -> dict[str, dict]:
    """Train each chain of jobs (a demo method, or an ablation setting with its own config in ``job_cfgs``), each job
    after its predecessor; a job that several chains share trains once. Returns each chain's last summary.

    With ``parallel`` > 1 up to that many jobs run at once, each a one-rank torchrun process at one thread; of the
    jobs ready to start, the one heading the longest remaining work starts first (``job_order``)."""
    jobs, after, priority = job_order(chains)
    job_cfg = {job.out_dir: (job_cfgs or {}).get(name, cfg) for name, chain in chains.items() for job in chain}
    by_priority = sorted(jobs, key=lambda key: -priority[key])
    summaries: dict[Path, dict] = {}
    if parallel == 1:
        while len(summaries) < len(jobs):
            key = next(k for k in by_priority if k not in summaries and (after[k] is None or after[k] in summaries))
            summaries[key] = run_training(job_cfg[key], jobs[key])
    else:
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        running: dict = {}
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            while len(summaries) < len(jobs):
                started = set(summaries) | set(running.values())
                ready = [k for k in by_priority if k not in started and (after[k] is None or after[k] in summaries)]
                for key in ready[: parallel - len(running)]:
                    subprocess_cfg = replace(job_cfg[key], launcher="torchrun")
                    running[pool.submit(run_training, subprocess_cfg, jobs[key], threads=1)] = key
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    summaries[running.pop(future)] = future.result()  # a failed job raises here
    return {method: summaries[chain[-1].out_dir] for method, chain in chains.items()}


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


def run_perception_eval(tracker, export_dir: str, cfg: RunConfig, out_dir: Path, *, parent_run_id: str | None,
                        progress: bool = True) -> dict | None:
    """Stage 0's perception accuracy on the perception val questions (None when the set has none)."""
    manifest = "perception_val.jsonl"
    if not (Path(cfg.data.root) / manifest).is_file():
        return None
    perception_cfg = replace(cfg, data=replace(cfg.data, val_manifest=manifest),
                             eval=replace(cfg.eval, split="val", num_latency_items=0))
    return run_eval(tracker, export_dir, perception_cfg, out_dir, name="stage0/perception_eval",
                    parent_run_id=parent_run_id, tags={"method": "stage0"}, progress=progress)


def stage0_hidden_rms(export_dir: str) -> float | None:
    """RMS of the final RMSNorm's weight: the scale of the last-layer states the latents are (what targets meet)."""
    from safetensors import safe_open

    for path in sorted(Path(export_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            # save_pretrained's layout ("model.norm.weight") or the module's ("model.language_model.norm.weight")
            key = next((k for k in f.keys() if k in ("model.norm.weight", "model.language_model.norm.weight")), None)
            if key is not None:
                return float(f.get_tensor(key).float().pow(2).mean().sqrt())
    return None


# ---- the demo ----
def run_demo(cfg: RunConfig, *, progress: bool = True) -> dict[str, Path]:
    from storms_dist.data.manifest import read_manifest
    from storms_dist.eval import diagnostics
    from storms_dist.eval.report import paired_differences, print_table, write_report
    from storms_dist.targets import TargetStore
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
        by_horizon: dict[str, list[dict]] = {m: [] for m in cfg.demo.methods}
        train_samples = read_manifest(cfg.data.manifest_path("train"))
        eval_samples = read_manifest(cfg.data.manifest_path(cfg.eval.split))
        perception_lines, target_lines = [], []
        for seed in cfg.demo.seeds:
            seed_cfg = with_seed(cfg, seed)
            seed_dir = run_dir / f"seed{seed}"
            stage0 = run_training(seed_cfg, stage0_job(seed_cfg, seed_dir, parent_id))
            perception = run_perception_eval(tracker, stage0["export"], seed_cfg, seed_dir / "stage0" / "perception",
                                             parent_run_id=parent_id, progress=progress)
            if perception is not None:
                per_type = ", ".join(f"{q.removeprefix('perception_')} {v['accuracy']:.1f}"
                                     for q, v in perception["by_type"].items())
                perception_lines.append(f"- seed {seed}: overall {perception['overall']['accuracy']:.1f} % "
                                        f"({per_type})")
            chains = {method: method_jobs(seed_cfg, method, seed_dir=seed_dir, stage0_export=stage0["export"],
                                          targets_dir=seed_dir / "targets", parent_run_id=parent_id)
                      for method in cfg.demo.methods}
            summaries = train_methods(seed_cfg, chains, parallel=cfg.demo.parallel)
            for method in cfg.demo.methods:
                metrics = run_eval(tracker, summaries[method]["export"], cfg, seed_dir / method / "eval",
                                   name=f"{method}/eval", parent_run_id=parent_id, tags={"method": method},
                                   progress=progress)
                results[method].append(metrics)
                latency[method].append({"latency_ms_per_item": metrics["latency_ms_per_item"],
                                        "num_latents": metrics["num_latents"]})
                by_horizon[method].append(diagnostics.accuracy_by_horizon(
                    seed_dir / method / "eval" / "predictions.jsonl", eval_samples))
                targets_dir = seed_dir / "targets"
                if method == "storms" and (targets_dir / "stamp.json").is_file():
                    store = TargetStore(targets_dir)
                    with_targets = [s for s in train_samples if s.thought_video is not None]
                    info = diagnostics.target_informativeness(
                        store[[s.uid for s in with_targets]], with_targets,
                        hidden_rms=stage0_hidden_rms(stage0["export"]))
                    target_lines.append(f"- seed {seed}: {diagnostics.format_diagnostics(info)}")
        context = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
                   "date": time.strftime("%Y-%m-%d"), "backbone": cfg.model.backbone,
                   "num_latents": cfg.model.num_latents, "seeds": list(cfg.demo.seeds),
                   "steps": {"stage0": cfg.stage0.num_steps, "stage1": cfg.stage1.num_steps,
                             "stage2": cfg.stage2.num_steps},
                   "split": cfg.eval.split, "wall_time_min": round((time.time() - started) / 60, 1)}
        baselines = {"chance": diagnostics.chance_by_type(eval_samples),
                     **diagnostics.baseline_results(train_samples, eval_samples)}
        sections = _report_sections(perception_lines, target_lines, by_horizon)
        paired = paired_differences(results, list(cfg.demo.dynamics_qtypes), list(cfg.demo.seeds))
        if paired:
            sections = {"STORMS minus each method, dynamics avg (points, paired by seed)": paired, **sections}
        report = dict(results=results, latency=latency, qtypes=_qtypes(results),
                      dynamics_qtypes=list(cfg.demo.dynamics_qtypes), baselines=baselines, sections=sections)
        paths = write_report(run_dir, **report, context=context)
        print_table(**report)
        for path in paths.values():
            tracker.log_artifact(path)
    return paths


ABLATION_KS = (4, 8, 16)
ABLATION_LAMBDAS = (0.0, 0.1, 1.0)


def run_ablation(cfg: RunConfig, *, progress: bool = True) -> dict[str, Path]:
    """STORMS I->II with K in ABLATION_KS (at the config's lambda) and lambda in ABLATION_LAMBDAS (at the config's K),
    all from one Stage 0 checkpoint with the same step budget (paper Table 5); report in RUN_DIR/ablation."""
    from storms_dist.eval.report import print_table, write_report
    from storms_dist.tracking import Tracker

    started = time.time()
    seed = cfg.demo.seeds[0]
    run_dir, seed_dir = cfg.run_dir, cfg.run_dir / f"seed{seed}"
    out_dir = run_dir / "ablation"
    seed_cfg = with_seed(cfg, seed)
    settings = [(k, cfg.model.align_weight) for k in ABLATION_KS]
    settings += [(cfg.model.num_latents, lam) for lam in ABLATION_LAMBDAS if lam != cfg.model.align_weight]
    tracker = Tracker(cfg.tracking, Path(cfg.runs_dir), is_main_process=True)
    results: dict[str, list[dict]] = {}
    latency: dict[str, list[dict]] = {}
    with tracker.run(f"{cfg.name}/ablation", tags={"pipeline": "ablation"}) as parent_id:
        ensure_synth(cfg, progress=progress)
        stage0 = run_training(seed_cfg, stage0_job(seed_cfg, seed_dir, parent_id))
        setting_cfgs, setting_dirs, chains = {}, {}, {}
        for k, lam in settings:
            name = f"K={k} λ={lam:g}"
            setting_cfgs[name] = replace(seed_cfg, model=replace(seed_cfg.model, num_latents=k, align_weight=lam))
            setting_dirs[name] = out_dir / f"k{k}_lambda{lam:g}"
            chains[name] = method_jobs(setting_cfgs[name], "storms", seed_dir=setting_dirs[name],
                                       stage0_export=stage0["export"], targets_dir=seed_dir / f"targets_k{k}",
                                       parent_run_id=parent_id)
            for job in chains[name]:
                job.tags = {"method": "storms", "ablation": name}
        summaries = train_methods(seed_cfg, chains, parallel=cfg.demo.parallel, job_cfgs=setting_cfgs)
        for name, summary in summaries.items():
            setting_cfg = setting_cfgs[name]
            k = setting_cfg.model.num_latents
            metrics = run_eval(tracker, summary["export"], setting_cfg, setting_dirs[name] / "eval", name=f"{name}/eval",
                               parent_run_id=parent_id, tags={"ablation": name}, progress=progress)
            results[name] = [metrics]
            latency[name] = [{"latency_ms_per_item": metrics["latency_ms_per_item"], "num_latents": k}]
        context = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
                   "date": time.strftime("%Y-%m-%d"), "backbone": cfg.model.backbone, "seed": seed,
                   "steps": {"stage1": cfg.stage1.num_steps, "stage2": cfg.stage2.num_steps},
                   "split": cfg.eval.split, "wall_time_min": round((time.time() - started) / 60, 1)}
        report = dict(results=results, latency=latency, qtypes=_qtypes(results),
                      dynamics_qtypes=list(cfg.demo.dynamics_qtypes), title="STORMS ablations (K, λ)")
        paths = write_report(out_dir, **report, context=context)
        print_table(**report)
        for path in paths.values():
            tracker.log_artifact(path)
    return paths


def _report_sections(perception_lines: list[str], target_lines: list[str],
                     by_horizon: dict[str, list[dict]]) -> dict[str, list[str]]:
    from storms_dist.eval.metrics import ci95, mean_std

    sections = {}
    if perception_lines:
        sections["Stage 0 perception (perception val questions, accuracy %)"] = perception_lines
    if target_lines:
        sections["Thought-video targets (raw, before standardisation)"] = [
            "variance_ratio = across-sample variance / mean square; probe = nearest-centroid accuracy % from the "
            "target slot of the asked horizon to the answer (80/20 split of train; probe_majority beside it); "
            "target_rms vs hidden_rms = the scale of what the latents are aligned to.", "", *target_lines]
    buckets = sorted({b for runs in by_horizon.values() for run in runs for b in run},
                     key=lambda b: int(b.split("-")[0]))
    if buckets:
        rows = ["| method | " + " | ".join(f"D {b}" for b in buckets) + " |",
                "|---|" + "---:|" * len(buckets)]
        for method, runs in by_horizon.items():
            cells = []
            for b in buckets:
                values = [run[b] for run in runs if b in run]
                mean, std = mean_std(values) if values else (float("nan"), 0.0)
                cells.append(f"{mean:.1f}" + (f" ± {ci95(std, len(values)):.1f}" if len(values) > 1 else ""))
            rows.append(f"| {method} | " + " | ".join(cells) + " |")
        sections["Future-cell accuracy by horizon D (frames after the clip), %"] = rows
    return sections


def _qtypes(results: dict[str, list[dict]]) -> list[str]:
    seen: list[str] = []
    for runs in results.values():
        for metrics in runs:
            seen += [q for q in metrics["by_type"] if q not in seen]
    return seen
