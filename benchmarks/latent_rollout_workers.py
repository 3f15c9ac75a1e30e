"""The processes ``benchmarks/latent_rollout.py`` launches: each reads a JSON spec the parent wrote and runs one job.

    python benchmarks/latent_rollout_workers.py init FOLDER --backbone qwen2_5_vl-3b-shaped   # a random-init 3B
    torchrun ... benchmarks/latent_rollout_workers.py paired WORK/paired/worker.json   # switch alternated per step
    torchrun ... benchmarks/latent_rollout_workers.py hf WORK/hf_trainer/worker.json   # transformers.Trainer, K=0

Kept apart from the sweep because they instrument or replace the trainer (DeepSpeed's coordinator patched to count
all-gathers; the HF Trainer baseline), while the sweep only runs the CLI users run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script (torchrun): latent_rollout is beside it
from latent_rollout import BACKBONES, load_run_config  # noqa: E402


def init_worker(backbone: str, folder: Path) -> None:
    import torch

    from storms_dist.model.build import _hf_classes, build_tokenizer, tiny_hf_config
    from storms_dist.model.registry import BackboneSpec

    tokenizer = build_tokenizer()
    spec = BackboneSpec(name=backbone, family="qwen2_5_vl", tiny_config=BACKBONES[backbone]["shape"],
                        vision_keys=("model.visual.",), merger_keys=("model.visual.merger.",))
    config = tiny_hf_config(spec, tokenizer)
    _, model_cls = _hf_classes("qwen2_5_vl")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"[latent_rollout] writing a random-init {backbone} model to {folder} (on {device})", flush=True)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(previous)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    num_params = sum(p.numel() for p in model.parameters())
    (tmp / "shape.json").write_text(json.dumps({"num_params": num_params, **BACKBONES[backbone]["shape"]},
                                               indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    print(f"[latent_rollout] {num_params / 1e9:.2f} B parameters", flush=True)


def _memoise_release_sets_per_mode(Coordinator, mode: list[str]) -> None:
    """DeepSpeed memoises which parameters a module call releases (an lru_cache keyed by coordinator, module and
    trace position, filled with the ds_persist flags of the first call), so a process that alternates the switch
    would reuse the first setting's release sets. Re-key that memo by the current switch setting (``mode[0]``):
    each setting gets its own, computed once, as in a job that keeps one setting."""
    import functools

    name = "_PartitionedParameterCoordinator__params_to_release"
    fn = getattr(Coordinator, name, None)
    memo = next((c for c in (fn, *(cell.cell_contents for cell in (getattr(fn, "__closure__", None) or ())))
                 if hasattr(c, "cache_clear")), None)
    if memo is None:
        raise RuntimeError(f"this DeepSpeed has no memoised PartitionedParameterCoordinator.{name}: the paired run "
                           "cannot switch settings step by step")
    compute = memo.__wrapped__

    @functools.lru_cache(maxsize=None)
    def per_mode(self, submodule, step_id, setting):
        return compute(self, submodule, step_id)

    setattr(Coordinator, name, lambda self, submodule, step_id: per_mode(self, submodule, step_id, mode[0]))


def paired_worker(spec_path: str) -> None:
    """Warm-up steps, then pairs of Stage II steps with the switch off/on (ABBA order), all-gathers counted."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as Coordinator

    from storms_dist.train.trainer import Trainer, TrainJob

    name = "_PartitionedParameterCoordinator__all_gather_params"
    if not hasattr(Coordinator, name):
        raise RuntimeError(f"this DeepSpeed has no PartitionedParameterCoordinator.{name}: cannot count all-gathers")
    counts = {"calls": 0, "params": 0, "numel": 0}
    original = getattr(Coordinator, name)

    def counting(self, params, forward):
        counts["calls"] += 1
        counts["params"] += len(params)
        counts["numel"] += sum(p.ds_numel for p in params)
        return original(self, params, forward)

    setattr(Coordinator, name, counting)
    mode = ["off"]
    _memoise_release_sets_per_mode(Coordinator, mode)
    spec = json.loads(Path(spec_path).read_text())
    cfg = load_run_config(spec["overrides"])
    out_dir = Path(spec["out_dir"])
    init_from = None if spec["init_from"] == "registry" else spec["init_from"]
    trainer = Trainer(cfg, TrainJob(name="paired", stage=2, stage_cfg=cfg.stage2, out_dir=out_dir / "job",
                                    init_from=init_from))
    if trainer.engine.zero_optimization_stage() != 3:
        raise RuntimeError("the paired run needs ZeRO-3")
    schedule = [("off", True)] * spec["warmup"]
    for i in range(spec["pairs"]):
        schedule += [(g, False) for g in (("off", "on") if i % 2 == 0 else ("on", "off"))]
    batches, rows = iter(trainer.sampler), []
    for step, (gather, warmup) in enumerate(schedule, 1):
        trainer.model.gather_latent_passes = gather == "on"
        mode[0] = gather
        counts.update(calls=0, params=0, numel=0)
        metrics = trainer.train_step(batches)
        rows.append({"step": step, "gather": gather, "warmup": warmup, "allgather_calls": counts["calls"],
                     "params_gathered": counts["params"], "numel_gathered": counts["numel"],
                     **{key: metrics[key] for key in ("step_s", "forward_s", "backward_s", "loss")}})
    if trainer.dist.is_main:
        (out_dir / "paired.json").write_text(json.dumps(rows, indent=2) + "\n")


# ---- the HF Trainer worker (runs under torchrun) ----
def hf_worker(spec_path: str) -> None:
    """transformers.Trainer + DeepSpeed ZeRO-3 on the same backbone (same init), data and DeepSpeed settings as the
    K=0 point: answer-only CE through the HF model's own forward (labels on the answer tokens only)."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from storms_dist.config import to_dict
    from storms_dist.data.dataset import LatentCollator, VideoQADataset
    from storms_dist.data.manifest import read_manifest
    from storms_dist.data.preprocess import VisionSpec
    from storms_dist.model.build import apply_freezing, build_backbone, build_tokenizer, latent_token_ids
    from storms_dist.model.latent import IGNORE_INDEX
    from storms_dist.model.storms import STORMSModel
    from storms_dist.train.deepspeed_config import build_ds_config
    from storms_dist.train.flops import FlopsModel, peak_flops_per_device

    spec = json.loads(Path(spec_path).read_text())
    cfg = load_run_config(spec["overrides"])
    out_dir = Path(spec["out_dir"])
    init_from = None if spec["init_from"] == "registry" else spec["init_from"]
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    stage = cfg.stage2
    lr = stage.lr or cfg.optim.lr
    on_gpu = torch.cuda.is_available()

    tokenizer = build_tokenizer(init_from)
    model_cfg = type(cfg.model)(**{**to_dict(cfg.model), "init_from": init_from})
    backbone, registry_spec = build_backbone(model_cfg, tokenizer, seed=cfg.seed)  # what the storms Trainer builds
    holder = STORMSModel(backbone, registry_spec, latent_token_ids(tokenizer))
    apply_freezing(holder, stage.trainable)  # Stage II's trainable groups (vision tower frozen)
    flops = FlopsModel.from_model(holder, vision_trained=stage.trainable.vision)
    peak = peak_flops_per_device()
    bf16 = backbone.dtype == torch.bfloat16

    ds_config = build_ds_config(cfg.deepspeed, cfg.optim, micro_batch_size=stage.micro_batch_size,
                                grad_accum=stage.grad_accum, world_size=world_size, bf16=bf16)
    ds_config["optimizer"]["params"]["lr"] = lr
    if rank == 0:
        (out_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")

    dataset = VideoQADataset(read_manifest(cfg.data.manifest_path(stage.split)), tokenizer,
                             VisionSpec.from_hf_config(backbone.config), cfg.data)
    collate_k0 = LatentCollator(latent_token_ids(tokenizer), tokenizer.pad_token_id, 0)
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "labels", "pixel_values_videos", "video_grid_thw",
            "second_per_grid_ts")

    def collate(items):
        batch, _ = collate_k0(items)
        return {key: batch[key] for key in keys}

    training_args = TrainingArguments(
        output_dir=str(out_dir / "trainer"), per_device_train_batch_size=stage.micro_batch_size,
        gradient_accumulation_steps=stage.grad_accum, max_steps=spec["steps"], learning_rate=lr,
        adam_beta1=cfg.optim.betas[0], adam_beta2=cfg.optim.betas[1], adam_epsilon=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay, max_grad_norm=cfg.optim.grad_clip, lr_scheduler_type="constant",
        bf16=bf16, deepspeed=ds_config, seed=cfg.seed, data_seed=cfg.seed, remove_unused_columns=False,
        dataloader_num_workers=0, dataloader_drop_last=True, dataloader_pin_memory=on_gpu,
        logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True,
        ddp_backend="nccl" if on_gpu else "gloo",
        # CPU: accelerate treats DeepSpeed without CUDA as one process unless use_cpu (then MULTI_CPU + DeepSpeed)
        use_cpu=not on_gpu,
    )

    class Accounting:
        tokens = 0
        flops = 0.0
        loss = None

    acct = Accounting()

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs["attention_mask"]
            acct.tokens += int(mask.sum())
            supervised = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())  # the shifted CE's targets
            acct.flops += flops.step_flops(mask.cpu(), supervised, inputs["pixel_values_videos"].shape[0])
            loss = super().training_step(model, inputs, num_items_in_batch)
            acct.loss = float(loss)
            return loss

    class StepTimer(TrainerCallback):
        """step_s = wall time between consecutive optimizer-step ends (data, forward, backward, optimizer)."""

        def __init__(self):
            self.last = None

        def _now(self):
            if on_gpu:
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_begin(self, *a, **kw):
            self.last = self._now()

        def on_step_end(self, args_, state, control, **kw):
            now = self._now()
            step_s, self.last = now - self.last, now
            metrics = {"step": state.global_step, "step_s": step_s,
                       "samples_per_s": stage.micro_batch_size * stage.grad_accum * world_size / step_s,
                       "tokens_per_s": acct.tokens * world_size / step_s,
                       "tflops_per_device": acct.flops / step_s / 1e12}
            if peak is not None:
                metrics["mfu"] = acct.flops / step_s / peak
            metrics["loss"] = acct.loss
            acct.tokens, acct.flops = 0, 0.0
            if rank == 0:
                with open(out_dir / "train_log.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\n")

    trainer = CountingTrainer(model=backbone, args=training_args, train_dataset=dataset, data_collator=collate,
                              callbacks=[StepTimer()])
    trainer.train()
    if rank == 0:
        (out_dir / "summary.json").write_text(json.dumps({"steps": trainer.state.global_step}) + "\n")
    # an explicit teardown: left to interpreter exit, the gloo group and DeepSpeed's threads have aborted the
    # process after training ("terminate called without an active exception", SIGABRT)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("worker", choices=("init", "paired", "hf"))
    p.add_argument("path", help="init: the folder to write; paired / hf: the worker.json the parent wrote")
    p.add_argument("--backbone", choices=tuple(BACKBONES), default="qwen2_5_vl-3b-shaped", help="init only")
    args = p.parse_args(argv)
    if args.worker == "init":
        init_worker(args.backbone, Path(args.path))
    elif args.worker == "paired":
        paired_worker(args.path)
    else:
        hf_worker(args.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
