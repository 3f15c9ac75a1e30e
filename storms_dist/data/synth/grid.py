"""The embedded default task: one ball bouncing on a coarse grid, where the future needs serial computation.

Geometry (docs/data.md has the arithmetic): a ``28 x 28`` frame is a ``4 x 4`` grid of 7-px cells. Qwen2.5-VL's
14-px patches, 2-frame temporal patches and 2x2 spatial merge turn every pair of frames into exactly **one** merged
visual token that sees the whole scene, so the ball's cell in both frames -- its position and its velocity -- is
*content* of that token (a from-scratch tower cannot learn to find a small object wherever it sits, docs/results.md;
it can learn what one token shows). The ball is drawn in its cell's colour and the floor is tinted by it, so the cell is
content of every patch.

Dynamics: the ball moves one cell per frame on each axis (diagonally) and reflects off the walls. The question asks
for its cell ``D`` frames after the clip, with ``D`` drawn per item from ``horizons`` and written in the question:
one forward pass must compute a ``(cell, velocity, D)`` lookup with bounces, while the thought video -- the
ground-truth motion up to the asked moment, then held, two frames (= one merged token = one of the K targets) per
latent step -- lays out the state ``k`` steps on in target ``k`` and ends on the answer's state
(``thought_states``). A static control asks for the ball's cell at the end of the clip.

Everything is a pure function of ``(seed, split, index)``; ``generator.py`` owns the output folder and manifests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import numpy as np

from storms_dist.data.manifest import OPTION_LETTERS

CELL_PX = 7
TIMER_BLUE_BASE, TIMER_BLUE_MAX = 40, 120  # the floor's blue level at timer 0 and at the largest count
GRID_QTYPES = ("future_cell", "current_cell")
GRID_DYNAMICS_QTYPES = ("future_cell",)
GRID_DEFAULT_QTYPES = ("future_cell", "future_cell", "future_cell", "current_cell")  # round-robin: 3 in 4 dynamic
DIRECTIONS = ("up-left", "up-right", "down-left", "down-right")


@dataclass(kw_only=True)
class GridTaskConfig:
    """Knobs of the grid task (``synth.grid``): the difficulty curve is measured over ``horizons``."""

    cells: int = 4
    """Cells per side; the frame is ``cells * 7`` px (4 -> 28 px: one merged token per frame pair)."""
    dynamics: Literal["bounce", "flow"] = "bounce"
    """How the ball moves. ``bounce``: diagonally, one cell per frame per axis, reflecting off the walls -- two
    independent 6-cycles of (position, velocity), so one pass answers with two small lookups and the velocity (which
    a thought-video target barely shows) is part of the state. ``flow``: every cell sends the ball on to one fixed
    neighbouring cell (``flow_cycle``: one closed tour through all cells, the same for every video, like a law of
    motion learned from data): the state is the cell alone -- what every target shows -- so a latent step is a
    function of its previous latent, while one pass must learn ``(cell, D) -> cell`` over the whole tour."""
    flow_seed: int = 0
    """Seed of the ``flow`` tour (a fixed part of the task, not of the sample)."""
    flow_moves: tuple[int, ...] = (1,)
    """With ``flow``: the tour steps the ball moves per frame, one value drawn per video (negative: the tour run
    backwards). ``[1]`` (default): one law for every video, so ``(last cell, D)`` is the whole question. ``[1, -1]``
    or ``[1, -1, 2, -2]``: the move is part of the state (shown by the two frames of every merged token), so the
    ``(state, D)`` table is 2 or 4 times larger while the step law stays one rule; Stage 0 then also asks the move,
    which the from-scratch tower did not learn in 300-600 steps (50 % on two moves; docs/results.md session 24)."""
    clip_frames: int = 4
    """Frames of the visible clip (even: whole temporal patches). Shorter than the motion's period (2 * (cells - 1)
    frames per axis), so copying a past frame cannot answer most horizons."""
    horizons: tuple[int, int] = (1, 16)
    """Inclusive range of D, the frames after the clip the question asks about (<= thought_frames)."""
    thought_frames: int = 16
    """Frames of the thought video: 2 per latent step, so K = thought_frames / 2 targets."""
    thought: Literal["until_asked", "continuation"] = "until_asked"
    """What the thought video imagines. ``until_asked``: the motion from the clip's end up to the asked moment
    (D frames on), then held still -- so the last target is the answer's state for every D, as the paper's thought
    video ends where its answer is. ``continuation``: the next ``thought_frames`` frames whatever D is -- the answer
    then sits in target (D - 1) // 2, and reading the slot a number in the question names was not learned even with
    the true targets in the slots (docs/results.md, session 5)."""
    horizon_cue: Literal["timer", "question"] = "question"
    """Where the horizon D is given. ``timer``: the floor's blue level counts down the frames left until the ball
    stops (D at the clip's last frame), and the question is the same text for every D -- so D is content of the
    visual tokens like the rest of the state, and a latent step can count it down from its input alone.
    ``question`` (default): the number D is written in the question. The timer is opt-in: with it, Stage 0's
    perception fell from 100 % to 22-30 % (cell at the last frame) in 300 steps, timer reading at chance
    (docs/results.md, session 6) -- the extra colour variation costs the from-scratch tower its cell code."""
    heading_cue: bool = False
    """The ball's blue level shows its heading (the direction of its next move), so every frame -- every merged
    token and every thought-video target -- holds the whole state (cell, heading, timer): one latent step is then
    a function of the previous state alone. Off (default): the heading is only in the motion between frames."""
    thought_cues: bool = False
    """Show the heading and the timer in the thought video only (the clip stays as ``heading_cue`` /
    ``horizon_cue`` say): every target then holds the whole state the next step needs -- cell, heading, frames left
    -- while the clip keeps the plain rendering Stage 0 learns (the cues in the clip cost perception, session 6).
    With ``flow`` only the timer is shown (the cell is the rest of the state)."""
    timer_blue: tuple[int, int] = (TIMER_BLUE_BASE, TIMER_BLUE_MAX)
    """The floor's (or ``timer_panel: blue``'s) blue level at timer 0 and at the largest count (``max_timer``),
    when the timer is shown. At the default's ~4 levels apart the Stage-0 tower's targets hold the count linearly
    (ridge R^2 0.92) but as ~10 % of their variance (docs/results.md, session 12); [0, 255] is a louder cue."""
    timer_panel: Literal["none", "ball", "blue"] = "none"
    """With ``thought_cues``: the thought video shows the timer in a second 28-px panel beside the scene instead of
    on the floor -- ``ball``: a second ball on a second grid (its cell = the frames left, row by row); ``blue``: the
    panel's uniform blue level (``timer_blue``). Each temporal patch is then two merged tokens -- scene, timer --
    and the mean-pooled target is their sum, so the state's two factors stay separable (docs/results.md, session
    12: a blue floor is encoded entangled with the cell). Its 56x28 frames need 1568
    pixels when encoded (``grid_recipe.py --thought-pixels 1568``; the trainer's targets use ``data.max_pixels``)."""
    holdout: float = 0.0
    """Fraction of the horizons D, per last visible cell, that train never asks about: val and test future_cell
    questions ask only those ``(last cell, D)`` pairs (``held_out_pairs``), train only the others. The step law is
    still in every train clip and thought video, so a model that simulates can answer a held-out pair; one that
    looks ``(cell, D)`` up has never seen it. 0 (default): every split draws every pair."""
    holdout_seed: int = 0
    """Seed of the held-out pairs (a fixed part of the task, like ``flow_seed``)."""
    perception_frames: int = 1
    """Stage 0 asks the ball's cell at the last ``perception_frames`` clip frames and its direction of motion (0: no
    perception set). 1 -- the state the dynamics start from -- is learned in ~250 steps; asking every frame makes
    the answer depend on a frame number in the question, which the tiny backbone did not learn inside the budget
    (docs/results.md, session 5)."""

    def __post_init__(self) -> None:
        if not isinstance(self.cells, int) or not 2 <= self.cells <= 8:
            raise ValueError(f"grid.cells: expected an int in 2..8, got {self.cells!r}")
        if self.cells * CELL_PX % 28:
            raise ValueError(f"grid.cells: the frame ({self.cells} x {CELL_PX} px) must be a multiple of 28 px "
                             f"(14-px patches x 2x2 merge); use 4 or 8, got {self.cells}")
        if self.clip_frames < 2 or self.clip_frames % 2:
            raise ValueError(f"grid.clip_frames: expected an even number >= 2, got {self.clip_frames}")
        if self.thought_frames < 2 or self.thought_frames % 2:
            raise ValueError(f"grid.thought_frames: expected an even number >= 2, got {self.thought_frames}")
        if (not isinstance(self.perception_frames, int) or isinstance(self.perception_frames, bool)
                or not 0 <= self.perception_frames <= self.clip_frames):
            raise ValueError(f"grid.perception_frames: expected an int in 0..clip_frames={self.clip_frames} (the last "
                             f"N clip frames Stage 0 asks about), got {self.perception_frames!r}")
        if self.horizon_cue not in ("timer", "question"):
            raise ValueError(f"grid.horizon_cue: expected 'timer' or 'question', got {self.horizon_cue!r}")
        if not isinstance(self.thought_cues, bool):
            raise ValueError(f"grid.thought_cues: expected true or false, got {self.thought_cues!r}")
        if not isinstance(self.heading_cue, bool):
            raise ValueError(f"grid.heading_cue: expected true or false, got {self.heading_cue!r}")
        if self.dynamics not in ("bounce", "flow"):
            raise ValueError(f"grid.dynamics: expected 'bounce' or 'flow', got {self.dynamics!r}")
        self.flow_moves = tuple(self.flow_moves)
        if (not self.flow_moves or len(set(self.flow_moves)) != len(self.flow_moves)
                or not all(isinstance(m, int) and not isinstance(m, bool) and 0 < abs(m) < self.num_cells
                           for m in self.flow_moves)):
            raise ValueError(f"grid.flow_moves: expected distinct non-zero tour steps per frame with |move| < "
                             f"{self.num_cells} (cells^2), got {list(self.flow_moves)}")
        if self.flow_moves != (1,) and self.dynamics != "flow":
            raise ValueError(f"grid.flow_moves: {list(self.flow_moves)} needs dynamics: flow (bounce moves one cell "
                             f"per frame per axis)")
        if self.dynamics == "flow" and self.heading_cue:
            raise ValueError("grid.heading_cue: the flow dynamics has no heading to show (the cell is the whole "
                             "state); set it false or use dynamics: bounce")
        if self.timer_panel not in ("none", "ball", "blue"):
            raise ValueError(f"grid.timer_panel: expected 'none', 'ball' or 'blue', got {self.timer_panel!r}")
        if self.timer_panel != "none" and not self.thought_cues:
            raise ValueError(f"grid.timer_panel: {self.timer_panel!r} needs thought_cues: true (the panel is the "
                             f"thought video's timer)")
        if self.timer_panel == "ball" and self.horizons[1] > self.cells ** 2:
            raise ValueError(f"grid.timer_panel: the panel shows counts 0..horizons[1]-1 on {self.cells}x{self.cells} "
                             f"cells; horizons[1]={self.horizons[1]} is more than {self.cells ** 2}")
        if self.thought not in ("until_asked", "continuation"):
            raise ValueError(f"grid.thought: expected 'until_asked' or 'continuation', got {self.thought!r}")
        self.horizons = tuple(self.horizons)
        low, high = self.horizons
        if not 1 <= low <= high <= self.thought_frames:
            raise ValueError(f"grid.horizons: expected 1 <= low <= high <= thought_frames={self.thought_frames}, "
                             f"got {list(self.horizons)}")
        if not isinstance(self.holdout, (int, float)) or isinstance(self.holdout, bool) or not 0 <= self.holdout < 1:
            raise ValueError(f"grid.holdout: expected a fraction in [0, 1) of the horizons to hold out per cell, "
                             f"got {self.holdout!r}")
        if self.holdout and not 1 <= self.held_out_per_cell < high - low + 1:
            raise ValueError(f"grid.holdout: {self.holdout} of the {high - low + 1} horizons rounds to "
                             f"{self.held_out_per_cell} per cell; expected at least 1 held out and 1 left for train")
        if self.horizon_cue == "timer" and high - low + 1 > len(OPTION_LETTERS):
            raise ValueError(f"grid.horizons: the timer's perception question lists every D as an option; at most "
                             f"{len(OPTION_LETTERS)} values, got {list(self.horizons)}")
        self.timer_blue = tuple(self.timer_blue)
        blue_low, blue_high = self.timer_blue
        if not (isinstance(blue_low, int) and isinstance(blue_high, int) and 0 <= blue_low < blue_high <= 255):
            raise ValueError(f"grid.timer_blue: expected [low, high] blue levels with 0 <= low < high <= 255, got "
                             f"{list(self.timer_blue)}")
        shows_blue_timer = self.horizon_cue == "timer" or self.thought_cues and self.timer_panel != "ball"
        if shows_blue_timer and (blue_high - blue_low) / self.max_timer < 4:
            raise ValueError(f"grid.timer_blue: the timer shows up to D + clip_frames - 1 = {self.max_timer} counts; "
                             f"{list(self.timer_blue)} puts its blue levels under 4 apart (widen timer_blue or lower "
                             f"horizons[1] / clip_frames)")

    @property
    def max_timer(self) -> int:
        """The largest count the timer shows: D at its largest, at the clip's first frame."""
        return self.horizons[1] + self.clip_frames - 1

    @property
    def held_out_per_cell(self) -> int:
        """How many of the horizons each last visible cell holds out of train."""
        return round(self.holdout * (self.horizons[1] - self.horizons[0] + 1))

    def period(self, move: int = 1) -> int:
        """Frames after which the motion repeats: a 2 (cells - 1) bounce per axis, or the flow tour's length over
        the tour steps per frame (``move``) it shares a divisor with."""
        return 2 * (self.cells - 1) if self.dynamics == "bounce" else self.num_cells // math.gcd(self.num_cells, move)

    @property
    def size(self) -> int:
        return self.cells * CELL_PX

    @property
    def num_cells(self) -> int:
        return self.cells * self.cells


# ---- physics: one rule, used for the videos, the answers and the exact baselines ----
def reflect_step(position: int, velocity: int, cells: int) -> tuple[int, int]:
    """One frame of motion on one axis: move by ``velocity`` cells, reflecting off the walls at 0 and cells-1."""
    position += velocity
    if position > cells - 1:
        position, velocity = 2 * (cells - 1) - position, -velocity
    elif position < 0:
        position, velocity = -position, -velocity
    return position, velocity


def trajectory(start: tuple[int, int], velocity: tuple[int, int], num_frames: int, cells: int) -> np.ndarray:
    """Cells ``(col, row)`` of frames ``0 .. num_frames-1`` from ``start`` moving by ``velocity`` per frame."""
    (x, y), (vx, vy) = start, velocity
    out = np.zeros((num_frames, 2), dtype=np.int64)
    for t in range(num_frames):
        out[t] = x, y
        x, vx = reflect_step(x, vx, cells)
        y, vy = reflect_step(y, vy, cells)
    return out


FLOW_SEARCH_BUDGET = 20_000  # depth-first extensions before the constructive fallback


@lru_cache(maxsize=None)
def flow_cycle(cells: int, seed: int) -> tuple[tuple[int, int], ...]:
    """The ``flow`` law: a closed tour ``(col, row)`` through every cell, each step to one of the 8 neighbours
    (a Hamiltonian cycle of the king's graph), drawn from ``seed``.

    A seeded randomised depth-first search (the measured 4x4 tours come from it) explodes from 5x5 on, so past
    ``FLOW_SEARCH_BUDGET`` extensions the tour is built instead: a serpentine cycle shuffled by random 2-opt moves
    (reverse a stretch when its two new joins are also king's moves), which keeps it a closed tour at every step."""
    neighbours = {(c, r): [(c + dc, r + dr) for dc in (-1, 0, 1) for dr in (-1, 0, 1)
                           if (dc or dr) and 0 <= c + dc < cells and 0 <= r + dr < cells]
                  for c in range(cells) for r in range(cells)}
    rng = np.random.default_rng(seed)
    tour = _depth_first_tour(neighbours, cells, rng)
    return tour if tour is not None else _shuffled_serpentine_tour(cells, rng)


def _depth_first_tour(neighbours: dict, cells: int, rng: np.random.Generator):
    start = (int(rng.integers(cells)), int(rng.integers(cells)))
    path, seen, budget = [start], {start}, [FLOW_SEARCH_BUDGET]

    def extend() -> bool | None:  # None: out of budget
        if len(path) == cells * cells:
            return start in neighbours[path[-1]]
        options = [n for n in neighbours[path[-1]] if n not in seen]
        for i in rng.permutation(len(options)):
            budget[0] -= 1
            if budget[0] < 0:
                return None
            path.append(options[i])
            seen.add(options[i])
            found = extend()
            if found is None or found:
                return found
            seen.discard(path.pop())
        return False

    return tuple(path) if extend() else None


def _shuffled_serpentine_tour(cells: int, rng: np.random.Generator) -> tuple[tuple[int, int], ...]:
    if cells % 2:
        raise ValueError(f"flow_cycle: the constructive tour needs an even grid side, got {cells}")
    # row 0 left to right, rows 1.. snaking over columns 1.., back up column 0
    tour = [(c, 0) for c in range(cells)]
    for r in range(1, cells):
        cols = range(cells - 1, 0, -1) if r % 2 else range(1, cells)
        tour += [(c, r) for c in cols]
    tour += [(0, r) for r in range(cells - 1, 0, -1)]

    def king(a, b) -> bool:
        return max(abs(a[0] - b[0]), abs(a[1] - b[1])) == 1

    n = len(tour)
    for i, j in np.sort(rng.integers(n, size=(20 * n * n, 2)), axis=1).tolist():
        if j - i < 2:
            continue
        a, b, c, d = tour[i], tour[i + 1], tour[j], tour[(j + 1) % n]
        if king(a, c) and king(b, d):
            tour[i + 1:j + 1] = tour[i + 1:j + 1][::-1]
    start = int(rng.integers(n))
    return tuple(tour[start:] + tour[:start])


def flow_trajectory(start: tuple[int, int], num_frames: int, cells: int, seed: int, move: int = 1) -> np.ndarray:
    """Cells of frames ``0 .. num_frames-1`` from ``start`` along the flow tour, ``move`` tour steps per frame."""
    tour = flow_cycle(cells, seed)
    first = tour.index(start)
    return np.array([tour[(first + move * t) % len(tour)] for t in range(num_frames)], dtype=np.int64)


def move_name(move: int) -> str:
    """The option text of a flow move: ``1 forward``, ``2 back``."""
    return f"{abs(move)} {'forward' if move > 0 else 'back'}"


def cell_name(col: int, row: int) -> str:
    """``r1c1`` (top-left) .. ``r4c4``: the option text of a cell."""
    return f"r{row + 1}c{col + 1}"


def cell_index(col: int, row: int, cells: int) -> int:
    """Row-major index: the canonical option position of a cell."""
    return row * cells + col


def direction_name(velocity: tuple[int, int]) -> str:
    vx, vy = velocity
    return f"{'up' if vy < 0 else 'down'}-{'left' if vx < 0 else 'right'}"


def heading_index(velocity: tuple[int, int]) -> int:
    """DIRECTIONS index of a diagonal move; -1 for a straight one (the flow tour has both, and no heading cue)."""
    return DIRECTIONS.index(direction_name(velocity)) if all(velocity) else -1


# ---- rendering ----
def cell_code(col: int, row: int, cells: int) -> tuple[int, int]:
    """Red level from the column, green level from the row (0..1 over the grid)."""
    scale = max(cells - 1, 1)
    return col / scale, row / scale


HEADING_BLUE = (255, 235, 215, 195)  # the ball's blue level per DIRECTIONS entry (heading_cue)


def ball_colour(col: int, row: int, cells: int, heading: int | None = None) -> tuple[int, int, int]:
    """Red and green from the cell; blue from the heading (an index into DIRECTIONS) when it is shown."""
    red, green = cell_code(col, row, cells)
    return round(80 + 175 * red), round(80 + 175 * green), 255 if heading is None else HEADING_BLUE[heading]


def timer_blue(count: int, max_count: int, levels: tuple[int, int] = (TIMER_BLUE_BASE, TIMER_BLUE_MAX)) -> int:
    """The floor's blue level for a timer count: evenly spaced from ``levels[0]`` (0) to ``levels[1]`` (max)."""
    low, high = levels
    return low + round((high - low) * count / max(max_count, 1))


def floor_colour(col: int, row: int, cells: int, blue: int = TIMER_BLUE_BASE) -> tuple[int, int, int]:
    """The floor is tinted by the ball's cell, dimmer than the ball: the state is then content of *every* patch
    of the frame, the signal a from-scratch tower learns in ~100 steps (docs/results.md: a uniform level per answer
    was learned at once, a ball's place alone not in thousands of steps). Its blue level is the timer's count."""
    red, green = cell_code(col, row, cells)
    return round(20 + 100 * red), round(20 + 100 * green), blue


def render(cells_T2: np.ndarray, cells: int, *, headings_T: np.ndarray | None = None,
           floor_blue_T: np.ndarray | None = None) -> np.ndarray:
    """Frames ``[T, H, W, 3]``: the floor tinted by the ball's cell (blue: the timer, when shown), with the ball
    filling that cell (blue: its heading, when shown)."""
    size = cells * CELL_PX
    frames = np.empty((len(cells_T2), size, size, 3), dtype=np.uint8)
    for t, (col, row) in enumerate(cells_T2):
        heading = None if headings_T is None else int(headings_T[t])
        blue = TIMER_BLUE_BASE if floor_blue_T is None else int(floor_blue_T[t])
        frames[t] = floor_colour(col, row, cells, blue)
        frames[t, row * CELL_PX:(row + 1) * CELL_PX, col * CELL_PX:(col + 1) * CELL_PX] = ball_colour(
            col, row, cells, heading)
    return frames


@dataclass(frozen=True)
class FrameStates:
    """What each frame of a video shows: the ball's cell, its heading (DIRECTIONS index) and the timer's count."""

    cells_T2: np.ndarray
    headings_T: np.ndarray
    timers_T: np.ndarray

    def render(self, cfg: "GridTaskConfig", *, thought: bool = False) -> np.ndarray:
        """The frames, with the cues ``cfg`` shows in this video (``thought_cues``: in the thought video too)."""
        heading = (cfg.heading_cue or thought and cfg.thought_cues) and cfg.dynamics != "flow"  # flow: cell = state
        timer = cfg.horizon_cue == "timer" or thought and cfg.thought_cues
        headings_T = self.headings_T if heading else None
        blue_T = np.array([timer_blue(int(c), cfg.max_timer, cfg.timer_blue) for c in self.timers_T])
        if not (thought and cfg.timer_panel != "none"):
            return render(self.cells_T2, cfg.cells, headings_T=headings_T, floor_blue_T=blue_T if timer else None)
        scene = render(self.cells_T2, cfg.cells, headings_T=headings_T)
        if cfg.timer_panel == "ball":
            panel = render(np.stack([self.timers_T % cfg.cells, self.timers_T // cfg.cells], axis=1), cfg.cells)
        else:
            panel = np.zeros_like(scene)
            panel[..., 2] = blue_T[:, None, None]
        return np.concatenate([scene, panel], axis=2)


# ---- one item ----
@dataclass(frozen=True)
class GridQuestion:
    variant: str
    question: str
    options: tuple[str, ...]
    correct: int
    meta: dict[str, Any]


@dataclass(frozen=True)
class GridWorld:
    """One video's state: the clip, its continuation (the thought video) and its questions."""

    clip_T2: np.ndarray
    thought_T2: np.ndarray
    headings_T: np.ndarray
    """Heading (DIRECTIONS index of the next move) of every clip then thought frame."""
    start: tuple[int, int]
    velocity: tuple[int, int]
    horizon: int
    move: int = 1
    """Flow: tour steps per frame (``flow_moves``)."""

    @property
    def last_velocity(self) -> tuple[int, int]:
        """The velocity between the clip's last two frames (what the last visual token shows)."""
        (x0, y0), (x1, y1) = self.clip_T2[-2], self.clip_T2[-1]
        return int(x1 - x0), int(y1 - y0)


@lru_cache(maxsize=None)
def held_out_pairs(cells: int, horizons: tuple[int, int], per_cell: int, seed: int) -> frozenset[tuple[int, int, int]]:
    """``(col, row, D)``: the pairs of last visible cell and horizon train never asks about -- ``per_cell`` of the
    horizons for every cell, drawn from ``seed``, so every cell and (almost surely) every D stays in train too."""
    rng = np.random.default_rng([seed, 0x401D])
    pairs = range(horizons[0], horizons[1] + 1)
    return frozenset((col, row, int(d)) for row in range(cells) for col in range(cells)
                     for d in rng.choice(pairs, size=per_cell, replace=False))


PairSet = Literal["any", "train", "held_out"]
MAX_WORLD_ATTEMPTS = 10_000


def sample_world(rng: np.random.Generator, cfg: GridTaskConfig, pairs: PairSet = "any") -> GridWorld:
    """One world; ``pairs`` restricts its (last visible cell, D) pair to train's or the held-out ones
    (``cfg.holdout``) by redrawing from the same stream, so the result stays a pure function of the seed."""
    if pairs == "any" or not cfg.holdout:
        return _draw_world(rng, cfg)
    held_out = held_out_pairs(cfg.cells, cfg.horizons, cfg.held_out_per_cell, cfg.holdout_seed)
    for _ in range(MAX_WORLD_ATTEMPTS):
        world = _draw_world(rng, cfg)
        col, row = (int(v) for v in world.clip_T2[-1])
        if ((col, row, world.horizon) in held_out) == (pairs == "held_out"):
            return world
    raise RuntimeError(f"grid.sample_world: no {pairs} pair in {MAX_WORLD_ATTEMPTS} draws (grid.holdout="
                       f"{cfg.holdout})")


def _draw_world(rng: np.random.Generator, cfg: GridTaskConfig) -> GridWorld:
    start = (int(rng.integers(cfg.cells)), int(rng.integers(cfg.cells)))
    velocity = (int(rng.choice((-1, 1))), int(rng.choice((-1, 1))))
    horizon = int(rng.integers(cfg.horizons[0], cfg.horizons[1] + 1))
    num_frames = cfg.clip_frames + cfg.thought_frames
    move = 1
    if cfg.dynamics == "flow":
        # drawn only when there is a choice, so a one-law set keeps its random stream (and its bytes)
        move = int(rng.choice(cfg.flow_moves)) if len(cfg.flow_moves) > 1 else cfg.flow_moves[0]
        path = flow_trajectory(start, num_frames + 1, cfg.cells, cfg.flow_seed, move)
        velocity = tuple(int(v) for v in path[1] - path[0])
    else:
        path = trajectory(start, velocity, num_frames + 1, cfg.cells)
    headings = np.array([heading_index(tuple(int(v) for v in step)) for step in np.diff(path, axis=0)])
    return GridWorld(clip_T2=path[:cfg.clip_frames], thought_T2=path[cfg.clip_frames:num_frames], headings_T=headings,
                     start=start, velocity=velocity, horizon=horizon, move=move)


def clip_states(world: GridWorld, cfg: GridTaskConfig) -> FrameStates:
    """The visible clip: the timer counts down to D at the clip's last frame."""
    timers = world.horizon + np.arange(cfg.clip_frames)[::-1]
    return FrameStates(world.clip_T2, world.headings_T[:cfg.clip_frames], timers)


def thought_states(world: GridWorld, qtype: str, cfg: GridTaskConfig) -> FrameStates:
    """What each thought-video frame shows (``cfg.thought``); ``current_cell`` asks about the clip's end. The timer
    keeps counting down from the clip (D - 1 at the first thought frame) and the ball stops where it reaches 0."""
    headings = world.headings_T[cfg.clip_frames:]
    timers = np.maximum(world.horizon - 1 - np.arange(cfg.thought_frames), 0)
    if cfg.thought == "continuation":
        return FrameStates(world.thought_T2, headings, timers)
    asked = world.horizon if qtype == "future_cell" else 0
    held = len(world.thought_T2) - asked
    if asked:
        cell, heading = world.thought_T2[asked - 1], headings[asked - 1]
    else:
        cell, heading, timers = world.clip_T2[-1], world.headings_T[cfg.clip_frames - 1], np.zeros_like(timers)
    return FrameStates(np.concatenate([world.thought_T2[:asked], np.repeat(cell[None], held, axis=0)]),
                       np.concatenate([headings[:asked], np.full(held, heading)]), timers)


def cell_options(cells: int) -> tuple[str, ...]:
    return tuple(cell_name(i % cells, i // cells) for i in range(cells * cells))


def compact_prompt(question: str, options: Sequence[str]) -> str:
    """The user text for ``data.prompt: verbatim`` (the instruction line is appended by the prompt builder): cell
    options named by their rule, not listed one by one. 16 listed options would be ~75 % of the sequence -- of
    every step's cost, and of what attention at init spreads over besides the few visual tokens."""
    if options and all(o.startswith("r") and "c" in o for o in options):
        last = OPTION_LETTERS[len(options) - 1]
        return f"{question}\nOptions: {OPTION_LETTERS[0]}-{last}, the cells row by row from the top left."
    return "\n".join([question, *(f"{OPTION_LETTERS[i]}. {o}" for i, o in enumerate(options))])


def _question(variant: str, question: str, options: tuple[str, ...], correct: int, **meta: Any) -> GridQuestion:
    return GridQuestion(variant, question, options, correct, {**meta, "prompt": compact_prompt(question, options)})


def main_question(world: GridWorld, qtype: str, cfg: GridTaskConfig) -> GridQuestion:
    options = cell_options(cfg.cells)
    if qtype == "future_cell" and cfg.horizon_cue == "timer":
        col, row = world.thought_T2[world.horizon - 1]
        return _question(qtype, "The ball stops when the timer runs out. Which cell does it stop in?", options,
                         cell_index(col, row, cfg.cells), horizon=world.horizon)
    if qtype == "future_cell":
        col, row = world.thought_T2[world.horizon - 1]
        frames = "frame" if world.horizon == 1 else "frames"
        return _question(qtype, f"Which cell will the ball be in {world.horizon} {frames} after the video ends?",
                         options, cell_index(col, row, cfg.cells), horizon=world.horizon)
    if qtype == "current_cell":
        col, row = world.clip_T2[-1]
        return _question(qtype, "Which cell is the ball in at the end of the video?", options,
                         cell_index(col, row, cfg.cells))
    raise ValueError(f"grid: unknown question type {qtype!r}; valid: {', '.join(GRID_QTYPES)}")


def perception_questions(world: GridWorld, cfg: GridTaskConfig) -> list[GridQuestion]:
    """Stage 0's supervision: the ball's cell at the last ``perception_frames`` clip frames, and (bounce) its
    direction."""
    if not cfg.perception_frames:
        return []
    options = cell_options(cfg.cells)
    first = cfg.clip_frames - cfg.perception_frames
    questions = [_question("cell_at_frame", f"Which cell is the ball in at frame {t + 1} of the video?", options,
                           cell_index(int(col), int(row), cfg.cells), frame=t + 1)
                 for t, (col, row) in enumerate(world.clip_T2) if t >= first]
    if cfg.dynamics == "bounce" and cfg.heading_cue:  # what the last frame shows: the next move's heading
        questions.append(_question("direction", "In which direction is the ball heading at the end of the video?",
                                   DIRECTIONS, int(world.headings_T[cfg.clip_frames - 1])))
    elif cfg.dynamics == "bounce":
        questions.append(_question("direction", "In which direction is the ball moving at the end of the video?",
                                   DIRECTIONS, DIRECTIONS.index(direction_name(world.last_velocity))))
    elif len(cfg.flow_moves) > 1:  # (one flow law: the cell is the whole state, there is no move to learn)
        questions.append(_question("move", "How many steps along its track does the ball move per frame, and which "
                                   "way?", tuple(move_name(m) for m in cfg.flow_moves),
                                   cfg.flow_moves.index(world.move)))
    if cfg.horizon_cue == "timer":
        low, high = cfg.horizons
        questions.append(_question("timer", "How many frames are left on the timer at the end of the video?",
                                   tuple(str(d) for d in range(low, high + 1)), world.horizon - low))
    return questions


# ---- exact, non-learned baselines (computed from the generator's ground truth) ----
def baseline_answers(world: GridWorld, cfg: GridTaskConfig) -> dict[str, int]:
    """What simple rules answer for the future cell: copy the last frame; copy the past frame in the same phase of
    the motion's period when the clip holds one (else the last frame). The exact physics answers 100 % (it is the
    label) and is not listed; ``majority`` and the (last cell, D) lookup are fitted on train by the report."""
    col, row = world.clip_T2[-1]
    answers = {"copy_last": cell_index(int(col), int(row), cfg.cells)}
    period = cfg.period(world.move)
    target_t = cfg.clip_frames - 1 + world.horizon
    same_phase = [t for t in range(cfg.clip_frames) if (target_t - t) % period == 0]
    copy_col, copy_row = world.clip_T2[same_phase[-1]] if same_phase else world.clip_T2[-1]
    answers["copy_same_phase"] = cell_index(int(copy_col), int(copy_row), cfg.cells)
    return answers
