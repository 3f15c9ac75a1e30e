"""The frame-index rule against an independent transcription of qwen-vl-utils and against transformers' Qwen3-VL."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from storms_dist.data.sampling import (
    FrameSamplingConfig,
    sample_frame_indices,
    sampled_timestamps,
    second_per_grid_t,
    segment_frame_range,
    temporal_patch_timestamps,
)


# --- reference: qwen-vl-utils vision_process.py (smart_nframes + calculate_video_frame_range + linspace), as is ---
def _qwen_vl_utils_indices(total: int, video_fps: float, *, fps=None, nframes=None, min_frames=4, max_frames=768,
                           video_start=None, video_end=None, factor=2) -> list[int]:
    if video_start is None and video_end is None:
        start_frame, end_frame, seg_total = 0, total - 1, total
    else:
        max_duration = total / video_fps
        start_frame = math.ceil(max(0.0, min(video_start, max_duration)) * video_fps) if video_start is not None else 0
        if video_end is not None:
            end_frame = min(math.floor(max(0.0, min(video_end, max_duration)) * video_fps), total - 1)
        else:
            end_frame = total - 1
        assert start_frame < end_frame
        seg_total = end_frame - start_frame + 1
    if nframes is not None:
        n = round(nframes / factor) * factor
    else:
        lo = math.ceil(min_frames / factor) * factor
        hi = math.floor(min(max_frames, seg_total) / factor) * factor
        n = math.floor(min(min(max(seg_total / video_fps * fps, lo), hi), seg_total) / factor) * factor
    if not (factor <= n <= seg_total):
        raise ValueError("qwen-vl-utils rejects this video")
    return torch.linspace(start_frame, end_frame, n).round().long().tolist()


@pytest.mark.parametrize("field, kwargs", [
    ("fps", dict(fps=0.0)),
    ("fps", dict(fps=-1.0)),
    ("fps", dict(fps=float("nan"))),
    ("fps", dict(fps=None)),
    ("num_frames", dict(num_frames=3)),
    ("num_frames", dict(num_frames=0)),
    ("min_frames", dict(min_frames=3)),
    ("max_frames", dict(max_frames=0)),
    ("min_frames", dict(min_frames=8, max_frames=4)),
    ("temporal_patch_size", dict(temporal_patch_size=0)),
])
def test_config_rejects_bad_values_naming_the_field(field, kwargs):
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        FrameSamplingConfig(**kwargs)


def test_num_frames_alone_is_enough():
    cfg = FrameSamplingConfig(fps=None, num_frames=8)
    assert len(sample_frame_indices(100, 25.0, cfg)) == 8


@pytest.mark.parametrize("total, native_fps, expected", [
    # 10 s at 30 fps -> 20 frames at 2 fps, spread over [0, 299]
    (300, 30.0, [0, 16, 31, 47, 63, 79, 94, 110, 126, 142, 157, 173, 189, 205, 220, 236, 252, 268, 283, 299]),
    (7, 2.0, [0, 1, 2, 4, 5, 6]),   # 3.5 s -> 7 wanted -> floored to 6 (even)
    (3, 30.0, [0, 2]),              # min_frames=4 > 3 available -> 2 (even, no repeats)
    (1, 30.0, [0, 0]),              # 1-frame video: the temporal patch repeats it
    (100, 25.0, [0, 14, 28, 42, 57, 71, 85, 99]),  # 4 s -> 8 frames
])
def test_worked_examples(total, native_fps, expected):
    assert sample_frame_indices(total, native_fps, FrameSamplingConfig()) == expected


def test_max_frames_caps_long_videos():
    indices = sample_frame_indices(10_000, 30.0, FrameSamplingConfig(max_frames=32))
    assert len(indices) == 32 and indices[0] == 0 and indices[-1] == 9_999


@pytest.mark.parametrize("native_fps", [0.0, -5.0, float("nan"), float("inf"), None])
def test_unknown_native_fps_means_one_frame_per_second(native_fps):
    cfg = FrameSamplingConfig(fps=0.5, max_frames=64)
    # 20 frames at "1 fps" = 20 s -> 10 frames at 0.5 fps
    assert sample_frame_indices(20, native_fps, cfg) == sample_frame_indices(20, 1.0, cfg)
    assert len(sample_frame_indices(20, native_fps, cfg)) == 10
    assert sampled_timestamps([0, 3], native_fps) == [0.0, 3.0]


@pytest.mark.parametrize("total", [0, -3])
def test_empty_video_raises(total):
    with pytest.raises(ValueError, match="^num_total_frames: expected"):
        sample_frame_indices(total, 30.0, FrameSamplingConfig())


def test_fixed_count_repeats_frames_of_a_short_video():
    indices = sample_frame_indices(3, 30.0, FrameSamplingConfig(num_frames=8))
    assert indices == [0, 0, 1, 1, 1, 1, 2, 2]


def test_clip_segment():
    cfg = FrameSamplingConfig()
    assert segment_frame_range(300, 30.0, start_s=2.0, end_s=4.0) == (60, 120)
    assert sample_frame_indices(300, 30.0, cfg, start_s=2.0, end_s=4.0) == [60, 80, 100, 120]
    # open ends clamp to the video
    assert segment_frame_range(300, 30.0, start_s=-1.0, end_s=None) == (0, 299)
    assert segment_frame_range(300, 30.0, start_s=None, end_s=99.0) == (0, 299)
    # float noise: 0.1 s * 30 fps = 3.0000000000000004 must still be frame 3
    assert segment_frame_range(300, 30.0, start_s=0.1, end_s=0.3)[0] == 3


def test_clip_between_two_frames_takes_the_nearest_one():
    assert segment_frame_range(300, 30.0, start_s=2.01, end_s=2.02) == (60, 60)
    assert sample_frame_indices(300, 30.0, FrameSamplingConfig(), start_s=2.01, end_s=2.02) == [60, 60]


@pytest.mark.parametrize("start_s, end_s, field", [(5.0, 4.0, "start_s"), (10.0, None, "start_s"),
                                                   (float("nan"), None, "start_s")])
def test_bad_clips_raise(start_s, end_s, field):
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        sample_frame_indices(300, 30.0, FrameSamplingConfig(), start_s=start_s, end_s=end_s)


def test_matches_qwen_vl_utils_wherever_it_accepts_the_video():
    rng = np.random.default_rng(0)
    num_compared = 0
    for _ in range(3000):
        total = int(rng.integers(1, 4000))
        native_fps = float(rng.choice([23.976, 24.0, 25.0, 29.97, 30.0, 59.94, 60.0, 1.0, 7.5]))
        fps = float(rng.choice([0.25, 0.5, 1.0, 2.0, 3.0]))
        min_frames, max_frames = int(rng.choice([2, 4, 8])), int(rng.choice([8, 16, 32, 64, 768]))
        clip = {}
        if rng.random() < 0.3:
            duration = total / native_fps
            a, b = sorted(rng.uniform(-0.1 * duration, 1.1 * duration, 2))
            clip = dict(start_s=float(a), end_s=float(b))
        try:
            expected = _qwen_vl_utils_indices(total, native_fps, fps=fps, min_frames=min_frames,
                                              max_frames=max_frames, video_start=clip.get("start_s"),
                                              video_end=clip.get("end_s"))
        except (ValueError, AssertionError):
            continue  # qwen-vl-utils rejects it; our fallbacks are tested above
        cfg = FrameSamplingConfig(fps=fps, min_frames=min_frames, max_frames=max_frames)
        try:
            got = sample_frame_indices(total, native_fps, cfg, **clip)
        except ValueError:
            assert clip and clip["start_s"] >= total / native_fps  # only "starts after the end" may raise
            continue
        assert got == expected, (total, native_fps, cfg, clip)
        num_compared += 1
    assert num_compared > 1500


def test_fixed_count_matches_qwen_vl_utils_nframes():
    for total in (8, 9, 50, 1234):
        for nframes in (2, 4, 8):
            cfg = FrameSamplingConfig(num_frames=nframes)
            assert sample_frame_indices(total, 30.0, cfg) == _qwen_vl_utils_indices(total, 30.0, nframes=nframes)


def test_matches_transformers_qwen3_sampler_when_its_count_is_even():
    """Qwen3VLVideoProcessor.sample_frames truncates the count but does not make it even; compare where it is."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    num_compared = 0
    for total in range(4, 900, 7):
        for native_fps in (24.0, 29.97, 30.0):
            hf_self = SimpleNamespace(fps=2, min_frames=4, max_frames=32)
            metadata = SimpleNamespace(total_num_frames=total, fps=native_fps)
            hf = Qwen3VLVideoProcessor.sample_frames(hf_self, metadata, fps=2).tolist()
            if len(hf) % 2:
                continue
            assert sample_frame_indices(total, native_fps, FrameSamplingConfig(fps=2.0, max_frames=32)) == hf
            num_compared += 1
    assert num_compared > 100


def test_invariants_over_a_grid():
    for tps in (1, 2, 4):
        for total in (1, 2, 3, 5, 17, 64, 901):
            for native_fps in (1.0, 29.97, 60.0):
                for fps in (0.1, 1.0, 4.0):
                    cfg = FrameSamplingConfig(fps=fps, min_frames=tps, max_frames=8 * tps, temporal_patch_size=tps)
                    indices = sample_frame_indices(total, native_fps, cfg)
                    assert len(indices) % tps == 0 and tps <= len(indices) <= 8 * tps
                    assert indices == sorted(indices) and 0 <= indices[0] and indices[-1] < total
                    if len(indices) > 1:  # linspace spans the whole video
                        assert indices[0] == 0 and indices[-1] == total - 1
                    if total >= tps:  # enough frames: no repeats
                        assert len(set(indices)) == len(indices)


def test_timestamps_and_temporal_patch_times_match_transformers_qwen3_processor():
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    indices = sample_frame_indices(300, 29.97, FrameSamplingConfig())
    times = sampled_timestamps(indices, 29.97)
    assert times == pytest.approx([i / 29.97 for i in indices])
    assert temporal_patch_timestamps(times, 2) == pytest.approx(
        Qwen3VLProcessor._calculate_timestamps(None, indices, 29.97, 2))
    odd = [0, 10, 20]  # padded with the last frame like the processor
    assert temporal_patch_timestamps(sampled_timestamps(odd, 10.0), 2) == pytest.approx(
        Qwen3VLProcessor._calculate_timestamps(None, list(odd), 10.0, 2))
    with pytest.raises(ValueError, match="^timestamps_s: expected"):
        temporal_patch_timestamps([], 2)


def test_second_per_grid_t_is_the_processor_formula():
    # transformers: temporal_patch_size / sampled_fps, sampled_fps = n_sampled / n_total * native_fps
    indices = sample_frame_indices(300, 30.0, FrameSamplingConfig())
    assert second_per_grid_t(indices, 30.0, 2) == pytest.approx(2 / (len(indices) / 300 * 30.0))
    assert second_per_grid_t(indices, 30.0, 2) == pytest.approx(1.0)  # 2 fps sampling -> 1 s per 2-frame patch
    clip = sample_frame_indices(300, 30.0, FrameSamplingConfig(), start_s=2.0, end_s=4.0)  # 61 frames, 4 sampled
    assert second_per_grid_t(clip, 30.0, 2) == pytest.approx(2 / (4 / 61 * 30.0))
