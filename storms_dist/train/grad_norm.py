"""The global gradient norm of each optimizer step, on every ZeRO stage: the norm gradient clipping used.

DeepSpeed fills ``engine.get_global_grad_norm()`` from its ZeRO (1-3), fp16 and bf16 optimizers. On ZeRO stage 0 in
fp32 with a torch optimizer (the one-process CPU demo) it clips through ``clip_fp32_gradients`` but drops the norm,
so ``get_global_grad_norm()`` stays None. There we compute the same norm (the 2-norm over every parameter's gradient,
after the data-parallel all-reduce that ``engine.backward`` does at the boundary) just before ``engine.step()``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def total_grad_norm(params: Iterable[torch.nn.Parameter]) -> float:
    """2-norm of all gradients together (parameters without a gradient count as zero), in fp32."""
    norms = [p.grad.detach().float().norm(2) for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def engine_reports_grad_norm(engine) -> bool:
    """Whether DeepSpeed's own optimizer wrapper records the global norm (see the module docstring)."""
    return bool(engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled())


def step_with_grad_norm(engine) -> float | None:
    """``engine.step()``; returns the global gradient norm of the update it applied at an accumulation boundary,
    None between boundaries (no update)."""
    boundary = engine.is_gradient_accumulation_boundary()
    own = total_grad_norm(engine.module.parameters()) if boundary and not engine_reports_grad_norm(engine) else None
    engine.step()
    if not boundary:
        return None
    if own is not None:
        return own
    reported = engine.get_global_grad_norm()
    return None if reported is None else float(reported)
