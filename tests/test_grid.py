"""The grid task (the embedded default): physics, rendering, questions, thought videos, and the report's rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from storms_dist.data.manifest import OPTION_LETTERS, read_manifest
from storms_dist.data.synth import SynthConfig, generate, grid
from storms_dist.data.synth.grid import GridTaskConfig, reflect_step, trajectory
from storms_dist.data.video_io import decode_frames
from storms_dist.eval import diagnostics


def test_reflect_step_bounces_off_both_walls() -> None:
    assert reflect_step(2, 1, 4) == (3, 1)
    assert reflect_step(3, 1, 4) == (2, -1)
    assert reflect_step(0, -1, 4) == (1, 1)


def test_trajectory_has_the_period_of_the_grid() -> None:
    path = trajectory((0, 2), (1, -1), 20, 4)
    period = 2 * (4 - 1)
    assert (path[period:] == path[:-period]).all()
    assert (np.abs(np.diff(path, axis=0)) == 1).all()  # one cell per frame on each axis, also at a bounce
    assert path.min() == 0 and path.max() == 3


def test_render_codes_the_cell_in_place_and_colour() -> None:
    frames = grid.render(np.array([[1, 2], [3, 0]]), 4)
    assert frames.shape == (2, 28, 28, 3)
    assert tuple(frames[0, 2 * 7 + 3, 1 * 7 + 3]) == grid.ball_colour(1, 2, 4)
    assert tuple(frames[0, 0, 0]) == grid.floor_colour(1, 2, 4) != grid.floor_colour(3, 0, 4) == tuple(frames[1, 0, 0])
    colours = {grid.ball_colour(c, r, 4) for c in range(4) for r in range(4)}
    assert len(colours) == 16  # the colour alone names the cell
    # the opt-in cues: the ball's blue level is its heading, the floor's blue level the timer's count
    cued = grid.render(np.array([[1, 2], [1, 2]]), 4, headings_T=np.array([0, 3]), floor_blue_T=np.array([40, 99]))
    assert cued[0, 2 * 7 + 3, 1 * 7 + 3, 2] == grid.HEADING_BLUE[0] != cued[1, 2 * 7 + 3, 1 * 7 + 3, 2]
    assert (cued[0, 0, 0, 2], cued[1, 0, 0, 2]) == (40, 99)
    levels = [grid.timer_blue(c, 19) for c in range(20)]
    assert levels[0] == grid.TIMER_BLUE_BASE and levels[-1] == grid.TIMER_BLUE_MAX and min(np.diff(levels)) >= 4


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="grid.horizons"):
        GridTaskConfig(horizons=(0, 4))
    with pytest.raises(ValueError, match="grid.horizons"):
        GridTaskConfig(horizons=(1, 40))
    with pytest.raises(ValueError, match="grid.cells"):
        GridTaskConfig(cells=3)
    with pytest.raises(ValueError, match="grid.clip_frames"):
        GridTaskConfig(clip_frames=3)
    with pytest.raises(ValueError, match="grid.perception_frames"):
        GridTaskConfig(perception_frames=5)
    with pytest.raises(ValueError, match="grid.perception_frames"):
        GridTaskConfig(perception_frames=True)
    with pytest.raises(ValueError, match="grid.horizon_cue"):
        GridTaskConfig(horizon_cue="clock")
    with pytest.raises(ValueError, match="grid.heading_cue"):
        GridTaskConfig(heading_cue="yes")
    with pytest.raises(ValueError, match="grid.timer_blue.*23 counts"):
        GridTaskConfig(horizon_cue="timer", horizons=(1, 16), thought_frames=32, clip_frames=8)
    GridTaskConfig(horizon_cue="timer", horizons=(1, 16), thought_frames=32, clip_frames=8, timer_blue=(0, 255))
    with pytest.raises(ValueError, match="grid.timer_blue"):
        GridTaskConfig(timer_blue=(120, 40))
    with pytest.raises(ValueError, match="grid.timer_blue.*under 4 apart"):
        GridTaskConfig(dynamics="flow", thought_cues=True, timer_blue=(40, 60))


@pytest.fixture(scope="module")
def grid_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    cfg = SynthConfig(num_train=160, num_val=8, num_test=40, workers=1)
    return cfg, generate(cfg, root)


def test_generated_questions_match_the_ground_truth(grid_set) -> None:
    cfg, paths = grid_set
    samples = read_manifest(paths["train"])
    assert [s.qtype for s in samples[:4]] == list(grid.GRID_DEFAULT_QTYPES)
    for s in samples:
        assert len(s.options) == 16 and s.options[0] == "r1c1" and s.options[-1] == "r4c4"  # canonical order
        if s.qtype == "future_cell":
            horizon = s.meta["horizon"]
            col, row = s.meta["thought_cells"][horizon - 1]
            assert 1 <= horizon <= 16 and f" {horizon} frame" in s.question
            assert s.meta["thought_timers"] == [max(horizon - 1 - t, 0) for t in range(16)]  # 0 where it is asked
        else:
            col, row = s.meta["clip_cells"][-1]
            assert s.meta["thought_timers"] == [0] * 16
        assert s.answer == OPTION_LETTERS[row * 4 + col]
        assert "Options: A-P" in s.meta["prompt"]
    # the thought video (grid.thought: until_asked) plays the true motion up to the asked moment, then holds it:
    # its last frame is the answer's state for every horizon
    for s in samples[:8]:
        path = trajectory(tuple(s.meta["start"]), tuple(s.meta["velocity"]), 20, 4).tolist()
        asked = s.meta.get("horizon", 0)
        assert s.meta["clip_cells"] == path[:4] and s.meta["thought"] == "until_asked"
        assert s.meta["thought_cells"] == path[4:4 + asked] + [path[3 + asked]] * (16 - asked)
        col, row = s.meta["thought_cells"][-1]
        assert s.answer == OPTION_LETTERS[row * 4 + col]


def test_continuation_thought_is_the_next_frames_whatever_is_asked(tmp_path) -> None:
    cfg = SynthConfig(num_train=4, num_val=0, num_test=0, workers=1, grid=GridTaskConfig(thought="continuation"))
    for s in read_manifest(generate(cfg, tmp_path)["train"]):
        path = trajectory(tuple(s.meta["start"]), tuple(s.meta["velocity"]), 20, 4).tolist()
        assert s.meta["clip_cells"] + s.meta["thought_cells"] == path and s.meta["thought"] == "continuation"


@pytest.mark.timeout(60)  # the plain search never finishes on 8x8: the constructive fallback must take over
def test_flow_tour_visits_every_cell_by_neighbour_moves() -> None:
    for cells, seed in ((4, 0), (4, 1), (6, 0), (8, 0), (8, 1)):
        tour = grid.flow_cycle(cells, seed)
        assert sorted(tour) == [(c, r) for c in range(cells) for r in range(cells)]
        for (c0, r0), (c1, r1) in zip(tour, tour[1:] + tour[:1]):  # closed, one king's move per frame
            assert max(abs(c1 - c0), abs(r1 - r0)) == 1
    assert grid.flow_cycle(4, 0) != grid.flow_cycle(4, 1)
    assert grid.flow_cycle(8, 0) != grid.flow_cycle(8, 1)


def test_flow_dynamics_answers_follow_the_tour_and_the_cell_is_the_state(tmp_path) -> None:
    task = GridTaskConfig(dynamics="flow")
    cfg = SynthConfig(num_train=12, num_val=0, num_test=0, workers=1, grid=task)
    paths = generate(cfg, tmp_path)
    tour = list(grid.flow_cycle(4, task.flow_seed))
    for s in read_manifest(paths["train"]):
        first = tour.index(tuple(s.meta["clip_cells"][0]))
        path = [list(tour[(first + t) % 16]) for t in range(20)]
        assert s.meta["clip_cells"] == path[:4]
        if s.qtype == "future_cell":  # the answer is the tour D cells on from the clip's last cell
            col, row = path[3 + s.meta["horizon"]]
            assert s.meta["thought_cells"][-1] == [col, row]
            assert s.answer == OPTION_LETTERS[row * 4 + col]
    perception = read_manifest(paths["perception_train"])  # the cell is the whole state: no direction question
    assert {p.meta["variant"] for p in perception} == {"cell_at_frame"}
    assert task.period() == 16 and GridTaskConfig(dynamics="flow", flow_moves=[2, -1]).period(2) == 8
    with pytest.raises(ValueError, match="grid.dynamics"):
        GridTaskConfig(dynamics="orbit")
    with pytest.raises(ValueError, match="grid.heading_cue"):
        GridTaskConfig(dynamics="flow", heading_cue=True)


def test_flow_moves_draw_a_law_per_video_and_stage0_asks_it(tmp_path) -> None:
    task = GridTaskConfig(dynamics="flow", flow_moves=[1, -1, 2, -2])
    cfg = SynthConfig(num_train=40, num_val=0, num_test=0, workers=1, grid=task)
    paths = generate(cfg, tmp_path)
    tour = list(grid.flow_cycle(4, task.flow_seed))
    moves = set()
    for s in read_manifest(paths["train"]):
        move, first = s.meta["move"], tour.index(tuple(s.meta["clip_cells"][0]))
        moves.add(move)
        path = [list(tour[(first + move * t) % 16]) for t in range(20)]
        assert s.meta["clip_cells"] == path[:4]
        if s.qtype == "future_cell":  # the answer is `move` tour steps per frame, D frames on
            col, row = path[3 + s.meta["horizon"]]
            assert s.answer == OPTION_LETTERS[row * 4 + col]
    assert moves == {1, -1, 2, -2}
    asked = [p for p in read_manifest(paths["perception_train"]) if p.meta["variant"] == "move"]
    assert len(asked) == 40 and {p.answer_text for p in asked} == {"1 forward", "1 back", "2 forward", "2 back"}
    assert task.period(2) == 8 and task.period(-1) == 16
    for bad in ([], [0], [1, 1], [16]):
        with pytest.raises(ValueError, match="grid.flow_moves"):
            GridTaskConfig(dynamics="flow", flow_moves=bad)
    with pytest.raises(ValueError, match="needs dynamics: flow"):
        GridTaskConfig(flow_moves=[1, -1])


def test_one_flow_law_draws_the_same_worlds_as_before() -> None:
    """flow_moves draws from the random stream only when it offers a choice: the default set keeps its bytes."""
    task = GridTaskConfig(dynamics="flow")
    worlds = [grid.sample_world(np.random.default_rng(i), task) for i in range(5)]
    tour = grid.flow_cycle(4, task.flow_seed)
    for i, world in enumerate(worlds):
        rng = np.random.default_rng(i)
        start = (int(rng.integers(4)), int(rng.integers(4)))
        rng.choice((-1, 1)), rng.choice((-1, 1))  # the bounce velocity: drawn for every world, used by bounce only
        assert world.start == start and world.move == 1
        assert world.horizon == int(rng.integers(1, 17))
        assert tuple(world.clip_T2[1]) == tour[(tour.index(start) + 1) % 16]


def test_holdout_keeps_held_out_pairs_out_of_train_and_asks_only_them_outside(tmp_path) -> None:
    task = GridTaskConfig(dynamics="flow", holdout=0.5)
    assert task.held_out_per_cell == 8
    held_out = grid.held_out_pairs(4, (1, 16), 8, task.holdout_seed)
    assert len(held_out) == 16 * 8 and held_out == grid.held_out_pairs(4, (1, 16), 8, 0)
    assert held_out != grid.held_out_pairs(4, (1, 16), 8, 1)
    cfg = SynthConfig(num_train=24, num_val=12, num_test=12, workers=1, grid=task)
    paths = generate(cfg, tmp_path)
    for split in ("train", "val", "test"):
        samples = read_manifest(paths[split])
        future = [s for s in samples if s.qtype == "future_cell"]
        pairs = [(*s.meta["clip_cells"][-1], s.meta["horizon"]) for s in future]
        assert future and all((p in held_out) == (split != "train") for p in pairs), split
        assert any(s.qtype == "current_cell" for s in samples)  # the static control draws from any pair
    # holdout 0 is the plain task: the same worlds from the same seeds
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    plain, restricted = grid.sample_world(rng_a, GridTaskConfig()), grid.sample_world(rng_b, GridTaskConfig(), "train")
    assert (plain.clip_T2 == restricted.clip_T2).all() and plain.horizon == restricted.horizon
    for bad in (1.0, -0.1, 0.01):  # 0.01 of 16 horizons rounds to none held out
        with pytest.raises(ValueError, match="grid.holdout"):
            GridTaskConfig(holdout=bad)


def test_videos_show_the_clip_and_the_thought_video(grid_set) -> None:
    _, paths = grid_set
    sample = read_manifest(paths["train"])[0]
    for path, cells in ((sample.video_path, sample.meta["clip_cells"]),
                        (sample.thought_path, sample.meta["thought_cells"])):
        frames = decode_frames(path, list(range(len(cells))))
        assert frames.shape[1:] == (28, 28, 3)
        for frame, (col, row) in zip(frames, cells):  # the brightest cell is the ball's, in its colour (VP9: ~)
            means = frame.reshape(4, 7, 4, 7, 3).mean(axis=(1, 3)).sum(-1)
            assert np.unravel_index(means.argmax(), means.shape) == (row, col)
            colour = frame[row * 7 + 3, col * 7 + 3].astype(int)
            assert np.abs(colour - grid.ball_colour(col, row, 4)).max() < 24
        assert abs(np.median(frames[..., 2]) - grid.TIMER_BLUE_BASE) < 4  # no timer on the floor by default


def test_perception_questions_ask_the_starting_state(grid_set) -> None:
    _, paths = grid_set
    perception = read_manifest(paths["perception_train"])
    train = read_manifest(paths["train"])
    # the default asks the cell at the last clip frame (the state the dynamics start from) and the direction
    assert len(perception) == len(train) * 2
    assert {p.meta["frame"] for p in perception if p.meta["variant"] == "cell_at_frame"} == {4}
    first = [p for p in perception if p.meta["source_uid"] == train[0].uid]
    cells = train[0].meta["clip_cells"]
    for p in first:
        if p.meta["variant"] == "cell_at_frame":
            col, row = cells[p.meta["frame"] - 1]
            assert p.answer == OPTION_LETTERS[row * 4 + col]
    (direction,) = [p for p in first if p.meta["variant"] == "direction"]
    (x0, y0), (x1, y1) = cells[-2:]
    assert direction.options[OPTION_LETTERS.index(direction.answer)] == grid.direction_name((x1 - x0, y1 - y0))


def test_baselines_chance_and_horizon_accuracy(grid_set, tmp_path) -> None:
    _, paths = grid_set
    train, test = read_manifest(paths["train"]), read_manifest(paths["test"])
    rules = diagnostics.baseline_results(train, test)
    assert rules["copy last frame"]["by_type"]["current_cell"]["accuracy"] == 100.0  # the control needs one frame
    assert 0.0 <= rules["copy last frame"]["by_type"]["future_cell"]["accuracy"] < 100.0
    assert set(rules) == {"majority", "copy last frame", "copy same-phase frame", "lookup (last cell, D)"}
    assert diagnostics.chance_by_type(test)["by_type"]["future_cell"]["accuracy"] == pytest.approx(6.25)
    records = [{"uid": s.uid, "qtype": s.qtype, "prediction": s.answer if s.meta.get("horizon", 0) <= 8 else "A",
                "answer": s.answer} for s in test]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(__import__("json").dumps(r) + "\n" for r in records))
    by_horizon = diagnostics.accuracy_by_horizon(path, test)
    assert all(by_horizon[b] == 100.0 for b in ("1-4", "5-8") if b in by_horizon)
    assert all(by_horizon[b] < 100.0 for b in ("9-12", "13-16") if b in by_horizon and
               any(s.answer != "A" for s in test if s.qtype == "future_cell" and s.meta["horizon"] > 8))


def test_target_informativeness_sees_a_constant_and_an_informative_cache(grid_set) -> None:
    _, paths = grid_set
    train = [s for s in read_manifest(paths["train"])]
    k, d = 8, 6
    constant = torch.ones(len(train), k, d)
    info = diagnostics.target_informativeness(constant, train, hidden_rms=1.0)
    assert info["variance_ratio"] == 0.0 and info["target_rms"] == pytest.approx(1.0) and info["hidden_rms"] == 1.0
    # targets whose slot k one-hot-codes the cells of its two frames (as a merged token holds both): the probe
    # from the slot of the asked horizon reads the answer far above the majority rate
    coded = torch.randn(len(train), k, 32) * 0.01
    for i, s in enumerate(train):
        for slot in range(k):
            for half in range(2):
                col, row = s.meta["thought_cells"][2 * slot + half]
                coded[i, slot, 16 * half + row * 4 + col] += 1.0
    info = diagnostics.target_informativeness(coded, train)
    assert info["variance_ratio"] > 0.5
    assert info["probe_accuracy"] >= 2 * info["probe_majority"]


def test_timer_and_heading_cues_show_the_whole_state_in_every_frame(tmp_path) -> None:
    task = GridTaskConfig(horizon_cue="timer", heading_cue=True)
    paths = generate(SynthConfig(num_train=8, num_val=0, num_test=0, workers=1, grid=task), tmp_path)
    train = read_manifest(paths["train"])
    sample = next(s for s in train if s.qtype == "future_cell")
    assert sample.question == "The ball stops when the timer runs out. Which cell does it stop in?"
    horizon = sample.meta["horizon"]
    path = trajectory(tuple(sample.meta["start"]), tuple(sample.meta["velocity"]), 21, 4)
    headings = [grid.heading_index(tuple(int(v) for v in step)) for step in np.diff(path, axis=0)]
    clip_timers = [horizon + 3 - t for t in range(4)]  # the timer counts down to D at the clip's last frame
    stop = 3 + horizon  # frame index of the asked moment; the thought video holds it
    thought_headings = [headings[min(4 + t, stop)] for t in range(16)]
    for video, cells, timers, heads in ((sample.video_path, sample.meta["clip_cells"], clip_timers, headings[:4]),
                                        (sample.thought_path, sample.meta["thought_cells"],
                                         sample.meta["thought_timers"], thought_headings)):
        frames = decode_frames(video, list(range(len(cells)))).astype(float)
        for frame, (col, row), timer, heading in zip(frames, cells, timers, heads):
            cell_means = frame.reshape(4, 7, 4, 7, 3).mean(axis=(1, 3)).reshape(16, 3)
            floor = np.delete(cell_means, row * 4 + col, axis=0)
            assert abs(np.median(floor[:, 2]) - grid.timer_blue(timer, task.max_timer)) < 2.1  # half a level (VP9)
            assert abs(frame[row * 7 + 3, col * 7 + 3, 2] - grid.HEADING_BLUE[heading]) < 10
    perception = [p for p in read_manifest(paths["perception_train"]) if p.meta["source_uid"] == sample.uid]
    by_variant = {p.meta["variant"]: p for p in perception}
    assert set(by_variant) == {"cell_at_frame", "direction", "timer"}
    timer = by_variant["timer"]
    assert timer.options[OPTION_LETTERS.index(timer.answer)] == str(horizon)
    direction = by_variant["direction"]  # the heading the last frame shows: the next move's, after any bounce
    assert direction.options[OPTION_LETTERS.index(direction.answer)] == grid.DIRECTIONS[headings[3]]


def test_timer_panel_shows_the_frames_left_as_a_second_ball_beside_the_scene(tmp_path) -> None:
    task = GridTaskConfig(dynamics="flow", thought_cues=True, timer_panel="ball")
    paths = generate(SynthConfig(num_train=8, num_val=0, num_test=0, workers=1, grid=task), tmp_path)
    sample = next(s for s in read_manifest(paths["train"]) if s.qtype == "future_cell")
    clip = decode_frames(sample.video_path, [0])
    assert clip.shape[1:3] == (28, 28)  # the clip keeps the plain scene Stage 0 learns
    frames = decode_frames(sample.thought_path, list(range(16))).astype(float)
    assert frames.shape[1:3] == (28, 56)
    for frame, (col, row), timer in zip(frames, sample.meta["thought_cells"], sample.meta["thought_timers"]):
        for panel, (c, r) in ((frame[:, :28], (col, row)), (frame[:, 28:], (timer % 4, timer // 4))):
            means = panel.reshape(4, 7, 4, 7, 3).mean(axis=(1, 3)).sum(-1)  # the ball is the brightest cell
            assert int(means.argmax()) == r * 4 + c
    with pytest.raises(ValueError, match="grid.timer_panel"):
        GridTaskConfig(timer_panel="ball")  # needs thought_cues
    with pytest.raises(ValueError, match="grid.timer_panel.*horizons"):
        GridTaskConfig(cells=4, thought_cues=True, timer_panel="ball", horizons=(1, 20), thought_frames=20)


def test_blue_timer_panel_shows_the_count_as_the_panels_blue_level(tmp_path) -> None:
    task = GridTaskConfig(dynamics="flow", thought_cues=True, timer_panel="blue", timer_blue=(0, 255))
    paths = generate(SynthConfig(num_train=4, num_val=0, num_test=0, workers=1, grid=task), tmp_path)
    sample = next(s for s in read_manifest(paths["train"]) if s.qtype == "future_cell")
    frames = decode_frames(sample.thought_path, list(range(16))).astype(float)
    for frame, timer in zip(frames, sample.meta["thought_timers"]):
        panel = frame[:, 28:]
        assert abs(np.median(panel[..., 2]) - grid.timer_blue(timer, task.max_timer, task.timer_blue)) < 6  # VP9
        assert np.median(panel[..., :2]) < 8  # no red/green: the scene's cell code stays out of the panel
    with pytest.raises(ValueError, match="grid.timer_panel"):
        GridTaskConfig(thought_cues=True, timer_panel="stripe")
