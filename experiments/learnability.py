"""Does a random-init backbone learn to read its visual tokens? Two diagnostics behind docs/results.md (session 2).

``lm``: plain PyTorch (no DeepSpeed), the registry's tiny backbone, K = 0, answer-only CE on the perception questions
of the chosen variants (every parameter trained, AdamW, constant lr); prints the running train loss and the val loss
next to the *prior* val loss (the CE of always predicting the train split's answer-letter frequencies), all as the
trainer reports them: mean over the letter and ``<|im_end|>`` tokens. A model that uses the video goes below the prior.

``probe``: a linear probe (softmax regression on the standardised, flattened merged visual tokens) of the *untrained*
backbone's vision tower + merger, per variant, against the majority-letter rate: is the information there at init?

With ``--oracle uniform|quadrant|dot`` the ``lm`` run is a positive control: the videos are replaced by frames that
code the answer letter, so the vision -> answer route is tested apart from the vision tower's ability to see balls.

    python experiments/learnability.py lm --root runs/data/synth_demo --variants num_balls --steps 400
    python experiments/learnability.py lm --variants num_balls,position --steps 300 --oracle quadrant
    python experiments/learnability.py probe --root runs/data/synth_demo --variants num_balls,position
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import time
from collections import Counter

import torch

from storms_dist.data.dataset import DataConfig, LatentCollator, VideoQADataset
from storms_dist.data.manifest import read_manifest
from storms_dist.data.preprocess import VisionSpec, patchify
from storms_dist.data.sampling import FrameSamplingConfig
from storms_dist.model.build import ModelConfig, build_model, build_tokenizer, latent_token_ids


def load_split(root: str, name: str, variants: list[str], tokenizer, spec: VisionSpec, cfg: DataConfig):
    samples = [s for s in read_manifest(f"{root}/perception_{name}.jsonl") if s.meta.get("variant") in variants]
    return VideoQADataset(samples, tokenizer, spec, cfg)


def prior_loss(train: VideoQADataset, val: VideoQADataset) -> float:
    """Mean CE over (letter, <|im_end|>) of predicting each variant's train letter frequencies (end token free)."""
    counts: dict[str, Counter] = {}
    for s in train.samples:
        counts.setdefault(s.meta["variant"], Counter())[s.answer] += 1
    nll = [-math.log(counts[s.meta["variant"]][s.answer] / sum(counts[s.meta["variant"]].values()))
           for s in val.samples]
    return sum(nll) / len(nll) / 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("lm", "probe"))
    p.add_argument("--root", default="runs/data/synth_demo")
    p.add_argument("--variants", default="num_balls")
    p.add_argument("--backbone", default="qwen2_5_vl-tiny")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-pixels", type=int, default=3136)
    p.add_argument("--oracle", choices=("uniform", "quadrant", "dot"), default=None,
                   help="positive controls: every video replaced by frames that code the answer letter -- uniform: "
                        "one grey level per letter; quadrant: the letter's quadrant lit (one merged token per frame "
                        "pair); dot: a --dot-size square at a random place inside the letter's quadrant")
    p.add_argument("--dot-size", type=int, default=6, help="side of the --oracle dot in pixels")
    p.add_argument("--patch-init", choices=("random", "block_mean"), default="random",
                   help="block_mean: the patch embedding's first 15 channels are per-colour means of the whole patch "
                        "and of its four quadrants (within-patch translation invariance at init)")
    p.add_argument("--whiten-merger", type=float, default=0.0,
                   help="data-dependent init: rescale the merger's last linear so its outputs on train videos have "
                        "zero mean and this per-dimension std (0: off)")
    args = p.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    variants = args.variants.split(",")
    tokenizer = build_tokenizer(None)
    model = build_model(ModelConfig(backbone=args.backbone, num_latents=0), tokenizer)
    spec = VisionSpec.from_hf_config(model.backbone.config)
    cfg = DataConfig(root=args.root, max_pixels=args.max_pixels,
                     frames=FrameSamplingConfig(fps=None, num_frames=16, min_frames=4, max_frames=16))
    train, val = (load_split(args.root, n, variants, tokenizer, spec, cfg) for n in ("train", "val"))
    if args.patch_init == "block_mean":
        block_mean_patch_init(model)
    if args.oracle:
        train, val = (OracleVideos(d, args.oracle, spec, args.dot_size) for d in (train, val))
    if args.whiten_merger:
        whiten_merger(model, train, args.whiten_merger)
    print(f"{args.mode}: {args.backbone}, variants {variants}, train {len(train)}, val {len(val)}", flush=True)
    (run_lm if args.mode == "lm" else run_probe)(model, tokenizer, train, val, args)


class OracleVideos:
    """The dataset's items with each video replaced by frames that code the answer letter (same shapes)."""

    def __init__(self, dataset: VideoQADataset, kind: str, spec: VisionSpec, dot_size: int):
        self.dataset, self.samples, self.kind, self.spec, self.dot = dataset, dataset.samples, kind, spec, dot_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        letter = "ABCDEFGH".index(item.sample.answer)
        num_temporal, grid_h, grid_w = item.video.video_grid_thw.tolist()
        height, width = grid_h * self.spec.patch_size, grid_w * self.spec.patch_size
        frames_TCHW = torch.full((num_temporal * self.spec.temporal_patch_size, 3, height, width), -1.5)
        if self.kind == "uniform":
            frames_TCHW.fill_(letter - 1.5)
        else:  # quadrant letter % 4, row-major
            top, left = (letter % 4) // 2 * height // 2, (letter % 4) % 2 * width // 2
            if self.kind == "quadrant":
                frames_TCHW[:, :, top:top + height // 2, left:left + width // 2] = 1.5
            else:
                rng = random.Random(item.sample.uid)
                y, x = top + rng.randrange(height // 2 - self.dot + 1), left + rng.randrange(width // 2 - self.dot + 1)
                frames_TCHW[:, :, y:y + self.dot, x:x + self.dot] = 1.5
        pixels, _ = patchify(frames_TCHW, self.spec)
        return dataclasses.replace(item, video=dataclasses.replace(item.video, pixel_values_videos=pixels))


@torch.no_grad()
def block_mean_patch_init(model) -> None:
    """Patch-embedding channels 0-14: per-colour means of the whole patch and of its four quarters."""
    weight = model.backbone.model.visual.patch_embed.proj.weight  # [out, C, T, P, P]
    _, num_channels, _, patch, _ = weight.shape
    half = patch // 2
    regions = [(slice(None), slice(None))] + [(slice(r, r + half), slice(c, c + half))
                                              for r in (0, half) for c in (0, half)]
    out = 0
    for rows, cols in regions:
        for channel in range(num_channels):
            weight[out].zero_()
            block = weight[out, channel, :, rows, cols]
            block.fill_(1.0 / block.numel())
            out += 1


@torch.no_grad()
def whiten_merger(model, train, target_std: float, num_videos: int = 128) -> None:
    """Make the merged visual tokens differ across inputs at the text embeddings' scale (LSUV-style init)."""
    items = [train[i] for i in range(min(num_videos, len(train)))]
    pixels = torch.cat([it.video.pixel_values_videos for it in items])
    grids = torch.stack([it.video.video_grid_thw for it in items])
    tokens_ND = model.encode_video(pixels, grids).embeds_ND
    mean_D, std_D = tokens_ND.mean(0), tokens_ND.std(0) + 1e-8
    last = model.backbone.model.visual.merger.mlp[-1]
    last.weight.mul_((target_std / std_D)[:, None])
    last.bias.sub_(mean_D).mul_(target_std / std_D)
    after = model.encode_video(pixels, grids).embeds_ND
    print(f"merger whitened: token std {std_D.mean():.4f} -> {after.std(0).mean():.4f}, "
          f"mean abs {mean_D.abs().mean():.4f} -> {after.mean(0).abs().mean():.4f}", flush=True)


def run_lm(model, tokenizer, train, val, args) -> None:
    collate = LatentCollator(latent_token_ids(tokenizer), tokenizer.pad_token_id, 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    num_val = min(len(val), 256)

    def loss_of(items):
        batch, layout = collate(items)
        batch.pop("uids")
        return model(batch, layout, mode="single").loss

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        total = 0.0
        for start in range(0, num_val, 64):
            items = [val[i] for i in range(start, min(start + 64, num_val))]
            total += loss_of(items).item() * len(items)
        model.train()
        return total / num_val

    print(f"prior val loss {prior_loss(train, val):.4f}", flush=True)
    started, losses = time.time(), []
    for step in range(1, args.steps + 1):
        loss = loss_of([train[i] for i in random.sample(range(len(train)), args.batch)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 25 == 0:
            shown = f" val {val_loss():.4f}" if step % 100 == 0 else ""
            print(f"step {step} train {sum(losses[-25:]) / 25:.4f}{shown} ({time.time() - started:.0f} s)", flush=True)


@torch.no_grad()
def run_probe(model, tokenizer, train, val, args) -> None:
    model.eval()

    def features(dataset):
        feats, labels, variants = [], [], []
        for start in range(0, len(dataset), 64):
            items = [dataset[i] for i in range(start, min(start + 64, len(dataset)))]
            pixels = torch.cat([it.video.pixel_values_videos for it in items])
            grids = torch.stack([it.video.video_grid_thw for it in items])
            feats.append(model.encode_video(pixels, grids).embeds_ND.view(len(items), -1))
            labels += ["ABCDEFGH".index(it.sample.answer) for it in items]
            variants += [it.sample.meta["variant"] for it in items]
        return torch.cat(feats), torch.tensor(labels), variants

    x_train, y_train, v_train = features(train)
    x_val, y_val, v_val = features(val)
    for variant in dict.fromkeys(v_train):
        tr = torch.tensor([v == variant for v in v_train])
        va = torch.tensor([v == variant for v in v_val])
        mean, std = x_train[tr].mean(0), x_train[tr].std(0) + 1e-6
        xt, xv = (x_train[tr] - mean) / std, (x_val[va] - mean) / std
        with torch.enable_grad():
            weight = torch.zeros(xt.shape[1], 8, requires_grad=True)
            bias = torch.zeros(8, requires_grad=True)
            optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
            for _ in range(300):
                loss = torch.nn.functional.cross_entropy(xt @ weight + bias, y_train[tr]) + 1e-3 * weight.pow(2).sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        accuracy = ((xv @ weight + bias).argmax(1) == y_val[va]).float().mean().item()
        majority = torch.bincount(y_val[va]).max().item() / int(va.sum())
        print(f"{variant}: linear probe val accuracy {accuracy:.3f}, majority letter {majority:.3f}", flush=True)


if __name__ == "__main__":
    main()
