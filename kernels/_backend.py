"""Backend choice shared by every kernel in this package: ``auto`` | ``triton`` | ``torch``.

``auto`` runs the Triton kernel on CUDA tensors and the plain-torch reference everywhere else. ``triton`` insists on
the kernel: on CPU tensors that only works under ``TRITON_INTERPRET=1`` (Triton's interpreter, used by the CI
tests). ``torch`` always runs the reference.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Literal, get_args

import torch

Backend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[str, ...] = get_args(Backend)


@lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Triton's interpreter runs kernels on CPU tensors (read at import of triton, so set it before)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_backend(name: str, value: str) -> None:
    """One-line config error for a bad choice (used by the configs that carry a kernel switch)."""
    if value not in BACKENDS:
        raise ValueError(f"{name}: {value!r} is not a valid choice; valid choices: {', '.join(map(repr, BACKENDS))}")


def resolve_backend(backend: str, device: torch.device, *, kernel: str) -> Literal["triton", "torch"]:
    """The implementation that runs for tensors on ``device``; raises (one line, with the fix) when the kernel was
    asked for and cannot run."""
    check_backend(kernel, backend)
    if backend == "torch":
        return "torch"
    runnable = triton_available() and (device.type == "cuda" or interpreting())
    if backend == "auto":
        return "triton" if runnable and device.type == "cuda" else "torch"
    if not triton_available():
        raise RuntimeError(f"{kernel}: backend 'triton' needs the triton package: pip install -e '.[triton]'")
    if not runnable:
        raise RuntimeError(f"{kernel}: backend 'triton' on {device.type} tensors needs CUDA or TRITON_INTERPRET=1 "
                           f"(Triton's CPU interpreter); use 'auto' or 'torch' here")
    return "triton"
