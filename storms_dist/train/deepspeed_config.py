"""DeepSpeed configuration generated from our typed config (written to the run folder by the trainer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from storms_dist.train.optim import OptimConfig


@dataclass(kw_only=True)
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 3
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_params: Literal["none", "cpu"] = "none"
    overlap_comm: bool = False
    reduce_bucket_size: int = 50_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    """Parameters smaller than this stay gathered on every rank (no all-gather per forward)."""
    stage3_max_live_parameters: int = 1_000_000_000
    stage3_max_reuse_distance: int = 1_000_000_000

    def __post_init__(self):
        if self.offload_params != "none" and self.zero_stage != 3:
            raise ValueError(f"offload_params: parameter offload needs zero_stage 3, got zero_stage {self.zero_stage}")


def build_ds_config(
    cfg: DeepSpeedConfig,
    optim: OptimConfig,
    *,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    bf16: bool,
) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 2:
        zero.update(overlap_comm=cfg.overlap_comm, reduce_bucket_size=cfg.reduce_bucket_size)
    if cfg.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=cfg.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=cfg.stage3_param_persistence_threshold,
            stage3_max_live_parameters=cfg.stage3_max_live_parameters,
            stage3_max_reuse_distance=cfg.stage3_max_reuse_distance,
            stage3_gather_16bit_weights_on_model_save=False,
        )
    if cfg.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": cfg.offload_optimizer}
    if cfg.offload_params != "none":
        zero["offload_param"] = {"device": cfg.offload_params}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": optim.grad_clip,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        # torch's AdamW: no JIT-compiled op (DeepSpeed's FusedAdam/CPUAdam need a ~50 s C++ build on first use)
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
                       "weight_decay": optim.weight_decay, "torch_adam": True},
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
