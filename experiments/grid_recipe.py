"""Fast recipe search for the grid task (docs/results.md, session 4): a plain PyTorch loop over the real model,
collator and dataset, no DeepSpeed, val split only. Decisions made here are then run through the real pipeline.

    python experiments/grid_recipe.py stage0 --root runs/data/synth_grid --steps 300
    python experiments/grid_recipe.py method --init runs/x/stage0.pt --method storms --steps 600
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
import types

import torch

from storms_dist.data.dataset import DataConfig, LatentCollator, VideoQADataset
from storms_dist.data.manifest import OPTION_LETTERS, read_manifest
from storms_dist.data.preprocess import VisionSpec
from storms_dist.data.sampling import FrameSamplingConfig
from storms_dist.model.build import ModelConfig, build_model, build_tokenizer, latent_token_ids
from storms_dist.targets import standardization


def data_cfg(root: str) -> DataConfig:
    return DataConfig(root=root, min_pixels=784, max_pixels=784, prompt="verbatim", system_prompt=False,
                      frames=FrameSamplingConfig(fps=8.0, num_frames=None, min_frames=2, max_frames=16))


@torch.no_grad()
def accuracy(model, collate, dataset, letter_ids, num_latents: int, limit: int = 400,
             oracle: dict | None = None, slot_targets: dict | None = None) -> dict[str, float]:
    """Greedy first answer token after the rollout (teacher-forced suffix = same as generate for one token); with
    ``oracle`` (uid -> K targets) the true targets sit in the slots instead of the model's own latents."""
    model.eval()
    hits: dict[str, list[int]] = {}
    slot_errors: dict[str, list[float]] = {}
    indices = list(range(min(limit, len(dataset))))
    for start in range(0, len(indices), 64):
        items = [dataset[i] for i in indices[start:start + 64]]
        batch, layout = collate(items)
        uids = batch.pop("uids")
        if oracle is not None:
            hidden = oracle_hidden(model, batch, layout, torch.stack([oracle[u] for u in uids]))
        else:
            hidden, latents_BKD = answer_hidden(model, batch, layout, num_latents)
            if slot_targets is not None and num_latents:  # the rollout's MSE to the true targets, per slot
                error = (latents_BKD - torch.stack([slot_targets[u] for u in uids])).pow(2).mean(-1)
                for slot, values in enumerate(error.T.tolist()):
                    slot_errors.setdefault(f"mse{slot}", []).extend(values)
        pred = model.backbone.lm_head(hidden).argmax(-1)
        option_logits = option_scores(model, hidden, items, letter_ids)
        for item, p, o in zip(items, pred.tolist(), option_logits):
            key = item.sample.qtype
            hits.setdefault(key, []).append(int(p == letter_ids[item.sample.answer]))
            hits.setdefault(key + "@opt", []).append(int(int(o.argmax()) == item.sample.answer_index))
    model.train()
    return {**{k: 100.0 * sum(v) / len(v) for k, v in hits.items()},
            **{k: sum(v) / len(v) for k, v in slot_errors.items()}}


def option_scores(model, hidden_BD, items, letter_ids):
    """Logits of each item's option letters only (padded with -inf to 16): closed-set multiple-choice scoring."""
    ids = torch.tensor([letter_ids[c] for c in OPTION_LETTERS])
    logits = model.backbone.lm_head(hidden_BD)[:, ids]
    counts = torch.tensor([len(item.sample.options) for item in items])
    return logits.masked_fill(torch.arange(len(ids))[None] >= counts[:, None], float("-inf"))


def oracle_hidden(model, batch, layout, targets_BKD):
    """Hidden state that predicts the first answer letter with the true targets teacher-forced into the slots."""
    visual = model.encode_video(batch["pixel_values_videos"], batch["video_grid_thw"])
    embeds = model.input_embeddings(batch["input_ids"], visual).clone()
    embeds[:, layout.slots] = targets_BKD.to(embeds.dtype)
    hidden = model.decoder(embeds, model.rope_positions(batch), batch["attention_mask"], None, visual=visual)
    return hidden[:, layout.suffix_start]


def answer_hidden(model, batch, layout, num_latents):
    """Hidden state that predicts the first answer letter (after the rollout when K > 0), and the K latents."""
    visual = model.encode_video(batch["pixel_values_videos"], batch["video_grid_thw"])
    pos = model.rope_positions(batch)
    embeds = model.input_embeddings(batch["input_ids"], visual)
    P, S0 = layout.prefix_len, layout.suffix_start
    mask = batch["attention_mask"]
    if num_latents == 0:
        hidden = model.decoder(embeds, pos, mask, None, visual=visual)
        return hidden[:, P - 1], None
    cache = model.new_cache()
    h = model.decoder(embeds[:, :P], pos[:, :, :P], mask[:, :P], cache, visual=visual)[:, -1:]
    m = mask[:, :P]
    ones = m[:, :1].new_ones(m.shape[0], 1)
    latents = []
    for k in range(num_latents):
        latents.append(h)
        m = torch.cat([m, ones], 1)
        h = model.decoder(h, pos[:, :, P + k:P + k + 1], m, cache)
    m = torch.cat([m, ones], 1)
    h = model.decoder(embeds[:, S0:S0 + 1], pos[:, :, S0:S0 + 1], m, cache)
    return h[:, -1], torch.cat(latents, 1)


def stage1_rollout(model, batch, layout, targets_BKD, *, detach: bool, feed_target_prob: float, input_scale: float,
                   feed_from: int | None = None, align: bool = True, align_slots: int | None = None):
    """Stage I rollout with knobs the model's ``_rollout`` does not have: ``detach`` cuts the gradient through the
    latent chain (each step learns from its own previous latent as a fixed input), ``feed_target_prob`` feeds the
    true previous target instead of the model's own latent per row (scheduled sampling), ``input_scale`` multiplies
    the fed latent."""
    visual = model.encode_video(batch["pixel_values_videos"], batch["video_grid_thw"])
    pos = model.rope_positions(batch)
    embeds = model.input_embeddings(batch["input_ids"], visual)
    P, S0, K = layout.prefix_len, layout.suffix_start, layout.num_latents
    mask = batch["attention_mask"]
    cache = model.new_cache()
    h = model.decoder(embeds[:, :P], pos[:, :, :P], mask[:, :P], cache, visual=visual)[:, -1:]
    m = mask[:, :P]
    ones = m[:, :1].new_ones(m.shape[0], 1)
    latents = []
    for k in range(K):
        latents.append(h)
        fed = h.detach() if detach else h
        if feed_target_prob > 0:
            coin = torch.rand(h.shape[0], 1, 1) < feed_target_prob
            fed = torch.where(coin, targets_BKD[:, k:k + 1].to(h.dtype), fed)
        if feed_from is not None and k >= feed_from:  # Coconut-style curriculum: the later slots teacher-forced
            fed = targets_BKD[:, k:k + 1].to(h.dtype)
        m = torch.cat([m, ones], 1)
        h = model.decoder(fed * input_scale, pos[:, :, P + k:P + k + 1], m, cache)
    hidden = model.decoder(embeds[:, S0:], pos[:, :, S0:], torch.cat([m, mask[:, S0:]], 1), cache)
    latents_BKD = torch.cat(latents, 1)
    if align_slots is not None:  # slot curriculum: only the first ``align_slots`` slots are aligned
        out = model._loss(batch, hidden[:, :-1], S0, latents_BKD[:, :align_slots], targets_BKD[:, :align_slots])
        out.latents_BKD = latents_BKD
        return out
    return model._loss(batch, hidden[:, :-1], S0, latents_BKD, targets_BKD if align else None)


def stage1_noisy_teacher(model, batch, layout, targets_BKD, noise: float):
    """Teacher-forced Stage I whose slot inputs are the targets plus Gaussian noise (std ``noise`` per feature),
    aligned to the clean targets: the step function learns to pull a perturbed state back onto the targets."""
    visual = model.encode_video(batch["pixel_values_videos"], batch["video_grid_thw"])
    embeds = model.input_embeddings(batch["input_ids"], visual).clone()
    noisy = targets_BKD + noise * torch.randn_like(targets_BKD)
    embeds[:, layout.slots] = noisy.to(embeds.dtype)
    hidden = model.decoder(embeds, model.rope_positions(batch), batch["attention_mask"], None, visual=visual)
    P, S0 = layout.prefix_len, layout.suffix_start
    return model._loss(batch, hidden[:, S0:-1], S0, hidden[:, P - 1:S0 - 1], targets_BKD)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("stage0", "method"))
    p.add_argument("--root", default="runs/data/synth_grid")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-embed", action="store_true")
    p.add_argument("--variants", default="")
    p.add_argument("--frames", default="", help="keep only cell_at_frame questions about these frames (1-based)")
    p.add_argument("--minimal-prompt", action="store_true", help="the question alone (no options/instruction lines)")
    p.add_argument("--merger-scale", type=float, default=None, help="multiply the merger's last linear at init")
    p.add_argument("--norm-init", type=float, default=None, help="final RMSNorm weight at init (output scale)")
    p.add_argument("--head", default="vocab", choices=("vocab", "options"),
                   help="answer CE over the vocabulary (as the trainer) or over the item's option letters only")
    p.add_argument("--init", default=None)
    p.add_argument("--save", default=None)
    p.add_argument("--method", default="sft_k0", choices=("sft_k0", "storms", "stage1_only", "stage2_only", "oracle"),
                   help="oracle: the true targets teacher-forced into the slots in training and eval, answer CE only "
                        "(the upper bound of what the latents can carry)")
    p.add_argument("--tf-frac", type=float, default=0.0,
                   help="first fraction of Stage I teacher-forced (targets in the slots), the rest rolled out")
    p.add_argument("--stage1-mode", default="rollout", choices=("rollout", "single"),
                   help="Stage I rolls out (default) or teacher-forces the targets into the slots (the trainer's "
                        "stage1.mode default)")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--stage1-frac", type=float, default=0.5)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--detach", action="store_true", help="Stage I rollout: no gradient through the latent chain")
    p.add_argument("--ss-start", type=float, default=0.0,
                   help="Stage I rollout: probability of feeding the true target at the start, annealed to 0")
    p.add_argument("--ss-end-frac", type=float, default=1.0, help="fraction of Stage I over which it anneals")
    p.add_argument("--input-scale", type=float, default=1.0)
    p.add_argument("--s2-detach", action="store_true", help="keep the custom rollout knobs in Stage II")
    p.add_argument("--tf-noise", type=float, default=0.0, help="teacher-forced Stage I: noise std on the slot inputs")
    p.add_argument("--s2-curriculum", type=float, default=0.0,
                   help="Stage II: the first j slots roll out, the rest get the targets; j grows from 1 to K over "
                        "this fraction of Stage II, then full rollout")
    p.add_argument("--slot-curriculum", type=float, default=0.0,
                   help="Stage I rollout: align slots 1..j only, j growing to K over this fraction of Stage I")
    p.add_argument("--joint", type=float, default=0.0,
                   help="Stage I: teacher-forced loss + this weight x a detached rollout's alignment loss")
    p.add_argument("--s2-lr-scale", type=float, default=1.0, help="Stage II (after Stage I): lr x this")
    p.add_argument("--s2-lam", type=float, default=0.0,
                   help="Stage II (after Stage I): keep this lambda x the rolled-out latents' alignment")
    p.add_argument("--s2-align", action="store_true", help="keep lambda * alignment in the curriculum's Stage II")
    p.add_argument("--raw-targets", action="store_true", help="targets: the raw merged tokens (no standardising)")
    p.add_argument("--whiten", type=int, default=0, help="targets: top-r principal components, whitened")
    p.add_argument("--target-sphere", action="store_true", help="standardised targets scaled to unit RMS each")
    p.add_argument("--thought-pixels", type=int, default=0,
                   help="pixels per thought frame when encoding targets (1568 for grid.timer_panel's 56x28 frames)")
    p.add_argument("--timer-code", type=float, default=0.0,
                   help="diagnostic: add SCALE x a fixed random unit-RMS code of each slot's frames-left count to its "
                        "target (a Markov state the frozen tower does not show; session 12)")
    p.add_argument("--regions", type=int, default=0,
                   help="targets: pool each of R side-by-side token positions (scene | panel) on its own, each "
                        "compressed to hidden/R dims by a train-set PCA, scaled to unit RMS, and concatenated")
    p.add_argument("--token-standardize", action="store_true",
                   help="targets: z-score each token position (per feature, train statistics) before pooling")
    args = p.parse_args()
    globals()["TOKEN_STANDARDIZE"] = args.token_standardize
    globals()["REGIONS"] = args.regions
    globals()["SPHERE"] = args.target_sphere
    globals()["WHITEN"] = args.whiten
    globals()["RAW"] = args.raw_targets
    globals()["TIMER_CODE"] = args.timer_code
    globals()["THOUGHT_PIXELS"] = args.thought_pixels
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if args.minimal_prompt:
        import storms_dist.data.dataset as dataset_module
        import storms_dist.data.manifest as manifest_module

        dataset_module.MC_INSTRUCTION = ""
        original = manifest_module.read_manifest

        def read_minimal(path, **kw):
            samples = original(path, **kw)
            for sample in samples:
                sample.meta["prompt"] = sample.question
            return samples

        globals()["read_manifest"] = read_minimal
    tokenizer = build_tokenizer(None)
    model = build_model(ModelConfig(backbone="qwen2_5_vl-tiny", num_latents=args.k, align_weight=args.lam), tokenizer,
                        seed=args.seed)
    if args.init:
        model.backbone.load_state_dict(torch.load(args.init))
    if args.merger_scale is not None:
        with torch.no_grad():
            last = model.backbone.model.visual.merger.mlp[-1]
            last.weight.mul_(args.merger_scale)
            last.bias.mul_(args.merger_scale)
    if args.norm_init is not None:
        with torch.no_grad():
            model.backbone.model.language_model.norm.weight.fill_(args.norm_init)
    spec = VisionSpec.from_hf_config(model.backbone.config)
    cfg = data_cfg(args.root)
    letter_ids = {c: tokenizer.convert_tokens_to_ids(c) for c in OPTION_LETTERS}
    if args.mode == "stage0":
        variants = args.variants.split(",") if args.variants else None
        frames = {int(f) for f in args.frames.split(",")} if args.frames else None
        load = lambda n: VideoQADataset([s for s in read_manifest(f"{args.root}/perception_{n}.jsonl")  # noqa
                                         if (variants is None or s.meta["variant"] in variants)
                                         and (frames is None or s.meta.get("frame", 0) in frames | {0})],
                                        tokenizer, spec, cfg)
        train, val = load("train"), load("val")
        k = 0
    else:
        train = VideoQADataset(read_manifest(f"{args.root}/train.jsonl"), tokenizer, spec, cfg)
        val = VideoQADataset(read_manifest(f"{args.root}/val.jsonl"), tokenizer, spec, cfg)
        k = 0 if args.method == "sft_k0" else args.k
    collate = LatentCollator(latent_token_ids(tokenizer), tokenizer.pad_token_id, k)
    for name, param in model.named_parameters():
        param.requires_grad = args.train_embed or "embed_tokens" not in name and "lm_head" not in name
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    targets = val_targets = None
    if args.mode == "method" and args.method in ("storms", "stage1_only", "oracle"):
        targets, val_targets = build_targets(model, train, k, val)
    if args.method == "oracle":
        model.align_weight = 0.0
    stage1_steps = {"storms": int(args.steps * args.stage1_frac), "stage1_only": args.steps,
                    "oracle": args.steps}.get(args.method, 0)
    stage1_mode = "single" if args.method == "oracle" else args.stage1_mode
    started = time.time()
    losses = []
    slot_mse: list[torch.Tensor] = []
    order: list[int] = []
    for step in range(1, args.steps + 1):
        if len(order) < args.batch:
            order += random.sample(range(len(train)), len(train))
        idx, order = order[:args.batch], order[args.batch:]
        items = [train[i] for i in idx]
        batch, layout = collate(items)
        uids = batch.pop("uids")
        lr = args.lr * min(1.0, step / 20) * (1 - step / (args.steps + 1))
        if stage1_steps and step > stage1_steps:
            lr *= args.s2_lr_scale
        for g in optimizer.param_groups:
            g["lr"] = lr
        aligned = targets is not None and step <= stage1_steps
        if args.head == "options" and not aligned:  # the item's option letters replace the vocabulary CE
            hidden, _ = answer_hidden(model, batch, layout, k)
            gold = torch.tensor([item.sample.answer_index for item in items])
            loss = torch.nn.functional.cross_entropy(option_scores(model, hidden, items, letter_ids), gold)
            out = types.SimpleNamespace(ce=loss.detach(), align=None)
        elif aligned:
            mode = "single" if step <= args.tf_frac * stage1_steps else stage1_mode
            tgt = torch.stack([targets[u] for u in uids])
            custom = args.detach or args.ss_start > 0 or args.input_scale != 1.0 or args.slot_curriculum > 0
            if args.joint and not args.tf_noise:  # the trainer's stage1.mode: joint
                out = model(batch, layout, mode="joint", targets_BKD=tgt, rollout_weight=args.joint)
            elif args.joint:  # the same with noisy teacher-forced inputs
                tf_out = (stage1_noisy_teacher(model, batch, layout, tgt, args.tf_noise) if args.tf_noise > 0
                          else model(batch, layout, mode="single", targets_BKD=tgt))
                roll = stage1_rollout(model, batch, layout, tgt, detach=True, feed_target_prob=0.0, input_scale=1.0)
                roll_align = (roll.latents_BKD - tgt).pow(2).mean()
                out = types.SimpleNamespace(loss=tf_out.loss + args.joint * model.align_weight * roll_align,
                                            ce=tf_out.ce, align=roll_align.detach(), latents_BKD=roll.latents_BKD)
            elif mode == "single" and args.tf_noise > 0:
                out = stage1_noisy_teacher(model, batch, layout, tgt, args.tf_noise)
            elif mode == "rollout" and custom:
                ss = args.ss_start * max(0.0, 1 - step / max(1, args.ss_end_frac * stage1_steps))
                slots = (min(k, 1 + int(step / (args.slot_curriculum * stage1_steps) * k))
                         if args.slot_curriculum > 0 else None)
                out = stage1_rollout(model, batch, layout, tgt, detach=args.detach, feed_target_prob=ss,
                                     input_scale=args.input_scale, align_slots=slots)
            else:
                out = model(batch, layout, mode=mode, targets_BKD=tgt)
            loss = out.loss
            slot_mse.append((out.latents_BKD.detach() - tgt).pow(2).mean((0, 2)))
        elif args.s2_curriculum and k and targets is not None:  # own latents in the first j slots, j growing to K
            progress = (step - stage1_steps - 1) / max(1, args.steps - stage1_steps)
            own = min(k, 1 + int(progress / args.s2_curriculum * k))
            out = stage1_rollout(model, batch, layout, torch.stack([targets[u] for u in uids]), detach=False,
                                 feed_target_prob=0.0, input_scale=1.0, feed_from=own, align=args.s2_align)
            loss = out.loss
        elif args.s2_lam and k and targets is not None:  # Stage II that keeps some alignment of its own rollout
            model.align_weight = args.s2_lam
            out = model(batch, layout, mode="rollout", targets_BKD=torch.stack([targets[u] for u in uids]))
            loss = out.loss
        else:
            out = model(batch, layout, mode="rollout" if k else "single")
            loss = out.loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append((out.ce.item(), 0.0 if out.align is None else out.align.item()))
        if step % args.eval_every == 0 or step == args.steps:
            acc = accuracy(model, collate, val, letter_ids, k, oracle=val_targets if args.method == "oracle" else None,
                           slot_targets=val_targets or None)
            ce = sum(x[0] for x in losses[-50:]) / min(50, len(losses))
            al = sum(x[1] for x in losses[-50:]) / min(50, len(losses))
            train_slots = ""
            if slot_mse:
                train_slots = " train-slot-mse " + " ".join(f"{v:.2f}" for v in torch.stack(slot_mse[-50:]).mean(0))
                slot_mse.clear()
            print(f"step {step} ce {ce:.3f} align {al:.3f}{train_slots} val {({k2: round(v, 1) for k2, v in acc.items()})} "
                  f"({time.time() - started:.0f} s)", flush=True)
    if args.save:
        torch.save(model.backbone.state_dict(), args.save)


@torch.no_grad()
def build_targets(model, dataset, k, val_dataset=None):
    """Pooled thought-video targets from the starting model's tower, standardised per (slot, feature) with the
    train set's statistics (applied to ``val_dataset`` too, for the oracle)."""
    from storms_dist.data.dataset import load_video_inputs
    from storms_dist.model.latent import pool_targets

    spec = VisionSpec.from_hf_config(model.backbone.config)

    def encode(samples, cfg):
        out = {}
        if THOUGHT_PIXELS:
            cfg = dataclasses.replace(cfg, min_pixels=THOUGHT_PIXELS, max_pixels=THOUGHT_PIXELS)
        for start in range(0, len(samples), 64):
            chunk = samples[start:start + 64]
            videos = [load_video_inputs(s.thought_path, spec, cfg) for s in chunk]
            visual = model.encode_video(torch.cat([v.pixel_values_videos for v in videos]),
                                        torch.stack([v.video_grid_thw for v in videos]))
            num_tokens = [int(v.video_grid_thw.prod()) // spec.merge_size**2 for v in videos]
            for s, tok in zip(chunk, visual.embeds_ND.split(num_tokens)):
                out[s.uid] = tok.float()
        return out

    tokens = encode(dataset.samples, dataset.cfg)
    val_tokens = encode(val_dataset.samples, val_dataset.cfg) if val_dataset is not None else {}
    if TOKEN_STANDARDIZE:  # every token position's own z-score before pooling: a quiet panel token gets the scene's scale
        token_mean, token_std = standardization(torch.stack(list(tokens.values())))
        tokens = {u: (t - token_mean) / token_std for u, t in tokens.items()}
        val_tokens = {u: (t - token_mean) / token_std for u, t in val_tokens.items()}
    if REGIONS:
        return region_targets(tokens, val_tokens, k, REGIONS)
    out = {u: pool_targets(t, k) for u, t in tokens.items()}
    val_out = {u: pool_targets(t, k) for u, t in val_tokens.items()}
    stacked = torch.stack(list(out.values()))
    mean, std = standardization(stacked)
    ms = stacked.pow(2).mean().item()
    var = stacked.var(0).mean().item()
    print(f"targets: mean square {ms:.4f}, across-sample variance {var:.4f} ({var / ms:.3f} of it)", flush=True)
    if WHITEN:  # top-r principal components of the raw targets, each scaled to unit variance, in their subspace
        flat = stacked.reshape(-1, stacked.shape[-1])
        centre = flat.mean(0)
        _, sing, vh = torch.linalg.svd(flat - centre, full_matrices=False)
        basis, scale = vh[:WHITEN], sing[:WHITEN] / (len(flat) - 1) ** 0.5
        gain = (stacked.shape[-1] / WHITEN) ** 0.5  # unit RMS over the hidden width

        def norm(t):
            return (((t - centre) @ basis.T) / scale) @ basis * gain
    elif RAW:  # the merged visual tokens as they are: the embeddings the LM already reads in the prompt
        def norm(t):
            return t
    else:
        def norm(t):
            z = (t - mean) / std
            return z / z.pow(2).mean(-1, keepdim=True).sqrt() if SPHERE else z

    if TIMER_CODE:  # frames left at each slot's first frame, from the generator's meta (0 for current_cell)
        samples = {s.uid: s for s in [*dataset.samples, *(val_dataset.samples if val_dataset is not None else [])]}
        codes = torch.randn(64, stacked.shape[-1], generator=torch.Generator().manual_seed(1234))
        codes = codes / codes.pow(2).mean(-1, keepdim=True).sqrt()

        def with_timer(uid, t):
            timers = samples[uid].meta.get("thought_timers") or [0] * (2 * k)
            return t + TIMER_CODE * codes[torch.tensor(timers[0:2 * k:2])]

        return ({u: with_timer(u, norm(t)) for u, t in out.items()},
                {u: with_timer(u, norm(t)) for u, t in val_out.items()})
    return ({u: norm(t) for u, t in out.items()}, {u: norm(t) for u, t in val_out.items()})


def region_targets(tokens, val_tokens, k, regions):
    """Each token position of a temporal patch (the scene and the panel beside it) pooled on its own, so their
    codes land in disjoint dimensions instead of adding: per region a train-set PCA to hidden/R dims (no whitening,
    which amplified noise directions in session 12), scaled to unit RMS, then the regions side by side."""
    from storms_dist.model.latent import pool_targets

    def pooled(t):  # (K, R, D): the tokens are (temporal patch, region) in row-major order
        return torch.stack([pool_targets(t[r::regions], k) for r in range(regions)], dim=1)

    out, val_out = {u: pooled(t) for u, t in tokens.items()}, {u: pooled(t) for u, t in val_tokens.items()}
    stacked = torch.stack(list(out.values()))
    width = stacked.shape[-1] // regions
    fits = []
    for r in range(regions):
        flat = stacked[:, :, r].reshape(-1, stacked.shape[-1])
        centre = flat.mean(0)
        _, sing, vh = torch.linalg.svd(flat - centre, full_matrices=False)
        kept = (sing[:width].pow(2).sum() / sing.pow(2).sum()).item()
        rms = (sing[:width].pow(2).sum() / (len(flat) * width)).sqrt()
        fits.append((centre, vh[:width], rms))
        print(f"targets: region {r} keeps {kept:.4f} of its variance in {width} principal dims", flush=True)

    def norm(t):
        return torch.cat([((t[:, r] - centre) @ basis.T) / rms for r, (centre, basis, rms) in enumerate(fits)], -1)

    return {u: norm(t) for u, t in out.items()}, {u: norm(t) for u, t in val_out.items()}


REGIONS = 0
SPHERE = False
WHITEN = 0
RAW = False
TIMER_CODE = 0.0
THOUGHT_PIXELS = 0
TOKEN_STANDARDIZE = False


if __name__ == "__main__":
    main()
