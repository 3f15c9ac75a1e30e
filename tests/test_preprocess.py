"""The torch video preprocessing against transformers' own helpers, a numpy transcription of its patchify, PIL,
and tiny random-init Qwen2.5-VL / Qwen3-VL forwards."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from storms_dist.data.preprocess import (
    IMAGENET_STANDARD_MEAN,
    OPENAI_CLIP_MEAN,
    ProcessedVideo,
    ResizeConfig,
    VisionSpec,
    normalize_frames,
    patchify,
    preprocess_video,
    resize_frames,
    resized_hw,
    smart_resize,
    smart_resize_qwen3_video,
)

HF_MODELS = Path(transformers.__file__).parent / "models"


# --- reference: transformers' Qwen2VLVideoProcessor.patchify (batch of one) + fused normalise, in numpy ---
def _numpy_reference(resized_TCHW_uint8: np.ndarray, spec: VisionSpec) -> tuple[np.ndarray, list[int]]:
    mean = np.asarray(spec.image_mean, dtype=np.float32) * np.float32(255.0)
    std = np.asarray(spec.image_std, dtype=np.float32) * np.float32(255.0)
    videos = (resized_TCHW_uint8.astype(np.float32) - mean[:, None, None]) / std[:, None, None]
    videos = videos[None]  # (batch, T, C, H, W)
    batch_size, num_frames, channel, resized_height, resized_width = videos.shape
    tps, patch_size, merge_size = spec.temporal_patch_size, spec.patch_size, spec.merge_size
    if pad := -num_frames % tps:
        videos = np.concatenate([videos, np.repeat(videos[:, -1:], pad, axis=1)], axis=1)
        num_frames += pad
    grid_t = num_frames // tps
    grid_h, grid_w = resized_height // patch_size, resized_width // patch_size
    patches = videos.reshape(batch_size, grid_t, tps, channel, grid_h // merge_size, merge_size, patch_size,
                             grid_w // merge_size, merge_size, patch_size)
    patches = patches.transpose(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    flatten = patches.reshape(batch_size, grid_t * grid_h * grid_w, channel * tps * patch_size * patch_size)
    return flatten[0], [grid_t, grid_h, grid_w]


def _video(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------ VisionSpec
@pytest.mark.parametrize("config_name, family, patch", [
    ("Qwen2VLConfig", "qwen2_vl", 14), ("Qwen2_5_VLConfig", "qwen2_5_vl", 14), ("Qwen3VLConfig", "qwen3_vl", 16)])
def test_spec_from_hf_config(config_name, family, patch):
    config = getattr(transformers, config_name)()
    spec = VisionSpec.from_hf_config(config)
    assert spec == VisionSpec.default(family)
    assert (spec.family, spec.patch_size, spec.temporal_patch_size, spec.merge_size) == (family, patch, 2, 2)
    custom = getattr(transformers, config_name)(vision_config=dict(patch_size=8, spatial_merge_size=1))
    assert (VisionSpec.from_hf_config(custom).patch_size, VisionSpec.from_hf_config(custom).merge_size) == (8, 1)


def test_spec_constants_are_the_processors():
    from transformers.image_utils import IMAGENET_STANDARD_STD, OPENAI_CLIP_STD
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    qwen2 = VisionSpec.default("qwen2_5_vl")
    assert qwen2.image_mean == tuple(OPENAI_CLIP_MEAN) and qwen2.image_std == tuple(OPENAI_CLIP_STD)
    # Qwen2VLVideoProcessor imports torchvision at module level: check its source instead
    source = (HF_MODELS / "qwen2_vl" / "video_processing_qwen2_vl.py").read_text()
    assert re.search(r"image_mean = OPENAI_CLIP_MEAN\n\s+image_std = OPENAI_CLIP_STD", source)
    assert re.search(r"patch_size = 14\n\s+temporal_patch_size = 2\n\s+merge_size = 2", source)
    qwen3 = VisionSpec.default("qwen3_vl")
    assert qwen3.image_mean == tuple(Qwen3VLVideoProcessor.image_mean) == tuple(IMAGENET_STANDARD_MEAN)
    assert qwen3.image_std == tuple(Qwen3VLVideoProcessor.image_std) == tuple(IMAGENET_STANDARD_STD)
    assert qwen3.patch_size == Qwen3VLVideoProcessor.patch_size
    assert qwen3.merge_size == Qwen3VLVideoProcessor.merge_size


@pytest.mark.parametrize("field, kwargs", [
    ("family", dict(family="llava")), ("patch_size", dict(patch_size=0)), ("merge_size", dict(merge_size=1.5)),
    ("image_std", dict(image_std=(0.5, 0.0, 0.5))), ("image_mean", dict(image_mean=(0.5, 0.5)))])
def test_spec_validation(field, kwargs):
    base = dict(family="qwen2_5_vl", patch_size=14, temporal_patch_size=2, merge_size=2,
                image_mean=OPENAI_CLIP_MEAN, image_std=(0.3, 0.3, 0.3))
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        VisionSpec(**{**base, **kwargs})


@pytest.mark.parametrize("field, kwargs", [("min_pixels", dict(min_pixels=0, max_pixels=10)),
                                           ("max_pixels", dict(min_pixels=100, max_pixels=99))])
def test_resize_config_validation(field, kwargs):
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        ResizeConfig(**kwargs)


# ---------------------------------------------------------------------------------------------- smart_resize
def test_smart_resize_matches_transformers_over_many_sizes():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 4000, (4000, 2))]
    sizes += [(h, w) for h in (1, 2, 27, 28, 29, 55, 56, 57, 480, 720, 1080) for w in (1, 28, 56, 640, 1280, 1920)]
    budgets = [(56 * 56, 28 * 28 * 1280), (128 * 28 * 28, 768 * 28 * 28), (4 * 28 * 28, 64 * 28 * 28), (3136, 12845056)]
    num_compared = 0
    for height, width in sizes:
        for factor in (28, 32):
            for min_pixels, max_pixels in budgets:
                try:
                    expected = hf_smart_resize(height, width, factor=factor, min_pixels=min_pixels,
                                               max_pixels=max_pixels)
                except ValueError:
                    with pytest.raises(ValueError, match="aspect ratio"):
                        smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
                    continue
                got = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
                assert got == expected, (height, width, factor, min_pixels, max_pixels)
                num_compared += 1
    assert num_compared > 25_000


def test_qwen3_smart_resize_matches_transformers_over_many_sizes():
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as hf_smart_resize

    rng = np.random.default_rng(1)
    cases = [(int(t), int(h), int(w)) for t, h, w in zip(rng.integers(2, 200, 4000), rng.integers(1, 3000, 4000),
                                                         rng.integers(1, 3000, 4000))]
    budgets = [(128 * 32 * 32, 768 * 32 * 32), (4096, 25165824), (128 * 32 * 32, 32 * 32 * 64 * 16)]
    for num_frames, height, width in cases:
        for min_pixels, max_pixels in budgets:
            try:
                expected = hf_smart_resize(num_frames, height, width, temporal_factor=2, factor=32,
                                           min_pixels=min_pixels, max_pixels=max_pixels)
            except ValueError:
                with pytest.raises(ValueError):
                    smart_resize_qwen3_video(num_frames, height, width, temporal_factor=2, factor=32,
                                             min_pixels=min_pixels, max_pixels=max_pixels)
                continue
            assert smart_resize_qwen3_video(num_frames, height, width, temporal_factor=2, factor=32,
                                            min_pixels=min_pixels, max_pixels=max_pixels) == expected


def test_qwen3_budget_is_per_video_and_qwen2_per_frame():
    resize = ResizeConfig(min_pixels=32 * 32, max_pixels=32 * 32 * 64)
    qwen3, qwen25 = VisionSpec.default("qwen3_vl"), VisionSpec.default("qwen2_5_vl")
    h2, w2 = resized_hw(2, 640, 640, qwen3, resize)
    h16, w16 = resized_hw(16, 640, 640, qwen3, resize)
    assert h16 * w16 * 16 <= resize.max_pixels < h2 * w2 * 16  # more frames -> smaller frames
    assert resized_hw(2, 640, 640, qwen25, resize) == resized_hw(16, 640, 640, qwen25, resize)
    assert resized_hw(1, 640, 640, qwen3, resize) == (h2, w2)  # 1 frame budgets like its padded temporal patch


# ---------------------------------------------------------------------------------------- resize / normalise
def test_resize_is_antialiased_bicubic_close_to_pil():
    image = pytest.importorskip("PIL.Image")
    frames = _video(2, 97, 131, seed=3)
    for height, width in ((56, 84), (28, 56), (196, 252)):
        ours = resize_frames(torch.from_numpy(frames).permute(0, 3, 1, 2), height, width)
        assert ours.dtype == torch.uint8 and tuple(ours.shape) == (2, 3, height, width)
        for t in range(2):
            pil = np.asarray(image.fromarray(frames[t]).resize((width, height), image.BICUBIC))
            diff = np.abs(ours[t].permute(1, 2, 0).numpy().astype(int) - pil.astype(int))
            assert diff.max() <= 2 and diff.mean() < 0.05  # fixed-point rounding only (no-antialias: max ~100)


def test_resize_is_a_no_op_at_the_target_size():
    frames = torch.from_numpy(_video(2, 56, 84)).permute(0, 3, 1, 2)
    assert resize_frames(frames, 56, 84) is frames


def test_normalize_values():
    spec = VisionSpec.default("qwen2_5_vl")
    frames = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    got = normalize_frames(frames, spec)
    expected = [(v / 255 - m) / s for v, m, s in zip((0, 128, 255), spec.image_mean, spec.image_std)]
    assert got.dtype == torch.float32
    assert torch.allclose(got[0, :, 0, 0], torch.tensor(expected), atol=1e-6)


# ------------------------------------------------------------------------------------- layout (bit-exact)
@pytest.mark.parametrize("family, num_frames, height, width, budget", [
    ("qwen2_5_vl", 4, 60, 80, (56 * 56, 28 * 28 * 64)),
    ("qwen2_5_vl", 3, 100, 50, (56 * 56, 28 * 28 * 64)),   # odd T -> last frame padded
    ("qwen2_vl", 1, 28, 28, (28 * 28, 28 * 28 * 4)),       # single frame
    ("qwen3_vl", 5, 70, 90, (32 * 32 * 4, 32 * 32 * 8 * 6)),
    ("qwen3_vl", 2, 64, 64, (32 * 32, 32 * 32 * 64)),       # no resize needed
])
def test_pixel_values_match_numpy_transcription_of_transformers(family, num_frames, height, width, budget):
    spec = VisionSpec.default(family)
    resize = ResizeConfig(min_pixels=budget[0], max_pixels=budget[1])
    frames = _video(num_frames, height, width, seed=num_frames)
    out = preprocess_video(frames, spec, resize)
    target_h, target_w = resized_hw(num_frames, height, width, spec, resize)
    resized = resize_frames(torch.from_numpy(frames).permute(0, 3, 1, 2), target_h, target_w).numpy()
    expected, grid = _numpy_reference(resized, spec)
    assert isinstance(out, ProcessedVideo)
    assert out.video_grid_thw.dtype == torch.long and out.video_grid_thw.tolist() == grid
    assert out.pixel_values_videos.dtype == torch.float32
    assert np.array_equal(out.pixel_values_videos.numpy(), expected)  # bit-exact
    assert grid[0] == -(-num_frames // 2) and grid[1] * spec.patch_size == target_h


def test_layout_semantics_channels_time_and_merge_order():
    """Rows are (C, t, p, p); rows of one merged token are its 2x2 patches in raster order."""
    spec = VisionSpec(family="qwen2_5_vl", patch_size=2, temporal_patch_size=2, merge_size=2,
                      image_mean=(0.0, 0.0, 0.0), image_std=(1 / 255, 1 / 255, 1 / 255))  # identity normalisation
    num_frames, height, width = 3, 8, 8
    # pixel value encodes (frame, channel, patch row, patch col)
    t, c, y, x = np.meshgrid(np.arange(num_frames), np.arange(3), np.arange(height), np.arange(width), indexing="ij")
    video_TCHW = torch.from_numpy((t * 64 + c * 16 + (y // 2) * 4 + (x // 2)).astype(np.uint8))
    pixel_values, grid = patchify(normalize_frames(video_TCHW, spec), spec)
    assert grid.tolist() == [2, 4, 4] and pixel_values.shape == (32, 3 * 2 * 2 * 2)
    rows = pixel_values.round().long().view(32, 3, 2, 4)  # (row, C, t, p*p)
    assert (rows == rows[..., :1]).all()  # a patch holds one (frame, channel, patch) value
    values = rows[..., 0]
    merged_order = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3),
                    (2, 0), (2, 1), (3, 0), (3, 1), (2, 2), (2, 3), (3, 2), (3, 3)]
    for row in range(32):
        grid_t, (patch_y, patch_x) = divmod(row, 16)[0], merged_order[row % 16]
        for channel in range(3):
            for dt in range(2):
                frame = min(grid_t * 2 + dt, num_frames - 1)  # frame 3 is the padded copy of frame 2
                assert values[row, channel, dt] == frame * 64 + channel * 16 + patch_y * 4 + patch_x


def test_inputs_are_validated_and_tensors_accepted():
    spec, resize = VisionSpec.default("qwen2_5_vl"), ResizeConfig(min_pixels=56 * 56, max_pixels=28 * 28 * 16)
    frames = _video(2, 56, 56)
    from_tensor = preprocess_video(torch.from_numpy(frames), spec, resize)
    from_view = preprocess_video(frames[:, ::-1][:, ::-1], spec, resize)  # negative strides
    assert torch.equal(from_tensor.pixel_values_videos, from_view.pixel_values_videos)
    with pytest.raises(ValueError, match="^frames: expected dtype uint8"):
        preprocess_video(frames.astype(np.float32), spec, resize)
    with pytest.raises(ValueError, match=r"^frames: expected shape \[T, H, W, 3\]"):
        preprocess_video(frames[..., :2], spec, resize)
    with pytest.raises(ValueError, match=r"^frames: expected shape"):
        preprocess_video(frames[:0], spec, resize)


# ------------------------------------------------------------------------------------- tiny model forwards
def _tiny_qwen25(patch_size: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]},
                         pad_token_id=0),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch_size,
                           temporal_patch_size=2, spatial_merge_size=2, window_size=4 * patch_size,
                           out_hidden_size=64, fullatt_block_indexes=[1], tokens_per_second=2),
        image_token_id=997, video_token_id=998, vision_start_token_id=995, vision_end_token_id=996)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _tiny_qwen3(patch_size: int):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = Qwen3VLConfig(
        text_config=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 2, 2],
                                          "mrope_interleaved": True}, pad_token_id=0),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch_size,
                           temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64,
                           num_position_embeddings=64, deepstack_visual_indexes=[0]),
        image_token_id=997, video_token_id=998, vision_start_token_id=995, vision_end_token_id=996)
    return Qwen3VLForConditionalGeneration(config).eval()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_processed_video_runs_through_tiny_model(family):
    torch.manual_seed(0)
    model = _tiny_qwen25(14) if family == "qwen2_5_vl" else _tiny_qwen3(16)
    spec = VisionSpec.from_hf_config(model.config)
    assert spec.family == family
    budget = (56 * 56, 28 * 28 * 16) if family == "qwen2_5_vl" else (32 * 32 * 4, 32 * 32 * 3 * 6)
    out = preprocess_video(_video(5, 70, 100), spec, ResizeConfig(min_pixels=budget[0], max_pixels=budget[1]))
    grid_t, grid_h, grid_w = out.video_grid_thw.tolist()
    per_patch = grid_h * grid_w // spec.merge_size**2
    vs, ve, vid = 995, 996, 998
    if family == "qwen2_5_vl":
        ids = [1, 11, 12, vs] + [vid] * (grid_t * per_patch) + [ve, 13, 14]
        extra = dict(second_per_grid_ts=torch.tensor([1.0]))
    else:  # one timestamped group per temporal patch
        ids = [1, 11]
        for chunk in range(grid_t):
            ids += [50 + chunk, vs] + [vid] * per_patch + [ve]
        ids += [13, 14]
        extra = {}
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        features = model.model.get_video_features(out.pixel_values_videos, out.video_grid_thw[None]).pooler_output
        assert sum(f.shape[0] for f in features) == grid_t * per_patch  # one LLM token per merged patch
        logits = model(input_ids=input_ids, pixel_values_videos=out.pixel_values_videos,
                       video_grid_thw=out.video_grid_thw[None], mm_token_type_ids=(input_ids == vid).long() * 2,
                       **extra).logits
    assert logits.shape == (1, len(ids), 1000) and torch.isfinite(logits).all()
