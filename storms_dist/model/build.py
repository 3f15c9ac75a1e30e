"""Build, export and reload STORMS models: backbone from the registry, latent tokens, freezing and LR groups."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from storms_dist.model.latent import LATENT_TOKENS, AlignLoss, LatentTokenIds
from storms_dist.model.latent_cache import LATENT_ATTENTION_CHOICES, LatentAttention
from storms_dist.model.registry import BackboneSpec, ModuleGroup, backbone_names, get_backbone
from storms_dist.model.storms import STORMSModel

LATENT_SETTINGS_FILE = "storms_latent.json"


@dataclass(kw_only=True)
class ModelConfig:
    backbone: str = "qwen2_5_vl-tiny"
    """Registry name (``storms_dist.model.registry``): tiny random-init entries or real checkpoints."""
    init_from: str | None = None
    """An exported STORMS/HF folder to start from (overrides the registry checkpoint), e.g. the Stage 0 export."""
    num_latents: int = 8
    """K, latent steps per answer; 0 = answer-only SFT baseline."""
    max_latents: int = 16
    """Upper bound on K at inference (K may differ from training)."""
    align_loss: AlignLoss = "mse"
    align_weight: float = 0.1
    """lambda in  loss = CE(answer) + lambda * align."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """auto = flash_attention_2 when flash-attn is installed and a GPU is present, else sdpa."""
    latent_attention: LatentAttention = "off"
    """Attention of the rollout's passes after the prefill. off = HF's DynamicCache (each pass copies the prefix
    K/V, and backward keeps every copy); auto / triton / torch = the prefix stored once, storms_dist.kernels
    latent_attention on that backend (auto: the Triton kernel on CUDA, the torch reference elsewhere)."""
    activation_checkpointing: bool = False
    """Recompute activations in backward. The vision tower always; decoder layers only in single-pass modes,
    because HF layer checkpointing drops the KV cache the latent rollout carries across passes."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto = bfloat16 on GPU, float32 on CPU."""

    def __post_init__(self):
        if self.backbone not in backbone_names():
            raise ValueError(f"backbone: unknown {self.backbone!r}; valid choices: {', '.join(backbone_names())}")
        if not 0 <= self.num_latents <= self.max_latents:
            raise ValueError(f"num_latents: expected 0 <= num_latents <= max_latents ({self.max_latents}), "
                             f"got {self.num_latents}")
        if self.latent_attention not in LATENT_ATTENTION_CHOICES:
            raise ValueError(f"latent_attention: {self.latent_attention!r} is not a valid choice; valid choices: "
                             f"{', '.join(map(repr, LATENT_ATTENTION_CHOICES))}")
        if self.align_weight < 0:
            raise ValueError(f"align_weight: expected >= 0, got {self.align_weight}")


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _flash_attn_importable() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_attn_implementation(name: str) -> str:
    if name == "flash_attention_2" and not (torch.cuda.is_available() and _flash_attn_importable()):
        raise ValueError("model.attn_implementation: flash_attention_2 needs a CUDA GPU and the flash-attn package "
                         "(pip install -e '.[flash]' on the GPU machine); use auto or sdpa here")
    if name != "auto":
        return name
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def latent_token_ids(tokenizer) -> LatentTokenIds:
    ids = tokenizer.convert_tokens_to_ids(list(LATENT_TOKENS))
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ValueError(f"tokenizer lacks the latent tokens {LATENT_TOKENS}; load it with build_tokenizer()")
    return LatentTokenIds(*ids)


def build_tokenizer(path: str | Path | None = None):
    """The Qwen tokenizer with the three latent tokens added (from an export folder when ``path`` is given)."""
    if path is not None and (Path(path) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
        latent_token_ids(tokenizer)  # validates
        return tokenizer
    from storms_dist.data.prompt import load_tokenizer

    return load_tokenizer(extra_special_tokens=LATENT_TOKENS)


def _hf_classes(family: str):
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    if family == "qwen3_vl":
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        return Qwen3VLConfig, Qwen3VLForConditionalGeneration
    raise ValueError(f"unknown backbone family {family!r}")


def tiny_hf_config(spec: BackboneSpec, tokenizer) -> Any:
    """HF config of a random-init registry backbone, with the vocabulary and special ids of ``tokenizer``."""
    config_cls, _ = _hf_classes(spec.family)
    ids = tokenizer.convert_tokens_to_ids
    kwargs = {k: (dict(v) if isinstance(v, dict) else v) for k, v in spec.tiny_config.items()}
    kwargs["text_config"] = dict(
        kwargs["text_config"], vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        eos_token_id=ids("<|im_end|>"), bos_token_id=None,
    )
    return config_cls(
        **kwargs,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def init_latent_token_rows(backbone: nn.Module, token_ids: LatentTokenIds, num_original_rows: int) -> None:
    """Set the latent tokens' embedding (and untied output) rows to the mean of the original vocabulary's rows.

    Under ZeRO-3 the rows are partitioned: gather them, modify on rank 0, and let DeepSpeed re-partition.
    """
    tensors = [backbone.get_input_embeddings().weight]
    out = backbone.get_output_embeddings()
    if out is not None and out.weight is not tensors[0]:
        tensors.append(out.weight)
    rows = torch.tensor([token_ids.start, token_ids.pad, token_ids.end])
    partitioned = any(hasattr(t, "ds_id") for t in tensors)
    if partitioned:
        import deepspeed

        context = deepspeed.zero.GatheredParameters(tensors, modifier_rank=0)
    else:
        from contextlib import nullcontext

        context = nullcontext()
    with context, torch.no_grad():
        for weight in tensors:
            weight[rows] = weight[:num_original_rows].mean(dim=0, keepdim=True).to(weight.dtype)


def build_backbone(cfg: ModelConfig, tokenizer, *, seed: int = 0) -> tuple[nn.Module, BackboneSpec]:
    """The HF backbone: loaded from ``init_from`` / the registry checkpoint, or random-init from the tiny config."""
    spec = get_backbone(cfg.backbone)
    _, model_cls = _hf_classes(spec.family)
    dtype = resolve_dtype(cfg.dtype)
    attn = resolve_attn_implementation(cfg.attn_implementation)
    source = cfg.init_from or spec.checkpoint
    if source is not None:
        backbone = model_cls.from_pretrained(source, dtype=dtype, attn_implementation=attn)
        num_original = tokenizer.convert_tokens_to_ids(LATENT_TOKENS[0])  # latent tokens were appended last
        if backbone.get_input_embeddings().weight.shape[0] < len(tokenizer):
            backbone.resize_token_embeddings(len(tokenizer))
        if not (Path(source) / LATENT_SETTINGS_FILE).is_file():  # a STORMS export already has trained rows
            init_latent_token_rows(backbone, latent_token_ids(tokenizer), num_original)
    else:
        config = tiny_hf_config(spec, tokenizer)
        config._attn_implementation = attn
        torch.manual_seed(seed)
        backbone = model_cls(config).to(dtype)
        init_latent_token_rows(backbone, latent_token_ids(tokenizer),
                               tokenizer.convert_tokens_to_ids(LATENT_TOKENS[0]))
    if cfg.activation_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return backbone, spec


def build_model(cfg: ModelConfig, tokenizer, *, seed: int = 0) -> STORMSModel:
    backbone, spec = build_backbone(cfg, tokenizer, seed=seed)
    model = STORMSModel(backbone, spec, latent_token_ids(tokenizer), align_loss=cfg.align_loss,
                        align_weight=cfg.align_weight)
    model.latent_attention = cfg.latent_attention
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[model {cfg.backbone}] attention: {describe_attention(model)}", flush=True)
    return model


def describe_attention(model: STORMSModel) -> str:
    """Which implementation runs where (printed at start-up): vision tower, text decoder, the rollout's passes."""
    config = model.backbone.config
    text = config.text_config._attn_implementation
    if model.latent_attention == "off":
        passes = f"DynamicCache + {text}"
    else:
        from storms_dist.kernels._backend import triton_available

        kernel = model.latent_attention
        if kernel == "auto":
            kernel = "triton" if torch.cuda.is_available() and triton_available() else "torch reference"
        passes = f"storms_latent (prefix K/V once) -> latent_attention {kernel}"
    return (f"vision tower {config.vision_config._attn_implementation}; text decoder {text}; "
            f"rollout passes after the prefill: {passes}")


# ---- freezing and LR groups, driven by the registry's module keys ----
@dataclass(kw_only=True)
class TrainableConfig:
    vision: bool = False
    """Train the vision tower (frozen in the paper; Stage 0 trains it from scratch)."""
    merger: bool = True
    embed: bool = True
    """Token embeddings + output head. Vocabulary-sized: on the CPU demo they dominate step time."""
    lm: bool = True
    vision_lr_scale: float = 0.1
    merger_lr_scale: float = 1.0
    embed_lr_scale: float = 1.0

    def __post_init__(self):
        if not (self.vision or self.merger or self.embed or self.lm):
            raise ValueError("trainable: at least one of vision / merger / embed / lm must be true")
        for name in ("vision_lr_scale", "merger_lr_scale", "embed_lr_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"trainable.{name}: expected > 0, got {getattr(self, name)}")


def apply_freezing(model: STORMSModel, trainable: TrainableConfig) -> dict[ModuleGroup, int]:
    """Set requires_grad per module group; returns the number of trainable parameters per group."""
    counts: dict[ModuleGroup, int] = {"vision": 0, "merger": 0, "embed": 0, "lm": 0}
    for name, param in model.backbone.named_parameters():
        group = model.spec.group_of(name)
        param.requires_grad_(bool(getattr(trainable, group)))
        if param.requires_grad:
            counts[group] += param.ds_numel if hasattr(param, "ds_numel") else param.numel()
    return counts


def param_groups(model: STORMSModel, *, lr: float, weight_decay: float, trainable: TrainableConfig) -> list[dict]:
    """AdamW groups: (vision | merger | embed | lm) x (decay | no decay); biases, norms, embeddings: no decay."""
    scales = {"vision": trainable.vision_lr_scale, "merger": trainable.merger_lr_scale,
              "embed": trainable.embed_lr_scale, "lm": 1.0}
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.backbone.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim < 2 or "norm" in name or "embed" in name or name.endswith(".bias")
        buckets.setdefault((model.spec.group_of(name), no_decay), []).append(param)
    return [
        {"params": params, "lr": lr * scales[group], "weight_decay": 0.0 if no_decay else weight_decay,
         "name": f"{group}{'_no_decay' if no_decay else ''}"}
        for (group, no_decay), params in sorted(buckets.items())
    ]


# ---- export / reload ----
def export_model(model: STORMSModel, tokenizer, out_dir: str | Path, *, num_latents: int, max_latents: int,
                 state_dict: dict[str, torch.Tensor] | None = None, extra: dict | None = None,
                 data: dict | None = None) -> Path:
    """``save_pretrained`` folder (transformers loads it back), the processor configs and chat template
    (``model/processor_files.py``), plus our latent-token settings.

    ``data``: the run's ``DataConfig`` as a dict (``config.to_dict``), whose pixel budget and frame sampling the
    processor configs record; default: the built-in ``DataConfig``. It is also kept in ``storms_latent.json``.
    """
    from storms_dist.config import to_dict
    from storms_dist.data.dataset import DataConfig
    from storms_dist.data.preprocess import VisionSpec
    from storms_dist.model.processor_files import write_processor_files

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = to_dict(DataConfig()) if data is None else data
    model.backbone.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    write_processor_files(out_dir, VisionSpec.from_hf_config(model.backbone.config), min_pixels=data["min_pixels"],
                          max_pixels=data["max_pixels"], frames=data["frames"],
                          system_prompt=data.get("system_prompt", True))
    write_latent_settings(model, out_dir, num_latents=num_latents, max_latents=max_latents,
                          extra={**(extra or {}), "data": data})
    return out_dir


def write_latent_settings(model: STORMSModel, out_dir: Path, *, num_latents: int, max_latents: int,
                          extra: dict | None = None) -> None:
    ids = model.token_ids
    settings = {
        "backbone": model.spec.name,
        "family": model.spec.family,
        "latent_tokens": dict(zip(("start", "pad", "end"), LATENT_TOKENS)),
        "latent_token_ids": {"start": ids.start, "pad": ids.pad, "end": ids.end},
        "num_latents": num_latents,
        "max_latents": max_latents,
        "align_loss": model.align_loss,
        "align_weight": model.align_weight,
        # plain transformers >= 5.3 places text after a long video elsewhere: pass position_ids from this rule
        "mrope_rule": "segment_starts_at_max_plus_one (storms_dist.model.mrope.mrope_positions)",
        **(extra or {}),
    }
    (Path(out_dir) / LATENT_SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")


def export_from_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """Consolidate a (ZeRO-3, any world size) training checkpoint into an export, without an engine.

    ``checkpoint_dir`` is a job's ``checkpoints/<tag>`` folder (or the job's ``checkpoints`` folder: its latest).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForImageTextToText

    checkpoint_dir = Path(checkpoint_dir)
    if (checkpoint_dir / "latest").is_file():
        checkpoint_dir = checkpoint_dir / (checkpoint_dir / "latest").read_text().strip()
    meta = checkpoint_dir / "meta"
    if not (meta / LATENT_SETTINGS_FILE).is_file():
        raise FileNotFoundError(f"{checkpoint_dir}: not a STORMS training checkpoint (missing meta/{LATENT_SETTINGS_FILE})")
    settings = read_latent_settings(meta)
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir.parent), tag=checkpoint_dir.name)
    prefix = "backbone."
    backbone_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    backbone = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(meta))
    missing, unexpected = backbone.load_state_dict(backbone_state, strict=False)
    tied = {"lm_head.weight"} if backbone.config.get_text_config().tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{checkpoint_dir}: checkpoint does not match its config "
                           f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    tokenizer = build_tokenizer(meta)
    model = STORMSModel(backbone, get_backbone(settings["backbone"]), latent_token_ids(tokenizer),
                        align_loss=settings["align_loss"], align_weight=settings["align_weight"])
    extra = {k: v for k, v in settings.items() if k in ("stage", "job", "steps")}
    return export_model(model, tokenizer, out_dir, num_latents=settings["num_latents"],
                        max_latents=settings["max_latents"], extra=extra, data=settings.get("data"))


def read_latent_settings(export_dir: str | Path) -> dict:
    path = Path(export_dir) / LATENT_SETTINGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a STORMS export (missing {LATENT_SETTINGS_FILE})")
    return json.loads(path.read_text())


def load_exported(export_dir: str | Path, *, attn_implementation: str = "auto", dtype: str = "auto"):
    """(STORMSModel, tokenizer, settings) from an export folder."""
    settings = read_latent_settings(export_dir)
    tokenizer = build_tokenizer(export_dir)
    cfg = ModelConfig(backbone=settings["backbone"], init_from=str(export_dir), num_latents=settings["num_latents"],
                      max_latents=settings["max_latents"], align_loss=settings["align_loss"],
                      align_weight=settings["align_weight"], attn_implementation=attn_implementation, dtype=dtype)
    return build_model(cfg, tokenizer), tokenizer, settings
