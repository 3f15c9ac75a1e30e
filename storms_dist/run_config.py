"""The run configuration: one section per component, each section owned (defined and validated) by its component."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from storms_dist.data.dataset import DataConfig
from storms_dist.data.synth import SynthConfig
from storms_dist.eval.evaluate import EvalConfig
from storms_dist.model.build import ModelConfig, TrainableConfig
from storms_dist.targets import TargetsConfig
from storms_dist.tracking import TrackingConfig
from storms_dist.train.checkpoint import CheckpointConfig
from storms_dist.train.deepspeed_config import DeepSpeedConfig
from storms_dist.train.optim import OptimConfig
from storms_dist.train.trainer import RobustnessConfig, StageConfig

METHODS = ("sft_k0", "stage1_only", "stage2_only", "storms")
"""Demo methods: K=0 answer-only SFT, Stage I only, Stage II only, and STORMS (Stage I then Stage II)."""


@dataclass(kw_only=True)
class DemoConfig:
    seeds: tuple[int, ...] = (0,)
    """One full set of trainings per seed; the table reports mean +- std over seeds."""
    methods: tuple[str, ...] = METHODS
    dynamics_qtypes: tuple[str, ...] = ("future_cell",)
    """Question types that need the video's dynamics (the rest are single-frame controls). The default is the grid
    task's; the balls task's are extrapolate, order, count, speed_direction (configs/demo/synth_balls.yaml)."""
    share_stage1: bool = True
    """Stage I only = STORMS's Stage I job (trained once) + ``stage2.num_steps`` more Stage I steps on Stage II's lr
    schedule, so Stage I only and STORMS differ only in their last stage's objective (paired at the branch point).
    False: Stage I only trains the whole budget in one schedule from Stage 0."""
    parallel: int = 1
    """Training jobs run at a time. Above 1, each training job runs as its own one-rank torchrun process at one
    thread: two torch processes at two threads each oversubscribe two cores, at one thread each they share them."""

    def __post_init__(self):
        self.seeds, self.methods = tuple(self.seeds), tuple(self.methods)
        if not self.seeds:
            raise ValueError("seeds: expected at least one seed")
        if self.parallel < 1:
            raise ValueError(f"parallel: expected the number of methods trained at a time (>= 1), got {self.parallel}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods: unknown {unknown}; valid choices: {', '.join(METHODS)}")


def _stage0() -> StageConfig:
    return StageConfig(num_steps=300, lr=1e-3, num_latents=0, mode="single", split="perception",
                       trainable=TrainableConfig(vision=True, merger=True, lm=True, vision_lr_scale=1.0))


@dataclass(kw_only=True)
class RunConfig:
    name: str = "demo"
    """Run folder name under runs_dir."""
    runs_dir: str = "runs"
    seed: int = 0
    nproc: int = 1
    """Local processes per training job (torchrun); ZeRO shards across them."""
    launcher: Literal["inprocess", "torchrun"] = "inprocess"
    """How the pipeline starts training jobs when nproc == 1; nproc > 1 always uses torchrun."""
    synth: SynthConfig = field(default_factory=SynthConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    stage0: StageConfig = field(default_factory=_stage0)
    stage1: StageConfig = field(default_factory=lambda: StageConfig(align=True, mode="single"))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(mode="rollout"))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

    def __post_init__(self):
        if self.nproc < 1:
            raise ValueError(f"nproc: expected >= 1, got {self.nproc}")
        if not self.name or "/" in self.name:
            raise ValueError(f"name: expected a folder name without '/', got {self.name!r}")

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def stage(self, index: int) -> StageConfig:
        if index not in (0, 1, 2):
            raise ValueError(f"stage: expected 0, 1 or 2, got {index}")
        return getattr(self, f"stage{index}")
