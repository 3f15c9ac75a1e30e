"""Generation of the set: one video (``make_video`` for the ``balls`` task, ``make_grid_video`` for the grid task:
plan, render and encode the source and thought videos, with the per-video seeded streams ``_rng``), the answer
letters (canonical or balanced option order), and the output folder: manifests, the stamp (``STAMP_NAME``,
``config_hash``, ``content_hash``, ``is_complete``), and ``generate``, which runs the videos in this process or a
spawn pool.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from storms_dist.config import to_dict
from storms_dist.data.manifest import Sample, letter, write_manifest
from storms_dist.data.synth import grid
from storms_dist.data.synth.config import (
    _SPLIT_CODES,
    DIRECTIONS,
    GENERATOR_VERSION,
    PALETTE,
    PERCEPTION_SPLITS,
    QUADRANTS,
    SPLITS,
    WALLS,
    SynthConfig,
)
from storms_dist.data.synth.perception import perception_plans
from storms_dist.data.synth.physics import Event
from storms_dist.data.synth.questions import QuestionPlan, World, assignment, balanced_pick, sample_world, target_values
from storms_dist.data.synth.rendering import render
from storms_dist.data.video_io import SUFFIX_BY_CODEC, write_video

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
    """The grid task's video ``index``: the clip, its thought video (grid.thought_states), one question (grid.py)."""
    task = cfg.grid
    qtype = cfg.question_types[index % len(cfg.question_types)]
    # a held-out (last cell, D) pair is asked only outside train (grid.holdout); the static control draws any
    pairs = "any" if qtype != "future_cell" else "train" if split == "train" else "held_out"
    world = grid.sample_world(_rng(cfg, split, index, 0), task, pairs)
    suffix = SUFFIX_BY_CODEC[cfg.codec]
    video, thought_video = f"videos/{split}/{index:06d}{suffix}", f"thoughts/{split}/{index:06d}{suffix}"
    thought = grid.thought_states(world, qtype, task)
    write_video(out_dir / video, grid.clip_states(world, task).render(task), cfg.fps, cfg.codec)
    write_video(out_dir / thought_video, thought.render(task, thought=True), cfg.fps, cfg.codec)

    def plan(question: grid.GridQuestion) -> QuestionPlan:
        return QuestionPlan(variant=question.variant, question=question.question, options=question.options,
                            correct=question.correct, thought=None, meta=question.meta)

    main = grid.main_question(world, qtype, task)
    perception = [plan(q) for q in grid.perception_questions(world, task)] if split in PERCEPTION_SPLITS else []
    meta = {"variant": qtype, "task": "grid", "thought": task.thought, "start": list(world.start),
            "velocity": list(world.velocity), "clip_cells": world.clip_T2.tolist(),
            "thought_cells": thought.cells_T2.tolist(), "thought_timers": thought.timers_T.tolist(),
            "baselines": grid.baseline_answers(world, task), **main.meta}
    if len(task.flow_moves) > 1:  # (one law: the default's manifests keep their bytes)
        meta["move"] = world.move
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
