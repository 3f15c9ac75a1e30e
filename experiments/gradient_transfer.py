"""Which training objective's gradient points where the never-seen pairs need it (issue 9, "beats Stage I only").

At one export of a finished `storms demo` run, the gradient of each objective on train items is compared with
g_val, the gradient of the answer CE read through the rollout (as inference reads it) on the eval split's
future_cell items -- on the panel default, (last cell, D) pairs train never asks. cos(g, g_val) > 0 means a small
step of that objective lowers the never-seen pairs' loss; the slope g . g_val / |g| is how fast, per unit of step.
A split-half cosine of g_val says how much of g_val is signal at this many items.

    python -m experiments.gradient_transfer runs/seeds5_850 --seed 0 --set eval.split=val [--train-items 256] \
        [--export storms/stage1/export]

(diagnostic only: eval items are read for a gradient, nothing is trained on them)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from storms_dist.config import load_config
from storms_dist.data.dataset import LatentCollator, VideoQADataset
from storms_dist.data.manifest import read_manifest
from storms_dist.data.preprocess import VisionSpec
from storms_dist.model.build import apply_freezing, latent_token_ids, load_exported
from storms_dist.pipeline import with_seed
from storms_dist.run_config import RunConfig
from storms_dist.targets import TargetStore

BATCH = 32
NOISE_SEED = 1234  # the joint objective's teacher noise, drawn identically for each lambda


def flat_grad(model, params, dataset, collate, *, store=None, **forward) -> torch.Tensor:
    """Mean-over-items gradient of one objective, flattened over ``params``."""
    model.zero_grad(set_to_none=True)
    for start in range(0, len(dataset), BATCH):
        items = [dataset[i] for i in range(start, min(start + BATCH, len(dataset)))]
        batch, layout = collate(items)
        uids = batch.pop("uids")
        targets = store[uids] if store is not None else None
        torch.manual_seed(NOISE_SEED + start)
        out = model(batch, layout, targets_BKD=targets, **forward)
        (out.loss * len(items) / len(dataset)).backward()
    return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in params])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="config override (eval.split=val)")
    p.add_argument("--export", default="storms/stage1/export", help="relative to the seed folder")
    p.add_argument("--train-items", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(1)
    run_dir = Path(args.run_dir)
    seed_dir = run_dir / f"seed{args.seed}"
    cfg = with_seed(load_config(RunConfig, run_dir / "config.yaml", args.set), args.seed)
    model, tokenizer, settings = load_exported(seed_dir / args.export)
    model.train()
    apply_freezing(model, cfg.stage1.trainable)  # the weights Stage I and Stage II train (the same module groups)
    params = [q for q in model.parameters() if q.requires_grad]
    spec = VisionSpec.from_hf_config(model.backbone.config)
    collate = LatentCollator(latent_token_ids(tokenizer), tokenizer.pad_token_id, settings["num_latents"])

    def dataset(split, qtypes, limit=None):
        samples = [s for s in read_manifest(cfg.data.manifest_path(split))
                   if s.thought_video is not None and s.qtype in qtypes]
        return VideoQADataset(samples[:limit], tokenizer, spec, cfg.data)

    train = dataset("train", ("future_cell", "current_cell"), args.train_items)
    held = dataset(cfg.eval.split, ("future_cell",))
    store = TargetStore(seed_dir / "targets", normalize=cfg.targets.normalize)
    stage1 = dict(mode="joint", teacher_noise=cfg.stage1.teacher_noise, rollout_weight=cfg.stage1.rollout_weight)

    halves = [torch.utils.data.Subset(held, range(i, len(held), 2)) for i in (0, 1)]
    g_a, g_b = (flat_grad(model, params, h, collate, mode="rollout") for h in halves)
    g_val = (g_a * len(halves[0]) + g_b * len(halves[1])) / len(held)  # the whole split's mean gradient
    stage1_objective = flat_grad(model, params, train, collate, store=store, **stage1)
    align_weight, model.align_weight = model.align_weight, 0.0
    stage1_answer = flat_grad(model, params, train, collate, store=store, **stage1)  # same noise, lambda = 0
    model.align_weight = align_weight
    grads = {
        "Stage II, answer-only (the paper's)": flat_grad(model, params, train, collate, mode="rollout"),
        "Stage II, anchored (STORMS's default)": flat_grad(model, params, train, collate, store=store,
                                                          mode="rollout"),
        "Stage I objective (joint; Stage I only's next steps)": stage1_objective,
        "... its answer CE alone (lambda = 0)": stage1_answer,
        "... its alignment alone": stage1_objective - stage1_answer,
    }

    cos = torch.nn.functional.cosine_similarity
    print(f"export {seed_dir / args.export}; g_val: rollout answer CE on {len(held)} {cfg.eval.split} future_cell "
          f"items; split-half cos(g_val) {cos(g_a, g_b, dim=0):.3f}; train objectives on {len(train)} items")
    print("| objective (train items) | cos(g, g_val) | slope g . g_val / abs(g) | abs(g) |")
    print("|---|---:|---:|---:|")
    for name, g in grads.items():
        print(f"| {name} | {cos(g, g_val, dim=0):+.3f} | {g @ g_val / g.norm():+.4f} | {g.norm():.3f} |")


if __name__ == "__main__":
    main()
