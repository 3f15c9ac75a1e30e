"""Ball physics of the ``balls`` task: the initial ``Scene``, the exact event-driven simulation (``simulate``) into a
piecewise-linear ``Trajectory`` with every wall bounce and collision as an ``Event``, the sampling of random scenes
(balls, velocities, the occluding bar), and the geometry helpers the questions read (quadrant, direction).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from storms_dist.data.synth.config import PALETTE, QUADRANTS, SynthConfig

_MAX_EVENTS = 400  # a ball pinned between a wall and another ball bounces forever; such scenes are resampled


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
