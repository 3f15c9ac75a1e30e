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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from storms_dist.config import dump, flatten, to_dict
from storms_dist.data.dataset import LatentCollator, ShardedSampler, VideoQADataset
from storms_dist.data.preprocess import VisionSpec
from storms_dist.model.build import (
    TrainableConfig,
    apply_freezing,
    build_model,
    build_tokenizer,
    export_model,
    latent_token_ids,
    param_groups,
)
from storms_dist.train.deepspeed_config import build_ds_config
from storms_dist.train.distributed import barrier, init_distributed
from storms_dist.train.optim import lr_multiplier


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
    mode: Literal["single", "rollout"] = "rollout"
    """single: one pass (with align = teacher-forced targets in the slots); rollout: K cached latent passes."""
    align: bool = False
    """Add lambda * alignment to the thought-video targets (Stage I)."""
    split: Literal["train", "perception"] = "train"
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    log_every: int = 10

    def __post_init__(self):
        if self.num_steps < 1:
            raise ValueError(f"num_steps: expected >= 1, got {self.num_steps}")
        if self.micro_batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"micro_batch_size and grad_accum: expected >= 1, got {self.micro_batch_size}, "
                             f"{self.grad_accum}")
        if self.align and self.num_latents == 0:
            raise ValueError("align: alignment needs latent slots, but num_latents is 0")


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


class Trainer:
    def __init__(self, cfg, job: TrainJob):
        from storms_dist.tracking import Tracker

        self.cfg, self.job, self.stage_cfg = cfg, job, job.stage_cfg
        job.out_dir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(cfg.runs_dir).resolve() / "torch_extensions"))
        self.dist = init_distributed()
        torch.manual_seed(cfg.seed)
        self.num_latents = cfg.model.num_latents if self.stage_cfg.num_latents is None else self.stage_cfg.num_latents

        self.tokenizer = build_tokenizer(job.init_from)
        model_cfg = type(cfg.model)(**{**to_dict(cfg.model), "init_from": job.init_from})
        self.model = build_model(model_cfg, self.tokenizer, seed=cfg.seed)
        self.trainable_counts = apply_freezing(self.model, self.stage_cfg.trainable)
        self.spec = VisionSpec.from_hf_config(self.model.backbone.config)

        self.dataset = VideoQADataset.from_split(self.stage_cfg.split, self.tokenizer, self.spec, cfg.data)
        self.sampler = ShardedSampler(len(self.dataset), micro_batch_size=self.stage_cfg.micro_batch_size,
                                      rank=self.dist.rank, world_size=self.dist.world_size, seed=cfg.seed)
        self.collate = LatentCollator(latent_token_ids(self.tokenizer), self.tokenizer.pad_token_id,
                                      self.num_latents)
        self.targets = self._thought_video_targets() if self.stage_cfg.align else None
        self.model.train()

        self.engine = self._build_engine()
        self.tracker = Tracker(cfg.tracking, Path(cfg.runs_dir), is_main_process=self.dist.is_main)
        self.step = 0

    def _thought_video_targets(self):
        """Stage I targets from this stage's starting checkpoint: rank 0 (re)builds a stale or missing cache."""
        from storms_dist.targets import TargetStore, build_targets

        if self.job.targets_dir is None:
            raise ValueError(f"{self.job.name}: align=true needs a targets folder (TrainJob.targets_dir)")
        if self.dist.is_main:
            build_targets(self.model, self.dataset.samples, self.spec, self.cfg.data, self.job.targets_dir,
                          num_latents=self.num_latents, cfg=self.cfg.targets, progress=True)
        barrier()
        return TargetStore(self.job.targets_dir)

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
        run_id = self.tracker.start_run(job.name, parent_run_id=job.parent_run_id,
                                        tags={"stage": str(job.stage), **job.tags})
        self.tracker.log_params({**flatten(self.cfg), "job.name": job.name, "job.stage": job.stage,
                                 "job.init_from": job.init_from, "job.num_latents": self.num_latents,
                                 **flatten(to_dict(stage_cfg), "stage")})
        self.tracker.log_artifact(job.out_dir / "config.yaml") if self.dist.is_main else None
        batches = iter(self.sampler)
        bar = tqdm(total=stage_cfg.num_steps, desc=job.name, disable=not self.dist.is_main, unit="step")
        history = []
        status = "FAILED"
        try:
            while self.step < stage_cfg.num_steps:
                metrics = self.train_step(batches)
                self.step += 1
                history.append(metrics)
                self.tracker.log_metrics(metrics, step=self.step)
                bar.update(1)
                if self.step % stage_cfg.log_every == 0 or self.step == stage_cfg.num_steps:
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}")
            bar.close()
            summary = self.finish(history)
            status = "FINISHED"
            return summary
        finally:
            self.tracker.end_run(status)

    def train_step(self, batches) -> dict:
        engine, stage_cfg = self.engine, self.stage_cfg
        timings = {"data_s": 0.0, "forward_s": 0.0, "backward_s": 0.0, "optimizer_s": 0.0}
        sums = {"loss": 0.0, "ce": 0.0, "align": 0.0}
        num_tokens = num_samples = 0
        step_start = time.perf_counter()
        for _ in range(stage_cfg.grad_accum):
            t0 = time.perf_counter()
            batch, layout = self.collate([self.dataset[i] for i in next(batches)])
            uids = batch.pop("uids")
            targets = self.targets[uids] if self.targets is not None else None
            t1 = time.perf_counter()
            out = engine(batch, layout, mode=stage_cfg.mode, targets_BKD=targets)
            t2 = time.perf_counter()
            engine.backward(out.loss)
            t3 = time.perf_counter()
            engine.step()  # applies the optimizer only at the accumulation boundary
            t4 = time.perf_counter()
            for key, dt in zip(timings, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                timings[key] += dt
            sums["loss"] += out.loss.item()
            sums["ce"] += out.ce.item()
            sums["align"] += 0.0 if out.align is None else out.align.item()
            num_tokens += int(batch["attention_mask"].sum())
            num_samples += len(uids)
        step_s = time.perf_counter() - step_start
        metrics = {k: v / stage_cfg.grad_accum for k, v in sums.items()}
        if self.targets is None:
            metrics.pop("align")
        grad_norm = engine.get_global_grad_norm()
        metrics.update(
            lr=engine.get_lr()[0],
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            step_s=step_s,
            tokens_per_s=num_tokens * self.dist.world_size / step_s,
            samples_per_s=num_samples * self.dist.world_size / step_s,
            peak_mem_gb=peak_memory_gb(),
            **timings,
        )
        return metrics

    def finish(self, history: list[dict]) -> dict:
        """End-of-stage DeepSpeed checkpoint, then the save_pretrained export (consolidated on rank 0)."""
        job = self.job
        self.engine.save_checkpoint(str(job.out_dir / "checkpoints"), tag=f"step{self.step}")
        state_dict = self.consolidated_state_dict()
        probe = self.probe_logits()
        export_dir = job.out_dir / "export"
        if self.dist.is_main:
            torch.save(probe, job.out_dir / "export_probe.pt")
            export_model(self.model, self.tokenizer, export_dir, num_latents=self.num_latents,
                         max_latents=self.cfg.model.max_latents, state_dict=state_dict,
                         extra={"stage": job.stage, "job": job.name, "steps": self.step})
            summary = {"job": job.name, "stage": job.stage, "steps": self.step, "num_latents": self.num_latents,
                       "export": str(export_dir), "final_loss": history[-1]["loss"],
                       "mean_step_s": sum(m["step_s"] for m in history) / len(history),
                       "trainable_params": self.trainable_counts,
                       "loss_curve": [round(m["loss"], 5) for m in history]}
            (job.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            with open(job.out_dir / "train_log.jsonl", "w") as f:
                for step, m in enumerate(history, 1):
                    f.write(json.dumps({"step": step, **m}) + "\n")
            self.tracker.log_artifact(job.out_dir / "summary.json")
        barrier()
        return json.loads((job.out_dir / "summary.json").read_text())

    @torch.no_grad()
    def probe_logits(self) -> dict:
        """The trained model's logits on a fixed batch (the first sample's prompt and answer), computed through the
        engine's parameters: lets anyone check that the export reloads with identical logits."""
        items = [self.dataset[0]]
        batch, _ = LatentCollator(self.collate.token_ids, self.collate.pad_id, 0)(items)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values_videos",
                                        "video_grid_thw")}
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
