"""Procedural spatial-temporal benchmark: bouncing balls, multiple-choice questions and ground-truth thought videos.

Every source video shows 1-``max_balls`` coloured balls moving at constant velocity, bouncing elastically off the four
walls (and, optionally, off each other), sometimes passing behind a static grey bar. The physics is simulated
event by event, so every wall bounce and collision is known exactly, with its time in frames. Each video gets one
question whose answer needs the dynamics (extrapolate, order, count, speed_direction) or, as a control, a single frame
(static), plus a "thought video" that shows the evidence (the continuation, a replay with the events marked, motion
trails, or the queried frame with the object marked). Train and val videos also get single-frame perception questions
for Stage-0 pre-training of the tiny backbone.

Everything is a pure function of ``(cfg.seed, split, index)``: each split is reproducible on its own and the output
does not depend on the number of workers. See docs/data.md for the schema and examples.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import multiprocessing
import shutil
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from storms_dist.config import to_dict
from storms_dist.data import grid
from storms_dist.data.grid import GridTaskConfig
from storms_dist.data.manifest import Sample, letter, write_manifest
from storms_dist.data.video_io import SUFFIX_BY_CODEC, write_video

GENERATOR_VERSION = 3  # bump when the content for a given config changes; invalidates existing stamps

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 70),
    "blue": (40, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 220),
    "cyan": (40, 220, 230),
}
BACKGROUND_RGB = (40, 24, 40)  # the background's centre colour; see background_image
OCCLUDER_RGB = (128, 128, 128)
MARK_RGB = (255, 255, 255)

WALLS = ("left", "right", "top", "bottom")
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
DIRECTIONS = grid.DIRECTIONS  # one vocabulary for both tasks
EXTREMES = ("leftmost", "rightmost", "topmost", "bottommost")

QTYPES = ("extrapolate", "order", "count", "speed_direction", "static")
VARIANTS: dict[str, tuple[str, ...]] = {
    "extrapolate": ("next_wall", "future_quadrant"),
    "order": ("event_order", "first_bounce"),
    "count": ("wall_bounces",),
    "speed_direction": ("fastest", "start_direction"),
    "static": ("closest_to_corner", "num_balls"),
}
PERCEPTION_VARIANTS = ("colour_in_quadrant", "extreme", "num_balls", "position", "caption")
SPLITS = ("train", "val", "test")
PERCEPTION_SPLITS = ("train", "val")
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

# Unambiguity margins, in frames: an event closer than EDGE to the clip's first/last frame may be missed or
# miscounted by a viewer, and two events closer than GAP cannot be ordered or counted reliably at 8 fps.
EDGE_MARGIN_FRAMES = 1.0
EVENT_GAP_FRAMES = 2.0
DIRECTION_MIN_FRACTION = 0.3  # |vx|, |vy| >= this * speed, so "up-left" etc. is clearly diagonal
FASTEST_MIN_RATIO = 1.3  # the fastest ball is at least this much faster than the runner-up
MAX_SCENE_ATTEMPTS = 20_000
_MAX_EVENTS = 400  # a ball pinned between a wall and another ball bounces forever; such scenes are resampled


# ----------------------------------------------------------------------------------------------------- config


@dataclass(kw_only=True)
class SynthConfig:
    """Size and content of the synthetic benchmark. ``num_*`` count source videos (= questions) per split.

    ``task`` picks the generator: ``grid`` (the embedded default: one ball on a 4x4 grid, variable-horizon future
    questions; storms_dist/data/grid.py, configured by ``grid``) or ``balls`` (several balls, walls, collisions and
    occluders at ``size`` px: the harder benchmark, for pretrained backbones; the fields below ``grid`` configure it).
    """

    seed: int = 0
    task: Literal["grid", "balls"] = "grid"
    grid: GridTaskConfig = field(default_factory=GridTaskConfig)
    num_train: int = 1200
    num_val: int = 120
    num_test: int = 240
    num_frames: int = 16
    fps: float = 8.0
    size: int = 84
    codec: Literal["vp9", "h264"] = "vp9"
    qtypes: tuple[str, ...] | None = None
    """Question types, round-robin over the videos; None = the task's own (grid: future_cell x3 per current_cell)."""
    num_thought_frames: int = 16
    max_balls: int = 3
    ball_collisions: bool = True
    occluder_prob: float = 0.3
    # canonical: options drawn from a fixed vocabulary (colours, walls, quadrants, directions, counts) are listed in
    # that vocabulary's order, so an answer letter names a value, not a position in a per-item shuffle; free-text
    # options (event descriptions, captions) are still placed at balanced positions. A backbone trained from scratch
    # cannot learn the option-matching indirection in the demo's budget (docs/results.md, run 1). shuffled: every
    # question's correct option at a balanced position, the usual MC-benchmark layout.
    option_order: Literal["canonical", "shuffled"] = "canonical"
    workers: int = 2  # processes; does not change the output

    def __post_init__(self) -> None:
        for name in ("num_train", "num_val", "num_test"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {getattr(self, name)!r}")
        if self.num_train + self.num_val + self.num_test == 0:
            raise ValueError("num_train/num_val/num_test: expected at least one video in some split, got all 0")
        if self.task not in ("grid", "balls"):
            raise ValueError(f"task: expected 'grid' or 'balls', got {self.task!r}")
        if self.num_frames < 8:
            raise ValueError(f"num_frames: expected >= 8 (events need margins at both ends), got {self.num_frames}")
        if self.num_thought_frames < 8:
            raise ValueError(f"num_thought_frames: expected >= 8, got {self.num_thought_frames}")
        if not self.fps > 0:
            raise ValueError(f"fps: expected > 0, got {self.fps}")
        if self.size < 56 or self.size % 28:
            raise ValueError(f"size: expected a multiple of 28 (14px patches x 2x2 merge) and >= 56, got {self.size}")
        if self.codec not in ("vp9", "h264"):
            raise ValueError(f"codec: expected 'vp9' or 'h264', got {self.codec!r}")
        valid_qtypes = grid.GRID_QTYPES if self.task == "grid" else QTYPES
        if self.qtypes is not None:  # None stays None: the task's own list, resolved by question_types
            self.qtypes = tuple(self.qtypes)
        types = self.question_types
        unknown = [q for q in types if q not in valid_qtypes]
        # the grid task may repeat a type (that weights it); the balls task round-robins over distinct types
        repeated = self.task == "balls" and len(set(types)) != len(types)
        if not types or unknown or repeated:
            raise ValueError(f"qtypes: expected a non-empty list of distinct names from {', '.join(valid_qtypes)}, "
                             f"got {list(types)}")
        if not 2 <= self.max_balls <= 4:
            raise ValueError(f"max_balls: expected 2..4 (order/speed questions need 2 balls), got {self.max_balls}")
        if not 0.0 <= self.occluder_prob <= 1.0:
            raise ValueError(f"occluder_prob: expected a probability in [0, 1], got {self.occluder_prob}")
        if self.option_order not in ("canonical", "shuffled"):
            raise ValueError(f"option_order: expected 'canonical' or 'shuffled', got {self.option_order!r}")
        if self.workers < 1:
            raise ValueError(f"workers: expected >= 1, got {self.workers}")

    @property
    def question_types(self) -> tuple[str, ...]:
        if self.qtypes is None:
            return grid.GRID_DEFAULT_QTYPES if self.task == "grid" else QTYPES
        return self.qtypes

    def num_videos(self, split: str) -> int:
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}[split]

    @property
    def radius(self) -> float:
        return float(round(0.07 * self.size))

    @property
    def speed_range(self) -> tuple[float, float]:
        """Ball speed in pixels per frame: slow enough to track (< one diameter per frame), fast enough to bounce."""
        return 0.02 * self.size, 0.07 * self.size


# ----------------------------------------------------------------------------------------------------- physics


@dataclass(frozen=True)
class Scene:
    """Initial state. Positions are ball centres in pixels (x right, y down) at frame 0; velocities in px/frame."""

    size: int
    radius: float
    colours: tuple[str, ...]
    positions: tuple[tuple[float, float], ...]
    velocities: tuple[tuple[float, float], ...]
    occluder: tuple[int, int, int, int] | None  # x0, y0, x1, y1 pixel box, drawn over the balls

    @property
    def num_balls(self) -> int:
        return len(self.colours)

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "radius": self.radius, "colours": list(self.colours),
                "positions": [list(p) for p in self.positions], "velocities": [list(v) for v in self.velocities],
                "occluder": None if self.occluder is None else list(self.occluder)}

    @staticmethod
    def from_json(data: dict[str, Any]) -> Scene:
        return Scene(size=int(data["size"]), radius=float(data["radius"]), colours=tuple(data["colours"]),
                     positions=tuple(tuple(p) for p in data["positions"]),
                     velocities=tuple(tuple(v) for v in data["velocities"]),
                     occluder=None if data["occluder"] is None else tuple(data["occluder"]))


@dataclass(frozen=True)
class Event:
    time: float  # in frames; frame i is shown at time i
    kind: Literal["wall", "collision"]
    ball: int
    wall: str | None = None  # for kind == "wall"
    other: int | None = None  # for kind == "collision"


@dataclass(frozen=True)
class Trajectory:
    """Piecewise-linear motion: between consecutive key times every ball moves at its key velocity."""

    key_times: np.ndarray  # [K]
    key_positions: np.ndarray  # [K, num_balls, 2]
    key_velocities: np.ndarray  # [K, num_balls, 2]
    events: tuple[Event, ...]
    duration: float

    def state_at(self, times: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions and velocities ``[len(times), num_balls, 2]`` at the given times."""
        times = np.asarray(times, dtype=np.float64)
        key = np.searchsorted(self.key_times, times, side="right") - 1
        elapsed = (times - self.key_times[key])[:, None, None]
        return self.key_positions[key] + self.key_velocities[key] * elapsed, self.key_velocities[key]

    def position(self, ball: int, t: float) -> np.ndarray:
        return self.state_at([t])[0][0, ball]

    def wall_events(self, ball: int | None = None) -> list[Event]:
        return [e for e in self.events if e.kind == "wall" and (ball is None or e.ball == ball)]

    def collides(self, ball: int, t_start: float, t_end: float) -> bool:
        return any(e.kind == "collision" and ball in (e.ball, e.other) and t_start <= e.time <= t_end
                   for e in self.events)


class _DegenerateScene(Exception):
    """Too many events (a ball trapped between a wall and another ball); the scene is resampled."""


def _next_hits(pos: np.ndarray, vel: np.ndarray, low: float, high: float, radius: float,
               collisions: bool) -> tuple[float, list[tuple]]:
    """Time until the next event(s) and all hits at that time: ("wall", ball, axis) or ("collision", i, j)."""
    candidates: list[tuple[float, tuple]] = []
    for ball in range(len(pos)):
        for axis in (0, 1):
            v = vel[ball, axis]
            if v > 1e-12:
                candidates.append((max((high - pos[ball, axis]) / v, 0.0), ("wall", ball, axis)))
            elif v < -1e-12:
                candidates.append((max((pos[ball, axis] - low) / -v, 0.0), ("wall", ball, axis)))
    if collisions:
        for i, j in itertools.combinations(range(len(pos)), 2):
            d = pos[j] - pos[i]
            w = vel[j] - vel[i]
            approach = float(d @ w)
            if approach >= 0:  # separating or at rest relative to each other
                continue
            a, c = float(w @ w), float(d @ d) - (2 * radius) ** 2
            discriminant = approach * approach - a * c
            if discriminant < 0:
                continue
            candidates.append((max((-approach - math.sqrt(discriminant)) / a, 0.0), ("collision", i, j)))
    if not candidates:
        return math.inf, []
    first = min(dt for dt, _ in candidates)
    return first, [hit for dt, hit in candidates if dt <= first + 1e-9]


def simulate(scene: Scene, duration: float, *, collisions: bool) -> Trajectory:
    """Exact event-driven simulation of elastic equal-mass discs in a box, from t = 0 to ``duration`` frames."""
    pos = np.array(scene.positions, dtype=np.float64)
    vel = np.array(scene.velocities, dtype=np.float64)
    low, high = scene.radius, scene.size - scene.radius
    t = 0.0
    key_times, key_positions, key_velocities = [0.0], [pos.copy()], [vel.copy()]
    events: list[Event] = []
    while True:
        dt, hits = _next_hits(pos, vel, low, high, scene.radius, collisions)
        if t + dt > duration:
            break
        pos = pos + vel * dt
        t += dt
        for kind, a, b in hits:
            if kind == "wall":
                towards_high = vel[a, b] > 0  # towards the right/bottom wall
                at_wall = pos[a, b] >= high - 1e-6 if towards_high else pos[a, b] <= low + 1e-6
                if vel[a, b] == 0 or not at_wall:
                    continue  # an earlier hit at this instant already turned the ball away
                wall = ("right" if towards_high else "left") if b == 0 else ("bottom" if towards_high else "top")
                pos[a, b] = high if towards_high else low  # snap: no drift through the wall
                vel[a, b] = -vel[a, b]
                events.append(Event(time=float(t), kind="wall", ball=a, wall=wall))
            else:
                normal = pos[b] - pos[a]
                normal /= np.linalg.norm(normal)
                closing = float((vel[b] - vel[a]) @ normal)
                if closing >= 0:
                    continue
                vel[a] += closing * normal  # equal masses: exchange the normal velocity components
                vel[b] -= closing * normal
                events.append(Event(time=float(t), kind="collision", ball=a, other=b))
        key_times.append(t)
        key_positions.append(pos.copy())
        key_velocities.append(vel.copy())
        if len(events) > _MAX_EVENTS:
            raise _DegenerateScene
    return Trajectory(key_times=np.array(key_times), key_positions=np.stack(key_positions),
                      key_velocities=np.stack(key_velocities), events=tuple(events), duration=duration)


def _sample_occluder(rng: np.random.Generator, size: int, radius: float) -> tuple[int, int, int, int]:
    """A grey bar in the interior, far enough from the walls that wall bounces are never hidden."""
    thickness = round(0.1 * size)
    length = round(rng.uniform(0.35, 0.55) * size)
    margin = math.ceil(2 * radius) + 2
    long_start = int(rng.integers(margin, size - margin - length + 1))
    short_start = int(rng.integers(margin, size - margin - thickness + 1))
    if rng.random() < 0.5:  # horizontal bar
        return long_start, short_start, long_start + length, short_start + thickness
    return short_start, long_start, short_start + thickness, long_start + length


def sample_scene(rng: np.random.Generator, cfg: SynthConfig, num_balls: int) -> Scene:
    size, radius = cfg.size, cfg.radius
    colours = tuple(str(c) for c in rng.choice(list(PALETTE), size=num_balls, replace=False))
    occluder = _sample_occluder(rng, size, radius) if rng.random() < cfg.occluder_prob else None
    positions: list[tuple[float, float]] = []
    while len(positions) < num_balls:
        candidate = tuple(float(x) for x in rng.uniform(radius + 1, size - radius - 1, size=2))
        if all(math.dist(candidate, p) >= 2 * radius + 2 for p in positions):
            positions.append(candidate)
    speed_min, speed_max = cfg.speed_range
    velocities = []
    for _ in range(num_balls):
        speed, angle = rng.uniform(speed_min, speed_max), rng.uniform(0, 2 * math.pi)
        velocities.append((speed * math.cos(angle), speed * math.sin(angle)))
    return Scene(size=size, radius=radius, colours=colours, positions=tuple(positions), velocities=tuple(velocities),
                 occluder=occluder)


def _fully_visible(scene: Scene, positions: np.ndarray) -> bool:
    """No ball overlaps the occluder at these positions ``[num_balls, 2]``."""
    if scene.occluder is None:
        return True
    x0, y0, x1, y1 = scene.occluder
    nearest_x = np.clip(positions[:, 0], x0, x1)
    nearest_y = np.clip(positions[:, 1], y0, y1)
    return bool(np.all(np.hypot(positions[:, 0] - nearest_x, positions[:, 1] - nearest_y) > scene.radius + 0.5))


def quadrant_of(position: Sequence[float], size: int) -> str:
    return QUADRANTS[2 * int(position[1] >= size / 2) + int(position[0] >= size / 2)]


def quadrant_margin(position: Sequence[float], size: int) -> float:
    """Distance of a centre from the nearest midline: small means the ball straddles two quadrants."""
    return min(abs(position[0] - size / 2), abs(position[1] - size / 2))


def direction_of(velocity: Sequence[float]) -> str:
    return f"{'up' if velocity[1] < 0 else 'down'}-{'left' if velocity[0] < 0 else 'right'}"


# ----------------------------------------------------------------------------------------------------- rendering


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


# ----------------------------------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class QuestionPlan:
    """A question with options in canonical order; letters are assigned later, balanced over the split."""

    variant: str
    question: str
    options: tuple[str, ...]
    correct: int
    thought: ThoughtSpec | None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class World:
    """A sampled scene with its simulated trajectory (through the clip, the continuation and a margin)."""

    cfg: SynthConfig
    scene: Scene
    trajectory: Trajectory

    @property
    def clip_end(self) -> float:
        return float(self.cfg.num_frames - 1)

    def colour(self, ball: int) -> str:
        return self.scene.colours[ball]

    def continuation_times(self) -> tuple[float, ...]:
        return tuple(float(self.cfg.num_frames + k) for k in range(self.cfg.num_thought_frames))

    def replay_times(self) -> tuple[float, ...]:
        return tuple(float(t) for t in np.linspace(0.0, self.clip_end, self.cfg.num_thought_frames))

    def still_times(self) -> tuple[float, ...]:
        return (0.0,) * self.cfg.num_thought_frames


def _nearest_frame(times: Sequence[float], t: float) -> int:
    return int(np.argmin(np.abs(np.asarray(times) - t)))


def _flash(frame: int, ball: int, num_frames: int) -> list[tuple[int, int, int]]:
    """A ring on the event frame and the next one, so the mark survives frame subsampling."""
    return [(f, ball, 0) for f in (frame, frame + 1) if f < num_frames]


def _colour_options(rng: np.random.Generator, scene: Scene, correct_colour: str,
                    num_options: int = 4) -> tuple[str, ...]:
    """The correct colour, the other balls' colours, then absent palette colours up to ``num_options``."""
    others = [c for c in scene.colours if c != correct_colour]
    absent = [c for c in PALETTE if c not in scene.colours]
    absent = [absent[i] for i in rng.permutation(len(absent))]
    return tuple([correct_colour, *others, *absent][:num_options])


def _plan_next_wall(world: World, rng: np.random.Generator, target_wall: str) -> QuestionPlan | None:
    end, num_thought = world.clip_end, world.cfg.num_thought_frames
    for ball in rng.permutation(world.scene.num_balls):
        walls = world.trajectory.wall_events(ball)
        if any(abs(e.time - end) < EDGE_MARGIN_FRAMES for e in walls):
            continue  # a bounce right at the end: is it the "next" one or not?
        after = [e for e in walls if e.time > end]
        if not after or after[0].wall != target_wall or after[0].time > end + num_thought - 1:
            continue
        hit = after[0]
        if len(after) > 1 and after[1].time - hit.time < EVENT_GAP_FRAMES:
            continue  # a corner: two walls at almost the same time
        if world.trajectory.collides(ball, end - EDGE_MARGIN_FRAMES, hit.time + EDGE_MARGIN_FRAMES):
            continue  # keep the continuation a matter of extrapolating motion and bounces
        times = world.continuation_times()
        return QuestionPlan(
            variant="next_wall",
            question=f"Which wall will the {world.colour(ball)} ball hit next after the video ends?",
            options=WALLS, correct=WALLS.index(target_wall),
            thought=ThoughtSpec(kind="continuation", times=times,
                                rings=tuple(_flash(_nearest_frame(times, hit.time), ball, num_thought))),
            meta={"ball": world.colour(ball), "hit_time": round(hit.time, 3)})
    return None


def _plan_future_quadrant(world: World, rng: np.random.Generator, target: tuple[str, bool]) -> QuestionPlan | None:
    quadrant, same_as_last = target
    cfg, end = world.cfg, world.clip_end
    frames_after = int(rng.choice(range(4, cfg.num_thought_frames + 1, 4)))
    query_time = end + frames_after
    for ball in rng.permutation(world.scene.num_balls):
        last, future = world.trajectory.position(ball, end), world.trajectory.position(ball, query_time)
        if quadrant_margin(future, cfg.size) < cfg.radius or quadrant_margin(last, cfg.size) < cfg.radius / 2:
            continue
        if quadrant_of(future, cfg.size) != quadrant or (quadrant_of(last, cfg.size) == quadrant) != same_as_last:
            continue
        if world.trajectory.collides(ball, end - EDGE_MARGIN_FRAMES, query_time + EDGE_MARGIN_FRAMES):
            continue
        times = world.continuation_times()
        return QuestionPlan(
            variant="future_quadrant",
            question=f"Where will the {world.colour(ball)} ball be {frames_after} frames after the video ends?",
            options=QUADRANTS, correct=QUADRANTS.index(quadrant),
            thought=ThoughtSpec(kind="continuation", times=times,
                                rings=tuple(_flash(frames_after - 1, ball, cfg.num_thought_frames))),
            meta={"ball": world.colour(ball), "frames_after": frames_after,
                  "same_quadrant_as_last_frame": same_as_last})
    return None


def _describe_wall_event(world: World, event: Event) -> str:
    return f"the {world.colour(event.ball)} ball hitting the {event.wall} wall"


def _plan_event_order(world: World, rng: np.random.Generator, earlier_mentioned_first: bool) -> QuestionPlan | None:
    end = world.clip_end
    seen = [e for e in world.trajectory.wall_events() if e.time <= end + EDGE_MARGIN_FRAMES]
    occurrences = Counter((e.ball, e.wall) for e in seen)

    def clear(e: Event) -> bool:  # once only, well inside the clip, not part of a corner double-hit
        return (occurrences[(e.ball, e.wall)] == 1 and EDGE_MARGIN_FRAMES <= e.time <= end - EDGE_MARGIN_FRAMES
                and not any(o.ball == e.ball and o is not e and abs(o.time - e.time) < EVENT_GAP_FRAMES for o in seen))

    candidates = [e for e in seen if clear(e)]
    pairs = [(a, b) for a, b in itertools.combinations(candidates, 2) if b.time - a.time >= EVENT_GAP_FRAMES]
    cross_ball = [(a, b) for a, b in pairs if a.ball != b.ball]
    pool = cross_ball if cross_ball and rng.random() < 0.8 else pairs
    if not pool:
        return None
    earlier, later = pool[int(rng.integers(len(pool)))]
    mentioned = (earlier, later) if earlier_mentioned_first else (later, earlier)
    options = tuple(_describe_wall_event(world, e) for e in mentioned)
    times = world.replay_times()
    rings = [r for e in mentioned for r in _flash(_nearest_frame(times, e.time), e.ball, len(times))]
    return QuestionPlan(
        variant="event_order", question=f"Which happened first: {options[0]} or {options[1]}?",
        options=options, correct=0 if earlier_mentioned_first else 1,
        thought=ThoughtSpec(kind="replay_marked", times=times, rings=tuple(rings)),
        meta={"event_times": [round(e.time, 3) for e in mentioned]})


def _plan_first_bounce(world: World, rng: np.random.Generator, target: None) -> QuestionPlan | None:
    end, num_balls = world.clip_end, world.scene.num_balls
    firsts = {}
    for ball in range(num_balls):
        walls = [e for e in world.trajectory.wall_events(ball) if e.time <= end + EDGE_MARGIN_FRAMES]
        if walls:
            firsts[ball] = walls[0]
    if not firsts:
        return None
    winner = min(firsts.values(), key=lambda e: e.time)
    if not EDGE_MARGIN_FRAMES <= winner.time <= end - EDGE_MARGIN_FRAMES:
        return None
    if any(e is not winner and e.time - winner.time < EVENT_GAP_FRAMES for e in firsts.values()):
        return None
    times = world.replay_times()
    rings = [r for e in firsts.values() for r in _flash(_nearest_frame(times, e.time), e.ball, len(times))]
    return QuestionPlan(
        variant="first_bounce", question="Which ball bounces off a wall first?",
        options=world.scene.colours, correct=winner.ball,
        thought=ThoughtSpec(kind="replay_marked", times=times, rings=tuple(rings)),
        meta={"first_bounce_times": {world.colour(b): round(e.time, 3) for b, e in firsts.items()}})


def max_bounce_count(cfg: SynthConfig) -> int:
    """Largest bounce count asked about: three well-separated bounces need >= 12 frames at the default speeds."""
    return 3 if cfg.num_frames >= 12 else 2


def _plan_wall_bounces(world: World, rng: np.random.Generator, target_count: int) -> QuestionPlan | None:
    end = world.clip_end
    for ball in rng.permutation(world.scene.num_balls):
        walls = [e for e in world.trajectory.wall_events(ball) if e.time <= end + EDGE_MARGIN_FRAMES]
        if any(e.time < EDGE_MARGIN_FRAMES or e.time > end - EDGE_MARGIN_FRAMES for e in walls):
            continue  # half-visible bounce at either end of the clip
        if any(b.time - a.time < EVENT_GAP_FRAMES for a, b in itertools.pairwise(walls)):
            continue  # corner: one visual bounce, two wall events
        if len(walls) != target_count:
            continue
        times = world.replay_times()
        bounce_frames = [_nearest_frame(times, e.time) for e in walls]
        rings = [r for f in bounce_frames for r in _flash(f, ball, len(times))]
        tally = tuple(sum(bf <= f for bf in bounce_frames) for f in range(len(times)))
        return QuestionPlan(
            variant="wall_bounces", question=f"How many times does the {world.colour(ball)} ball bounce off a wall?",
            options=tuple(str(c) for c in range(max_bounce_count(world.cfg) + 1)), correct=target_count,
            thought=ThoughtSpec(kind="replay_marked", times=times, rings=tuple(rings), tally=tally),
            meta={"ball": world.colour(ball), "bounce_times": [round(e.time, 3) for e in walls]})
    return None


def _plan_fastest(world: World, rng: np.random.Generator, target: None) -> QuestionPlan | None:
    if any(e.kind == "collision" and e.time <= world.clip_end + EDGE_MARGIN_FRAMES for e in world.trajectory.events):
        return None  # collisions exchange speed: "fastest" would change during the clip
    speeds = np.hypot(*np.array(world.scene.velocities).T)
    order = np.argsort(-speeds)
    if speeds[order[0]] < FASTEST_MIN_RATIO * speeds[order[1]]:
        return None
    return QuestionPlan(
        variant="fastest", question="Which ball moves fastest?", options=world.scene.colours, correct=int(order[0]),
        thought=ThoughtSpec(kind="replay_trails", times=world.replay_times(),
                            trail_balls=tuple(range(world.scene.num_balls))),
        meta={"speeds": {c: round(float(s), 3) for c, s in zip(world.scene.colours, speeds)}})


def _plan_start_direction(world: World, rng: np.random.Generator, target_direction: str) -> QuestionPlan | None:
    for ball in rng.permutation(world.scene.num_balls):
        velocity = world.scene.velocities[ball]
        if min(abs(velocity[0]), abs(velocity[1])) < DIRECTION_MIN_FRACTION * math.hypot(*velocity):
            continue
        if direction_of(velocity) != target_direction:
            continue
        early = [e for e in world.trajectory.events
                 if ball in (e.ball, e.other) and e.time < EVENT_GAP_FRAMES + EDGE_MARGIN_FRAMES]
        if early:
            continue  # the direction must hold over the first frames
        times = world.replay_times()
        return QuestionPlan(
            variant="start_direction",
            question=f"In which direction is the {world.colour(ball)} ball moving at the start of the video?",
            options=DIRECTIONS, correct=DIRECTIONS.index(target_direction),
            thought=ThoughtSpec(kind="replay_trails", times=times, trail_balls=(int(ball),),
                                rings=tuple(_flash(0, ball, len(times)))),
            meta={"ball": world.colour(ball)})
    return None


def _corner_point(corner: str, size: int) -> tuple[float, float]:
    return (0.0 if corner.endswith("left") else float(size), 0.0 if corner.startswith("top") else float(size))


def _plan_closest_to_corner(world: World, rng: np.random.Generator, corner: str) -> QuestionPlan | None:
    positions = np.array(world.scene.positions)
    distances = np.hypot(*(positions - _corner_point(corner, world.cfg.size)).T)
    order = np.argsort(distances)
    if distances[order[1]] - distances[order[0]] < world.cfg.radius:
        return None
    winner = int(order[0])
    options = _colour_options(rng, world.scene, world.colour(winner))
    times = world.still_times()
    return QuestionPlan(
        variant="closest_to_corner",
        question=f"What colour is the ball closest to the {corner} corner in the first frame?",
        options=options, correct=0,
        thought=ThoughtSpec(kind="still_marked", times=times,
                            rings=tuple((f, winner, f % 2) for f in range(len(times)))),  # pulsing ring
        meta={"corner": corner})


def _plan_num_balls(world: World, rng: np.random.Generator, target_count: int) -> QuestionPlan | None:
    num_balls = world.scene.num_balls
    if num_balls != target_count:
        return None
    times = world.still_times()
    # Count along: ball k gets its ring (and a tally square) at the k-th step, and keeps it.
    start_frames = [(k + 1) * len(times) // (num_balls + 1) for k in range(num_balls)]
    rings = tuple((f, ball, 0) for ball, start in enumerate(start_frames) for f in range(start, len(times)))
    tally = tuple(sum(start <= f for start in start_frames) for f in range(len(times)))
    return QuestionPlan(
        variant="num_balls", question="How many balls are there?",
        options=tuple(str(k) for k in range(1, world.cfg.max_balls + 1)), correct=num_balls - 1,
        thought=ThoughtSpec(kind="still_marked", times=times, rings=rings, tally=tally), meta={})


_PLANNERS = {
    "next_wall": _plan_next_wall,
    "future_quadrant": _plan_future_quadrant,
    "event_order": _plan_event_order,
    "first_bounce": _plan_first_bounce,
    "wall_bounces": _plan_wall_bounces,
    "fastest": _plan_fastest,
    "start_direction": _plan_start_direction,
    "closest_to_corner": _plan_closest_to_corner,
    "num_balls": _plan_num_balls,
}
_MIN_BALLS = {"first_bounce": 2, "fastest": 2, "closest_to_corner": 2}


def target_values(variant: str, cfg: SynthConfig) -> tuple[Any, ...]:
    """The answer-determining choice each question of ``variant`` is balanced over (None: balanced by chance)."""
    return {
        "next_wall": WALLS,
        # P(answer quadrant == last-frame quadrant) = 1/4, so the last frame alone does not predict the answer
        "future_quadrant": tuple((q, same) for q in QUADRANTS for same in (True, False, False, False)),
        "event_order": (True, False),
        "wall_bounces": tuple(range(max_bounce_count(cfg) + 1)),
        "start_direction": DIRECTIONS,
        "closest_to_corner": QUADRANTS,
        "num_balls": tuple(range(1, cfg.max_balls + 1)),
    }.get(variant, (None,))


def _stable_key(*parts: Any) -> int:
    """A process-independent 32-bit hash (Python's hash() of str is salted per process)."""
    return zlib.crc32(json.dumps(parts).encode())


def balanced_pick(values: Sequence[Any], k: int, *, seed: int, split: str, key: str) -> Any:
    """The k-th item of a sequence that visits every value once per block of len(values), in a seeded order."""
    block, offset = divmod(k, len(values))
    order = np.random.default_rng([seed, _SPLIT_CODES[split], _stable_key(key), block]).permutation(len(values))
    return values[int(order[offset])]


def assignment(cfg: SynthConfig, index: int) -> tuple[str, str, int]:
    """(qtype, variant, k) of video ``index``: qtypes round-robin, then variants round-robin; k counts within."""
    qtype = cfg.question_types[index % len(cfg.question_types)]
    variants = VARIANTS[qtype]
    within_qtype = index // len(cfg.question_types)
    return qtype, variants[within_qtype % len(variants)], within_qtype // len(variants)


def sample_world(rng: np.random.Generator, cfg: SynthConfig, variant: str, target: Any) -> tuple[World, QuestionPlan]:
    """Rejection-sample scenes until one has an unambiguous ``variant`` question with answer ``target``."""
    min_balls = _MIN_BALLS.get(variant, 1)
    horizon = cfg.num_frames - 1 + cfg.num_thought_frames + EVENT_GAP_FRAMES
    check_frames = sorted({0, 1, cfg.num_frames - 2, cfg.num_frames - 1})
    for _ in range(MAX_SCENE_ATTEMPTS):
        num_balls = target if variant == "num_balls" else int(rng.integers(min_balls, cfg.max_balls + 1))
        scene = sample_scene(rng, cfg, num_balls)
        try:
            trajectory = simulate(scene, horizon, collisions=cfg.ball_collisions)
        except _DegenerateScene:
            continue
        positions, _ = trajectory.state_at(check_frames)
        if not all(_fully_visible(scene, p) for p in positions):
            continue  # static and perception questions read the first/last frames
        world = World(cfg=cfg, scene=scene, trajectory=trajectory)
        plan = _PLANNERS[variant](world, rng, target)
        if plan is not None:
            return world, plan
    raise RuntimeError(f"synth: no scene with an unambiguous {variant} question (target {target!r}) in "
                       f"{MAX_SCENE_ATTEMPTS} attempts; num_frames={cfg.num_frames} may be too short for it")


# ----------------------------------------------------------------------------------------------------- perception


def _perception_colour_in_quadrant(world: World, rng: np.random.Generator, frame_name: str) -> QuestionPlan | None:
    size, radius = world.cfg.size, world.cfg.radius
    t = 0.0 if frame_name == "first" else world.clip_end
    positions = world.trajectory.state_at([t])[0][0]
    for quadrant in (QUADRANTS[i] for i in rng.permutation(4)):
        inside = [b for b, p in enumerate(positions)
                  if quadrant_of(p, size) == quadrant and quadrant_margin(p, size) >= radius]
        # any other ball whose disc reaches into the quadrant makes "the ball in the quadrant" ambiguous
        reaching = [b for b, p in enumerate(positions)
                    if quadrant_of(p, size) == quadrant or quadrant_margin(p, size) < radius]
        if len(inside) == 1 and reaching == inside:
            ball = inside[0]
            return QuestionPlan(
                variant="colour_in_quadrant",
                question=f"What colour is the ball in the {quadrant} quarter of the {frame_name} frame?",
                options=_colour_options(rng, world.scene, world.colour(ball)), correct=0, thought=None,
                meta={"frame": frame_name, "quadrant": quadrant})
    return None


def _perception_extreme(world: World, rng: np.random.Generator) -> QuestionPlan | None:
    if world.scene.num_balls < 2:
        return None
    positions = np.array(world.scene.positions)
    for extreme in (EXTREMES[i] for i in rng.permutation(4)):
        axis = 0 if extreme in ("leftmost", "rightmost") else 1
        sign = 1.0 if extreme in ("leftmost", "topmost") else -1.0
        keys = sign * positions[:, axis]
        order = np.argsort(keys)
        if keys[order[1]] - keys[order[0]] >= world.cfg.radius:
            return QuestionPlan(variant="extreme", question=f"Which ball is {extreme} in the first frame?",
                                options=world.scene.colours, correct=int(order[0]), thought=None,
                                meta={"extreme": extreme})
    return None


def _perception_num_balls(world: World, rng: np.random.Generator) -> QuestionPlan:
    return QuestionPlan(variant="num_balls", question="How many balls are in the video?",
                        options=tuple(str(k) for k in range(1, world.cfg.max_balls + 1)),
                        correct=world.scene.num_balls - 1, thought=None)


def _perception_position(world: World, rng: np.random.Generator) -> QuestionPlan | None:
    for ball in rng.permutation(world.scene.num_balls):
        position = world.scene.positions[ball]
        if quadrant_margin(position, world.cfg.size) >= world.cfg.radius:
            quadrant = quadrant_of(position, world.cfg.size)
            return QuestionPlan(variant="position",
                                question=f"In which quarter of the first frame is the {world.colour(ball)} ball?",
                                options=QUADRANTS, correct=QUADRANTS.index(quadrant), thought=None,
                                meta={"ball": world.colour(ball)})
    return None


def caption(colours: Sequence[str], has_bar: bool) -> str:
    """"A red ball and a blue ball, with a grey bar." (colours in palette order, so equal scenes read equal)."""
    names = [f"a {c} ball" for c in sorted(colours, key=list(PALETTE).index)]
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    return f"{listed[0].upper()}{listed[1:]}, {'with' if has_bar else 'without'} a grey bar."


def _perception_caption(world: World, rng: np.random.Generator) -> QuestionPlan:
    """A 2x2 design (true/swapped colours x true/toggled bar): every attribute value appears in exactly two options,
    so neither option statistics nor option length point at the answer."""
    colours, has_bar = list(world.scene.colours), world.scene.occluder is not None
    absent = [c for c in PALETTE if c not in colours]
    swapped = list(colours)
    swapped[int(rng.integers(len(swapped)))] = absent[int(rng.integers(len(absent)))]
    options = (caption(colours, has_bar), caption(colours, not has_bar),
               caption(swapped, has_bar), caption(swapped, not has_bar))
    return QuestionPlan(variant="caption", question="Which description matches the video?", options=options,
                        correct=0, thought=None)


def perception_plans(world: World, rng: np.random.Generator) -> list[QuestionPlan]:
    plans = [
        _perception_colour_in_quadrant(world, rng, "first"),
        _perception_colour_in_quadrant(world, rng, "last"),
        _perception_extreme(world, rng),
        _perception_num_balls(world, rng),
        _perception_position(world, rng),
        _perception_caption(world, rng),
    ]
    return [p for p in plans if p is not None]


# ----------------------------------------------------------------------------------------------------- one video


@dataclass(frozen=True)
class _VideoResult:
    split: str
    index: int
    qtype: str
    plan: QuestionPlan
    perception: tuple[QuestionPlan, ...]
    video: str  # relative to out_dir
    thought_video: str
    meta: dict[str, Any]


def _rng(cfg: SynthConfig, split: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, _SPLIT_CODES[split], index, stream])


def _event_json(world: World, event: Event) -> dict[str, Any]:
    record: dict[str, Any] = {"t": round(event.time, 4), "kind": event.kind, "ball": world.colour(event.ball)}
    if event.kind == "wall":
        record["wall"] = event.wall
    else:
        record["other"] = world.colour(event.other)
    return record


def make_video(cfg: SynthConfig, split: str, index: int, out_dir: Path) -> _VideoResult:
    """Plan, render and encode source + thought video number ``index`` of ``split``."""
    if cfg.task == "grid":
        return make_grid_video(cfg, split, index, out_dir)
    qtype, variant, k = assignment(cfg, index)
    target = balanced_pick(target_values(variant, cfg), k, seed=cfg.seed, split=split, key=f"target/{variant}")
    world, plan = sample_world(_rng(cfg, split, index, 0), cfg, variant, target)
    suffix = SUFFIX_BY_CODEC[cfg.codec]
    video, thought_video = f"videos/{split}/{index:06d}{suffix}", f"thoughts/{split}/{index:06d}{suffix}"
    write_video(out_dir / video, render(world.scene, world.trajectory, np.arange(cfg.num_frames, dtype=float)),
                cfg.fps, cfg.codec)
    write_video(out_dir / thought_video, render(world.scene, world.trajectory, plan.thought.times, plan.thought),
                cfg.fps, cfg.codec)
    perception = perception_plans(world, _rng(cfg, split, index, 1)) if split in PERCEPTION_SPLITS else []
    meta = {
        "variant": variant,
        "num_balls": world.scene.num_balls,
        "thought": plan.thought.kind,
        "scene": world.scene.to_json(),
        "events": [_event_json(world, e) for e in world.trajectory.events
                   if e.time <= world.clip_end + cfg.num_thought_frames],
        **plan.meta,
    }
    return _VideoResult(split=split, index=index, qtype=qtype, plan=plan, perception=tuple(perception), video=video,
                        thought_video=thought_video, meta=meta)


def make_grid_video(cfg: SynthConfig, split: str, index: int, out_dir: Path) -> _VideoResult:
    """The grid task's video ``index``: the clip, its thought video (grid.thought_cells), one question (grid.py)."""
    task = cfg.grid
    qtype = cfg.question_types[index % len(cfg.question_types)]
    world = grid.sample_world(_rng(cfg, split, index, 0), task)
    suffix = SUFFIX_BY_CODEC[cfg.codec]
    video, thought_video = f"videos/{split}/{index:06d}{suffix}", f"thoughts/{split}/{index:06d}{suffix}"
    thought = grid.thought_cells(world, qtype, task)
    write_video(out_dir / video, grid.render(world.clip_T2, task.cells), cfg.fps, cfg.codec)
    write_video(out_dir / thought_video, grid.render(thought, task.cells), cfg.fps, cfg.codec)

    def plan(question: grid.GridQuestion) -> QuestionPlan:
        return QuestionPlan(variant=question.variant, question=question.question, options=question.options,
                            correct=question.correct, thought=None, meta=question.meta)

    main = grid.main_question(world, qtype, task)
    perception = [plan(q) for q in grid.perception_questions(world, task)] if split in PERCEPTION_SPLITS else []
    meta = {"variant": qtype, "task": "grid", "thought": task.thought, "start": list(world.start),
            "velocity": list(world.velocity), "clip_cells": world.clip_T2.tolist(),
            "thought_cells": thought.tolist(), "baselines": grid.baseline_answers(world, task),
            **main.meta}
    return _VideoResult(split=split, index=index, qtype=qtype, plan=plan(main), perception=tuple(perception),
                        video=video, thought_video=thought_video, meta=meta)


def _make_video_task(task: tuple[SynthConfig, str, int, Path]) -> _VideoResult:
    return make_video(*task)


# ----------------------------------------------------------------------------------------------------- letters


# Rank of every fixed-vocabulary option value; counts ("0".."4") rank by their number.
_VOCABULARY_RANK = {name: rank for vocabulary in (tuple(PALETTE), WALLS, QUADRANTS, DIRECTIONS,
                                                   grid.cell_options(8))
                    for rank, name in enumerate(vocabulary)}


def canonical_order(options: Sequence[str]) -> list[int] | None:
    """Indices that list ``options`` in their vocabulary's order, or None for free-text options."""
    if all(o.isdigit() for o in options):
        return sorted(range(len(options)), key=lambda i: int(options[i]))
    if all(o in _VOCABULARY_RANK for o in options):
        return sorted(range(len(options)), key=lambda i: _VOCABULARY_RANK[options[i]])
    return None


class _LetterBalancer:
    """Orders the options: canonically where ``option_order`` says so and the options allow it, else with the correct
    option at balanced positions per (question kind, #options), in video order."""

    def __init__(self, seed: int, split: str, option_order: str):
        self.seed, self.split, self.option_order = seed, split, option_order
        self.counts: Counter[str] = Counter()

    def arrange(self, plan: QuestionPlan, kind: str, shuffle_rng: np.random.Generator) -> tuple[tuple[str, ...], str]:
        order = canonical_order(plan.options) if self.option_order == "canonical" else None
        if order is not None:
            return tuple(plan.options[i] for i in order), letter(order.index(plan.correct))
        num_options = len(plan.options)
        key = f"letters/{kind}/{num_options}"
        slot = balanced_pick(range(num_options), self.counts[key], seed=self.seed, split=self.split, key=key)
        self.counts[key] += 1
        distractors = [o for i, o in enumerate(plan.options) if i != plan.correct]
        distractors = [distractors[i] for i in shuffle_rng.permutation(len(distractors))]
        options = (*distractors[:slot], plan.options[plan.correct], *distractors[slot:])
        return options, letter(slot)


def _samples_for_split(cfg: SynthConfig, split: str, results: list[_VideoResult], out_dir: Path,
                       ) -> tuple[list[Sample], list[Sample]]:
    main_letters = _LetterBalancer(cfg.seed, split, cfg.option_order)
    perception_letters = _LetterBalancer(cfg.seed, split, cfg.option_order)
    samples, perception = [], []
    for result in sorted(results, key=lambda r: r.index):
        uid = f"synth-{split}-{result.index:06d}"
        options, answer = main_letters.arrange(result.plan, result.plan.variant, _rng(cfg, split, result.index, 2))
        samples.append(Sample(uid=uid, video=result.video, question=result.plan.question, options=options,
                              answer=answer, qtype=result.qtype, thought_video=result.thought_video, split=split,
                              root=out_dir, meta=result.meta))
        shuffle_rng = _rng(cfg, split, result.index, 3)
        for plan in result.perception:
            options, answer = perception_letters.arrange(plan, plan.variant, shuffle_rng)
            suffix = f"-{plan.meta['frame']}" if "frame" in plan.meta else ""
            perception.append(Sample(
                uid=f"{uid}-p-{plan.variant}{suffix}", video=result.video, question=plan.question, options=options,
                answer=answer, qtype=f"perception_{plan.variant}", thought_video=None, split=split, root=out_dir,
                meta={"variant": plan.variant, "source_uid": uid, **plan.meta}))
    return samples, perception


# ----------------------------------------------------------------------------------------------------- output folder


STAMP_NAME = "synth_config.json"


MANIFEST_NAMES = (*SPLITS, *(f"perception_{s}" for s in PERCEPTION_SPLITS))


def config_hash(cfg: SynthConfig) -> str:
    """Hash of everything that determines the content (``workers`` does not)."""
    content = {k: v for k, v in to_dict(cfg).items() if k != "workers"}
    return hashlib.sha256(json.dumps([GENERATOR_VERSION, content], sort_keys=True).encode()).hexdigest()


def content_hash(out_dir: Path, names: Sequence[str]) -> str:
    """sha256 over the manifests and every video they reference (bytes), in manifest order."""
    digest = hashlib.sha256()
    for name in names:
        manifest_bytes = (out_dir / f"{name}.jsonl").read_bytes()
        digest.update(name.encode() + b"\0" + manifest_bytes)
        if name.startswith("perception_"):
            continue  # same videos as the split's own manifest
        for line in manifest_bytes.splitlines():
            record = json.loads(line)
            for relative in (record["video"], record["thought_video"]):
                digest.update(relative.encode() + b"\0" + (out_dir / relative).read_bytes())
    return digest.hexdigest()


def is_complete(out_dir: Path, cfg: SynthConfig) -> bool:
    """Whether ``out_dir`` holds a finished set for this config whose files are unchanged since generation."""
    stamp_path = Path(out_dir) / STAMP_NAME
    try:
        stamp = json.loads(stamp_path.read_text())
        return (stamp.get("complete") is True and stamp.get("config_hash") == config_hash(cfg)
                and stamp.get("content_hash") == content_hash(Path(out_dir), MANIFEST_NAMES))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _prepare_out_dir(out_dir: Path) -> None:
    """Create ``out_dir`` or clear a previous generation from it; never touch a folder this module did not write."""
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / STAMP_NAME).is_file():
            raise FileExistsError(f"synth: {out_dir} is not empty and has no {STAMP_NAME}, so it was not made by "
                                  "storms synth; choose an empty or new folder")
        for folder in ("videos", "thoughts"):
            shutil.rmtree(out_dir / folder, ignore_errors=True)
        for path in out_dir.glob("*.jsonl"):
            path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def _write_stamp(out_dir: Path, cfg: SynthConfig, **fields: Any) -> None:
    stamp = {"generator_version": GENERATOR_VERSION, "config": to_dict(cfg), "config_hash": config_hash(cfg), **fields}
    tmp_path = out_dir / f".{STAMP_NAME}.tmp"
    tmp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    tmp_path.replace(out_dir / STAMP_NAME)


def generate(cfg: SynthConfig, out_dir: Path, progress: bool = False) -> dict[str, Path]:
    """Generate (or reuse) the benchmark in ``out_dir``; returns manifest name -> path.

    Names: ``train``, ``val``, ``test``, ``perception_train``, ``perception_val``. If ``out_dir`` already holds a
    complete set for the same config (stamp + content hash), nothing is regenerated.
    """
    out_dir = Path(out_dir)
    paths = {name: out_dir / f"{name}.jsonl" for name in MANIFEST_NAMES}
    if is_complete(out_dir, cfg):
        return paths
    _prepare_out_dir(out_dir)
    _write_stamp(out_dir, cfg, complete=False)  # marks the folder as ours, so an interrupted run can be cleared
    started = time.perf_counter()
    tasks = [(cfg, split, index, out_dir) for split in SPLITS for index in range(cfg.num_videos(split))]
    results = _run_tasks(tasks, cfg.workers, progress)
    num_samples = {}
    for split in SPLITS:
        samples, perception = _samples_for_split(cfg, split, [r for r in results if r.split == split], out_dir)
        write_manifest(paths[split], samples)
        num_samples[split] = len(samples)
        if split in PERCEPTION_SPLITS:
            write_manifest(paths[f"perception_{split}"], perception)
            num_samples[f"perception_{split}"] = len(perception)
    _write_stamp(out_dir, cfg, complete=True, content_hash=content_hash(out_dir, MANIFEST_NAMES),
                 num_samples=num_samples, generation_seconds=round(time.perf_counter() - started, 2))
    return paths


def _run_tasks(tasks: list[tuple[SynthConfig, str, int, Path]], workers: int, progress: bool) -> list[_VideoResult]:
    from tqdm import tqdm

    with tqdm(total=len(tasks), desc="storms synth", unit="video", disable=not progress) as bar:
        if workers > 1 and len(tasks) >= 64:  # a pool costs ~1 s to start: not worth it for tiny sets
            try:
                return _run_in_pool(tasks, workers, bar)
            except BrokenProcessPool as e:
                # e.g. the caller's __main__ cannot be re-imported by spawned workers (python - < script.py)
                warnings.warn(f"synth: worker processes died ({e}); generating in this process instead", stacklevel=3)
                bar.reset()
        results = []
        for task in tasks:
            results.append(_make_video_task(task))
            bar.update()
        return results


def _run_in_pool(tasks: list[tuple[SynthConfig, str, int, Path]], workers: int, bar: Any) -> list[_VideoResult]:
    # spawn, not fork: the caller may hold torch/OpenMP threads, which fork can deadlock. An executor (unlike
    # multiprocessing.Pool, which respawns crashed workers forever) fails fast with BrokenProcessPool.
    context = multiprocessing.get_context("spawn")
    results = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        for result in pool.map(_make_video_task, tasks, chunksize=16):
            results.append(result)
            bar.update()
    return results
