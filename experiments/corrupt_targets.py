"""Imperfect thought videos, simulated on a finished target cache (docs/results.md, session 21): for a fraction of
the samples the scene panel's pooled tokens are replaced by another random sample's, as if the video generator had
imagined the wrong path; the timer panel stays. The copy keeps the source's stamp, so a `storms demo` run whose seed
folder holds it (same Stage 0, same data) aligns to it instead of building a clean one.

    python experiments/corrupt_targets.py runs/seeds5_850/seed0/targets runs/corrupt/seed0/targets --fraction 0.3
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from storms_dist.targets import STAMP_FILE


def corrupt(targets: dict[str, torch.Tensor], fraction: float, seed: int) -> tuple[dict[str, torch.Tensor], int]:
    """Swap the scene panel (region 0) of ``fraction`` of the samples for another sample's; returns the new dict."""
    uids = sorted(targets)
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(uids), generator=gen)[: round(fraction * len(uids))].tolist()
    out = dict(targets)
    for i in chosen:
        donor = (i + 1 + int(torch.randint(len(uids) - 1, (1,), generator=gen))) % len(uids)  # any other sample
        swapped = targets[uids[i]].clone()
        swapped[:, 0] = targets[uids[donor]][:, 0]
        out[uids[i]] = swapped
    return out, len(chosen)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("source", type=Path, help="a target cache built with targets.regions: 2")
    p.add_argument("dest", type=Path)
    p.add_argument("--fraction", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    stamp = json.loads((args.source / STAMP_FILE).read_text())
    if stamp.get("regions", 1) < 2:
        raise SystemExit(f"{args.source}: regions {stamp.get('regions', 1)}; the scene panel needs regions >= 2")
    if args.dest.exists():
        raise SystemExit(f"{args.dest}: exists; remove it first")
    shards = {shard: list(load_file(shard).items()) for shard in sorted(args.source.glob("shard-*.safetensors"))}
    targets = {uid: t for items in shards.values() for uid, t in items}
    corrupted, count = corrupt(targets, args.fraction, args.seed)
    args.dest.mkdir(parents=True)
    for shard, items in shards.items():  # the source's sharding, each shard read once
        save_file({uid: corrupted[uid].contiguous() for uid, _ in items}, str(args.dest / shard.name))
    shutil.copy(args.source / STAMP_FILE, args.dest / STAMP_FILE)
    print(f"{args.dest}: scene panel swapped on {count} of {len(targets)} samples")


if __name__ == "__main__":
    main()
