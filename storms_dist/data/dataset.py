"""Video-QA samples -> model inputs: decode, preprocess, prompt, collate into the latent-slot layout.

Every path that turns a video file into model inputs (training, thought-video targets, eval, infer) goes through
``load_video_inputs``, so the frame-sampling rule and the preprocessing are the same everywhere.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch

from storms_dist.data.dali import DECODERS, DaliVideoLoader, decode_video_frames
from storms_dist.data.manifest import Sample, read_manifest
from storms_dist.data.preprocess import ResizeConfig, VisionSpec, preprocess_video
from storms_dist.data.prompt import (
    MC_INSTRUCTION,
    TEXT_INSTRUCTION,
    answer_tokens,
    build_prompt,
    extract_answer_letter,
    match_option_text,
)
from storms_dist.data.sampling import FrameSamplingConfig, sample_frame_indices, sampled_timestamps, second_per_grid_t
from storms_dist.data.video_io import VideoInfo, probe_video
from storms_dist.model.latent import LatentTokenIds, SlotLayout, collate_latent_batch


@dataclass(kw_only=True)
class DataConfig:
    root: str = "data/synth"
    """Folder holding the manifests (``storms synth`` writes one)."""
    train_manifest: str = "train.jsonl"
    val_manifest: str = "val.jsonl"
    test_manifest: str = "test.jsonl"
    perception_manifest: str = "perception_train.jsonl"
    """Stage 0 (embedded default only): single-frame perception questions that pre-train the tiny backbone."""
    frames: FrameSamplingConfig = field(default_factory=lambda: FrameSamplingConfig(fps=None, num_frames=16,
                                                                                    min_frames=4, max_frames=16))
    min_pixels: int = 28 * 28 * 4
    max_pixels: int = 112 * 112
    cache_decoded: bool = True
    """Keep preprocessed videos and prompts in memory (small synthetic sets: epochs after the first skip decoding, and
    later jobs of the same process -- the demo's stages, baselines and evals -- reuse the decoded videos)."""
    prompt: Literal["storms", "verbatim"] = "storms"
    """storms: question + lettered options + instruction; verbatim: the sample's ``meta.prompt`` as the user text
    (public benchmarks: lmms-eval's exact prompt, options included)."""
    system_prompt: bool = True
    """Open the chat with the family's default system turn (Qwen2.5-VL: "You are a helpful assistant."). The grid
    default drops it: a random-init model spreads its attention over every token, and the video is 2 of them."""
    answer_format: Literal["letter", "text"] = "letter"
    """letter: the model answers "B" (the benchmarks' convention); text: it answers with the option's text, which
    eval maps back to its letter (no letter indirection: what a small model trained from scratch learns fastest)."""
    decoder: Literal["auto", "pyav", "dali"] = "auto"
    """Video decoding backend, chosen per file by ``storms_dist.data.dali.select_backend``: ``auto`` = DALI's GPU
    decoder when CUDA and DALI are present, DALI's CPU decoder for VP8/VP9/MJPEG when DALI is installed, else PyAV;
    ``dali`` = DALI only; ``pyav`` = PyAV only. DALI's RGB differs from PyAV's within a documented tolerance
    (BT.601 + bilinear chroma; see storms_dist/data/dali.py)."""

    def __post_init__(self):
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder: expected one of {', '.join(DECODERS)}, got {self.decoder!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must be <= max_pixels ({self.max_pixels})")

    @property
    def resize(self) -> ResizeConfig:
        return ResizeConfig(min_pixels=self.min_pixels, max_pixels=self.max_pixels)

    def manifest_path(self, split: str) -> Path:
        name = {"train": self.train_manifest, "val": self.val_manifest, "test": self.test_manifest,
                "perception": self.perception_manifest}.get(split)
        if name is None:
            raise ValueError(f"unknown split {split!r}; valid: train, val, test, perception")
        return Path(self.root) / name


def answer_text(sample: Sample, cfg: DataConfig) -> str:
    """What the assistant says for ``sample``: its letter, or its option's text."""
    return sample.answer if cfg.answer_format == "letter" else sample.answer_text


def predicted_letter(raw: str, options, cfg: DataConfig) -> str | None:
    """The option letter a generated answer picks, under the configured answer format."""
    if cfg.answer_format == "text":
        return match_option_text(raw, options)
    return extract_answer_letter(raw, len(options))


@dataclass
class VideoInputs:
    pixel_values_videos: torch.Tensor
    video_grid_thw: torch.Tensor
    timestamps_s: list[float]
    second_per_grid_t: float
    num_missing_frames: int = 0
    """Frames the file's header promises but that are absent (a truncated file); the trainer counts it as bad data."""


def load_video_inputs(path: Path, spec: VisionSpec, cfg: DataConfig, *, start_s: float | None = None,
                      end_s: float | None = None) -> VideoInputs:
    """Decode the sampled frames of one video file (backend per ``cfg.decoder``) and preprocess them for the backbone.
    ``start_s`` / ``end_s`` restrict sampling to a clip (a manifest sample's optional fields)."""
    info = probe_video(path)
    warn_if_truncated(path, info)
    indices = sample_frame_indices(info.num_frames, info.fps, cfg.frames, start_s=start_s, end_s=end_s)
    frames = decode_video_frames(path, indices, cfg.decoder, info=info)
    return video_inputs_from_frames(frames, indices, info, spec, cfg)


_WARNED_TRUNCATED: set[str] = set()


def truncation_message(path: Path, info: VideoInfo) -> str:
    return (f"{path}: truncated video: {info.num_frames} of the {info.declared_num_frames} frames its header "
            f"promises are there; sampling from what is left")


def warn_if_truncated(path: Path, info: VideoInfo) -> None:
    """One warning per file and process: a cut-short file decodes, but shorter than the video it claims to be."""
    key = str(path)
    if info.num_missing_frames and key not in _WARNED_TRUNCATED:
        _WARNED_TRUNCATED.add(key)
        warnings.warn(truncation_message(path, info), stacklevel=3)


def video_inputs_from_frames(frames, indices: Sequence[int], info: VideoInfo, spec: VisionSpec,
                             cfg: DataConfig) -> VideoInputs:
    """Decoded frames ``[T, H, W, 3]`` uint8 (numpy, or a torch tensor that stays on its device) -> VideoInputs."""
    processed = preprocess_video(frames, spec, cfg.resize)
    return VideoInputs(processed.pixel_values_videos, processed.video_grid_thw, sampled_timestamps(indices, info.fps),
                       second_per_grid_t(indices, info.fps, spec.temporal_patch_size),
                       num_missing_frames=info.num_missing_frames)


@dataclass
class Item:
    sample: Sample
    prompt_ids: list[int]
    mm_token_type_ids: list[int]
    answer_ids: list[int]
    video: VideoInputs


# Preprocessed videos shared by the datasets of one process (``cache_decoded``), keyed by the decoding/preprocessing
# settings and the file's identity (path, clip, size, mtime): the demo's jobs read the same small videos many times.
_PROCESS_VIDEO_CACHE: dict[tuple, VideoInputs] = {}


def _process_cache_key(path: Path, start_s: float | None, end_s: float | None, spec: VisionSpec,
                       cfg: DataConfig) -> tuple | None:
    try:
        stat = Path(path).stat()
    except OSError:
        return None  # unreadable: decoding raises its own error
    return (str(Path(path).resolve()), start_s, end_s, stat.st_size, stat.st_mtime_ns, repr(spec), repr(cfg.frames),
            cfg.min_pixels, cfg.max_pixels, cfg.decoder)


class VideoQADataset(torch.utils.data.Dataset):
    def __init__(self, samples: Sequence[Sample], tokenizer, spec: VisionSpec, cfg: DataConfig):
        self.samples = list(samples)
        self.tokenizer, self.spec, self.cfg = tokenizer, spec, cfg
        self._video_cache: dict[Path | tuple, VideoInputs] = {}  # several questions can share one video
        self._item_cache: dict[int, Item] = {}

    @classmethod
    def from_split(cls, split: str, tokenizer, spec: VisionSpec, cfg: DataConfig) -> "VideoQADataset":
        return cls(read_manifest(cfg.manifest_path(split)), tokenizer, spec, cfg)

    def __len__(self) -> int:
        return len(self.samples)

    def video(self, path: Path, start_s: float | None = None, end_s: float | None = None) -> VideoInputs:
        if not self.cfg.cache_decoded:
            return load_video_inputs(path, self.spec, self.cfg, start_s=start_s, end_s=end_s)
        # a clip of a video is its own cache entry; whole videos stay keyed by path (what preload fills)
        key = path if start_s is None and end_s is None else (path, start_s, end_s)
        if key not in self._video_cache:
            shared_key = _process_cache_key(path, start_s, end_s, self.spec, self.cfg)
            video = _PROCESS_VIDEO_CACHE.get(shared_key) if shared_key is not None else None
            if video is None:
                video = load_video_inputs(path, self.spec, self.cfg, start_s=start_s, end_s=end_s)
                if shared_key is not None:
                    _PROCESS_VIDEO_CACHE[shared_key] = video
            self._video_cache[key] = video
        return self._video_cache[key]

    def preload(self, indices: Sequence[int] | None = None, *, rank: int = 0, world_size: int = 1,
                batch_size: int = 8) -> int:
        """Decode and preprocess the videos of items ``indices`` (default: all), this rank's share of them, into the
        video cache through a prefetching :class:`DaliVideoLoader` (PyAV for files DALI does not take). On the GPU
        path frames stay on the GPU through preprocessing. Unreadable videos are left out (``__getitem__`` raises for
        them later, as usual). Rank ``r`` gets every ``world_size``-th distinct video from ``r``, whatever is cached
        already, so the shards stay stable. Returns how many videos were cached; needs ``cache_decoded``."""
        if not self.cfg.cache_decoded:
            raise ValueError("preload fills the decoded-video cache; it needs data.cache_decoded = true")
        chosen = range(len(self.samples)) if indices is None else indices
        paths = list(dict.fromkeys(self.samples[i].video_path for i in chosen))
        loader = DaliVideoLoader([(p, None) for p in paths], decoder=self.cfg.decoder, frames=self.cfg.frames,
                                 rank=rank, world_size=world_size, batch_size=batch_size)
        num_cached = 0
        for video in loader:
            if video.error is None:
                warn_if_truncated(video.path, video.info)
                inputs = video_inputs_from_frames(video.frames, video.indices, video.info, self.spec, self.cfg)
                self._video_cache[video.path] = inputs
                shared_key = _process_cache_key(video.path, None, None, self.spec, self.cfg)
                if shared_key is not None:
                    _PROCESS_VIDEO_CACHE[shared_key] = inputs
                num_cached += 1
        return num_cached

    def __getitem__(self, index: int) -> Item:
        if self.cfg.cache_decoded and index in self._item_cache:
            return self._item_cache[index]
        sample = self.samples[index]
        video = self.video(sample.video_path, sample.start_s, sample.end_s)
        verbatim = self.cfg.prompt == "verbatim"
        prompt = build_prompt(self.tokenizer, self.spec.family,
                              question=sample.meta["prompt"] if verbatim else sample.question,
                              options=() if verbatim else sample.options,
                              instruction=MC_INSTRUCTION if self.cfg.answer_format == "letter" else TEXT_INSTRUCTION,
                              video_grid_thw=video.video_grid_thw, timestamps_s=video.timestamps_s,
                              merge_size=self.spec.merge_size, temporal_patch_size=self.spec.temporal_patch_size,
                              **({} if self.cfg.system_prompt else {"system": None}))
        item = Item(sample, prompt.input_ids, prompt.mm_token_type_ids, answer_tokens(self.tokenizer, answer_text(sample, self.cfg)),
                    video)
        if self.cfg.cache_decoded:
            self._item_cache[index] = item
        return item


@dataclass
class LatentCollator:
    """Items -> (batch, layout) in the latent-slot layout, with videos concatenated in batch order."""

    token_ids: LatentTokenIds
    pad_id: int
    num_latents: int
    with_answers: bool = True
    """False for inference: the batch is the left-padded prefix only (up to ``<|latent_start|>``)."""

    def __call__(self, items: Sequence[Item]) -> tuple[dict, SlotLayout]:
        answers = [it.answer_ids if self.with_answers else [] for it in items]
        batch, layout = collate_latent_batch([it.prompt_ids for it in items], [it.mm_token_type_ids for it in items],
                                             answers, num_latents=self.num_latents, ids=self.token_ids,
                                             pad_id=self.pad_id)
        if not self.with_answers:
            batch = {k: v[:, : layout.prefix_len] for k, v in batch.items() if k != "labels"}
        batch["pixel_values_videos"] = torch.cat([it.video.pixel_values_videos for it in items])
        batch["video_grid_thw"] = torch.stack([it.video.video_grid_thw for it in items])
        batch["second_per_grid_ts"] = torch.tensor([it.video.second_per_grid_t for it in items])
        batch["uids"] = [it.sample.uid for it in items]
        return batch, layout


class ShardedSampler:
    """Deterministic, resumable, per-rank batches of indices: epoch e is a permutation seeded by (seed, e);
    each global batch of ``micro_batch_size * world_size`` indices is split contiguously across ranks."""

    def __init__(self, num_items: int, *, micro_batch_size: int, rank: int, world_size: int, seed: int):
        global_batch = micro_batch_size * world_size
        if num_items < global_batch:
            raise ValueError(f"dataset has {num_items} items, fewer than one global batch ({global_batch})")
        self.num_items, self.micro_batch_size = num_items, micro_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.batch_in_epoch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_items // (self.micro_batch_size * self.world_size)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed,
                "world_size": self.world_size, "micro_batch_size": self.micro_batch_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("world_size", "micro_batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state was saved with {key}={state[key]}, this run has "
                                 f"{getattr(self, key)}: the data order cannot be resumed exactly")
        self.epoch, self.batch_in_epoch, self.seed = state["epoch"], state["batch_in_epoch"], state["seed"]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
            while self.batch_in_epoch < self.batches_per_epoch:
                start = (self.batch_in_epoch * self.world_size + self.rank) * self.micro_batch_size
                self.batch_in_epoch += 1
                yield order[start : start + self.micro_batch_size].tolist()
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
