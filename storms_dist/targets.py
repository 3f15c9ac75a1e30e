"""Thought-video targets: frozen vision encoder + merger -> K pooled targets per sample, in a stamped safetensors cache.

The cache is keyed by sample uid and stamped with everything that determines its content (fingerprint of the vision
and merger weights, K, frame sampling and pixel budget, backbone). A cache whose stamp differs is stale and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from storms_dist.config import to_dict
from storms_dist.data.dataset import DataConfig, load_video_inputs
from storms_dist.data.manifest import Sample
from storms_dist.data.preprocess import VisionSpec
from storms_dist.model.latent import pool_targets
from storms_dist.model.storms import STORMSModel

STAMP_FILE = "stamp.json"


@dataclass(kw_only=True)
class TargetsConfig:
    shard_size: int = 512
    """Samples per safetensors shard."""
    batch_size: int = 8
    """Thought videos encoded per vision-tower call."""

    def __post_init__(self):
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError(f"targets: shard_size and batch_size must be >= 1, got {self.shard_size}, {self.batch_size}")


def vision_fingerprint(model: STORMSModel) -> str:
    """Content hash of the vision encoder + merger weights (what the targets depend on)."""
    digest = hashlib.sha256()
    for name, param in sorted(model.backbone.named_parameters()):
        if model.spec.group_of(name) in ("vision", "merger"):
            digest.update(name.encode())
            digest.update(param.detach().to(torch.float32).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def target_stamp(model: STORMSModel, num_latents: int, data_cfg: DataConfig, samples: Sequence[Sample]) -> dict:
    uids = hashlib.sha256("\n".join(s.uid for s in samples).encode()).hexdigest()[:16]
    return {"vision_fingerprint": vision_fingerprint(model), "backbone": model.spec.name, "num_latents": num_latents,
            "frames": to_dict(data_cfg.frames), "min_pixels": data_cfg.min_pixels,
            "max_pixels": data_cfg.max_pixels, "uids": uids, "num_samples": len(samples)}


class TargetStore:
    """Read-only view of a target cache: ``store[uids] -> [B, K, D]``."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.stamp = json.loads((self.directory / STAMP_FILE).read_text())
        self._targets: dict[str, torch.Tensor] = {}
        for shard in sorted(self.directory.glob("shard-*.safetensors")):
            self._targets.update(load_file(shard))

    def __len__(self) -> int:
        return len(self._targets)

    def __getitem__(self, uids: Sequence[str]) -> torch.Tensor:
        missing = [u for u in uids if u not in self._targets]
        if missing:
            raise KeyError(f"{self.directory}: no thought-video targets for {missing[:3]} (rebuild with storms targets)")
        return torch.stack([self._targets[u] for u in uids])


def is_current(directory: Path, stamp: dict) -> bool:
    path = Path(directory) / STAMP_FILE
    return path.is_file() and json.loads(path.read_text()) == stamp


@torch.no_grad()
def build_targets(
    model: STORMSModel,
    samples: Sequence[Sample],
    spec: VisionSpec,
    data_cfg: DataConfig,
    out_dir: Path,
    *,
    num_latents: int,
    cfg: TargetsConfig = TargetsConfig(),
    progress: bool = False,
) -> TargetStore:
    """Encode every sample's thought video and store its K pooled targets; reuse the cache when its stamp matches."""
    out_dir = Path(out_dir)
    samples = [s for s in samples if s.thought_video is not None]
    if not samples:
        raise ValueError("no sample has a thought_video: Stage I needs thought-video targets")
    stamp = target_stamp(model, num_latents, data_cfg, samples)
    if is_current(out_dir, stamp):
        return TargetStore(out_dir)

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
        visual = model.encode_video(torch.cat([v.pixel_values_videos for v in videos]),
                                    torch.stack([v.video_grid_thw for v in videos]))
        merge = spec.merge_size**2
        num_tokens = [int(v.video_grid_thw.prod()) // merge for v in videos]
        for sample, tokens_MD in zip(chunk, visual.embeds_ND.split(num_tokens)):
            shard[sample.uid] = pool_targets(tokens_MD.float(), num_latents).contiguous()
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
    return TargetStore(out_dir)
