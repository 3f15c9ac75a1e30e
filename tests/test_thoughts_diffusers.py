"""The diffusers backend on a tiny randomly initialised Wan 2.1 image-to-video pipeline built offline from configs
(storms_dist/thoughts/tiny.py), loaded the production way (``from_pretrained(dir, local_files_only=True)``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from storms_dist.data.manifest import read_manifest, write_manifest
from storms_dist.data.synth import SynthConfig, generate
from storms_dist.data.video_io import probe_video
from storms_dist.thoughts.cli import main as thoughts_main
from storms_dist.thoughts.generators import (
    DiffusersConfig,
    DiffusersGenerator,
    GenerationRequest,
    load_dtypes,
    output_size,
    to_uint8_frames,
)
from storms_dist.thoughts.keyframes import select_keyframes

needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                                     reason="diffusers is not installed (pip install -e '.[thoughts]')")


def test_output_size_keeps_the_aspect_ratio_at_max_area() -> None:
    assert output_size((480, 832), height=None, width=None, max_area=480 * 832, multiple=16) == (480, 832)
    assert output_size((720, 1280), height=None, width=None, max_area=480 * 832, multiple=16) == (464, 832)
    assert output_size((56, 56), height=None, width=None, max_area=32 * 32, multiple=16) == (32, 32)
    assert output_size((56, 56), height=48, width=64, max_area=1, multiple=16) == (48, 64)
    assert output_size((10, 1000), height=None, width=None, max_area=256, multiple=16) == (16, 160)


def test_to_uint8_frames() -> None:
    floats = np.linspace(0, 1, 2 * 2 * 2 * 3, dtype=np.float32).reshape(2, 2, 2, 3)
    out = to_uint8_frames(floats)
    assert out.dtype == np.uint8 and out[0, 0, 0, 0] == 0 and out[-1, -1, -1, -1] == 255
    assert np.array_equal(to_uint8_frames(torch.from_numpy(floats)), out)
    assert to_uint8_frames(out) is out


def test_load_dtypes() -> None:
    assert load_dtypes("WanImageToVideoPipeline", "bfloat16", "cpu") == torch.float32
    assert load_dtypes("WanImageToVideoPipeline", "bfloat16", "cuda") == {
        "default": torch.bfloat16, "vae": torch.float32, "image_encoder": torch.float32}
    assert load_dtypes("CogVideoXImageToVideoPipeline", "float16", "cuda:1") == torch.float16
    assert load_dtypes("WanImageToVideoPipeline", "float32", "cuda") == torch.float32


@needs_diffusers
def test_mixed_dtype_loading_of_the_tiny_pipeline(tiny_wan: Path) -> None:
    """The GPU dtype recipe (bf16 transformer/text encoder, float32 VAE/image encoder), loaded and run on CPU."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_wan, local_files_only=True,
                                             dtype=load_dtypes("WanImageToVideoPipeline", "bfloat16", "cuda"))
    assert (pipe.transformer.dtype, pipe.text_encoder.dtype, pipe.vae.dtype, pipe.image_encoder.dtype) == (
        torch.bfloat16, torch.bfloat16, torch.float32, torch.float32)
    from PIL import Image

    video = pipe(image=Image.new("RGB", (32, 32)), prompt="a ball", height=32, width=32, num_frames=5,
                 num_inference_steps=1, guidance_scale=1.0, output_type="np").frames[0]
    assert video.shape == (5, 32, 32, 3) and np.isfinite(video).all()


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="dtype"):
        DiffusersConfig(model_dir="x", dtype="int8")
    with pytest.raises(ValueError, match="height/width"):
        DiffusersConfig(model_dir="x", height=32)


def test_missing_model_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model_index.json not found"):
        DiffusersGenerator(DiffusersConfig(model_dir=str(tmp_path)))


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory) -> Path:
    if importlib.util.find_spec("diffusers") is None:
        pytest.skip("diffusers is not installed (pip install -e '.[thoughts]')")
    from storms_dist.thoughts.tiny import build_tiny_wan_i2v

    return build_tiny_wan_i2v(tmp_path_factory.mktemp("tiny_wan") / "pipeline")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    paths = generate(SynthConfig(task="balls", num_train=2, num_val=0, num_test=0, size=56, workers=1), root)
    one = root / "one.jsonl"
    write_manifest(one, read_manifest(paths["train"])[:1])
    return one


TINY = ["--device", "cpu", "--num-frames", "9", "--max-area", str(32 * 32), "--steps", "2", "--guidance", "1.0"]


@needs_diffusers
def test_cli_generates_decodable_thought_videos_and_resumes(tiny_wan: Path, synth: Path, tmp_path: Path,
                                                            capsys) -> None:
    out = tmp_path / "out"
    args = ["thoughts", "--manifest", str(synth), "--out", str(out), "--backend", "diffusers", "--model-dir",
            str(tiny_wan), *TINY, "--keyframes", "scene_change", "--num-keyframes", "3", "--no-progress"]
    assert thoughts_main(args) == 0, capsys.readouterr().err
    (sample,) = read_manifest(out / "one.jsonl")
    info = probe_video(sample.thought_path)
    assert (info.num_frames, info.height, info.width, info.fps) == (9, 32, 32, 16.0)
    provenance = sample.meta["thought_gen"]
    assert provenance["pipeline"] == "WanImageToVideoPipeline" and provenance["num_frames"] == 9
    assert provenance["keyframes"]["method"] == "scene_change" and len(provenance["keyframes"]["indices"]) == 3
    assert provenance["condition_frame"] == 0 and sample.question in provenance["prompt"]
    stamp = json.loads((out / "thoughts_config.json").read_text())
    assert stamp["generator"]["pipeline"] == "WanImageToVideoPipeline" and stamp["generator"]["num_frames"] == 9

    assert thoughts_main(args) == 0
    assert "0 generated, 1 already done" in capsys.readouterr().out


@needs_diffusers
def test_generator_is_seeded_and_conditions_on_first_and_last_keyframes(tiny_wan: Path, synth: Path,
                                                                        tmp_path: Path) -> None:
    from storms_dist.thoughts.generators import GenerationError
    from storms_dist.thoughts.tiny import build_tiny_wan_i2v

    (sample,) = read_manifest(synth)
    keyframes = select_keyframes(sample.video_path, "uniform", 2)
    cfg = dict(device="cpu", num_frames=5, height=32, width=48, num_inference_steps=1, guidance_scale=1.0)
    request = GenerationRequest(sample=sample, seed=3, keyframes=keyframes, condition=0, prompt="a red ball moves")
    generator = DiffusersGenerator(DiffusersConfig(model_dir=str(tiny_wan), **cfg))
    first, again = generator.generate(request), generator.generate(request)
    assert first.frames.shape == (5, 32, 48, 3) and first.frames.dtype == np.uint8
    assert np.array_equal(first.frames, again.frames)
    assert first.info["last_image"] is False and first.info["seed"] == 3 and first.fps == 16.0
    assert generator.pipe.transformer.dtype == torch.float32  # CPU: float32 whatever --dtype says

    with pytest.raises(GenerationError, match="needs Wan2.1-FLF2V"):
        _ = DiffusersGenerator(DiffusersConfig(model_dir=str(tiny_wan), use_last_image=True, **cfg)).pipe
    flf2v = build_tiny_wan_i2v(tmp_path / "flf2v", first_last_frame=True)
    both = DiffusersGenerator(DiffusersConfig(model_dir=str(flf2v), use_last_image=True, **cfg)).generate(request)
    assert both.frames.shape == (5, 32, 48, 3) and both.info["last_image"] is True
