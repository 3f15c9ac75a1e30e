"""Step-boundary checkpoints: atomic, tracked by a ``latest`` file, last k kept, resumable bit-for-bit.

Layout under ``<job>/checkpoints/``::

    step000040/            DeepSpeed engine state (model, ZeRO-partitioned optimizer, LR scheduler) + ours:
      trainer_state.json     step, sampler position, MLflow run id, counters (rank 0)
      meta/                  HF config, tokenizer, latent settings (for ``storms export``)
      rng_rank{r}.pt         every rank's RNG states
    latest                 "step000040": written last, with an atomic rename

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

    def load(self, engine, tag: str) -> dict[str, Any]:
        """Restore engine + this rank's RNG; returns the trainer state. Refuses a different world size."""
        state = json.loads((self.directory / tag / STATE_FILE).read_text())
        if state["world_size"] != self.world_size:
            raise RuntimeError(
                f"{self.directory / tag}: saved with world size {state['world_size']}, this run has "
                f"{self.world_size}; exact resume needs the same number of ranks (the data order and RNG streams "
                f"are per rank). Resume with {state['world_size']} ranks, or export this checkpoint "
                f"(storms export) and start a new stage from it.")
        load_path, _ = engine.load_checkpoint(str(self.directory), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"{self.directory / tag}: DeepSpeed could not load this checkpoint")
        set_rng_state(torch.load(self.directory / tag / f"rng_rank{self.rank}.pt", weights_only=False))
        return state
