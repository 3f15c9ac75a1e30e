"""Rendering of the ``balls`` task: ``ThoughtSpec`` (what a thought video shows: the scene times and the marks),
the background gradient, and ``render``, which draws frames of a simulated trajectory (background, trails, balls,
occluder, rings and tally marks).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from storms_dist.data.synth.config import PALETTE
from storms_dist.data.synth.physics import Scene, Trajectory

BACKGROUND_RGB = (40, 24, 40)  # the background's centre colour; see background_image
OCCLUDER_RGB = (128, 128, 128)
MARK_RGB = (255, 255, 255)


@dataclass(frozen=True)
class ThoughtSpec:
    """What a thought video shows: scene times to render plus marks. ``rings`` are (frame, ball, extra_radius)."""

    kind: Literal["continuation", "replay_marked", "replay_trails", "still_marked"]
    times: tuple[float, ...]
    rings: tuple[tuple[int, int, int], ...] = ()
    trail_balls: tuple[int, ...] = ()
    tally: tuple[int, ...] = ()  # per frame: how many tally squares to draw (empty: none)


def _paint_annulus(frame: np.ndarray, centre: Sequence[float], outer: float, colour: Any, inner: float = -1.0) -> None:
    """Paint pixels whose centre lies within ``outer`` of ``centre`` and beyond ``inner`` (a disc when inner < 0).

    Works on the bounding box only: full-frame masks cost more than the video encoding at these sizes.
    """
    size = frame.shape[0]
    x, y = float(centre[0]), float(centre[1])
    col0, col1 = max(int(x - outer), 0), min(int(x + outer) + 2, size)
    row0, row1 = max(int(y - outer), 0), min(int(y + outer) + 2, size)
    if col0 >= col1 or row0 >= row1:
        return
    dx = np.arange(col0, col1) + 0.5 - x
    dy = np.arange(row0, row1) + 0.5 - y
    d2 = dy[:, None] ** 2 + dx[None, :] ** 2
    mask = d2 <= outer * outer
    if inner >= 0:
        mask &= d2 > inner * inner
    frame[row0:row1, col0:col1][mask] = colour


@functools.lru_cache(maxsize=8)
def background_image(size: int) -> np.ndarray:
    """``[size, size, 3]`` uint8, read-only (computed once per size): a dim gradient, red growing to the right and blue
    downwards.

    A real scene has landmarks; a uniform floor has none, and Qwen2.5-VL's vision tower (rotary positions only, no
    absolute embedding) then cannot tell where an object is from its patch alone, nor can a mean-pooled thought-video
    target. The gradient puts the position into every patch's content. Balls and marks are far brighter.
    """
    ramp = np.linspace(-1.0, 1.0, size)
    image = np.empty((size, size, 3), dtype=np.float64)
    image[:] = BACKGROUND_RGB
    image[..., 0] += 32.0 * ramp[None, :]
    image[..., 2] += 32.0 * ramp[:, None]
    image = np.round(image).astype(np.uint8)
    image.setflags(write=False)
    return image


def render(scene: Scene, trajectory: Trajectory, times: Sequence[float], spec: ThoughtSpec | None = None) -> np.ndarray:
    """Frames ``[len(times), size, size, 3]`` uint8 RGB: background, trails, balls, occluder, then marks on top."""
    radius = scene.radius
    positions, _ = trajectory.state_at(times)
    colours = np.array([PALETTE[c] for c in scene.colours], dtype=np.uint8)
    frames = np.empty((len(times), scene.size, scene.size, 3), dtype=np.uint8)
    frames[:] = background_image(scene.size)
    rings_by_frame: dict[int, list[tuple[int, int]]] = {}
    for frame_index, ball, extra in (spec.rings if spec else ()):
        rings_by_frame.setdefault(frame_index, []).append((ball, extra))
    for f, t in enumerate(times):
        frame = frames[f]
        for ball in (spec.trail_balls if spec else ()):
            _draw_trail(frame, trajectory, ball, float(t), radius, colours[ball])
        for ball in range(scene.num_balls):
            _paint_annulus(frame, positions[f, ball], radius, colours[ball])
        if scene.occluder is not None:
            x0, y0, x1, y1 = scene.occluder
            frame[y0:y1, x0:x1] = OCCLUDER_RGB
        for ball, extra in rings_by_frame.get(f, ()):
            _paint_annulus(frame, positions[f, ball], radius + 2.5 + extra, MARK_RGB, inner=radius + 1)
        if spec and spec.tally:
            for k in range(spec.tally[f]):
                frame[2:6, 2 + 6 * k:6 + 6 * k] = MARK_RGB
    return frames


def _draw_trail(frame: np.ndarray, trajectory: Trajectory, ball: int, t: float, radius: float,
                colour: np.ndarray) -> None:
    """Fading dots at the ball's positions over the last 3 frames: their spacing shows speed and direction."""
    past_times = [t - 0.5 * k for k in range(6, 0, -1) if t - 0.5 * k >= 0]
    if not past_times:
        return
    background = background_image(frame.shape[0])
    for k, position in enumerate(trajectory.state_at(past_times)[0][:, ball]):
        row, col = (min(max(int(c), 0), frame.shape[0] - 1) for c in (position[1], position[0]))
        under = background[row, col].astype(np.float64)
        strength = 0.25 + 0.5 * (k + 1) / len(past_times)
        faded = np.round(under + strength * (colour - under)).astype(np.uint8)
        _paint_annulus(frame, position, 0.45 * radius, faded)
