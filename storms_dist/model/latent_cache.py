"""The rollout's KV cache without copies: prefix K/V stored once, a small tail, attention by ``latent_attention``.

HF's ``DynamicCache`` ``torch.cat``s the whole cache on every pass, and autograd keeps each pass's copy of the
prefix K/V for backward (K growing copies in a K-step rollout). ``PrefixTailCache`` keeps the prefill's K/V as one
tensor and concatenates only the tail (latent columns, then the suffix). During the passes after the prefill the
text decoder's attention implementation is switched (``latent_passes``) to ``storms_latent``: a function registered
with transformers' ``AttentionInterface`` that reads this cache's two segments and calls
``storms_dist.kernels.latent_attention`` (Triton kernel on CUDA, torch reference elsewhere, per ``backend``). Its mask
function is transformers' ``sdpa_mask``; the key mask is the mask's last query row (causal lets that row see every
column, so it is exactly the 2D padding mask). The prefill itself runs on the model's own implementation.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Literal, get_args

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from storms_dist.kernels.latent_attention import latent_attention

LatentAttention = Literal["off", "auto", "triton", "torch"]
"""``model.latent_attention``: off = HF's DynamicCache (today's path); otherwise the kernel backend."""
LATENT_ATTENTION_CHOICES: tuple[str, ...] = get_args(LatentAttention)
IMPLEMENTATION = "storms_latent"

_ACTIVE: ContextVar[tuple["PrefixTailCache", str] | None] = ContextVar("storms_latent_cache", default=None)


class PrefixTailLayer(CacheLayerMixin):
    """One decoder layer: the first ``update`` is the prefix (kept, made contiguous once, as DynamicLayer's first
    cat does), later ones append to the tail."""

    is_sliding = False
    is_compileable = False

    def __init__(self):
        super().__init__()
        self.tail_keys: torch.Tensor | None = None
        self.tail_values: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.keys, self.values = key_states.contiguous(), value_states.contiguous()
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            return self.keys, self.values
        if _ACTIVE.get() is None:
            # the returned tensors are not the whole cache: only the storms_latent attention may read this layer
            raise RuntimeError("PrefixTailCache: a pass after the prefill must run inside latent_passes()")
        if self.tail_keys is None:
            self.tail_keys, self.tail_values = key_states, value_states
        else:  # the tail is K + suffix columns: small next to the prefix
            self.tail_keys = torch.cat([self.tail_keys, key_states], dim=-2)
            self.tail_values = torch.cat([self.tail_values, value_states], dim=-2)
        return self.keys, self.values  # placeholders: storms_latent reads both segments from this layer

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.keys.shape[-2] + (0 if self.tail_keys is None else self.tail_keys.shape[-2])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


class PrefixTailCache(Cache):
    def __init__(self, num_layers: int):
        super().__init__(layers=[PrefixTailLayer() for _ in range(num_layers)])


def _storms_latent_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    active = _ACTIVE.get()
    if active is None:
        raise RuntimeError(f"attention implementation {IMPLEMENTATION!r} runs only inside latent_passes()")
    if dropout:
        raise ValueError(f"{IMPLEMENTATION}: attention dropout is not supported (got {dropout})")
    cache, backend = active
    layer = cache.layers[module.layer_idx]
    key_mask_BS = None
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool:
            raise ValueError(f"{IMPLEMENTATION}: expected sdpa_mask's boolean mask, got {attention_mask.dtype}")
        key_mask_BS = attention_mask[:, 0, -1, :]
    out_BHTD = latent_attention(query, layer.keys, layer.values, layer.tail_keys, layer.tail_values, key_mask_BS,
                                scale=scaling, backend=backend)
    return out_BHTD.transpose(1, 2), None


AttentionInterface.register(IMPLEMENTATION, _storms_latent_attention)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


@contextmanager
def latent_passes(text_config, cache: PrefixTailCache, backend: str) -> Iterator[None]:
    """Route the text decoder's attention through ``cache``'s two segments for the passes inside this scope."""
    if backend not in LATENT_ATTENTION_CHOICES[1:]:
        raise ValueError(f"latent_passes: backend {backend!r}; valid choices: 'auto', 'triton', 'torch'")
    previous = text_config._attn_implementation
    token = _ACTIVE.set((cache, backend))
    text_config._attn_implementation = IMPLEMENTATION
    try:
        yield
    finally:
        text_config._attn_implementation = previous
        _ACTIVE.reset(token)
