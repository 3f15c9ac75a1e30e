"""The oracle rung for a finished `storms demo` run (issue 9, ladder item b): each export answers the eval split once
with its own rolled-out latents and once with the true thought-video targets written into the slots (one
teacher-forced pass), so the gap says how much of the answer the latents could carry if the rollout were exact.

The eval split's targets are encoded by the seed's Stage 0 tower (the one the train cache was built with) and
normalised with the *train* cache's projection, exactly as Stage I saw its targets.

    python -m experiments.oracle_panel runs/seeds5_850 --seed 0 --set eval.split=val [--limit 300] \
        [--export NAME=runs/seeds5_850/stage2_variants/seed0/VARIANT/export]

(run as a module from the repository root: it reuses experiments/grid_recipe.py's scoring)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from experiments.grid_recipe import accuracy
from storms_dist.config import load_config
from storms_dist.data.dataset import LatentCollator, VideoQADataset
from storms_dist.data.manifest import OPTION_LETTERS, read_manifest
from storms_dist.data.preprocess import VisionSpec
from storms_dist.model.build import latent_token_ids, load_exported
from storms_dist.pipeline import with_seed
from storms_dist.run_config import RunConfig
from storms_dist.targets import TargetStore, apply_region_projection, build_targets

EXPORTS = {"K=0": "sft_k0/sft/export", "Stage II only": "stage2_only/stage2/export",
           "Stage I export (STORMS's start)": "storms/stage1/export", "STORMS (I→II)": "storms/stage2/export",
           "Stage I only (continued)": "stage1_only/stage1_continued/export"}


def eval_targets(cfg: RunConfig, seed_dir: Path, samples) -> dict[str, torch.Tensor]:
    """uid -> [K, D] targets for ``samples``, projected with the train cache's region projection."""
    if cfg.targets.normalize != "region_pca":
        raise SystemExit(f"targets.normalize {cfg.targets.normalize!r}: this script reproduces region_pca only")
    tower, _, _ = load_exported(seed_dir / "stage0" / "export")
    spec = VisionSpec.from_hf_config(tower.backbone.config)
    with tempfile.TemporaryDirectory() as tmp:
        raw = build_targets(tower, samples, spec, cfg.data, Path(tmp) / "targets", num_latents=cfg.model.num_latents,
                            cfg=cfg.targets)
        uids = [s.uid for s in samples]
        raw_eval = dict(zip(uids, raw[uids]))
    projection = TargetStore(seed_dir / "targets", normalize="region_pca").projection
    return {uid: apply_region_projection(t, projection) for uid, t in raw_eval.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="config override (eval.split=val)")
    p.add_argument("--limit", type=int, default=None, help="the split's first N items only")
    p.add_argument("--export", action="append", default=[], help="NAME=PATH: another export of this seed (a Stage II "
                   "variant's) to score beside the pipeline's")
    args = p.parse_args()
    bad = [e for e in args.export if not all(e.partition("=")[::2])]
    if bad:
        p.error(f"--export {bad[0]!r}: expected NAME=PATH (a name, '=', an export folder)")
    extra = dict(e.partition("=")[::2] for e in args.export)
    torch.set_num_threads(1)
    run_dir = Path(args.run_dir)
    seed_dir = run_dir / f"seed{args.seed}"
    cfg = with_seed(load_config(RunConfig, run_dir / "config.yaml", args.set), args.seed)
    samples = [s for s in read_manifest(cfg.data.manifest_path(cfg.eval.split)) if s.thought_video is not None]
    samples = samples[: args.limit]
    oracle = eval_targets(cfg, seed_dir, samples)
    print(f"| export ({cfg.eval.split}, seed {args.seed}, {len(samples)} items) | rollout future_cell | "
          f"oracle future_cell | rollout current_cell | oracle current_cell |")
    print("|---|---:|---:|---:|---:|")
    exports = {name: seed_dir / rel for name, rel in EXPORTS.items()} | {n: Path(x) for n, x in extra.items()}
    for name, path in exports.items():
        if not path.is_dir():
            if name in extra:
                raise SystemExit(f"--export {name}={path}: not a folder")
            continue
        model, tokenizer, settings = load_exported(path)
        spec = VisionSpec.from_hf_config(model.backbone.config)
        dataset = VideoQADataset(samples, tokenizer, spec, cfg.data)
        collate = LatentCollator(latent_token_ids(tokenizer), tokenizer.pad_token_id, settings["num_latents"])
        letter_ids = {c: tokenizer.convert_tokens_to_ids(c) for c in OPTION_LETTERS}
        rolled = accuracy(model, collate, dataset, letter_ids, settings["num_latents"], limit=len(dataset))
        forced = {}  # K=0 has no slots to write the targets into
        if settings["num_latents"]:
            forced = accuracy(model, collate, dataset, letter_ids, settings["num_latents"], oracle=oracle,
                              limit=len(dataset))
        print(f"| {name} | {rolled.get('future_cell', float('nan')):.1f} | {forced.get('future_cell', float('nan')):.1f}"
              f" | {rolled.get('current_cell', float('nan')):.1f} | {forced.get('current_cell', float('nan')):.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
