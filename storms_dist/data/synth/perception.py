"""The perception questions of the ``balls`` task: single-frame questions (colour in a quadrant, the leftmost/...
ball, the number of balls, a ball's quadrant, the matching caption) asked about train and val videos for Stage-0
pre-training of the tiny backbone. They have no thought video.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from storms_dist.data.synth.config import EXTREMES, PALETTE, QUADRANTS
from storms_dist.data.synth.physics import quadrant_margin, quadrant_of
from storms_dist.data.synth.questions import QuestionPlan, World, _colour_options


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
