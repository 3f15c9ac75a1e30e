"""The dynamics questions of the ``balls`` task: one planner per variant (next_wall, future_quadrant, event_order,
first_bounce, wall_bounces, fastest, start_direction, and the static controls closest_to_corner and num_balls), each
with its unambiguity rules and its thought video; ``target_values`` and ``balanced_pick``, which balance the answers
over a split; ``assignment`` (question type and variant of video ``index``); and ``sample_world``, which
rejection-samples scenes until one has an unambiguous question with the wanted answer.
"""

from __future__ import annotations

import itertools
import json
import math
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from storms_dist.data.synth.config import (
    _SPLIT_CODES,
    DIRECTION_MIN_FRACTION,
    DIRECTIONS,
    EDGE_MARGIN_FRAMES,
    EVENT_GAP_FRAMES,
    FASTEST_MIN_RATIO,
    MAX_SCENE_ATTEMPTS,
    PALETTE,
    QUADRANTS,
    VARIANTS,
    WALLS,
    SynthConfig,
)
from storms_dist.data.synth.physics import (
    Event,
    Scene,
    Trajectory,
    _DegenerateScene,
    _fully_visible,
    direction_of,
    quadrant_margin,
    quadrant_of,
    sample_scene,
    simulate,
)
from storms_dist.data.synth.rendering import ThoughtSpec


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
