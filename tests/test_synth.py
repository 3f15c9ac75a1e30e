"""Synthetic benchmark: determinism, balance, decodability, physics and answers checked by an independent simulator."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from storms_dist.data.manifest import read_manifest
from storms_dist.data.synth import (
    EDGE_MARGIN_FRAMES,
    EVENT_GAP_FRAMES,
    PALETTE,
    PERCEPTION_VARIANTS,
    QTYPES,
    QUADRANTS,
    STAMP_NAME,
    VARIANTS,
    Scene,
    SynthConfig,
    background_image,
    balanced_pick,
    canonical_order,
    direction_of,
    generate,
    quadrant_margin,
    quadrant_of,
    render,
    sample_scene,
    sample_world,
    simulate,
    target_values,
)
from storms_dist.data.video_io import decode_frames, probe_video

# 72 videos >= the 64 from which generate() uses a worker pool, so the pool path is exercised too.
SMALL = {"num_train": 48, "num_val": 12, "num_test": 12, "occluder_prob": 0.3}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthConfig, Path]:
    cfg = SynthConfig(task="balls", **SMALL, workers=1)
    out_dir = tmp_path_factory.mktemp("synth")
    generate(cfg, out_dir)
    return cfg, out_dir


def manifest_texts(out_dir: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(out_dir.glob("*.jsonl"))}


# ------------------------------------------------------------------------------------------- an independent simulator


def naive_simulate(scene: dict, duration: float, collisions: bool, dt: float = 0.01):
    """Fixed-step integration with reflection at the walls; returns (wall events, positions at integer frames)."""
    size, radius = scene["size"], scene["radius"]
    pos = np.array(scene["positions"], dtype=float)
    vel = np.array(scene["velocities"], dtype=float)
    steps_per_frame = round(1 / dt)
    events: list[tuple[float, int, str]] = []
    frame_positions = [pos.copy()]
    for step in range(1, round(duration / dt) + 1):
        t = step * dt
        pos += vel * dt
        for ball in range(len(pos)):
            for axis, (low_wall, high_wall) in enumerate((("left", "right"), ("top", "bottom"))):
                if pos[ball, axis] < radius and vel[ball, axis] < 0:
                    pos[ball, axis] = 2 * radius - pos[ball, axis]
                    vel[ball, axis] *= -1
                    events.append((t, ball, low_wall))
                elif pos[ball, axis] > size - radius and vel[ball, axis] > 0:
                    pos[ball, axis] = 2 * (size - radius) - pos[ball, axis]
                    vel[ball, axis] *= -1
                    events.append((t, ball, high_wall))
        if collisions:
            for i in range(len(pos)):
                for j in range(i + 1, len(pos)):
                    d = pos[j] - pos[i]
                    closing = (vel[j] - vel[i]) @ d
                    if d @ d < (2 * radius) ** 2 and closing < 0:
                        n = d / np.linalg.norm(d)
                        exchange = (vel[j] - vel[i]) @ n
                        vel[i] += exchange * n
                        vel[j] -= exchange * n
        if step % steps_per_frame == 0:
            frame_positions.append(pos.copy())
    return events, np.stack(frame_positions)


@pytest.mark.parametrize("collisions", [False, True])
def test_event_driven_simulation_matches_fixed_step_integration(collisions: bool) -> None:
    cfg = SynthConfig(task="balls", num_train=1, num_val=0, num_test=0)
    rng = np.random.default_rng(123)
    num_compared_events = 0
    for _ in range(12):
        scene = sample_scene(rng, cfg, num_balls=int(rng.integers(1, 4)))
        trajectory = simulate(scene, 24.0, collisions=collisions)
        # fixed-step collision normals err by ~sqrt(dt) for grazing contacts, hence the finer step with collisions
        dt = 0.002 if collisions else 0.01
        naive_events, naive_positions = naive_simulate(scene.to_json(), 24.0, collisions, dt=dt)
        exact_walls = [(e.time, e.ball, e.wall) for e in trajectory.wall_events()]
        assert [(b, w) for _, b, w in exact_walls] == [(b, w) for _, b, w in naive_events]
        assert all(abs(a[0] - b[0]) <= 0.02 for a, b in zip(exact_walls, naive_events))
        positions, _ = trajectory.state_at(np.arange(25.0))
        assert np.abs(positions - naive_positions).max() < 0.1
        num_compared_events += len(exact_walls)
    assert num_compared_events > 20  # the comparison is not vacuous


def test_recorded_bounces_equal_velocity_reversals() -> None:
    cfg = SynthConfig(task="balls", num_train=1, num_val=0, num_test=0)
    rng = np.random.default_rng(7)
    for _ in range(20):
        scene = sample_scene(rng, cfg, num_balls=3)
        trajectory = simulate(scene, 30.0, collisions=False)
        _, velocities = trajectory.state_at(np.linspace(0, 30.0, 30_001))
        reversals = (np.diff(np.sign(velocities), axis=0) != 0).sum(axis=(0, 2))
        recorded = Counter(e.ball for e in trajectory.wall_events())
        assert list(reversals) == [recorded[b] for b in range(3)]
        positions, _ = trajectory.state_at(np.linspace(0, 30.0, 3001))
        assert positions.min() >= scene.radius - 1e-6 and positions.max() <= scene.size - scene.radius + 1e-6


def test_collisions_conserve_energy_and_never_overlap() -> None:
    cfg = SynthConfig(task="balls", num_train=1, num_val=0, num_test=0)
    rng = np.random.default_rng(11)
    num_collisions = 0
    for _ in range(40):
        scene = sample_scene(rng, cfg, num_balls=3)
        trajectory = simulate(scene, 40.0, collisions=True)
        num_collisions += sum(e.kind == "collision" for e in trajectory.events)
        energies = (trajectory.key_velocities ** 2).sum(axis=(1, 2))
        np.testing.assert_allclose(energies, energies[0], rtol=1e-9)
        positions, _ = trajectory.state_at(np.linspace(0, 40.0, 4001))
        gaps = [np.linalg.norm(positions[:, i] - positions[:, j], axis=-1).min() for i in range(3) for j in range(i)]
        assert min(gaps) >= 2 * scene.radius - 1e-6
    assert num_collisions > 0


# ------------------------------------------------------------------------------------------- answers are right


def answer_from_naive_simulation(sample, cfg: SynthConfig) -> str | None:
    """Re-derive the answer of a dynamics question from meta.scene with the fixed-step simulator."""
    meta, scene = sample.meta, sample.meta["scene"]
    end = cfg.num_frames - 1
    ball = scene["colours"].index(meta["ball"]) if "ball" in meta else None
    events, positions = naive_simulate(scene, end + cfg.num_thought_frames, cfg.ball_collisions)
    variant = meta["variant"]
    if variant == "next_wall":
        return next(w for t, b, w in events if b == ball and t > end)
    if variant == "future_quadrant":
        return quadrant_of(positions[end + meta["frames_after"], ball], scene["size"])
    if variant == "wall_bounces":
        return str(sum(1 for t, b, _ in events if b == ball and t <= end))
    if variant == "event_order":
        times = [next(t for t, b, w in events if f"the {scene['colours'][b]} ball hitting the {w} wall" == option)
                 for option in sample.options]
        return sample.options[int(np.argmin(times))]
    if variant == "first_bounce":
        return scene["colours"][min(events)[1]]
    if variant == "fastest":
        return scene["colours"][int(np.argmax([math.hypot(*v) for v in scene["velocities"]]))]
    if variant == "start_direction":
        return direction_of(scene["velocities"][ball])
    if variant == "closest_to_corner":
        corner = (0 if "left" in meta["corner"] else scene["size"], 0 if "top" in meta["corner"] else scene["size"])
        return scene["colours"][int(np.argmin([math.dist(p, corner) for p in scene["positions"]]))]
    if variant == "num_balls":
        return str(len(scene["colours"]))
    return None


def test_every_answer_agrees_with_an_independent_simulation(dataset: tuple[SynthConfig, Path]) -> None:
    cfg, out_dir = dataset
    checked = Counter()
    for split in ("train", "val", "test"):
        for sample in read_manifest(out_dir / f"{split}.jsonl"):
            assert answer_from_naive_simulation(sample, cfg) == sample.answer_text, sample.uid
            checked[sample.meta["variant"]] += 1
    assert set(checked) == {v for q in QTYPES for v in VARIANTS[q]}


def colour_centroid(frame: np.ndarray, colour: str, tolerance: int = 50) -> np.ndarray | None:
    mask = np.abs(frame.astype(int) - np.array(PALETTE[colour])).max(axis=-1) <= tolerance
    if mask.sum() < 10:  # hidden behind the occluder
        return None
    rows, cols = np.nonzero(mask)
    return np.array([cols.mean() + 0.5, rows.mean() + 0.5])


def test_rendered_videos_show_what_the_answers_say(dataset: tuple[SynthConfig, Path]) -> None:
    """Decoded pixels: the thought video shows the ball in the answered quadrant; frame 0 has the answered count."""
    cfg, out_dir = dataset
    samples = read_manifest(out_dir / "train.jsonl") + read_manifest(out_dir / "test.jsonl")
    num_quadrants_checked = 0
    for sample in samples:
        scene = sample.meta["scene"]
        if sample.meta["variant"] == "future_quadrant":
            (frame,) = decode_frames(sample.thought_path, [sample.meta["frames_after"] - 1])
            centre = colour_centroid(frame, sample.meta["ball"])
            if centre is not None:
                assert quadrant_of(centre, cfg.size) == sample.answer_text, sample.uid
                num_quadrants_checked += 1
        (first,) = decode_frames(sample.video_path, [0])
        visible = [c for c in PALETTE if colour_centroid(first, c) is not None]
        assert sorted(visible) == sorted(scene["colours"]), sample.uid
    assert num_quadrants_checked >= 3


def test_planned_questions_are_unambiguous() -> None:
    """Re-check each variant's margins on the simulated trajectory, over many planned (not rendered) questions."""
    cfg = SynthConfig(task="balls", num_train=1, num_val=0, num_test=0)
    end, gap, edge = cfg.num_frames - 1, EVENT_GAP_FRAMES, EDGE_MARGIN_FRAMES
    for variant in (v for q in QTYPES for v in VARIANTS[q]):
        targets = target_values(variant, cfg)
        for index in range(24):
            target = balanced_pick(targets, index, seed=5, split="train", key=variant)
            world, plan = sample_world(np.random.default_rng([5, index]), cfg, variant, target)
            trajectory, scene, answer = world.trajectory, world.scene, plan.options[plan.correct]
            ball = scene.colours.index(plan.meta["ball"]) if "ball" in plan.meta else None
            walls = trajectory.wall_events(ball)
            in_clip = [e.time for e in walls if e.time <= end + edge]
            if variant == "wall_bounces":
                assert all(edge <= t <= end - edge for t in in_clip) and len(in_clip) == int(answer)
                assert all(b - a >= gap for a, b in itertools.pairwise(in_clip))
            elif variant == "next_wall":
                after = [e for e in walls if e.time > end]
                assert all(abs(e.time - end) >= edge for e in walls) and after[0].wall == answer
                assert after[0].time <= end + cfg.num_thought_frames
                assert len(after) < 2 or after[1].time - after[0].time >= gap
            elif variant == "event_order":
                times = [next(e.time for e in trajectory.wall_events() if
                              f"the {scene.colours[e.ball]} ball hitting the {e.wall} wall" == option)
                         for option in plan.options]
                assert abs(times[0] - times[1]) >= gap and all(edge <= t <= end - edge for t in times)
            elif variant == "first_bounce":
                firsts = sorted(trajectory.wall_events(b)[0].time for b in range(scene.num_balls)
                                if trajectory.wall_events(b))
                assert edge <= firsts[0] <= end - edge and (len(firsts) < 2 or firsts[1] - firsts[0] >= gap)
            elif variant == "fastest":
                speeds = sorted(math.hypot(*v) for v in scene.velocities)
                assert speeds[-1] >= 1.3 * speeds[-2]
            elif variant == "start_direction":
                vx, vy = scene.velocities[ball]
                assert min(abs(vx), abs(vy)) >= 0.3 * math.hypot(vx, vy) and direction_of((vx, vy)) == answer
            elif variant == "closest_to_corner":
                corner = (0 if "left" in plan.meta["corner"] else cfg.size,
                          0 if "top" in plan.meta["corner"] else cfg.size)
                distances = sorted(math.dist(p, corner) for p in scene.positions)
                assert distances[1] - distances[0] >= cfg.radius
            elif variant == "future_quadrant":
                position = trajectory.position(ball, end + plan.meta["frames_after"])
                assert quadrant_margin(position, cfg.size) >= cfg.radius and quadrant_of(position, cfg.size) == answer
            else:
                assert variant == "num_balls" and int(answer) == scene.num_balls == target


# ------------------------------------------------------------------------------------------- dataset properties


def test_every_qtype_and_variant_present_and_files_decodable(dataset: tuple[SynthConfig, Path]) -> None:
    cfg, out_dir = dataset
    for split in ("train", "val", "test"):
        samples = read_manifest(out_dir / f"{split}.jsonl")
        assert len(samples) == cfg.num_videos(split)
        assert {s.qtype for s in samples} == set(QTYPES)
        for sample in samples:
            assert sample.split == split
            video, thought = probe_video(sample.video_path), probe_video(sample.thought_path)
            assert (video.num_frames, video.height, video.width) == (cfg.num_frames, cfg.size, cfg.size)
            assert (thought.num_frames, thought.height, thought.width) == (cfg.num_thought_frames, cfg.size, cfg.size)
            assert video.fps == pytest.approx(cfg.fps)
            assert sample.video_path.suffix == ".webm" and sample.video_path.is_relative_to(out_dir.resolve())
    train = read_manifest(out_dir / "train.jsonl")
    assert {s.meta["variant"] for s in train} == {v for q in QTYPES for v in VARIANTS[q]}


def test_perception_manifests(dataset: tuple[SynthConfig, Path]) -> None:
    cfg, out_dir = dataset
    assert not (out_dir / "perception_test.jsonl").exists()
    for split in ("train", "val"):
        videos = {s.video for s in read_manifest(out_dir / f"{split}.jsonl")}
        perception = read_manifest(out_dir / f"perception_{split}.jsonl")
        assert len(perception) >= 4 * cfg.num_videos(split)
        assert {s.qtype for s in perception} == {f"perception_{v}" for v in PERCEPTION_VARIANTS}
        assert all(s.thought_video is None and s.video in videos and s.split == split for s in perception)
    for sample in read_manifest(out_dir / "perception_train.jsonl"):
        if sample.qtype == "perception_caption":  # 2x2 design: no attribute singles out the answer
            assert Counter("without" in o for o in sample.options) == {True: 2, False: 2}
            colour_parts = Counter(o.rsplit(", with", 1)[0] for o in sample.options)
            assert sorted(colour_parts.values()) == [2, 2], sample.options


def _assert_letters_balanced(samples, groups_of) -> None:
    letters_by_group: dict[tuple, Counter] = defaultdict(Counter)
    for sample in samples:
        if groups_of(sample):
            letters_by_group[(sample.qtype, sample.meta["variant"], len(sample.options))][sample.answer] += 1
    assert letters_by_group
    for group, counts in letters_by_group.items():
        full = [counts.get(chr(ord("A") + i), 0) for i in range(group[2])]
        assert max(full) - min(full) <= 1, (group, counts)


def test_canonical_option_order(dataset: tuple[SynthConfig, Path]) -> None:
    """The default: fixed-vocabulary options in vocabulary order (a letter names a value), free text balanced."""
    cfg, out_dir = dataset
    assert cfg.option_order == "canonical"
    for name in ("train", "perception_train"):
        samples = read_manifest(out_dir / f"{name}.jsonl")
        for sample in samples:
            order = canonical_order(sample.options)
            assert order is None or order == list(range(len(sample.options))), sample.options
        assert any(canonical_order(s.options) is not None for s in samples)
        _assert_letters_balanced(samples, lambda s: canonical_order(s.options) is None)
    walls = [s for s in read_manifest(out_dir / "train.jsonl") if s.meta["variant"] == "next_wall"]
    assert walls and all(s.options == ("left", "right", "top", "bottom") for s in walls)
    assert canonical_order(["3", "10", "2"]) == [2, 0, 1] and canonical_order(["blue", "red"]) == [1, 0]
    assert canonical_order(["a red ball", "blue"]) is None


def test_shuffled_option_order_balances_every_letter(tmp_path: Path) -> None:
    cfg = SynthConfig(task="balls", **SMALL, option_order="shuffled", workers=1)
    generate(cfg, tmp_path)
    for name in ("train", "perception_train"):
        _assert_letters_balanced(read_manifest(tmp_path / f"{name}.jsonl"), lambda s: True)
    four_option = Counter(s.answer for s in read_manifest(tmp_path / "perception_train.jsonl") if len(s.options) == 4)
    assert max(four_option.values()) - min(four_option.values()) <= 3 and set(four_option) == set("ABCD")


def test_targets_are_balanced(dataset: tuple[SynthConfig, Path]) -> None:
    _, out_dir = dataset
    train = read_manifest(out_dir / "train.jsonl")
    bounces = Counter(s.answer_text for s in train if s.meta["variant"] == "wall_bounces")
    assert max(bounces.values()) - min(bounces.values()) <= 1 and len(bounces) >= 2
    walls = Counter(s.answer_text for s in train if s.meta["variant"] == "next_wall")
    assert max(walls.values()) - min(walls.values()) <= 1 and len(walls) >= 2


def test_background_encodes_position() -> None:
    """Red grows to the right, blue downwards: a patch's content says where it is (balls stay far brighter)."""
    image = background_image(56).astype(int)
    assert image[0, -1, 0] - image[0, 0, 0] >= 50 and image[-1, 0, 2] - image[0, 0, 2] >= 50
    assert (image[:, :, 1] == image[0, 0, 1]).all() and image.max() < 100
    cfg = SynthConfig(task="balls", num_train=1, num_val=0, num_test=0, size=56)
    world, _ = sample_world(np.random.default_rng(0), cfg, "num_balls", 1)
    frame = render(world.scene, world.trajectory, [0.0])[0].astype(int)
    far = np.ones((56, 56), dtype=bool)
    for x, y in world.trajectory.state_at([0.0])[0][0]:
        yy, xx = np.mgrid[:56, :56]
        far &= (xx - x) ** 2 + (yy - y) ** 2 > (world.scene.radius + 4) ** 2
    if world.scene.occluder is not None:
        x0, y0, x1, y1 = world.scene.occluder
        far[y0:y1, x0:x1] = False
    assert far.sum() > 1000 and (frame[far] == image[far]).all()


def test_questions_need_the_dynamics(dataset: tuple[SynthConfig, Path]) -> None:
    """Future-quadrant answers are not the last frame's quadrant (beyond chance), and no bounce hides at clip edges."""
    cfg, out_dir = dataset
    end = cfg.num_frames - 1
    for sample in read_manifest(out_dir / "train.jsonl") + read_manifest(out_dir / "test.jsonl"):
        times = [e["t"] for e in sample.meta["events"]
                 if e["kind"] == "wall" and e.get("ball") == sample.meta.get("ball")]
        if sample.meta["variant"] in ("wall_bounces", "next_wall"):
            assert all(abs(t - end) >= 1.0 for t in times), sample.uid
        if sample.meta["variant"] == "future_quadrant":
            scene = sample.meta["scene"]
            trajectory = simulate(Scene.from_json(scene), end, collisions=cfg.ball_collisions)
            last = quadrant_of(trajectory.position(scene["colours"].index(sample.meta["ball"]), end), cfg.size)
            assert (last == sample.answer_text) == sample.meta["same_quadrant_as_last_frame"]


# ------------------------------------------------------------------------------------------- determinism, stamp


def test_same_seed_is_identical_across_runs_and_worker_counts(dataset: tuple[SynthConfig, Path],
                                                               tmp_path: Path) -> None:
    cfg, out_dir = dataset
    again = tmp_path / "again"
    generate(SynthConfig(task="balls", **SMALL, workers=2), again)
    assert manifest_texts(again) == manifest_texts(out_dir)
    stamp, stamp_again = (json.loads((d / STAMP_NAME).read_text()) for d in (out_dir, again))
    assert stamp["content_hash"] == stamp_again["content_hash"]
    for sample in read_manifest(out_dir / "train.jsonl")[:6]:
        for relative in (sample.video, sample.thought_video):
            np.testing.assert_array_equal(decode_frames(out_dir / relative, range(cfg.num_frames)),
                                          decode_frames(again / relative, range(cfg.num_frames)))


def test_each_split_is_reproducible_on_its_own(dataset: tuple[SynthConfig, Path], tmp_path: Path) -> None:
    _, out_dir = dataset
    generate(SynthConfig(task="balls", **{**SMALL, "num_train": 3}, workers=1), tmp_path)
    for name in ("val.jsonl", "test.jsonl", "perception_val.jsonl"):
        assert (tmp_path / name).read_text() == (out_dir / name).read_text()
    assert (tmp_path / "train.jsonl").read_text() != (out_dir / "train.jsonl").read_text()


def test_different_seed_gives_different_content(dataset: tuple[SynthConfig, Path], tmp_path: Path) -> None:
    _, out_dir = dataset
    generate(SynthConfig(task="balls", **{**SMALL, "num_train": 4, "num_val": 1, "num_test": 1, "seed": 1}, workers=1), tmp_path)
    other = read_manifest(tmp_path / "train.jsonl")
    ours = read_manifest(out_dir / "train.jsonl")[:4]
    assert [s.meta["scene"] for s in other] != [s.meta["scene"] for s in ours]
    assert not np.array_equal(decode_frames(other[0].video_path, [0, 5]), decode_frames(ours[0].video_path, [0, 5]))


def test_generate_is_idempotent_and_regenerates_on_change(tmp_path: Path) -> None:
    cfg = SynthConfig(task="balls", num_train=5, num_val=2, num_test=2, workers=1)
    paths = generate(cfg, tmp_path)
    assert set(paths) == {"train", "val", "test", "perception_train", "perception_val"}
    stamp = json.loads((tmp_path / STAMP_NAME).read_text())
    assert stamp["complete"] and stamp["config"]["num_train"] == 5 and len(stamp["content_hash"]) == 64
    first_video = tmp_path / "videos" / "train" / "000000.webm"
    mtime, original = first_video.stat().st_mtime_ns, first_video.read_bytes()

    assert generate(SynthConfig(task="balls", num_train=5, num_val=2, num_test=2, workers=2), tmp_path) == paths  # workers: no effect
    assert first_video.stat().st_mtime_ns == mtime

    first_video.write_bytes(original[:-10])  # a damaged file is noticed and regenerated
    generate(cfg, tmp_path)
    assert first_video.read_bytes() == original

    generate(SynthConfig(task="balls", num_train=3, num_val=2, num_test=2, workers=1), tmp_path)  # new config: stale files removed
    assert sorted(p.name for p in (tmp_path / "videos" / "train").iterdir()) == ["000000.webm", "000001.webm",
                                                                                "000002.webm"]
    assert len(read_manifest(tmp_path / "train.jsonl")) == 3


def test_refuses_to_clear_a_folder_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not made by storms synth"):
        generate(SynthConfig(task="balls", num_train=1, num_val=0, num_test=0, workers=1), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("changes, message", [
    ({"size": 90}, "size: expected a multiple of 28"),
    ({"qtypes": ("count", "physics")}, "qtypes: expected"),
    ({"qtypes": ()}, "qtypes: expected"),
    ({"num_train": -1}, "num_train: expected an int >= 0"),
    ({"num_train": 0, "num_val": 0, "num_test": 0}, "at least one video"),
    ({"num_frames": 4}, "num_frames: expected >= 8"),
    ({"max_balls": 6}, "max_balls: expected 2..4"),
    ({"occluder_prob": 1.5}, "occluder_prob"),
    ({"codec": "mjpeg"}, "codec: expected 'vp9' or 'h264'"),
    ({"fps": 0.0}, "fps: expected > 0"),
])
def test_config_validation_names_the_field(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SynthConfig(**changes)


def test_quadrant_names_match_image_coordinates() -> None:
    assert [quadrant_of(p, 84) for p in [(10, 10), (70, 10), (10, 70), (70, 70)]] == list(QUADRANTS)
    assert direction_of((1.0, -1.0)) == "up-right" and direction_of((-1.0, 2.0)) == "down-left"
