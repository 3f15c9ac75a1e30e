"""Keyframe selection: which frames of a source video (or of its ``start_s``/``end_s`` clip) condition a thought video.

Two methods, both pure functions on frame counts / decoded frames plus one I/O wrapper (:func:`select_keyframes`):

* ``uniform``: ``k`` frames evenly spread over the clip, by the project's one sampling rule
  (:func:`storms_dist.data.sampling.sample_frame_indices` with ``num_frames=k`` and a temporal patch of 1), so the
  first and the last frame of the clip are always included.
* ``scene_change``: frame-difference peaks. Each analysed frame is turned into a small grayscale thumbnail
  (area average, ``size`` x ``size``); its score is the mean absolute difference to the previous thumbnail (0-255
  scale; the first frame scores 0). Keyframes are the first frame plus the ``k - 1`` highest-scoring local maxima
  (a score >= its left neighbour and > its right neighbour), at least ``min_gap`` analysed frames apart. A hard cut
  at frame ``t`` gives one large score at ``t``: the first frame of the new shot. When a video has fewer peaks than
  ``k - 1`` (a static shot), the rest is filled with uniformly spread frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from storms_dist.data.sampling import FrameSamplingConfig, sample_frame_indices, segment_frame_range
from storms_dist.data.video_io import VideoInfo, decode_frames, probe_video
from storms_dist.thoughts.constants import KEYFRAME_METHODS

KeyframeMethod = Literal["uniform", "scene_change"]
MAX_ANALYSIS_FRAMES = 256
"""scene_change decodes every frame of the clip up to this many; longer clips are analysed at this many frames
spread uniformly (a cut then lands on the first analysed frame after it)."""

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # BT.601


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"num_keyframes: expected an int >= 1, got {k!r}")


def uniform_keyframes(num_total_frames: int, native_fps: float | None, k: int, *, start_s: float | None = None,
                      end_s: float | None = None) -> list[int]:
    """``k`` frame indices evenly spread over the clip (fewer, without repeats, when the clip has fewer frames)."""
    _check_k(k)
    cfg = FrameSamplingConfig(fps=None, num_frames=k, min_frames=1, max_frames=max(k, 1), temporal_patch_size=1)
    indices = sample_frame_indices(num_total_frames, native_fps, cfg, start_s=start_s, end_s=end_s)
    return sorted(set(indices))


def grayscale_thumbnails(frames_THWC_uint8: np.ndarray, size: int = 32) -> np.ndarray:
    """``[T, H, W, 3]`` uint8 RGB -> ``[T, s, s]`` float32 luma in 0-255, area-averaged (``s = min(size, H, W)``)."""
    frames = np.asarray(frames_THWC_uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames: expected [T, H, W, 3], got {list(frames.shape)}")
    gray = frames.astype(np.float32) @ _LUMA  # [T, H, W]
    height, width = gray.shape[1:]
    rows = np.linspace(0, height, min(size, height) + 1).astype(int)
    cols = np.linspace(0, width, min(size, width) + 1).astype(int)
    sums = np.add.reduceat(np.add.reduceat(gray, rows[:-1], axis=1), cols[:-1], axis=2)
    areas = np.diff(rows)[:, None] * np.diff(cols)[None, :]
    return (sums / areas).astype(np.float32)


def frame_difference_scores(frames_THWC_uint8: np.ndarray, *, size: int = 32) -> np.ndarray:
    """``[T]`` float: mean |thumbnail_t - thumbnail_(t-1)| (0-255), 0 for the first frame."""
    thumbs = grayscale_thumbnails(frames_THWC_uint8, size)
    scores = np.zeros(len(thumbs), dtype=np.float64)
    if len(thumbs) > 1:
        scores[1:] = np.abs(np.diff(thumbs, axis=0)).mean(axis=(1, 2))
    return scores


def _local_maxima(scores: np.ndarray) -> list[int]:
    peaks = []
    for t in range(1, len(scores)):
        right = scores[t + 1] if t + 1 < len(scores) else -np.inf
        if scores[t] > 0 and scores[t] >= scores[t - 1] and scores[t] > right:
            peaks.append(t)
    return peaks


def scene_change_keyframes(frames_THWC_uint8: np.ndarray, k: int, *, size: int = 32, min_gap: int = 1) -> list[int]:
    """Positions (into ``frames``) of ``min(k, T)`` keyframes: 0, then the highest frame-difference peaks, sorted."""
    _check_k(k)
    if min_gap < 1:
        raise ValueError(f"min_gap: expected >= 1, got {min_gap}")
    scores = frame_difference_scores(frames_THWC_uint8, size=size)
    count = len(scores)
    if count == 0:
        raise ValueError("frames: expected at least one frame")
    k = min(k, count)
    chosen = [0]
    # highest score first; equal scores: the earlier frame first (stable sort of the negated scores)
    for t in sorted(_local_maxima(scores), key=lambda i: -scores[i]):
        if len(chosen) == k:
            break
        if all(abs(t - c) >= min_gap for c in chosen):
            chosen.append(t)
    if len(chosen) < k:  # too few peaks (static footage): spread the rest uniformly
        for t in [int(round(x)) for x in np.linspace(0, count - 1, k)] + list(range(count)):
            if len(chosen) == k:
                break
            if t not in chosen:
                chosen.append(t)
    return sorted(chosen)


@dataclass(frozen=True)
class Keyframes:
    """Selected frames of one video: ``indices`` into the video, their times, and the decoded RGB frames."""

    method: str
    indices: tuple[int, ...]
    times_s: tuple[float, ...]
    frames: np.ndarray  # [k, H, W, 3] uint8
    info: VideoInfo

    def to_json(self) -> dict:
        return {"method": self.method, "indices": list(self.indices), "times_s": [round(t, 4) for t in self.times_s]}


def select_keyframes(path: str | Path, method: KeyframeMethod, k: int, *, start_s: float | None = None,
                     end_s: float | None = None, max_analysis_frames: int = MAX_ANALYSIS_FRAMES,
                     size: int = 32, min_gap: int = 1) -> Keyframes:
    """Probe ``path``, pick ``k`` keyframes of the clip by ``method`` and decode them (VideoDecodeError if unreadable)."""
    if method not in KEYFRAME_METHODS:
        raise ValueError(f"keyframes: expected one of {', '.join(KEYFRAME_METHODS)}, got {method!r}")
    info = probe_video(path)
    if method == "uniform":
        indices = uniform_keyframes(info.num_frames, info.fps, k, start_s=start_s, end_s=end_s)
        frames = decode_frames(path, indices)
    else:
        first, last = segment_frame_range(info.num_frames, info.fps, start_s=start_s, end_s=end_s)
        if last - first + 1 <= max_analysis_frames:
            candidates = list(range(first, last + 1))
        else:
            candidates = uniform_keyframes(info.num_frames, info.fps, max_analysis_frames, start_s=start_s,
                                           end_s=end_s)
        analysed = decode_frames(path, candidates)
        positions = scene_change_keyframes(analysed, k, size=size, min_gap=min_gap)
        indices = [candidates[p] for p in positions]
        frames = analysed[positions]
    return Keyframes(method=method, indices=tuple(int(i) for i in indices),
                     times_s=tuple(int(i) / info.fps for i in indices), frames=frames, info=info)


def pick_condition(keyframes: Keyframes | Sequence, choice: str, teacher_choice: int | None = None) -> int:
    """Position of the keyframe that conditions image-to-video: ``first``/``middle``/``last``, or ``auto`` (the
    teacher's pick when it made one, else the first)."""
    count = len(keyframes.indices) if isinstance(keyframes, Keyframes) else len(keyframes)
    if count < 1:
        raise ValueError("keyframes: expected at least one")
    if choice == "auto":
        return teacher_choice if teacher_choice is not None and 0 <= teacher_choice < count else 0
    positions = {"first": 0, "middle": (count - 1) // 2, "last": count - 1}
    if choice not in positions:
        raise ValueError(f"condition: expected auto, first, middle or last, got {choice!r}")
    return positions[choice]
