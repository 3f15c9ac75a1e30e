"""One training loop for every stage, always through a real ``deepspeed.initialize`` engine.

Stage 0 (embedded default only) pre-trains the tiny random-init backbone on perception questions; Stage I aligns the
K latent states with thought-video targets (+ answer CE); Stage II trains answer-only CE through the rollout. The
baselines are the same loop with other stage settings (K = 0 SFT, Stage I only, Stage II only).
"""

from __future__ import annotations

import json
import os
import resource
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from storms_dist.config import dump, flatten, read_yaml, to_dict
from storms_dist.data.dataset import LatentCollator, ShardedSampler, VideoQADataset
from storms_dist.data.manifest import read_manifest
from storms_dist.data.preprocess import VisionSpec
from storms_dist.model.build import (
    TrainableConfig,
    apply_freezing,
    build_model,
    build_tokenizer,
    export_model,
    latent_token_ids,
    param_groups,
    write_latent_settings,
)
from storms_dist.model.storms import forward_option_error
from storms_dist.train.checkpoint import CheckpointManager, tag_for
from storms_dist.train.deepspeed_config import build_ds_config
from storms_dist.train.distributed import all_reduce_max, barrier, init_distributed
from storms_dist.train.flops import FlopsModel, peak_flops_per_device
from storms_dist.train.grad_norm import step_with_grad_norm
from storms_dist.train.optim import lr_multiplier
from storms_dist.train.signals import Preempted, PreemptionFlag

# DeepSpeed 0.19.8 calls torch's deprecated reduce_scatter_tensor on every step and torch warns on every call (its
# c10d wrapper defeats the once-per-location rule), which buries the progress bar and the logs.
warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.* is deprecated", category=FutureWarning)

# What may change between a run and its resumption: where and how it is checkpointed, tracked, evaluated and launched,
# and how long it trains. Any other change (data, model, optimiser, ZeRO) would silently splice two experiments.
RESUMABLE_CHANGES = ("checkpoint.", "robustness.", "tracking.", "eval.", "demo.", "launcher", "nproc", "runs_dir",
                     "name")


def config_changes(saved: dict, current: dict, defaults: dict | None = None) -> list[str]:
    """Dotted keys whose values differ between two resolved configs (nested dicts), except what a resumption may
    change (``RESUMABLE_CHANGES`` and every ``*.num_steps``). A key the saved config lacks reads as its value in
    ``defaults``: a field added to the code after the checkpoint was written, left at its default, changes nothing."""
    saved, current = {**flatten(defaults or {}), **flatten(saved)}, flatten(current)
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k)
                  and not k.startswith(RESUMABLE_CHANGES) and not k.endswith(".num_steps"))


@dataclass(kw_only=True)
class StageConfig:
    num_steps: int = 100
    """Optimizer steps."""
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None
    """Peak lr for this stage; None = optim.lr."""
    num_latents: int | None = None
    """K for this stage; None = model.num_latents."""
    mode: Literal["single", "rollout", "joint"] = "rollout"
    """single: one pass (with align = teacher-forced targets in the slots); rollout: K cached latent passes; joint
    (Stage I): the teacher-forced loss plus ``rollout_weight`` x lambda x the alignment of a rollout with the
    gradient cut between steps (model/storms.py)."""
    rollout_weight: float = 1.0
    """joint mode: weight of the rolled-out latents' alignment, relative to the teacher-forced one."""
    teacher_noise: float = 0.0
    """single / joint with align: std of Gaussian noise added to the teacher-forced slot inputs (the targets they
    are aligned to stay clean), so each step learns to pull an imprecise state back onto the targets."""
    detach_chain: bool = False
    """rollout mode: each latent enters the next pass as a constant, so the answer CE (and the anchor) train each step
    and the readout but send no gradient back along the chain (truncated backpropagation through the latent steps)."""
    answer_pass: Literal["teacher", "rollout", "both"] = "teacher"
    """joint mode: whose answer CE trains -- the teacher-forced pass's (Stage I), the rollout's (the answer read through
    the model's own latents, as inference reads it; the teacher-forced pass then only aligns), or both."""
    chain_grad: bool = False
    """joint mode: the rollout's gradient also flows back along the latent chain (joint cuts it between steps)."""
    answer_grad: Literal["all", "latents"] = "all"
    """rollout mode, or joint with the rollout's answer: ``latents`` = that answer CE reaches the weights only through
    the rolled-out latent states (the readout is not fitted to the answers directly; two full passes after the latent
    steps instead of one suffix pass)."""
    align: bool = False
    """Add lambda * alignment to the thought-video targets: Stage I's objective; in Stage II (rollout mode) an anchor
    that keeps the answer-trained rollout on the targets Stage I aligned it to (the same cache)."""
    split: Literal["train", "perception"] = "train"
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    log_every: int = 10

    def __post_init__(self):
        if self.num_steps < 1:
            raise ValueError(f"num_steps: expected >= 1, got {self.num_steps}")
        if self.micro_batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"micro_batch_size and grad_accum: expected >= 1, got {self.micro_batch_size}, "
                             f"{self.grad_accum}")
        if self.rollout_weight < 0:
            raise ValueError(f"rollout_weight: expected >= 0, got {self.rollout_weight}")
        error = forward_option_error(mode=self.mode, num_latents=self.num_latents, aligned=self.align,
                                     teacher_noise=self.teacher_noise, detach_chain=self.detach_chain,
                                     answer_pass=self.answer_pass, chain_grad=self.chain_grad,
                                     answer_grad=self.answer_grad)
        if error:
            raise ValueError(error)


@dataclass(kw_only=True)
class RobustnessConfig:
    on_nonfinite_loss: Literal["skip", "stop"] = "skip"
    """A NaN/inf loss on any rank: every rank drops that micro-batch (no backward, no update), or all stop."""
    max_consecutive_nonfinite: int = 8
    """Stop after this many non-finite micro-batches in a row (skipping would only hide a diverged run)."""
    max_bad_data_fraction: float = 0.05
    """Stop when more than this fraction of the samples seen so far (malformed manifest lines included) is bad."""
    min_samples_before_threshold: int = 50
    """The fraction is judged only after this many samples (a few bad files early must not stop a run)."""
    dist_timeout_s: float = 1800.0
    """torch.distributed process-group timeout: a hang surfaces as an error after this long."""

    def __post_init__(self):
        if not 0.0 <= self.max_bad_data_fraction <= 1.0:
            raise ValueError(f"max_bad_data_fraction: expected a fraction in [0, 1], got {self.max_bad_data_fraction}")
        if self.max_consecutive_nonfinite < 1 or self.dist_timeout_s <= 0:
            raise ValueError("max_consecutive_nonfinite: expected >= 1 and dist_timeout_s > 0")


class BadDataError(RuntimeError):
    """Too much of the data is unreadable or malformed: the message lists examples."""


@dataclass
class BadData:
    """Samples that could not be loaded (and malformed manifest lines), with a few examples for the error."""

    num_seen: int = 0
    num_bad: int = 0
    examples: list[str] = field(default_factory=list)

    def record(self, what: str) -> None:
        self.num_bad += 1
        if len(self.examples) < 10:
            self.examples.append(what)


@dataclass
class TrainJob:
    """One training run: a stage's settings, where it starts from and where it writes."""

    name: str
    stage: int
    stage_cfg: StageConfig
    out_dir: Path
    init_from: str | None = None
    targets_dir: Path | None = None
    parent_run_id: str | None = None
    tags: dict = field(default_factory=dict)
    reuse_targets: bool = False
    """Align to ``targets_dir`` as it is (``targets.check_reusable``) instead of (re)building it from this job's
    starting tower: a job that continues from a Stage I export aligns to the cache that Stage I aligned to. Stage II
    jobs always do."""


class Trainer:
    def __init__(self, cfg, job: TrainJob):
        from storms_dist.tracking import Tracker

        self.cfg, self.job, self.stage_cfg = cfg, job, job.stage_cfg
        job.out_dir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(cfg.runs_dir).resolve() / "torch_extensions"))
        self.dist = init_distributed(timeout_s=cfg.robustness.dist_timeout_s)
        torch.manual_seed(cfg.seed)
        self.num_latents = cfg.model.num_latents if self.stage_cfg.num_latents is None else self.stage_cfg.num_latents

        self.tokenizer = build_tokenizer(job.init_from)
        model_cfg = type(cfg.model)(**{**to_dict(cfg.model), "init_from": job.init_from})
        self.model = build_model(model_cfg, self.tokenizer, seed=cfg.seed)
        self.trainable_counts = apply_freezing(self.model, self.stage_cfg.trainable)
        self.spec = VisionSpec.from_hf_config(self.model.backbone.config)

        self.bad_data = BadData()
        self.dataset = self._dataset()
        self.sampler = ShardedSampler(len(self.dataset), micro_batch_size=self.stage_cfg.micro_batch_size,
                                      rank=self.dist.rank, world_size=self.dist.world_size, seed=cfg.seed)
        self.collate = LatentCollator(latent_token_ids(self.tokenizer), self.tokenizer.pad_token_id,
                                      self.num_latents)
        self.targets = self._thought_video_targets() if self.stage_cfg.align else None
        self.model.train()
        self.model.sync_ranks = self.dist.world_size > 1
        self.model.gather_latent_passes = cfg.deepspeed.gather_latent_passes and cfg.deepspeed.zero_stage == 3

        self.flops = FlopsModel.from_model(self.model, vision_trained=self.stage_cfg.trainable.vision)
        self.peak_flops = peak_flops_per_device()
        self.engine = self._build_engine()
        self.tracker = Tracker(cfg.tracking, Path(cfg.runs_dir), is_main_process=self.dist.is_main)
        self.checkpoints = CheckpointManager(job.out_dir / "checkpoints", cfg.checkpoint, rank=self.dist.rank,
                                             world_size=self.dist.world_size)
        self.step, self.mlflow_run_id, self.num_skipped_nonfinite = 0, None, 0
        self._good_indices: list[int] = []
        self.resumed_from = self._resume() if cfg.checkpoint.resume else None

    def _dataset(self) -> VideoQADataset:
        """The stage's split; malformed manifest lines are skipped and counted as bad data."""
        path = self.cfg.data.manifest_path(self.stage_cfg.split)
        samples = read_manifest(path, on_error="skip")
        for line in samples.skipped:
            self.bad_data.record(line.message)  # already "path:line: field: ..."
        self.bad_data.num_seen += len(samples.skipped)
        if not samples:
            raise BadDataError(f"{path}: no valid sample (examples: {self.bad_data.examples[:3]})")
        return VideoQADataset(samples, self.tokenizer, self.spec, self.cfg.data)

    def _resume(self) -> str | None:
        tag = self.checkpoints.latest_tag()
        if tag is None:
            return None
        self._check_resumable_config(tag)
        state = self.checkpoints.load(self.engine, tag)
        self.step, self.mlflow_run_id = state["step"], state["mlflow_run_id"]
        self.sampler.load_state_dict(state["sampler"])
        self.bad_data = BadData(**state["bad_data"])
        self.num_skipped_nonfinite = state["num_skipped_nonfinite"]
        self._good_indices = state["good_indices"]
        if self.dist.is_main:
            print(f"[{self.job.name}] resumed from {self.checkpoints.directory / tag} at step {self.step}", flush=True)
        return tag

    def _check_resumable_config(self, tag: str) -> None:
        """The config the checkpointed run wrote (``OUT/config.yaml``) must match this one outside RESUMABLE_CHANGES."""
        saved_path = self.job.out_dir / "config.yaml"
        if not saved_path.is_file():
            return  # a checkpoint copied without its run folder: nothing to compare against
        changes = config_changes(read_yaml(saved_path), to_dict(self.cfg), defaults=to_dict(type(self.cfg)()))
        if changes:
            shown = ", ".join(changes[:6]) + (f" and {len(changes) - 6} more" if len(changes) > 6 else "")
            raise ValueError(f"{self.job.out_dir}: its checkpoint {tag} was trained with a different config ({shown}); "
                             "resuming would splice two runs: delete that folder, use another run name, or set "
                             "checkpoint.resume=false")

    def save_checkpoint(self) -> Path:
        state = {"sampler": self.sampler.state_dict(), "mlflow_run_id": self.mlflow_run_id,
                 "bad_data": asdict(self.bad_data), "num_skipped_nonfinite": self.num_skipped_nonfinite,
                 "good_indices": self._good_indices[-1000:]}
        return self.checkpoints.save(self.engine, self.step, state, write_meta=self._write_checkpoint_meta)

    def _write_checkpoint_meta(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.model.backbone.config.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        write_latent_settings(self.model, folder, num_latents=self.num_latents, max_latents=self.cfg.model.max_latents,
                              # "data": storms export writes it into the processor configs
                              extra={"stage": self.job.stage, "job": self.job.name, "steps": self.step,
                                     "data": to_dict(self.cfg.data)})

    def _thought_video_targets(self):
        """Stage I targets from this stage's starting checkpoint: rank 0 (re)builds a stale or missing cache. Stage II
        with align, and any job with ``reuse_targets``, continues on Stage I's cache as it is (its tower's merger has
        moved since)."""
        from storms_dist.targets import TargetStore, build_targets, check_reusable

        if self.job.targets_dir is None:
            raise ValueError(f"{self.job.name}: align=true needs a targets folder (TrainJob.targets_dir)")
        if self.job.stage == 2 or self.job.reuse_targets:
            check_reusable(self.job.targets_dir, self.model, self.dataset.samples, self.cfg.data,
                           num_latents=self.num_latents, cfg=self.cfg.targets)
        elif self.dist.is_main:
            build_targets(self.model, self.dataset.samples, self.spec, self.cfg.data, self.job.targets_dir,
                          num_latents=self.num_latents, cfg=self.cfg.targets, progress=True)
        barrier()
        return TargetStore(self.job.targets_dir, normalize=self.cfg.targets.normalize)

    def close(self) -> None:
        """Release the engine (the pipeline trains several jobs in one process)."""
        self.tracker.flush()
        self.engine.destroy() if hasattr(self.engine, "destroy") else None
        self.engine = self.model = None

    def _build_engine(self):
        import deepspeed

        lr = self.stage_cfg.lr or self.cfg.optim.lr
        self.ds_config = build_ds_config(
            self.cfg.deepspeed, self.cfg.optim, micro_batch_size=self.stage_cfg.micro_batch_size,
            grad_accum=self.stage_cfg.grad_accum, world_size=self.dist.world_size,
            bf16=self.model.backbone.dtype == torch.bfloat16,
        )
        self.ds_config["optimizer"]["params"]["lr"] = lr
        if self.dist.is_main:
            (self.job.out_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2) + "\n")
        groups = param_groups(self.model, lr=lr, weight_decay=self.cfg.optim.weight_decay,
                              trainable=self.stage_cfg.trainable)
        num_steps, optim_cfg = self.stage_cfg.num_steps, self.cfg.optim

        def scheduler(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: lr_multiplier(step, num_steps=num_steps, cfg=optim_cfg))

        engine, *_ = deepspeed.initialize(model=self.model, model_parameters=groups, config=self.ds_config,
                                          lr_scheduler=scheduler)
        return engine

    # ---- the loop ----
    def train(self) -> dict:
        from tqdm import tqdm

        job, stage_cfg = self.job, self.stage_cfg
        if self.dist.is_main:
            dump(self.cfg, job.out_dir / "config.yaml")
        self.mlflow_run_id = self.tracker.start_run(job.name, parent_run_id=job.parent_run_id,
                                                    run_id=self.mlflow_run_id,
                                                    tags={"stage": str(job.stage), **job.tags})
        if self.resumed_from is None:
            self.tracker.log_params({**flatten(self.cfg), "job.name": job.name, "job.stage": job.stage,
                                     "job.init_from": job.init_from, "job.num_latents": self.num_latents,
                                     **flatten(to_dict(stage_cfg), "stage")})
            self.tracker.log_artifact(job.out_dir / "config.yaml")
        history = self._history_up_to(self.step)
        batches = iter(self.sampler)
        preemption = PreemptionFlag()
        bar = tqdm(total=stage_cfg.num_steps, initial=self.step, desc=job.name, disable=not self.dist.is_main,
                   unit="step")
        status = "FAILED"
        try:
            while self.step < stage_cfg.num_steps:
                metrics = self.train_step(batches)
                self.step += 1
                history.append(metrics)
                self._append_log(metrics)
                self.tracker.log_metrics(metrics, step=self.step)
                bar.update(1)
                if self.step % stage_cfg.log_every == 0 or self.step == stage_cfg.num_steps:
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}")
                # one collective per step: every rank learns whether any rank was signalled or saw too much bad data
                preempted, too_bad = (v > 0 for v in all_reduce_max([preemption.received is not None,
                                                                      self._too_much_bad_data()]))
                if too_bad:
                    raise BadDataError(self._bad_data_message())
                if preempted and self.step < stage_cfg.num_steps:
                    self.save_checkpoint()
                    status = "KILLED"
                    if self.dist.is_main:
                        (job.out_dir / "preempted.json").write_text(json.dumps({"step": self.step}) + "\n")
                    raise Preempted(self.step)
                every = self.cfg.checkpoint.every_steps
                if every and self.step % every == 0 and self.step < stage_cfg.num_steps:
                    self.save_checkpoint()
            bar.close()
            summary = self.finish(history)
            status = "FINISHED"
            return summary
        finally:
            preemption.restore()
            self.tracker.end_run(status)

    def _history_up_to(self, step: int) -> list[dict]:
        """The per-step log of the steps before ``step`` (a resumed run drops the steps after its checkpoint)."""
        path = self.job.out_dir / "train_log.jsonl"
        history = []
        if step > 0 and path.is_file():
            history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:step]
            history = [{k: v for k, v in m.items() if k != "step"} for m in history]
        if self.dist.is_main:
            with open(path, "w") as f:
                for i, m in enumerate(history, 1):
                    f.write(json.dumps({"step": i, **m}) + "\n")
        return history

    def _append_log(self, metrics: dict) -> None:
        if self.dist.is_main:  # per step, so a killed run keeps its curve up to the last step
            with open(self.job.out_dir / "train_log.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, **metrics}) + "\n")

    def _too_much_bad_data(self) -> bool:
        robust = self.cfg.robustness
        seen = self.bad_data.num_seen
        return seen >= robust.min_samples_before_threshold and self.bad_data.num_bad > robust.max_bad_data_fraction * seen

    def _bad_data_message(self) -> str:
        return (f"{self.job.name}: bad data over the threshold on some rank (this rank: {self.bad_data.num_bad} of "
                f"{self.bad_data.num_seen} samples unreadable or malformed, limit "
                f"{self.cfg.robustness.max_bad_data_fraction:.0%}); examples: {'; '.join(self.bad_data.examples[:5])}")

    def _load_items(self, indices: list[int]) -> list:
        """Load a micro-batch. An unreadable sample is counted and replaced by the last readable one (or the next
        readable one before any), so the batch keeps its size and a resumed run sees the same data."""
        items = []
        for index in indices:
            self.bad_data.num_seen += 1
            item = self._try_load(index, record=True)
            candidate = index
            while item is None:
                if self._good_indices:
                    candidate = self._good_indices[-1]
                else:
                    candidate = (candidate + 1) % len(self.dataset)
                    if candidate == index:
                        raise BadDataError(self._bad_data_message())
                item = self._try_load(candidate, record=False)
            items.append(item)
        return items

    def _try_load(self, index: int, *, record: bool):
        from storms_dist.data.video_io import VideoDecodeError

        try:
            item = self.dataset[index]
        except (VideoDecodeError, ValueError) as e:
            if record:
                uid = self.dataset.samples[index].uid
                self.bad_data.record(f"{uid}: {e}")
                print(f"[{self.job.name} rank {self.dist.rank}] skipping bad sample {uid}: {str(e)[:300]}", flush=True)
            return None
        if record and item.video.num_missing_frames:  # usable, but shorter than the video its label describes
            self.bad_data.record(f"{self.dataset.samples[index].uid}: {self.dataset.samples[index].video_path}: "
                                 f"truncated, {item.video.num_missing_frames} frames missing")
        self._good_indices.append(index)
        del self._good_indices[:-1000]
        return item

    def train_step(self, batches) -> dict:
        engine, stage_cfg, robust = self.engine, self.stage_cfg, self.cfg.robustness
        timings = {"data_s": 0.0, "forward_s": 0.0, "backward_s": 0.0, "optimizer_s": 0.0}
        sums = {"loss": 0.0, "ce": 0.0, "align": 0.0}
        num_tokens = num_samples = num_micro = num_nonfinite_in_row = 0
        grad_norm: float | None = None
        step_flops = 0.0
        step_start = time.perf_counter()
        while num_micro < stage_cfg.grad_accum:
            t0 = time.perf_counter()
            batch, layout = self.collate(self._load_items(next(batches)))
            uids = batch.pop("uids")
            targets = self.targets[uids] if self.targets is not None else None
            t1 = time.perf_counter()
            # every option at its configured value: at its default each is a no-op, and the model rejects a
            # combination its mode does not have (StageConfig already did, with the config field's name)
            out = engine(batch, layout, mode=stage_cfg.mode, targets_BKD=targets,
                         rollout_weight=stage_cfg.rollout_weight, teacher_noise=stage_cfg.teacher_noise,
                         detach_chain=stage_cfg.detach_chain, answer_pass=stage_cfg.answer_pass,
                         chain_grad=stage_cfg.chain_grad, answer_grad=stage_cfg.answer_grad)
            t2 = time.perf_counter()
            # all ranks agree before any backward: a non-finite loss anywhere drops this micro-batch everywhere
            if all_reduce_max([0.0 if torch.isfinite(out.loss).item() else 1.0])[0] > 0:
                self.num_skipped_nonfinite += 1
                num_nonfinite_in_row += 1
                message = (f"{self.job.name}: non-finite loss at step {self.step + 1} on some rank "
                           f"(this rank: {out.loss.item()})")
                if robust.on_nonfinite_loss == "stop" or num_nonfinite_in_row >= robust.max_consecutive_nonfinite:
                    raise FloatingPointError(message)
                if self.dist.is_main:
                    print(message + "; micro-batch skipped", flush=True)
                del out
                continue
            num_nonfinite_in_row = 0
            engine.backward(out.loss)
            t3 = time.perf_counter()
            step_norm = step_with_grad_norm(engine)  # the optimizer runs only at the accumulation boundary
            if step_norm is not None:
                grad_norm = step_norm
            t4 = time.perf_counter()
            for key, dt in zip(timings, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                timings[key] += dt
            sums["loss"] += out.loss.item()
            sums["ce"] += out.ce.item()
            sums["align"] += 0.0 if out.align is None else out.align.item()
            num_tokens += int(batch["attention_mask"].sum())
            num_samples += len(uids)
            step_flops += self.flops.step_flops(batch["attention_mask"], out.num_answer_tokens,
                                                batch["pixel_values_videos"].shape[0])
            num_micro += 1
        step_s = time.perf_counter() - step_start
        metrics = {k: v / stage_cfg.grad_accum for k, v in sums.items()}
        if self.targets is None:
            metrics.pop("align")
        if self.peak_flops is not None:
            metrics["mfu"] = step_flops / step_s / self.peak_flops
        metrics.update(
            lr=engine.get_lr()[0],
            grad_norm=grad_norm if grad_norm is not None else float("nan"),  # nan only if no update ran
            step_s=step_s,
            tokens_per_s=num_tokens * self.dist.world_size / step_s,
            samples_per_s=num_samples * self.dist.world_size / step_s,
            tflops_per_device=step_flops / step_s / 1e12,
            peak_mem_gb=peak_memory_gb(),
            bad_samples=float(self.bad_data.num_bad),
            skipped_nonfinite=float(self.num_skipped_nonfinite),
            **timings,
        )
        return metrics

    def finish(self, history: list[dict]) -> dict:
        """End-of-stage DeepSpeed checkpoint, then the save_pretrained export (consolidated on rank 0)."""
        job = self.job
        if self.resumed_from != tag_for(self.step):  # a finished run that is re-run only re-exports
            self.save_checkpoint()
        state_dict = self.consolidated_state_dict()
        probe = self.probe_logits()
        export_dir = job.out_dir / "export"
        if self.dist.is_main:
            torch.save(probe, job.out_dir / "export_probe.pt")
            export_model(self.model, self.tokenizer, export_dir, num_latents=self.num_latents,
                         max_latents=self.cfg.model.max_latents, state_dict=state_dict,
                         extra={"stage": job.stage, "job": job.name, "steps": self.step},
                         data=to_dict(self.cfg.data))
            summary = {"job": job.name, "stage": job.stage, "steps": self.step, "num_latents": self.num_latents,
                       "export": str(export_dir), "final_loss": history[-1]["loss"],
                       "mean_step_s": sum(m["step_s"] for m in history) / len(history),
                       "trainable_params": self.trainable_counts,
                       "loss_curve": [round(m["loss"], 5) for m in history]}
            summary.update(bad_samples=self.bad_data.num_bad, bad_examples=self.bad_data.examples,
                           skipped_nonfinite=self.num_skipped_nonfinite)
            (job.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            self.tracker.log_artifact(job.out_dir / "summary.json")
        barrier()
        return json.loads((job.out_dir / "summary.json").read_text())

    @torch.no_grad()
    def probe_logits(self) -> dict:
        """The trained model's logits on a fixed batch (the first sample's prompt and answer), computed through the
        engine's parameters: lets anyone check that the export reloads with identical logits."""
        items = [self.dataset[0]]
        batch, _ = LatentCollator(self.collate.token_ids, self.collate.pad_id, 0)(items)
        keys = ["input_ids", "attention_mask", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw"]
        if self.model.spec.family == "qwen2_5_vl":
            keys.append("second_per_grid_ts")  # Qwen3-VL carries time in the prompt's timestamps instead
        inputs = {k: batch[k] for k in keys}
        # the project's mRoPE rule, passed explicitly: what a plain-transformers user of the export must do too
        inputs["position_ids"] = self.model.rope_positions(batch)
        self.model.eval()
        logits = self.engine.module.backbone(**inputs).logits  # all ranks: ZeRO-3 gathers layer by layer
        self.model.train()
        return {"inputs": inputs, "logits": logits.float().cpu()}

    def consolidated_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full backbone weights on rank 0 (gathered module by module under ZeRO-3); None elsewhere."""
        if self.engine.zero_optimization_partition_weights():
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.engine.module.state_dict()
        if not self.dist.is_main:
            return None
        prefix = "backbone."
        return {k[len(prefix):]: v.detach().cpu().clone() for k, v in state.items() if k.startswith(prefix)}


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
