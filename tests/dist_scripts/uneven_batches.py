"""Run under torchrun with 2 ranks: every step gives the ranks deliberately different batches (a different K, one
rank without any video, different frame counts). With the model's rank synchronisation the steps complete; with
--no-sync the collectives diverge and the (short) process-group timeout fires instead of hanging forever."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta

import deepspeed
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

import test_model  # noqa: E402
from test_model import make_batch  # noqa: E402  (the model tests' batch builder)

from storms_dist.model.build import ModelConfig, build_model, build_tokenizer, latent_token_ids  # noqa: E402
from storms_dist.model.latent import collate_latent_batch  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--no-sync", action="store_true")
args = parser.parse_args()
deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=20 if args.no_sync else 300))
rank = torch.distributed.get_rank()
tokenizer = build_tokenizer()
model = build_model(ModelConfig(backbone="qwen2_5_vl-micro", dtype="float32"), tokenizer, seed=0)
model.sync_ranks = not args.no_sync
config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}, "steps_per_print": 10**9}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)


def text_only_batch(num_latents: int):
    """Prompts without any video placeholder: this rank has no pixels at all."""
    prompts = [[11, 12, 13, 14], [15, 16]]
    answers = [[33, tokenizer.convert_tokens_to_ids("<|im_end|>")]] * 2
    return collate_latent_batch(prompts, [[0] * len(p) for p in prompts], answers, num_latents=num_latents,
                                ids=latent_token_ids(tokenizer), pad_id=tokenizer.pad_token_id)


# (rank 0, rank 1) per step: ("video", grids, K) or ("text", K)
PLAN = [
    (("video", [(2, 4, 4), (2, 4, 6)], 2), ("text", 4)),
    (("video", [(2, 4, 4), (2, 4, 4)], 1), ("video", [(4, 4, 4), (6, 4, 4)], 3)),
    (("text", 1), ("video", [(2, 4, 6), (2, 4, 4)], 1)),
]
for step, plan in enumerate(PLAN):
    kind, *spec = plan[rank]
    if kind == "video":
        grids, num_latents = spec
        test_model.GRIDS_THW = grids
        batch, layout = make_batch(model, tokenizer, num_latents, seed=step)
    else:
        batch, layout = text_only_batch(spec[0])
    out = engine(batch, layout, mode="rollout")
    engine.backward(out.loss)
    engine.step()
    assert torch.isfinite(out.loss), out.loss
if not args.no_sync:  # K=0 on one rank and K>0 on the other cannot be matched: every rank raises, none hangs
    test_model.GRIDS_THW = [(2, 4, 4), (2, 4, 4)]
    batch, layout = make_batch(model, tokenizer, 0 if rank == 0 else 2, seed=9)
    try:
        engine(batch, layout, mode="rollout")
        raise AssertionError("mixed K=0 / K>0 was not rejected")
    except ValueError as error:
        assert "mix K=0" in str(error), error
torch.distributed.barrier()
if rank == 0:
    print("uneven batches: 3 steps ok", flush=True)
