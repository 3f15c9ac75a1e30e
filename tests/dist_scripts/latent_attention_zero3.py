"""Run under torchrun (2 ranks, gloo): two ZeRO-3 training steps of the rollout with model.latent_attention off and
torch, same data per rank; rank 0 prints one JSON line with both loss curves and a gathered weight checksum each."""

from __future__ import annotations

import json
import os
import sys

import deepspeed
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

from test_model import make_batch  # noqa: E402  (the model tests' batch builder)

from storms_dist.model.build import ModelConfig, build_model, build_tokenizer  # noqa: E402

deepspeed.init_distributed(dist_backend="gloo")
rank = torch.distributed.get_rank()
tokenizer = build_tokenizer()
result = {}
for mode in ("off", "torch"):
    model = build_model(ModelConfig(backbone="qwen2_5_vl-micro", dtype="float32", latent_attention=mode),
                        tokenizer, seed=0)
    model.sync_ranks = True
    batch, layout = make_batch(model, tokenizer, num_latents=3, seed=rank)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              # persistence 0: every parameter is partitioned and gathered per module call, as on a large model
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    losses = []
    for _ in range(2):
        out = engine(batch, layout, mode="rollout")
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
    weight = engine.module.backbone.model.language_model.layers[0].self_attn.k_proj.weight
    with deepspeed.zero.GatheredParameters([weight]):
        checksum = float(weight.double().sum())
    result[mode] = dict(losses=losses, checksum=checksum)
if rank == 0:
    print(json.dumps(result), flush=True)
# Join the process group's threads before exit: a rank once aborted at exit ("terminate called without an active
# exception", CI 2026-12-03), which then left its port in use for the next test.
torch.distributed.barrier()
torch.distributed.destroy_process_group()
