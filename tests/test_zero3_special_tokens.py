"""Special-token rows under ZeRO-3: the weights are partitioned (empty outside a gather), so the mean-of-vocabulary
initialisation must run inside GatheredParameters and survive re-partitioning."""

from __future__ import annotations

import deepspeed
import torch

from storms_dist.model.build import ModelConfig, build_model, init_latent_token_rows, latent_token_ids
from storms_dist.model.latent import LATENT_TOKENS
from storms_dist.train.distributed import init_distributed


def test_latent_rows_initialised_inside_gathered_parameters(tokenizer):
    init_distributed()
    model = build_model(ModelConfig(backbone="qwen2_5_vl-micro", dtype="float32"), tokenizer, seed=0)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3,
              "stage3_param_persistence_threshold": 0},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    weight = engine.module.backbone.get_input_embeddings().weight
    assert weight.numel() == 0 and hasattr(weight, "ds_id")  # partitioned: nothing to write into directly

    ids = latent_token_ids(tokenizer)
    num_original = tokenizer.convert_tokens_to_ids(LATENT_TOKENS[0])
    with deepspeed.zero.GatheredParameters([weight], modifier_rank=0), torch.no_grad():
        weight[[ids.start, ids.pad, ids.end]] = 7.0  # scribble, so the init below must really write
    init_latent_token_rows(engine.module.backbone, ids, num_original)

    with deepspeed.zero.GatheredParameters([weight]):
        full = weight.detach().clone()
    expected = full[:num_original].mean(dim=0)
    for row in (ids.start, ids.pad, ids.end):
        torch.testing.assert_close(full[row], expected)
    assert engine.module.backbone.get_input_embeddings().weight.numel() == 0  # re-partitioned afterwards
