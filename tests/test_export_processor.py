"""Every export carries the processor configs and the chat template with the values our preprocessing used, so the
ecosystem (AutoImageProcessor, AutoTokenizer.apply_chat_template, AutoProcessor) can be built from it."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch

from storms_dist.config import to_dict
from storms_dist.data.dataset import DataConfig
from storms_dist.data.preprocess import VisionSpec
from storms_dist.data.prompt import build_prompt_text
from storms_dist.data.sampling import FrameSamplingConfig
from storms_dist.model.build import (
    ModelConfig,
    build_model,
    export_model,
    read_latent_settings,
)
from storms_dist.model.processor_files import PROCESSOR_FILES

DATA = DataConfig(min_pixels=28 * 28 * 2, max_pixels=56 * 84, frames=FrameSamplingConfig(fps=1.0, max_frames=12))


@pytest.fixture(scope="module", params=["qwen2_5_vl-micro", "qwen3_vl-micro"])
def export(request, tokenizer, tmp_path_factory):
    model = build_model(ModelConfig(backbone=request.param, dtype="float32", attn_implementation="sdpa"), tokenizer,
                        seed=0)
    out = export_model(model, tokenizer, tmp_path_factory.mktemp("export") / "export", num_latents=2, max_latents=4,
                       data=to_dict(DATA))
    return out, VisionSpec.from_hf_config(model.backbone.config)


def test_processor_files_record_our_preprocessing(export):
    from transformers import AutoImageProcessor

    out, spec = export
    assert all((out / name).is_file() for name in PROCESSOR_FILES)
    image = AutoImageProcessor.from_pretrained(str(out))
    assert type(image).__name__.startswith("Qwen2VLImageProcessor")
    assert (image.patch_size, image.temporal_patch_size, image.merge_size) == \
        (spec.patch_size, spec.temporal_patch_size, spec.merge_size)
    assert image.size == {"shortest_edge": DATA.min_pixels, "longest_edge": DATA.max_pixels}
    if spec.family == "qwen2_5_vl":  # per-frame budget on both sides: the same resize, so the same grid
        import numpy as np
        from PIL import Image

        from storms_dist.data.preprocess import preprocess_video

        frame = np.random.default_rng(0).integers(0, 256, (100, 150, 3), dtype=np.uint8)
        theirs = image(images=[Image.fromarray(frame)], return_tensors="pt")["image_grid_thw"][0]
        ours = preprocess_video(np.stack([frame, frame]), spec, DATA.resize).video_grid_thw
        assert theirs.tolist() == ours.tolist()
    assert image.image_mean == pytest.approx(spec.image_mean) and image.image_std == pytest.approx(spec.image_std)
    video = json.loads((out / "video_preprocessor_config.json").read_text())
    assert video["size"] == {"shortest_edge": DATA.min_pixels, "longest_edge": DATA.max_pixels}
    assert (video["fps"], video["max_frames"], video["do_sample_frames"]) == (1.0, 12, False)
    settings = read_latent_settings(out)
    assert settings["data"]["max_pixels"] == DATA.max_pixels and "mrope" in settings["mrope_rule"]


def test_chat_template_renders_our_prompt(export):
    from transformers import AutoTokenizer

    out, spec = export
    tok = AutoTokenizer.from_pretrained(str(out))
    question, options = "Which wall next?", ["left", "right", "top", "bottom"]
    ours = build_prompt_text(spec.family, question=question, options=options, video_grid_thw=(2, 4, 4),
                             timestamps_s=[0.0, 0.5, 1.0, 1.5], merge_size=spec.merge_size)
    # the processor expands one placeholder per video (Qwen3-VL: into timestamped per-patch blocks)
    one_block = re.sub(r"(<[\d.]+ seconds>)?<\|vision_start\|>(<\|video_pad\|>)+<\|vision_end\|>", "\x00", ours)
    one_block = re.sub("\x00+", "<|vision_start|><|video_pad|><|vision_end|>", one_block)
    from storms_dist.data.prompt import format_question

    messages = [{"role": "user", "content": [{"type": "video"},
                                             {"type": "text", "text": format_question(question, options)}]}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == one_block
    from storms_dist.model.processor_files import chat_template

    plain = build_prompt_text(spec.family, question="hi", options=[], video_grid_thw=None, timestamps_s=None,
                              system=None)  # data.system_prompt false
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True,
                                   chat_template=chat_template(spec.family, system_prompt=False)) == plain
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(with_system, tokenize=False) == \
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


def test_auto_processor_is_built_from_the_export(export):
    from transformers import AutoProcessor

    out, spec = export
    if importlib.util.find_spec("torchvision") is None:
        # transformers' Qwen video processors need torchvision (no build for this CPU torch): the files resolve to
        # the family's processor, which then asks for torchvision
        with pytest.raises(ImportError, match="Torchvision"):
            AutoProcessor.from_pretrained(str(out))
        return
    processor = AutoProcessor.from_pretrained(str(out))
    assert type(processor).__name__ == {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}[
        spec.family]
    assert processor.video_processor.merge_size == spec.merge_size
    assert processor.video_processor.size["longest_edge"] == DATA.max_pixels
    frames = torch.zeros(4, 3, 56, 56, dtype=torch.uint8)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text",
                                           "text": "q"}]}], add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], videos=[frames], return_tensors="pt", do_sample_frames=False)
    assert int(inputs["pixel_values_videos"].shape[-1]) == 3 * spec.temporal_patch_size * spec.patch_size ** 2
