"""Thought-video targets: frozen vision encoder + merger -> K pooled targets per sample, in a stamped safetensors cache.

The cache is keyed by sample uid and stamped with everything that determines its content (fingerprint of the vision
and merger weights, K, frame sampling and pixel budget, decoder, backbone). A cache whose stamp differs is stale and
rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Sequence, get_args

import torch
from safetensors.torch import load_file, save_file

from storms_dist.config import to_dict
from storms_dist.data.dataset import DataConfig, load_video_inputs
from storms_dist.data.manifest import Sample
from storms_dist.data.preprocess import VisionSpec
from storms_dist.model.latent import pool_region_targets, pool_targets
from storms_dist.model.storms import STORMSModel

STAMP_FILE = "stamp.json"
TargetNormalize = Literal["none", "standardize", "region_pca"]
"""How Stage I sees the cached targets (``TargetsConfig.normalize``)."""


@dataclass(kw_only=True)
class TargetsConfig:
    shard_size: int = 512
    """Samples per safetensors shard."""
    batch_size: int = 8
    """Thought videos encoded per vision-tower call."""
    normalize: TargetNormalize = "none"
    """How Stage I sees the cached (raw, pooled) targets. ``standardize``: per (slot, feature), minus the mean and over
    the standard deviation across the cache's samples, so the alignment regresses what differs between thought
    videos. Pooled tokens of a small tower can share a large constant part that then dominates an MSE (the demo:
    across-sample variance 0.0003 against a mean square of 0.59; docs/results.md). ``region_pca`` (with ``regions``):
    each panel's pooled tokens projected on their top hidden/R principal directions over the cache, scaled to unit
    RMS, the panels side by side -- each panel's code in its own dimensions (:func:`region_projection`)."""
    regions: int = 1
    """Panels side by side in a thought frame (the scene | a timer panel: ``synth.grid.timer_panel``), one merged
    token each per temporal patch, pooled apart (:func:`~storms_dist.model.latent.pool_region_targets`). Summed into
    one mean, two panels seen by one tower give an ambiguous code (docs/results.md, sessions 12-16)."""
    pixels: int | None = None
    """Pixels per thought frame when encoding (min = max); None: ``data.min_pixels`` / ``data.max_pixels``, as the
    clip. A two-panel 56x28 thought frame beside 28x28 clip frames needs 1568."""

    def __post_init__(self):
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError(f"targets: shard_size and batch_size must be >= 1, got {self.shard_size}, {self.batch_size}")
        check_normalize(self.normalize)
        if self.regions < 1:
            raise ValueError(f"targets.regions: expected >= 1 panels per thought frame, got {self.regions}")
        if (self.regions > 1) != (self.normalize == "region_pca"):
            raise ValueError(f"targets: regions {self.regions} with normalize {self.normalize!r}: panels pooled apart "
                             "are [K, R, D] and need normalize: region_pca to become [K, D] targets, and region_pca "
                             "needs regions >= 2")
        if self.pixels is not None and self.pixels < 1:
            raise ValueError(f"targets.pixels: expected a positive pixel count per thought frame or null, got "
                             f"{self.pixels}")

    def encoding_data(self, data_cfg: DataConfig) -> DataConfig:
        """The data settings thought videos are encoded with (``pixels`` overrides the clip's budget)."""
        if self.pixels is None:
            return data_cfg
        return replace(data_cfg, min_pixels=self.pixels, max_pixels=self.pixels)

    def pool(self, visual_tokens_MD: torch.Tensor, num_latents: int) -> torch.Tensor:
        """One thought video's cached targets: [K, D], or [K, R, D] with panels."""
        if self.regions == 1:
            return pool_targets(visual_tokens_MD, num_latents)
        return pool_region_targets(visual_tokens_MD, num_latents, self.regions)


def vision_fingerprint(model: STORMSModel) -> str:
    """Content hash of the vision encoder + merger weights (what the targets depend on)."""
    digest = hashlib.sha256()
    for name, param in sorted(model.backbone.named_parameters()):
        if model.spec.group_of(name) in ("vision", "merger"):
            digest.update(name.encode())
            digest.update(param.detach().to(torch.float32).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def check_panels(samples: Sequence[Sample], videos, spec: VisionSpec, regions: int) -> None:
    """With panels pooled apart, every temporal patch of a thought video must hold exactly one token per panel."""
    if regions == 1:
        return
    for sample, video in zip(samples, videos):
        per_patch = int(video.video_grid_thw[1:].prod()) // spec.merge_size**2
        if per_patch != regions:
            raise ValueError(f"{sample.thought_path}: targets.regions is {regions} but its frames encode to {per_patch} "
                             f"merged tokens each (grid {video.video_grid_thw.tolist()}); set targets.pixels so a "
                             f"frame is {regions} merged tokens (e.g. {regions * 784} for {regions} 28-px panels)")


def target_stamp(model: STORMSModel, num_latents: int, data_cfg: DataConfig, samples: Sequence[Sample],
                 regions: int = 1) -> dict:
    """``data_cfg``: the encoding settings (:meth:`TargetsConfig.encoding_data`)."""
    uids = hashlib.sha256("\n".join(s.uid for s in samples).encode()).hexdigest()[:16]
    return {"vision_fingerprint": vision_fingerprint(model), "backbone": model.spec.name, "num_latents": num_latents,
            "frames": to_dict(data_cfg.frames), "min_pixels": data_cfg.min_pixels,
            "max_pixels": data_cfg.max_pixels, "uids": uids, "num_samples": len(samples),
            # DALI's RGB differs from PyAV's within a tolerance (storms_dist/data/dali.py): a different pixel source
            "decoder": data_cfg.decoder, "regions": regions}


class TargetStore:
    """Read-only view of a target cache: ``store[uids] -> [B, K, D]``, raw or normalised (``TargetsConfig.normalize``;
    raw panels pooled apart are [B, K, R, D])."""

    def __init__(self, directory: Path, normalize: TargetNormalize = "none"):
        self.directory = Path(directory)
        self.projection: RegionProjection | None = None
        """region_pca: the panels' projection fitted on this cache (apply it to targets encoded elsewhere)."""
        self.stamp = json.loads((self.directory / STAMP_FILE).read_text())
        self._targets: dict[str, torch.Tensor] = {}
        for shard in sorted(self.directory.glob("shard-*.safetensors")):
            self._targets.update(load_file(shard))
        cached_regions = self.stamp.get("regions", 1)
        if check_normalize(normalize) != "none" and (cached_regions > 1) != (normalize == "region_pca"):
            raise ValueError(f"{self.directory}: targets cached with regions {cached_regions} cannot be read with "
                             f"normalize {normalize!r} (panels need region_pca; one panel none or standardize)")
        if normalize == "standardize":
            mean_KD, std_KD = standardization(torch.stack(list(self._targets.values())))
            self._targets = {uid: (t - mean_KD) / std_KD for uid, t in self._targets.items()}
        elif normalize == "region_pca":
            self.projection = region_projection(torch.stack(list(self._targets.values())))
            self._targets = {uid: apply_region_projection(t, self.projection) for uid, t in self._targets.items()}

    def __len__(self) -> int:
        return len(self._targets)

    def __getitem__(self, uids: Sequence[str]) -> torch.Tensor:
        missing = [u for u in uids if u not in self._targets]
        if missing:
            raise KeyError(f"{self.directory}: no thought-video targets for {missing[:3]} (rebuild with storms targets)")
        return torch.stack([self._targets[u] for u in uids])


def check_normalize(normalize: str) -> str:
    if normalize not in get_args(TargetNormalize):
        raise ValueError(f"normalize: expected one of {', '.join(get_args(TargetNormalize))}, got {normalize!r}")
    return normalize


def standardization(targets_NKD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (slot, feature) mean and standard deviation over samples; a constant feature keeps its scale (std 1).
    Samples with a non-finite target are left out of the statistics: one corrupt entry must not turn every
    standardised target into NaN (it stays non-finite itself, and the trainer's non-finite policy handles it)."""
    targets_NKD = targets_NKD.float()
    finite_N = torch.isfinite(targets_NKD).flatten(1).all(dim=1)
    if finite_N.any():
        targets_NKD = targets_NKD[finite_N]
    mean_KD = targets_NKD.mean(dim=0)
    std_KD = targets_NKD.std(dim=0) if len(targets_NKD) > 1 else torch.ones_like(mean_KD)
    return mean_KD, torch.where(std_KD > 1e-8, std_KD, torch.ones_like(std_KD))


RegionProjection = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""Per panel: (centre [D], basis [D/R, D], rms [])."""


def region_projection(targets_NKRD: torch.Tensor) -> RegionProjection:
    """Per panel, the top D/R principal directions of its pooled tokens over samples and slots, and the RMS of the
    projection onto them. No per-direction whitening: equal weight per direction amplified directions that carry
    no state (docs/results.md, session 12). Non-finite samples are left out, as in :func:`standardization`."""
    targets_NKRD = targets_NKRD.float()
    finite_N = torch.isfinite(targets_NKRD).flatten(1).all(dim=1)
    if finite_N.any():
        targets_NKRD = targets_NKRD[finite_N]
    num_regions, width = targets_NKRD.shape[2], targets_NKRD.shape[3]
    if width % num_regions:
        raise ValueError(f"targets: {num_regions} panels cannot share a {width}-wide hidden state evenly")
    kept = width // num_regions
    projection = []
    for region in range(num_regions):
        flat = targets_NKRD[:, :, region].reshape(-1, width)
        centre = flat.mean(dim=0)
        centred = (flat - centre).double()
        variances, directions = torch.linalg.eigh(centred.T @ centred / len(flat))  # [D, D]: any sample count
        top = variances.argsort(descending=True)[:kept]
        rms = variances[top].clamp_min(0).mean().sqrt().float()
        projection.append((centre, directions[:, top].T.float().contiguous(),
                           torch.where(rms > 1e-8, rms, torch.ones_like(rms))))
    return projection


def apply_region_projection(targets_KRD: torch.Tensor, projection: RegionProjection) -> torch.Tensor:
    """[K, R, D] pooled panels -> [K, D]: each panel's coordinates on its own directions, side by side."""
    return torch.cat([(targets_KRD[:, r].float() - centre) @ basis.T / rms
                      for r, (centre, basis, rms) in enumerate(projection)], dim=-1)


def is_current(directory: Path, stamp: dict) -> bool:
    path = Path(directory) / STAMP_FILE
    return path.is_file() and json.loads(path.read_text()) == stamp


def check_reusable(directory: Path, model: STORMSModel, samples: Sequence[Sample], data_cfg: DataConfig, *,
                   num_latents: int, cfg: TargetsConfig) -> TargetStore:
    """The cache a *continuing* stage aligns to: the one its Stage I aligned to, built by Stage I's starting tower.
    Stage I trains the merger, so this checkpoint's tower would encode another space (docs/results.md, session
    18): everything in the stamp must match except the vision fingerprint."""
    path = Path(directory) / STAMP_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no target cache to continue aligning to (Stage I builds it; run Stage I "
                                "with the same targets folder first)")
    samples = [s for s in samples if s.thought_video is not None]
    expected = target_stamp(model, num_latents, cfg.encoding_data(data_cfg), samples, cfg.regions)
    cached = json.loads(path.read_text())
    differs = [k for k in expected if k != "vision_fingerprint" and cached.get(k) != expected[k]]
    if differs:
        raise ValueError(f"{path}: the cache was built for other {', '.join(differs)} "
                         f"({', '.join(f'{k}={cached.get(k)!r}, expected {expected[k]!r}' for k in differs[:2])})")
    return TargetStore(Path(directory))


@torch.no_grad()
def build_targets(
    model: STORMSModel,
    samples: Sequence[Sample],
    spec: VisionSpec,
    data_cfg: DataConfig,
    out_dir: Path,
    *,
    num_latents: int,
    cfg: TargetsConfig | None = None,
    progress: bool = False,
) -> TargetStore:
    """Encode every sample's thought video and store its K pooled targets; reuse the cache when its stamp matches."""
    cfg = cfg if cfg is not None else TargetsConfig()  # a fresh default: the config is mutable
    out_dir = Path(out_dir)
    samples = [s for s in samples if s.thought_video is not None]
    if not samples:
        raise ValueError("no sample has a thought_video: Stage I needs thought-video targets")
    data_cfg = cfg.encoding_data(data_cfg)
    stamp = target_stamp(model, num_latents, data_cfg, samples, cfg.regions)
    with cache_lock(out_dir):  # methods trained side by side (demo.parallel) build the same cache: one encodes
        if not is_current(out_dir, stamp):
            _encode_targets(model, samples, spec, data_cfg, out_dir, num_latents=num_latents, cfg=cfg, stamp=stamp,
                            progress=progress)
    return TargetStore(out_dir)


@contextlib.contextmanager
def cache_lock(out_dir: Path):
    """An exclusive lock on ``out_dir`` (a sibling ``.lock`` file), held while the cache is written."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.with_name(out_dir.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _encode_targets(model, samples, spec, data_cfg, out_dir: Path, *, num_latents: int, cfg: TargetsConfig,
                    stamp: dict, progress: bool) -> None:
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    model.eval()
    from tqdm import tqdm

    bar = tqdm(total=len(samples), desc="thought-video targets", disable=not progress, unit="video")
    shard: dict[str, torch.Tensor] = {}
    num_shards = 0
    for start in range(0, len(samples), cfg.batch_size):
        chunk = samples[start : start + cfg.batch_size]
        videos = [load_video_inputs(s.thought_path, spec, data_cfg) for s in chunk]
        check_panels(chunk, videos, spec, cfg.regions)
        visual = model.encode_video(torch.cat([v.pixel_values_videos for v in videos]),
                                    torch.stack([v.video_grid_thw for v in videos]))
        merge = spec.merge_size**2
        num_tokens = [int(v.video_grid_thw.prod()) // merge for v in videos]
        for sample, tokens_MD in zip(chunk, visual.embeds_ND.split(num_tokens)):
            shard[sample.uid] = cfg.pool(tokens_MD.float(), num_latents).contiguous()
        if len(shard) >= cfg.shard_size:
            save_file(shard, str(tmp_dir / f"shard-{num_shards:05d}.safetensors"))
            shard, num_shards = {}, num_shards + 1
        bar.update(len(chunk))
    bar.close()
    if shard:
        save_file(shard, str(tmp_dir / f"shard-{num_shards:05d}.safetensors"))
    (tmp_dir / STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir.rename(out_dir)  # atomic: a half-written cache never carries a valid stamp


# ---- range-sharded building (Slurm job arrays): one part per array task, then one merge ----
PART_STAMP_SUFFIX = ".json"


def part_range(num_samples: int, index: int, count: int) -> tuple[int, int]:
    """Contiguous ``[start, stop)`` of array task ``index`` of ``count`` (sizes differ by at most one)."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"part {index} of {count}: expected 0 <= index < count")
    base, extra = divmod(num_samples, count)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def part_name(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}"


@torch.no_grad()
def build_target_part(
    model: STORMSModel,
    samples: Sequence[Sample],
    spec: VisionSpec,
    data_cfg: DataConfig,
    parts_dir: Path,
    *,
    index: int,
    count: int,
    num_latents: int,
    cfg: TargetsConfig | None = None,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> Path | None:
    """Encode part ``index`` of ``count`` (a contiguous range of the thought-video samples) into
    ``parts_dir/part-IIIII-of-CCCCC.safetensors`` with the stamp of the *whole* cache next to it.

    Same samples, model and stamp as :func:`build_targets`, so :func:`merge_target_parts` yields a cache that
    ``build_targets`` (and the trainer) accept as current. Idempotent: a part with the same stamp is kept, and
    nothing is done when ``cache_dir`` already holds a current merged cache (returns None then).
    """
    parts_dir, cfg = Path(parts_dir), cfg or TargetsConfig()
    samples = [s for s in samples if s.thought_video is not None]
    if not samples:
        raise ValueError("no sample has a thought_video: Stage I needs thought-video targets")
    data_cfg = cfg.encoding_data(data_cfg)
    stamp = target_stamp(model, num_latents, data_cfg, samples, cfg.regions)
    if cache_dir is not None and is_current(cache_dir, stamp):
        return None
    name = part_name(index, count)
    stamp_path = parts_dir / f"{name}{PART_STAMP_SUFFIX}"
    part_path = parts_dir / f"{name}.safetensors"
    if part_path.is_file() and stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return part_path
    parts_dir.mkdir(parents=True, exist_ok=True)
    stamp_path.unlink(missing_ok=True)
    start, stop = part_range(len(samples), index, count)
    device = next(model.parameters()).device
    model.eval()
    from tqdm import tqdm

    chunk_samples = samples[start:stop]
    bar = tqdm(total=len(chunk_samples), desc=f"thought-video targets {name}", disable=not progress, unit="video")
    part: dict[str, torch.Tensor] = {}
    for offset in range(0, len(chunk_samples), cfg.batch_size):
        chunk = chunk_samples[offset : offset + cfg.batch_size]
        videos = [load_video_inputs(s.thought_path, spec, data_cfg) for s in chunk]
        check_panels(chunk, videos, spec, cfg.regions)
        visual = model.encode_video(torch.cat([v.pixel_values_videos for v in videos]).to(device),
                                    torch.stack([v.video_grid_thw for v in videos]).to(device))
        merge = spec.merge_size**2
        num_tokens = [int(v.video_grid_thw.prod()) // merge for v in videos]
        for sample, tokens_MD in zip(chunk, visual.embeds_ND.split(num_tokens)):
            part[sample.uid] = cfg.pool(tokens_MD.float(), num_latents).cpu().contiguous()
        bar.update(len(chunk))
    bar.close()
    tmp = parts_dir / f"{name}.tmp.safetensors"
    save_file(part, str(tmp))
    tmp.replace(part_path)
    stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")  # written last: a part without it is incomplete
    return part_path


def merge_target_parts(parts_dir: Path, out_dir: Path, *, count: int) -> TargetStore:
    """Gather the ``count`` parts of :func:`build_target_part` into ``out_dir`` in :func:`build_targets`' layout
    (``shard-*.safetensors`` + ``stamp.json``), atomically. Every part must be there, with one and the same stamp.
    A current cache in ``out_dir`` with no parts left (merged before) is returned as is."""
    parts_dir, out_dir = Path(parts_dir), Path(out_dir)
    names = [part_name(i, count) for i in range(count)]
    missing = [n for n in names if not (parts_dir / f"{n}.safetensors").is_file()
               or not (parts_dir / f"{n}{PART_STAMP_SUFFIX}").is_file()]
    if missing:
        if not any((parts_dir / f"{n}.safetensors").is_file() for n in names) and (out_dir / STAMP_FILE).is_file():
            return TargetStore(out_dir)  # already merged
        raise FileNotFoundError(f"{parts_dir}: thought-video target parts missing: {', '.join(missing[:4])}"
                                f"{' ...' if len(missing) > 4 else ''} (did every targets array task finish?)")
    stamps = [json.loads((parts_dir / f"{n}{PART_STAMP_SUFFIX}").read_text()) for n in names]
    if any(s != stamps[0] for s in stamps[1:]):
        raise ValueError(f"{parts_dir}: the target parts disagree on their stamp (built from different models, data "
                         f"or K); delete the folder and rebuild the targets")
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    for i, n in enumerate(names):
        shutil.copyfile(parts_dir / f"{n}.safetensors", tmp_dir / f"shard-{i:05d}.safetensors")
    (tmp_dir / STAMP_FILE).write_text(json.dumps(stamps[0], indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir.rename(out_dir)
    shutil.rmtree(parts_dir, ignore_errors=True)
    return TargetStore(out_dir)
