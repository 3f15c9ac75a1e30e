"""DeepSpeed configuration generated from our typed config (written to the run folder by the trainer)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
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
    zeropp_hpz_partition_size: int = 1
    """ZeRO++ hpZ: secondary parameter partition within a node (set to GPUs per node for multi-node; 1 = off)."""
    zeropp_quantized_weights: bool = False
    """ZeRO++ qwZ: int8-quantised weight all-gathers (multi-node bandwidth)."""
    zeropp_quantized_gradients: bool = False
    """ZeRO++ qgZ: quantised gradient reduce-scatter."""
    zeropp_preset: Literal["none", "hpz", "hpz_qwz", "zeropp"] = "none"
    """Named ZeRO++ settings for multi-node jobs (ZeRO-3 only): hpz = hpZ over the GPUs of a node (the
    rollout's K+2 re-gathers stay on NVLink); hpz_qwz = + int8 weight gathers; zeropp = + int4 gradient
    reduce-scatter (qgZ). The node size is the job's LOCAL_WORLD_SIZE. The zeropp_* fields must stay at their
    defaults when a preset is chosen."""
    autotp_size: int = 1
    """DeepSpeed AutoTP degree (``tensor_parallel.autotp_size``): the decoder's linears are sharded over this many
    ranks of a node (from the HF tp_plan), ZeRO partitions over world / autotp_size. 1 = off."""
    gather_latent_passes: bool = False
    """Keep the decoder's parameters gathered across the K+2 rollout passes (one all-gather instead of K+2);
    costs the memory of the full decoder on every rank while the rollout runs. ZeRO-3 only."""
    user_config: str | None = None
    """A DeepSpeed JSON whose keys are added to the generated config. A key that sets something our config
    already decides (batch sizes, optimizer, ZeRO stage...) to a different value is an error, not a silent merge."""

    def __post_init__(self):
        if self.offload_params != "none" and self.zero_stage != 3:
            raise ValueError(f"offload_params: parameter offload needs zero_stage 3, got zero_stage {self.zero_stage}")
        if self.zeropp_hpz_partition_size < 1:
            raise ValueError(f"zeropp_hpz_partition_size: expected >= 1, got {self.zeropp_hpz_partition_size}")
        if self.zeropp_preset != "none" and (self.zero_stage != 3 or self.zeropp_hpz_partition_size != 1
                                             or self.zeropp_quantized_weights or self.zeropp_quantized_gradients):
            raise ValueError(f"zeropp_preset: {self.zeropp_preset!r} needs zero_stage 3 and the zeropp_* fields at "
                             "their defaults (the preset sets them)")
        if self.autotp_size < 1:
            raise ValueError(f"autotp_size: expected >= 1, got {self.autotp_size}")
        if self.user_config is not None and not Path(self.user_config).is_file():
            raise ValueError(f"user_config: {self.user_config!r} does not exist (expected a DeepSpeed JSON file)")


ZEROPP_PRESETS = {"none": (False, False, False), "hpz": (True, False, False), "hpz_qwz": (True, True, False),
                  "zeropp": (True, True, True)}


def zeropp_settings(cfg: DeepSpeedConfig, gpus_per_node: int) -> tuple[int, bool, bool]:
    """(hpZ partition size, quantised weights, quantised gradients) after resolving the named preset."""
    if cfg.zeropp_preset == "none":
        return cfg.zeropp_hpz_partition_size, cfg.zeropp_quantized_weights, cfg.zeropp_quantized_gradients
    hpz, qw, qg = ZEROPP_PRESETS[cfg.zeropp_preset]
    return (gpus_per_node if hpz else 1), qw, qg


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
    # the node size a preset's hpZ spans: torchrun and submitit export LOCAL_WORLD_SIZE for every rank
    hpz, quantized_weights, quantized_gradients = zeropp_settings(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if cfg.zero_stage == 3 and hpz > 1:
        zero["zero_hpz_partition_size"] = hpz
    if cfg.zero_stage == 3 and quantized_weights:
        zero["zero_quantized_weights"] = True
    if cfg.zero_stage == 3 and quantized_gradients:
        zero["zero_quantized_gradients"] = True
    if cfg.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": cfg.offload_optimizer}
    if cfg.offload_params != "none":
        zero["offload_param"] = {"device": cfg.offload_params}
    generated = {
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
        **({"tensor_parallel": {"autotp_size": cfg.autotp_size}} if cfg.autotp_size > 1 else {}),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.autotp_size > 1:
        # DeepSpeed 0.19.8 checks train_batch_size against all ranks when it first reads the config and against
        # the data-parallel ranks once AutoTP has built its groups; left out, it derives it each time
        del generated["train_batch_size"]
    if cfg.user_config is None:
        return generated
    user = json.loads(Path(cfg.user_config).read_text())
    return merge_user_config(generated, user, source=cfg.user_config)


def merge_user_config(generated: dict[str, Any], user: dict[str, Any], *, source: str, _path: str = "") -> dict[str, Any]:
    """Add the user's keys; the same key with a different value (our config decides it) raises ValueError."""
    merged = dict(generated)
    for key, value in user.items():
        where = f"{_path}.{key}" if _path else key
        if key not in merged or value == "auto":
            if value != "auto":
                merged[key] = value
        elif isinstance(value, dict) and isinstance(merged[key], dict):
            merged[key] = merge_user_config(merged[key], value, source=source, _path=where)
        elif value != merged[key]:
            raise ValueError(f"{source}: {where}={value!r} conflicts with the value our config generates "
                             f"({merged[key]!r}); set it through the storms config instead (e.g. deepspeed.*, "
                             f"optim.*, stageN.micro_batch_size) or drop it from the JSON")
    return merged
