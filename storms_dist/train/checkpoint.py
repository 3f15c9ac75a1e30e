"""Step-boundary checkpoints: atomic, tracked by a ``latest`` file, last k kept, resumable bit-for-bit.

Layout under ``<job>/checkpoints/``::

    step000040/            DeepSpeed engine state (model, ZeRO-partitioned optimizer, LR scheduler) + ours:
      trainer_state.json     step, sampler position, MLflow run id, counters (rank 0)
      meta/                  HF config, tokenizer, latent settings (for ``storms export``)
      rng_rank{r}.pt         every rank's RNG states
    latest                 "step000040": written last, with an atomic rename
    universal/step000040/  DeepSpeed universal copy, made on demand when a run resumes on another world size

A checkpoint is written into ``<tag>.tmp`` by every rank and renamed by rank 0 after a barrier, so a crash at any
point leaves either the previous ``latest`` or the new one, never a half-written tag.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storms_dist.train.distributed import barrier

LATEST_FILE = "latest"
UNIVERSAL_DIR = "universal"  # world-size changes: DeepSpeed universal copies of the tags, converted on demand
STATE_FILE = "trainer_state.json"
META_DIR = "meta"
"""HF config + tokenizer + latent settings: enough to rebuild the model around consolidated weights."""


@dataclass(kw_only=True)
class CheckpointConfig:
    every_steps: int = 0
    """Save every N optimizer steps (0 = only at the end of the stage and on a preemption signal)."""
    keep_last: int = 2
    """Step checkpoints kept on disk (older ones are deleted after a successful save)."""
    resume: bool = True
    """Resume from ``checkpoints/latest`` when the job folder has one."""

    def __post_init__(self):
        if self.every_steps < 0:
            raise ValueError(f"every_steps: expected >= 0 (0 disables periodic saves), got {self.every_steps}")
        if self.keep_last < 1:
            raise ValueError(f"keep_last: expected >= 1, got {self.keep_last}")


def tag_for(step: int) -> str:
    return f"step{step:06d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    def __init__(self, directory: Path, cfg: CheckpointConfig, *, rank: int, world_size: int):
        self.directory, self.cfg = Path(directory), cfg
        self.rank, self.world_size = rank, world_size

    def latest_tag(self) -> str | None:
        path = self.directory / LATEST_FILE
        if not path.is_file():
            return None
        tag = path.read_text().strip()
        if not (self.directory / tag).is_dir():
            raise FileNotFoundError(f"{path} names {tag!r}, which does not exist: the checkpoint folder was edited")
        return tag

    def save(self, engine, step: int, state: dict[str, Any], write_meta=None) -> Path:
        """Collective: every rank writes its shards into ``<tag>.tmp``; rank 0 adds ``write_meta(folder)`` (what
        ``storms export`` needs to rebuild the model) and publishes it."""
        tag = tag_for(step)
        tmp_tag = f"{tag}.tmp"
        if self.rank == 0:
            shutil.rmtree(self.directory / tmp_tag, ignore_errors=True)
        barrier()
        engine.save_checkpoint(str(self.directory), tag=tmp_tag, save_latest=False)
        torch.save(rng_state(), self.directory / tmp_tag / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            payload = {**state, "step": step, "world_size": self.world_size}
            (self.directory / tmp_tag / STATE_FILE).write_text(json.dumps(payload, indent=2) + "\n")
            if write_meta is not None:
                write_meta(self.directory / tmp_tag / META_DIR)
        barrier()
        if self.rank == 0:
            shutil.rmtree(self.directory / tag, ignore_errors=True)
            os.replace(self.directory / tmp_tag, self.directory / tag)
            tracker_tmp = self.directory / f"{LATEST_FILE}.tmp"
            tracker_tmp.write_text(tag + "\n")
            os.replace(tracker_tmp, self.directory / LATEST_FILE)
            self._prune(keep=tag)
        barrier()
        return self.directory / tag

    def _prune(self, keep: str) -> None:
        tags = sorted(p.name for p in self.directory.glob("step*") if p.is_dir() and not p.name.endswith(".tmp"))
        for tag in tags[: -self.cfg.keep_last]:
            if tag != keep:
                shutil.rmtree(self.directory / tag, ignore_errors=True)
                shutil.rmtree(self.directory / UNIVERSAL_DIR / tag, ignore_errors=True)

    def load(self, engine, tag: str) -> dict[str, Any]:
        """Restore engine + this rank's RNG; returns the trainer state.

        Same world size: exact (bit-for-bit) resume. Another world size (a Slurm requeue on other nodes): the
        checkpoint is converted once to DeepSpeed's universal format (``universal/<tag>``, ``ds_to_universal``) and
        loaded with ``load_universal``; the sampler position is carried over in samples (``reshard_sampler_state``)
        and rank r takes the RNG state of old rank ``r % old_world_size``. The loss curve continues, but not
        bit-for-bit: the global batch and the per-rank RNG streams change with the rank count.
        """
        state = json.loads((self.directory / tag / STATE_FILE).read_text())
        old_world = state["world_size"]
        if old_world == self.world_size:
            source, universal = self.directory, False
        else:
            source, universal = self.universal_copy(tag).parent, True
        engine._config.load_universal_checkpoint = universal  # read by engine.load_checkpoint (DeepSpeed >= 0.14.5)
        try:
            load_path, _ = engine.load_checkpoint(str(source), tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        finally:
            engine._config.load_universal_checkpoint = False
        if load_path is None:
            raise RuntimeError(f"{source / tag}: DeepSpeed could not load this checkpoint")
        rng_rank = self.rank % old_world
        set_rng_state(torch.load(self.directory / tag / f"rng_rank{rng_rank}.pt", weights_only=False))
        if universal:
            state["sampler"] = reshard_sampler_state(state["sampler"], self.world_size)
            state["resharded_from_world_size"] = old_world
        return state

    def universal_copy(self, tag: str) -> Path:
        """Collective: ``<dir>/universal/<tag>``, converted by rank 0 on first use (atomic rename), then shared."""
        target = self.directory / UNIVERSAL_DIR / tag
        if self.rank == 0 and not target.is_dir():
            import subprocess
            import sys

            tmp = target.with_name(f"{tag}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            result = subprocess.run(
                [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                 str(self.directory / tag), "--output_folder", str(tmp), "--num_extract_workers", "1",
                 "--num_merge_workers", "1"], capture_output=True, text=True)
            if result.returncode != 0:
                tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
                raise RuntimeError(f"{self.directory / tag}: conversion to a universal checkpoint failed: {tail[0]}")
            os.replace(tmp, target)
        barrier()
        return target


def reshard_sampler_state(state: dict[str, Any], world_size: int) -> dict[str, Any]:
    """A ``ShardedSampler`` position saved with another world size, in this one's batches: the samples consumed so
    far in the epoch (``batch_in_epoch * micro * old_world``) rounded down to whole new global batches, so no sample
    is skipped (up to one global batch is seen again)."""
    consumed = state["batch_in_epoch"] * state["micro_batch_size"] * state["world_size"]
    return {**state, "world_size": world_size,
            "batch_in_epoch": consumed // (state["micro_batch_size"] * world_size)}
