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

Modules, by what they hold: ``config`` (``SynthConfig``, ``GENERATOR_VERSION``, vocabularies, margins), ``physics``
(scenes, the event-driven simulation, scene sampling), ``rendering`` (``ThoughtSpec``, ``render``), ``questions``
(the dynamics question planners and their balancing, ``sample_world``), ``perception`` (the Stage-0 perception
questions), ``generator`` (one video, answer letters, manifests, the stamp, ``generate``) and ``grid`` (the grid
task, the embedded default). This package re-exports their public names.
"""

from storms_dist.data.synth.config import (
    DIRECTION_MIN_FRACTION,
    DIRECTIONS,
    EDGE_MARGIN_FRAMES,
    EVENT_GAP_FRAMES,
    EXTREMES,
    FASTEST_MIN_RATIO,
    GENERATOR_VERSION,
    MAX_SCENE_ATTEMPTS,
    PALETTE,
    PERCEPTION_SPLITS,
    PERCEPTION_VARIANTS,
    QTYPES,
    QUADRANTS,
    SPLITS,
    VARIANTS,
    WALLS,
    SynthConfig,
)
from storms_dist.data.synth.generator import (
    MANIFEST_NAMES,
    STAMP_NAME,
    canonical_order,
    config_hash,
    content_hash,
    generate,
    is_complete,
    make_grid_video,
    make_video,
)
from storms_dist.data.synth.grid import GridTaskConfig
from storms_dist.data.synth.perception import caption, perception_plans
from storms_dist.data.synth.physics import (
    Event,
    Scene,
    Trajectory,
    direction_of,
    quadrant_margin,
    quadrant_of,
    sample_scene,
    simulate,
)
from storms_dist.data.synth.questions import (
    QuestionPlan,
    World,
    assignment,
    balanced_pick,
    max_bounce_count,
    sample_world,
    target_values,
)
from storms_dist.data.synth.rendering import (
    BACKGROUND_RGB,
    MARK_RGB,
    OCCLUDER_RGB,
    ThoughtSpec,
    background_image,
    render,
)

__all__ = [
    "BACKGROUND_RGB", "DIRECTIONS", "DIRECTION_MIN_FRACTION", "EDGE_MARGIN_FRAMES", "EVENT_GAP_FRAMES", "EXTREMES",
    "FASTEST_MIN_RATIO", "GENERATOR_VERSION", "MANIFEST_NAMES", "MARK_RGB", "MAX_SCENE_ATTEMPTS", "OCCLUDER_RGB",
    "PALETTE", "PERCEPTION_SPLITS", "PERCEPTION_VARIANTS", "QTYPES", "QUADRANTS", "SPLITS", "STAMP_NAME", "VARIANTS",
    "WALLS", "Event", "GridTaskConfig", "QuestionPlan", "Scene", "SynthConfig", "ThoughtSpec", "Trajectory", "World",
    "assignment", "background_image", "balanced_pick", "canonical_order", "caption", "config_hash", "content_hash",
    "direction_of", "generate", "is_complete", "make_grid_video", "make_video", "max_bounce_count", "perception_plans",
    "quadrant_margin", "quadrant_of", "render", "sample_scene", "sample_world", "simulate", "target_values",
]
