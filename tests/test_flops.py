"""The FLOPs formula against a hand count, and against the model's own parameter inventory."""

import torch

from storms_dist.model.build import ModelConfig, build_model
from storms_dist.train.flops import FlopsModel


def test_step_flops_hand_count():
    flops = FlopsModel(num_lm_params=1000, num_vision_params=50, hidden_size=8, num_layers=2, vocab_size=100,
                       vision_trained=False)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])  # 3 and 4 attended tokens
    decoder = (2 * 1000 * 3 + 4 * 8 * 2 * 3 * 4 / 2) + (2 * 1000 * 4 + 4 * 8 * 2 * 4 * 5 / 2)
    head = 2 * 100 * 8 * 5
    assert flops.step_flops(mask, num_supervised=5, num_patches=10) == 3 * (decoder + head) + 1 * 2 * 50 * 10
    trained = FlopsModel(**{**flops.__dict__, "vision_trained": True})
    assert trained.step_flops(mask, 5, 10) - flops.step_flops(mask, 5, 10) == 2 * (2 * 50 * 10)


def test_parameter_inventory_splits_groups(tokenizer):
    model = build_model(ModelConfig(backbone="qwen2_5_vl-micro"), tokenizer)
    flops = FlopsModel.from_model(model, vision_trained=False)
    total = sum(p.numel() for p in model.parameters())
    embed = model.backbone.get_input_embeddings().weight.numel()  # tied with the head: counted once
    assert flops.num_lm_params + flops.num_vision_params + embed == total
    assert flops.vocab_size == len(tokenizer) and flops.hidden_size == 64
