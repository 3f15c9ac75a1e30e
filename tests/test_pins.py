"""What changes the maths is pinned: constraints.txt matches the installed versions, and the installed transformers'
``get_rope_index`` still stands in the documented relation to the project's mRoPE rule (docs/architecture.md)."""

from __future__ import annotations

import importlib.metadata
import re

import pytest
import torch
from conftest import REPO
from test_mrope import long_video_batch

from storms_dist.model.build import ModelConfig, build_model
from storms_dist.model.mrope import VIDEO_TYPE

PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)")


def pins() -> dict[str, str]:
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if match := PIN.match(line.strip()):
            out[match.group(1)] = match.group(2)
    return out


def test_constraints_pin_the_numerics_libraries():
    assert {"torch", "transformers", "tokenizers", "deepspeed", "numpy", "av"} <= pins().keys()


@pytest.mark.parametrize("name", sorted(pins()))
def test_installed_version_is_the_pinned_one(name):
    installed = importlib.metadata.version(name).split("+")[0]  # torch's local build tag (+cpu) is not the version
    assert installed == pins()[name], (
        f"constraints.txt pins {name}=={pins()[name]} but {installed} is installed: reinstall (make install), or "
        f"re-validate the new version (tests/test_pins.py, tests/test_mrope.py, then the suite) and re-pin it")


@pytest.fixture(scope="module", params=["qwen2_5_vl-micro", "qwen3_vl-micro"])
def model(request, tokenizer):
    return build_model(ModelConfig(backbone=request.param, dtype="float32", attn_implementation="sdpa"),
                       tokenizer, seed=0).eval()


def library_positions(model, batch):
    kwargs = {"second_per_grid_ts": batch["second_per_grid_ts"]} if model.spec.family == "qwen2_5_vl" else {}
    pos, _ = model.backbone.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                                 video_grid_thw=batch["video_grid_thw"],
                                                 attention_mask=batch["attention_mask"], **kwargs)
    return pos


@pytest.mark.parametrize("second_per_grid_t", [0.0625, 0.25, 2.0, 30.0])  # 0.25: the synthetic 8 fps clips
def test_installed_get_rope_index_matches_the_documented_relation(model, tokenizer, second_per_grid_t):
    """transformers 5.24: the same positions on every vision token and on text before the first video; text after
    a video starts at ``s + max(h, w)`` instead of the rule's video max + 1, so it sits ``overhang`` lower, where
    overhang = max(0, (t - 1) * step - (max(h, w) - 1)). Zero for Qwen3-VL (one temporal patch per block) and for
    short Qwen2.5-VL clips. If this fails, transformers changed its rope: re-read the rule, then re-pin."""
    import transformers

    batch, _ = long_video_batch(model, tokenizer, 4, second_per_grid_t)
    ours, theirs = model.rope_positions(batch), library_positions(model, batch)
    vision = model.backbone.config.vision_config
    step = vision.tokens_per_second * second_per_grid_t if model.spec.family == "qwen2_5_vl" else 0.0
    expected, total_overhang = ours.clone(), 0
    for row, (t, h, w) in enumerate(batch["video_grid_thw"].tolist()):
        merged = max(h, w) // vision.spatial_merge_size
        overhang = max(0, int((t - 1) * step) - (merged - 1))
        is_video = batch["mm_token_type_ids"][row] == VIDEO_TYPE
        after_video = torch.zeros_like(is_video)
        after_video[int(is_video.nonzero().max()) + 1 :] = True
        after_video &= batch["attention_mask"][row].bool()
        expected[:, row, after_video] -= overhang
        total_overhang += overhang
    assert torch.equal(theirs, expected), (
        f"transformers {transformers.__version__}: get_rope_index no longer matches the relation to the project's "
        f"mRoPE rule documented in docs/architecture.md ('mRoPE positions'); max |diff| "
        f"{int((theirs - expected).abs().max())}. Re-read the library change, keep or revise storms_dist/model/mrope.py "
        f"on purpose, then update this test and the pin in constraints.txt")
    # the cases that differ really differ (0.0625 s per patch: no overhang, the two agree)
    assert torch.equal(theirs, ours) == (total_overhang == 0)
    assert (total_overhang == 0) == (model.spec.family == "qwen3_vl" or second_per_grid_t < 0.25)
