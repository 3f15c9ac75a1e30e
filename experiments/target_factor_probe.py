"""Target factor probe (docs/results.md, session 12): how much of each slot's thought-video target is the
frames-left count and the cell, and how well each is read back on val.

    python experiments/target_factor_probe.py ROOT STAGE0.pt [THOUGHT_PIXELS]
"""
import sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
import grid_recipe as gr
from storms_dist.data.dataset import VideoQADataset
from storms_dist.data.manifest import read_manifest
from storms_dist.data.preprocess import VisionSpec
from storms_dist.model.build import ModelConfig, build_model, build_tokenizer

root, init = sys.argv[1], sys.argv[2]
tok = build_tokenizer(None)
model = build_model(ModelConfig(backbone="qwen2_5_vl-tiny", num_latents=8), tok, seed=0)
model.backbone.load_state_dict(torch.load(init))
spec = VisionSpec.from_hf_config(model.backbone.config)
cfg = gr.data_cfg(root)
tr = VideoQADataset([s for s in read_manifest(f"{root}/train.jsonl") if s.qtype == "future_cell"], tok, spec, cfg)
va = VideoQADataset([s for s in read_manifest(f"{root}/val.jsonl") if s.qtype == "future_cell"], tok, spec, cfg)
gr.THOUGHT_PIXELS = int(sys.argv[3]) if len(sys.argv) > 3 else 0
t_tr, t_va = gr.build_targets(model, tr, 8, va)
def labels(ds, key, slot):
    return torch.tensor([s.meta[key][2 * slot] if key == "thought_timers" else
                         s.meta[key][2 * slot + 1][0] + 4 * s.meta[key][2 * slot + 1][1] for s in ds.samples])
for key in ("thought_timers", "thought_cells"):
    fr, r2 = [], []
    for slot in range(8):
        X = torch.stack([t_tr[s.uid][slot] for s in tr.samples]); Xv = torch.stack([t_va[s.uid][slot] for s in va.samples])
        y, yv = labels(tr, key, slot), labels(va, key, slot)
        # between-group variance fraction of the standardised target
        tot = X.var(0).sum()
        between = sum(((y == g).sum() * (X[y == g].mean(0) - X.mean(0)).pow(2).sum()) for g in y.unique()) / (len(X) - 1)
        fr.append((between / tot).item())
        # nearest-centroid probe accuracy on val
        groups = y.unique(); cents = torch.stack([X[y == g].mean(0) for g in groups])
        pred = groups[torch.cdist(Xv, cents).argmin(1)]
        acc = (pred == yv).float().mean().item()
        if key == "thought_timers":  # ridge regression of the count, R^2 on val
            A = torch.cat([X, torch.ones(len(X), 1)], 1); Av = torch.cat([Xv, torch.ones(len(Xv), 1)], 1)
            w = torch.linalg.solve(A.T @ A + 1.0 * torch.eye(A.shape[1]), A.T @ y.float())
            res = ((Av @ w - yv.float()) ** 2).mean(); acc = (1 - res / yv.float().var()).item()
        r2.append(acc)
    print(key, "variance fraction per slot", " ".join(f"{v:.3f}" for v in fr))
    print(key, "val probe (timer: ridge R^2; cell: nearest-centroid acc) per slot", " ".join(f"{v:.2f}" for v in r2))
