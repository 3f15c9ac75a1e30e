"""Training FLOPs of a STORMS step and the MFU estimate (the formula the logs and docs/benchmarks.md use).

Per row with n attended tokens (prompt + video + K latent slots + answer; the rollout processes each exactly once,
so latent passes cost what K extra tokens cost):

    decoder forward   = 2 * N_lm * n  +  4 * d * num_layers * n (n + 1) / 2        (matmuls + causal attention)
    lm head forward   = 2 * V * d * num_supervised_tokens                             (only answer columns are projected)
    vision forward    = 2 * N_vision * num_patches                                    (attention of the ViT omitted)

A training step is 3x forward (backward = 2x forward) for everything that is trained or lies on the gradient path
(the decoder and the head always), 1x for a frozen vision tower (no gradient flows into it). N_lm excludes the
embedding/head matrices, which are counted by the lm-head term. MFU = achieved FLOP/s per device / peak FLOP/s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                    "B200": 2250.0}
"""Dense bf16 tensor-core peaks (NVIDIA datasheets, SXM parts)."""


@dataclass(frozen=True)
class FlopsModel:
    num_lm_params: int
    num_vision_params: int
    hidden_size: int
    num_layers: int
    vocab_size: int
    vision_trained: bool

    @classmethod
    def from_model(cls, model, *, vision_trained: bool) -> "FlopsModel":
        counts = {"vision": 0, "merger": 0, "embed": 0, "lm": 0}
        for name, param in model.backbone.named_parameters():
            counts[model.spec.group_of(name)] += param.ds_numel if hasattr(param, "ds_numel") else param.numel()
        text = model.text_config
        return cls(num_lm_params=counts["lm"], num_vision_params=counts["vision"] + counts["merger"],
                   hidden_size=text.hidden_size, num_layers=text.num_hidden_layers, vocab_size=text.vocab_size,
                   vision_trained=vision_trained)

    def step_flops(self, attention_mask_BL: torch.Tensor, num_supervised: int, num_patches: int) -> float:
        tokens_B = attention_mask_BL.sum(dim=1).double()
        decoder = float((2 * self.num_lm_params * tokens_B
                         + 4 * self.hidden_size * self.num_layers * tokens_B * (tokens_B + 1) / 2).sum())
        head = 2.0 * self.vocab_size * self.hidden_size * num_supervised
        vision = 2.0 * self.num_vision_params * num_patches
        return 3 * (decoder + head) + (3 if self.vision_trained else 1) * vision


def peak_flops_per_device() -> float | None:
    """bf16 peak of the local GPU by name, or None (CPU / unknown part: MFU is not reported)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for part, tflops in PEAK_TFLOPS_BF16.items():
        if part in name:
            return tflops * 1e12
    return None
