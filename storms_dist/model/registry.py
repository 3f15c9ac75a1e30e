"""Backbone registry: one entry per backbone, naming its checkpoint (or tiny random-init config) and module keys.

The module keys (vision / merger / language model) drive freezing and learning-rate groups, LLaMA-Factory style:
a parameter belongs to the first group whose key prefixes its name. Tiny entries build a random-init model from a
config (no hub access at run time); real entries name the checkpoints clusters load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Family = Literal["qwen2_5_vl", "qwen3_vl"]
ModuleGroup = Literal["vision", "merger", "embed", "lm"]


@dataclass(frozen=True, kw_only=True)
class BackboneSpec:
    name: str
    family: Family
    checkpoint: str | None = None
    """Hugging Face id or local path of a pretrained checkpoint; None = random init from ``tiny_config``."""
    tiny_config: dict[str, Any] | None = None
    """Kwargs for the family's config class (text_config / vision_config dicts), random-init backbones only."""
    vision_keys: tuple[str, ...]
    merger_keys: tuple[str, ...]
    embed_keys: tuple[str, ...] = ("model.language_model.embed_tokens.", "lm_head.")
    """Token embeddings and output head (tied in small Qwen models): the vocabulary-sized matrices."""
    lm_keys: tuple[str, ...] = ("model.language_model.",)
    num_params_b: float | None = None
    """Nominal size in billions, for scaling-study tables."""
    published_config: dict[str, Any] | None = None
    """The shape fields of the checkpoint's published config.json (text_config / vision_config), so that
    ``storms plan`` can build the architecture on the meta device without hub access. Not used for loading."""

    def group_of(self, param_name: str) -> ModuleGroup:
        # specific keys first: the merger sits under the vision prefix, the embeddings under the LM prefix
        for group, keys in (("merger", self.merger_keys), ("vision", self.vision_keys), ("embed", self.embed_keys),
                            ("lm", self.lm_keys)):
            if any(param_name.startswith(k) for k in keys):
                return group  # type: ignore[return-value]
        raise KeyError(f"parameter {param_name!r} matches no module key of backbone {self.name!r}")


_QWEN25_VISION = ("model.visual.",)
_QWEN25_MERGER = ("model.visual.merger.",)
_QWEN3_VISION = ("model.visual.",)
_QWEN3_MERGER = ("model.visual.merger.", "model.visual.deepstack_merger_list.")


def _tiny_text(hidden: int, num_layers: int, mrope_section: list[int], **extra: Any) -> dict[str, Any]:
    return dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section, **extra},
        **({"head_dim": hidden // 4} if "mrope_interleaved" in extra else {}),
    )


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get_backbone(name: str) -> BackboneSpec:
    if name not in _REGISTRY:
        raise ValueError(f"model.backbone: unknown backbone {name!r}; valid choices: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def backbone_names() -> list[str]:
    return list(_REGISTRY)


def _tiny(family: Family, size: str, *, hidden: int, num_layers: int, vision_depth: int) -> BackboneSpec:
    """A random-init backbone of the family's architecture: text ``hidden`` wide, vision half as wide."""
    head_dim = hidden // 4
    vision = dict(depth=vision_depth, hidden_size=hidden // 2, intermediate_size=hidden, num_heads=max(2, hidden // 32),
                  out_hidden_size=hidden, temporal_patch_size=2, spatial_merge_size=2)
    if family == "qwen2_5_vl":  # mrope sections (t, h, w) sum to head_dim / 2
        text = _tiny_text(hidden, num_layers, [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16])
        # temporal rope units per second: the real checkpoints' 2 suits ~2 fps sampling; the demo's clips are 8 fps
        # (0.25 s per temporal patch), where 2 gives two consecutive temporal patches the same position
        vision.update(patch_size=14, window_size=56, fullatt_block_indexes=list(range(1, vision_depth, 2)),
                      tokens_per_second=8)
        keys = dict(vision_keys=_QWEN25_VISION, merger_keys=_QWEN25_MERGER)
    else:
        text = _tiny_text(hidden, num_layers, [head_dim // 4, head_dim // 8, head_dim // 8], mrope_interleaved=True)
        vision.update(patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[vision_depth // 2 - 1
                                                                                           if vision_depth > 2 else 0])
        keys = dict(vision_keys=_QWEN3_VISION, merger_keys=_QWEN3_MERGER)
    return BackboneSpec(name=f"{family}-{size}", family=family, **keys,
                        tiny_config=dict(text_config=text, vision_config=vision, tie_word_embeddings=True))


# Tiny random-init backbones: the CPU demo (tiny) and the unit / 2-rank tests (micro: fast collectives).
for _family in ("qwen2_5_vl", "qwen3_vl"):
    register(_tiny(_family, "tiny", hidden=128, num_layers=4, vision_depth=4))
    register(_tiny(_family, "micro", hidden=64, num_layers=2, vision_depth=2))
# Wider / deeper random-init shapes for CPU scaling studies and the planner's validation (issue 10): one grows the
# width (activations and matmuls), the other the depth (layers, per-layer gathers).
register(_tiny("qwen2_5_vl", "wide", hidden=256, num_layers=4, vision_depth=4))
register(_tiny("qwen2_5_vl", "deep", hidden=128, num_layers=12, vision_depth=4))


def _text(hidden, layers, heads, kv, inter, vocab, tied, head_dim=None):
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                intermediate_size=inter, vocab_size=vocab, tie_word_embeddings=tied,
                **({"head_dim": head_dim} if head_dim else {}))


# Published config.json shape fields (Hugging Face model cards' config.json of each -Instruct checkpoint).
_Q25_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
_Q25_TEXT = {"3B": _text(2048, 36, 16, 2, 11008, 151936, True), "7B": _text(3584, 28, 28, 4, 18944, 152064, False),
             "32B": _text(5120, 64, 40, 8, 27648, 152064, False), "72B": _text(8192, 80, 64, 8, 29568, 152064, False)}
_Q3_VISION_S = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    deepstack_visual_indexes=[5, 11, 17])
_Q3_VISION_L = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    deepstack_visual_indexes=[8, 16, 24])
_Q3 = {"2B": (_text(2048, 28, 16, 8, 6144, 151936, True, 128), _Q3_VISION_S),
       "4B": (_text(2560, 36, 32, 8, 9728, 151936, True, 128), _Q3_VISION_S),
       "8B": (_text(4096, 36, 32, 8, 12288, 151936, False, 128), _Q3_VISION_L),
       "32B": (_text(5120, 64, 64, 8, 25600, 151936, False, 128), _Q3_VISION_L)}


def _published(text: dict, vision: dict) -> dict[str, Any]:
    return dict(text_config=text, vision_config={**vision, "out_hidden_size": text["hidden_size"]},
                tie_word_embeddings=text["tie_word_embeddings"])


# Real checkpoints (clusters). Sizes are the published ones.
for _size, _b in (("3B", 3.75), ("7B", 8.29), ("32B", 33.5), ("72B", 73.4)):
    register(BackboneSpec(name=f"qwen2_5_vl-{_size.lower()}", family="qwen2_5_vl",
                          checkpoint=f"Qwen/Qwen2.5-VL-{_size}-Instruct", vision_keys=_QWEN25_VISION,
                          merger_keys=_QWEN25_MERGER, num_params_b=_b,
                          published_config=_published(_Q25_TEXT[_size], _Q25_VISION)))
for _size, _b in (("2B", 2.1), ("4B", 4.4), ("8B", 8.8), ("32B", 33.4)):
    register(BackboneSpec(name=f"qwen3_vl-{_size.lower()}", family="qwen3_vl",
                          checkpoint=f"Qwen/Qwen3-VL-{_size}-Instruct", vision_keys=_QWEN3_VISION,
                          merger_keys=_QWEN3_MERGER, num_params_b=_b,
                          published_config=_published(*_Q3[_size])))
