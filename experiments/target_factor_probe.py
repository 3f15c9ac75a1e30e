"""Target factor probe (docs/results.md, session 12): how much of each slot's thought-video target is the
frames-left count and the cell, and how well each is read back on val (train-standardised targets of the
future_cell items; a ridge probe of the count and a nearest-centroid probe of the cell, fitted on train).

    python experiments/target_factor_probe.py ROOT STAGE0.pt [THOUGHT_PIXELS] [--token-standardize] [--regions]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import grid_recipe  # noqa: E402

from storms_dist.data.dataset import VideoQADataset  # noqa: E402
from storms_dist.data.manifest import read_manifest  # noqa: E402
from storms_dist.data.preprocess import VisionSpec  # noqa: E402
from storms_dist.data.synth.grid import cell_index  # noqa: E402
from storms_dist.model.build import ModelConfig, build_model, build_tokenizer  # noqa: E402

K = 8


def slot_labels(samples, factor: str, slot: int) -> torch.Tensor:
    """The count at the slot's first frame, or the cell index at its second (the later of its two frames)."""
    if factor == "timer":
        return torch.tensor([s.meta["thought_timers"][2 * slot] for s in samples])
    return torch.tensor([cell_index(col, row, round(len(s.options) ** 0.5))  # the options are the grid's cells
                         for s, (col, row) in ((s, s.meta["thought_cells"][2 * slot + 1]) for s in samples)])


def variance_share(x_ND: torch.Tensor, y_N: torch.Tensor) -> float:
    """Between-group variance of ``x`` over its total variance, groups = the label's values."""
    centre = x_ND.mean(0)
    between = sum((y_N == g).sum() * (x_ND[y_N == g].mean(0) - centre).pow(2).sum() for g in y_N.unique())
    return float(between / (len(x_ND) - 1) / x_ND.var(0).sum())


def ridge_r2(x_ND, y_N, xv_ND, yv_N, alpha: float = 1.0) -> float:
    ones = lambda x: torch.cat([x, torch.ones(len(x), 1)], 1)  # noqa: E731
    a = ones(x_ND)
    w = torch.linalg.solve(a.T @ a + alpha * torch.eye(a.shape[1]), a.T @ y_N.float())
    residual = (ones(xv_ND) @ w - yv_N.float()).pow(2).mean()
    return float(1 - residual / yv_N.float().var())


def nearest_centroid(x_ND, y_N, xv_ND, yv_N) -> float:
    groups = y_N.unique()
    centroids = torch.stack([x_ND[y_N == g].mean(0) for g in groups])
    return float((groups[torch.cdist(xv_ND, centroids).argmin(1)] == yv_N).float().mean())


def main() -> None:
    root, init = sys.argv[1], sys.argv[2]
    grid_recipe.THOUGHT_PIXELS = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    grid_recipe.TOKEN_STANDARDIZE = "--token-standardize" in sys.argv
    grid_recipe.REGIONS = 2 if "--regions" in sys.argv else 0
    tokenizer = build_tokenizer(None)
    model = build_model(ModelConfig(backbone="qwen2_5_vl-tiny", num_latents=K), tokenizer, seed=0)
    model.backbone.load_state_dict(torch.load(init))
    spec, cfg = VisionSpec.from_hf_config(model.backbone.config), grid_recipe.data_cfg(root)
    load = lambda split: VideoQADataset([s for s in read_manifest(f"{root}/{split}.jsonl")  # noqa: E731
                                         if s.qtype == "future_cell"], tokenizer, spec, cfg)
    train, val = load("train"), load("val")
    targets, val_targets = grid_recipe.build_targets(model, train, K, val)
    for factor, probe, probe_name in (("timer", ridge_r2, "ridge R^2"), ("cell", nearest_centroid, "nearest-centroid")):
        shares, scores = [], []
        for slot in range(K):
            x = torch.stack([targets[s.uid][slot] for s in train.samples])
            xv = torch.stack([val_targets[s.uid][slot] for s in val.samples])
            y, yv = slot_labels(train.samples, factor, slot), slot_labels(val.samples, factor, slot)
            shares.append(variance_share(x, y))
            scores.append(probe(x, y, xv, yv))
        print(f"{factor}: variance share per slot", " ".join(f"{v:.3f}" for v in shares))
        print(f"{factor}: val {probe_name} per slot", " ".join(f"{v:.2f}" for v in scores))


if __name__ == "__main__":
    main()
