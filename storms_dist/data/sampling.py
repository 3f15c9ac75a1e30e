"""The one frame-index rule shared by training, latent targets and eval (pure: no decoding, no I/O).

The rule is qwen-vl-utils' ``smart_nframes`` + ``calculate_video_frame_range`` + ``torch.linspace(...).round()``
(``vision_process.py``, the reference preprocessing Qwen2-VL / Qwen2.5-VL / Qwen3-VL were trained and evaluated
with), with three deliberate differences that only matter where qwen-vl-utils raises or where float noise would
flip a floor/ceil:

* too few frames (a 1-frame video, or a clip shorter than one temporal patch) gives ``temporal_patch_size``
  indices that repeat the last frame, which is what the Qwen processors' temporal padding would produce anyway,
  instead of ``ValueError("nframes should in interval ...")``;
* a clip that falls between two frames takes the frame nearest its midpoint instead of raising;
* floors and ceils of float products get a 1e-9 tolerance (``0.1 s * 30 fps`` is ``3.0000000000000004``).

See docs/preprocessing.md for worked examples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# NOTE: tolerance for floor/ceil of float products such as duration * fps (noise, not semantics).
_EPS = 1e-9


@dataclass(kw_only=True)
class FrameSamplingConfig:
    """How many frames to sample from a video (or a clipped segment of it)."""

    fps: float | None = 2.0
    """Sampling rate in frames per second of video time; ignored when ``num_frames`` is set."""
    num_frames: int | None = None
    """Fixed frame count; overrides ``fps``, ``min_frames`` and ``max_frames`` (qwen-vl-utils ``nframes``)."""
    min_frames: int = 4
    """Lower clamp of the fps-derived count (qwen-vl-utils ``FPS_MIN_FRAMES``)."""
    max_frames: int = 32
    """Upper clamp of the fps-derived count (qwen-vl-utils ``FPS_MAX_FRAMES`` is 768; 32 bounds memory)."""
    temporal_patch_size: int = 2
    """Frames per temporal patch of the vision tower; counts are multiples of it (qwen-vl-utils ``FRAME_FACTOR``)."""

    def __post_init__(self) -> None:
        tps = self.temporal_patch_size
        if isinstance(tps, bool) or not isinstance(tps, int) or tps < 1:
            raise ValueError(f"temporal_patch_size: expected an int >= 1, got {tps!r}")
        fps = self.fps
        if fps is not None and not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps: expected a finite rate > 0 or None, got {fps!r}")
        if self.fps is None and self.num_frames is None:
            raise ValueError("fps: expected a rate > 0 when num_frames is None (one of fps / num_frames must be set)")
        for name in ("num_frames", "min_frames", "max_frames"):
            value = getattr(self, name)
            if (name != "num_frames" or value is not None) and not _is_positive_multiple(value, tps):
                raise ValueError(f"{name}: expected a positive multiple of temporal_patch_size={tps}, got {value!r}")
        if self.min_frames > self.max_frames:
            raise ValueError(f"min_frames: expected <= max_frames={self.max_frames}, got {self.min_frames}")


def _is_positive_multiple(value: object, factor: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= factor and value % factor == 0


def effective_fps(native_fps: float | None) -> float:
    """``native_fps`` if it is a finite rate > 0, else 1.0 (unknown rate: one frame per second of 'video time')."""
    if native_fps is None or not math.isfinite(native_fps) or native_fps <= 0:
        return 1.0
    return float(native_fps)


def segment_frame_range(
    num_total_frames: int, native_fps: float | None, *, start_s: float | None = None, end_s: float | None = None
) -> tuple[int, int]:
    """Inclusive ``(first, last)`` frame indices of the clip ``[start_s, end_s]`` (whole video when both are None).

    qwen-vl-utils ``calculate_video_frame_range``: times are clamped to ``[0, num_total_frames / fps]``, the first
    frame is ``ceil(start * fps)``, the last ``min(floor(end * fps), num_total_frames - 1)``. A clip between two
    frames (first > last) takes the single frame nearest its midpoint.
    """
    if isinstance(num_total_frames, bool) or not isinstance(num_total_frames, int) or num_total_frames < 1:
        raise ValueError(f"num_total_frames: expected an int >= 1, got {num_total_frames!r}")
    if start_s is None and end_s is None:
        return 0, num_total_frames - 1
    fps = effective_fps(native_fps)
    duration_s = num_total_frames / fps
    for name, value in (("start_s", start_s), ("end_s", end_s)):
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite time in seconds or None, got {value!r}")
    if start_s is not None and end_s is not None and start_s > end_s:
        raise ValueError(f"start_s: expected <= end_s={end_s}, got {start_s}")
    if start_s is not None and start_s >= duration_s:
        raise ValueError(f"start_s: expected < the video duration {duration_s:.3f} s, got {start_s}")
    start_clamped_s = 0.0 if start_s is None else min(max(start_s, 0.0), duration_s)
    end_clamped_s = duration_s if end_s is None else min(max(end_s, 0.0), duration_s)
    first = math.ceil(start_clamped_s * fps - _EPS)
    last = min(math.floor(end_clamped_s * fps + _EPS), num_total_frames - 1)
    if first > last:  # the clip lies between two frames: keep the one nearest its middle
        middle = min(max(round((start_clamped_s + end_clamped_s) / 2 * fps), 0), num_total_frames - 1)
        return middle, middle
    return first, last


def num_sampled_frames(num_segment_frames: int, native_fps: float | None, cfg: FrameSamplingConfig) -> int:
    """How many frames to sample from a segment of ``num_segment_frames`` frames (a multiple of the temporal patch).

    ``num_frames`` if set; else qwen-vl-utils ``smart_nframes``:
    ``floor_to_tps(min(max(n_segment / native_fps * fps, min_frames), floor_to_tps(min(max_frames, n_segment))))``,
    and never below ``temporal_patch_size`` (then indices repeat).
    """
    tps = cfg.temporal_patch_size
    if cfg.num_frames is not None:
        return cfg.num_frames
    assert cfg.fps is not None  # guaranteed by FrameSamplingConfig.__post_init__
    wanted = num_segment_frames / effective_fps(native_fps) * cfg.fps
    upper = _floor_to_multiple(min(cfg.max_frames, num_segment_frames), tps)
    count = _floor_to_multiple(min(max(wanted, cfg.min_frames), upper), tps)
    return max(count, tps)


def _floor_to_multiple(value: float, factor: int) -> int:
    return math.floor(value / factor + _EPS) * factor


def sample_frame_indices(
    num_total_frames: int,
    native_fps: float | None,
    cfg: FrameSamplingConfig,
    *,
    start_s: float | None = None,
    end_s: float | None = None,
) -> list[int]:
    """Frame indices to decode: sorted, in ``[0, num_total_frames)``, a multiple of ``cfg.temporal_patch_size`` long.

    1. Segment ``[first, last]`` = the whole video, or the clip ``[start_s, end_s]`` (``segment_frame_range``).
    2. Count ``n`` = ``cfg.num_frames``, or ``floor(n_segment / native_fps * fps)`` clamped to
       ``[min_frames, min(max_frames, n_segment)]`` and rounded down to a multiple of ``temporal_patch_size``
       (never below it) (``num_sampled_frames``).
    3. Indices = ``torch.linspace(first, last, n)`` in float32, rounded half-to-even (exactly qwen-vl-utils).
       When ``n`` exceeds the segment (fixed ``num_frames`` on a short video, or a 1-frame video) indices repeat.

    ``native_fps`` None, <= 0, NaN or inf means unknown and is treated as 1.0.
    ``num_total_frames`` < 1 raises ValueError.
    """
    first, last = segment_frame_range(num_total_frames, native_fps, start_s=start_s, end_s=end_s)
    count = num_sampled_frames(last - first + 1, native_fps, cfg)
    # NOTE: float32 linspace + round (half to even) on purpose: bit-identical to qwen-vl-utils' _read_video_*.
    return torch.linspace(first, last, count, dtype=torch.float32).round().long().tolist()


def sampled_timestamps(indices: Sequence[int], native_fps: float | None) -> list[float]:
    """Time in seconds of each sampled frame, ``index / native_fps`` (Qwen3-VL ``VideoMetadata.timestamps``)."""
    fps = effective_fps(native_fps)
    return [int(index) / fps for index in indices]


def temporal_patch_timestamps(timestamps_s: Sequence[float], temporal_patch_size: int = 2) -> list[float]:
    """One time per temporal patch: the mean of its first and last frame's time (Qwen3-VL prompt timestamps).

    Mirrors ``Qwen3VLProcessor._calculate_timestamps`` (transformers/models/qwen3_vl/processing_qwen3_vl.py): the
    list is first padded to a multiple of ``temporal_patch_size`` by repeating its last entry.
    """
    if not timestamps_s:
        raise ValueError("timestamps_s: expected at least one frame time, got an empty sequence")
    times = [float(t) for t in timestamps_s]
    times += [times[-1]] * (-len(times) % temporal_patch_size)
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


def second_per_grid_t(indices: Sequence[int], native_fps: float | None, temporal_patch_size: int = 2) -> float:
    """Seconds spanned by one temporal patch: Qwen2.5-VL's ``second_per_grid_ts`` entry for this video.

    transformers/qwen-vl-utils: ``temporal_patch_size / sampled_fps`` with
    ``sampled_fps = n_sampled / n_segment * native_fps``; the segment is ``[indices[0], indices[-1]]`` because the
    linspace of ``sample_frame_indices`` always starts and ends on the segment's first and last frame.
    """
    if not indices:
        raise ValueError("indices: expected at least one frame index, got an empty sequence")
    num_segment_frames = int(indices[-1]) - int(indices[0]) + 1
    sampled_fps = len(indices) / num_segment_frames * effective_fps(native_fps)
    return temporal_patch_size / sampled_fps
