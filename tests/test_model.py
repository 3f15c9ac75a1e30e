"""The latent mechanism against independent references: naive recompute rollout, plain backbone, generation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from storms_dist.model.build import ModelConfig, build_model, latent_token_ids
from storms_dist.model.latent import IGNORE_INDEX, collate_latent_batch

BACKBONES = ["qwen2_5_vl-micro", "qwen3_vl-micro"]
PER_TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")
GRIDS_THW = [(2, 4, 4), (2, 4, 6), (4, 4, 4)]  # different video sizes -> different prompt lengths


def make_batch(model, tokenizer, num_latents: int, *, seed: int = 0):
    """Prompts of different lengths with real video placeholders, random pixels, 2-token answers."""
    ids = tokenizer.convert_tokens_to_ids
    vs, ve, vid, im_end = ids("<|vision_start|>"), ids("<|vision_end|>"), ids("<|video_pad|>"), ids("<|im_end|>")
    patch = model.backbone.config.vision_config.patch_size
    gen = torch.Generator().manual_seed(seed)
    prompts, types, answers, pixels = [], [], [], []
    for row, (t, h, w) in enumerate(GRIDS_THW):
        text = torch.randint(10, 5000, (row + 2,), generator=gen).tolist()
        if model.spec.family == "qwen2_5_vl":
            prompt = text + [vs] + [vid] * (t * h * w // 4) + [ve] + [11, 12]
        else:  # Qwen3-VL: one placeholder group per temporal patch, separated by timestamp text
            prompt = list(text)
            for chunk in range(t):
                prompt += [100 + chunk, vs] + [vid] * (h * w // 4) + [ve]
            prompt += [11, 12]
        prompts.append(prompt)
        types.append([2 if x == vid else 0 for x in prompt])
        answers.append([int(torch.randint(20, 80, (1,), generator=gen)), im_end])
        pixels.append(torch.randn(t * h * w, 3 * 2 * patch * patch, generator=gen))
    grids = torch.tensor(GRIDS_THW)
    batch, layout = collate_latent_batch(prompts, types, answers, num_latents=num_latents,
                                         ids=latent_token_ids(tokenizer), pad_id=tokenizer.pad_token_id)
    batch["pixel_values_videos"] = torch.cat(pixels)
    batch["video_grid_thw"] = grids
    return batch, layout


def naive_rollout_loss(model, batch, layout):
    """Reference without KV cache: re-run the whole growing sequence for every latent step, then one full pass."""
    visual = model.encode_video(batch["pixel_values_videos"], batch["video_grid_thw"])
    pos = model.rope_positions(batch)
    embeds = model.input_embeddings(batch["input_ids"], visual)
    video_mask = batch["input_ids"] == model.video_token_id
    mask = batch["attention_mask"]
    P = layout.prefix_len
    for k in range(layout.num_latents + 1):
        end = P + k
        hidden = model.decoder(embeds[:, :end], pos[:, :, :end], mask[:, :end], None, visual=visual,
                               video_mask_BT=video_mask[:, :end])
        if k < layout.num_latents:
            embeds = torch.cat([embeds[:, :end], hidden[:, -1:], embeds[:, end + 1 :]], dim=1)
    hidden = model.decoder(embeds, pos, mask, None, visual=visual, video_mask_BT=video_mask)
    logits = model.backbone.lm_head(hidden)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX)


@pytest.fixture(scope="module", params=BACKBONES)
def model(request, tokenizer):
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone=request.param, dtype="float32", attn_implementation="sdpa"),
                       tokenizer, seed=0).train()


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_cached_rollout_equals_naive_rollout(model, tokenizer):
    batch, layout = make_batch(model, tokenizer, num_latents=4)
    model.zero_grad()
    cached = model(batch, layout, mode="rollout")
    cached.loss.backward()
    cached_grads = grads(model)
    model.zero_grad()
    naive = naive_rollout_loss(model, batch, layout)
    naive.backward()
    naive_grads = grads(model)
    assert cached.num_answer_tokens == 2 * len(GRIDS_THW)
    assert torch.isfinite(cached.loss)
    assert abs(cached.loss.item() - naive.item()) <= 1e-5
    assert cached_grads.keys() == naive_grads.keys()
    assert len(cached_grads) == sum(1 for _ in model.parameters())  # vision tower included
    for name, grad in cached_grads.items():
        assert torch.isfinite(grad).all(), name
        # fp32 accumulation order differs between the two paths; compare on the gradient's own scale
        scale = max(1.0, naive_grads[name].abs().max().item())
        assert (grad - naive_grads[name]).abs().max().item() <= 1e-5 * scale, name


def test_gradient_reaches_first_latent_step(model, tokenizer, monkeypatch):
    """Stage II's answer-only CE trains the first latent step through the whole rollout chain."""
    batch, layout = make_batch(model, tokenizer, num_latents=4)
    latent_inputs = []
    decoder = model.decoder

    def recording_decoder(embeds_BTD, *args, **kwargs):
        if embeds_BTD.shape[1] == 1:  # one-column latent step
            latent_inputs.append(embeds_BTD)
        return decoder(embeds_BTD, *args, **kwargs)

    monkeypatch.setattr(model, "decoder", recording_decoder)
    out = model(batch, layout, mode="rollout")
    assert len(latent_inputs) == 4
    (grad_first,) = torch.autograd.grad(out.loss, latent_inputs[0])
    assert grad_first.abs().sum() > 0
    # Stage I (rollout variant): the alignment term is part of the loss with weight lambda
    targets = torch.randn(len(GRIDS_THW), 4, model.text_config.hidden_size)
    aligned = model(batch, layout, mode="rollout", targets_BKD=targets)
    assert aligned.align > 0
    assert torch.allclose(aligned.loss, aligned.ce + 0.1 * aligned.align, atol=1e-6)


def record_latent_inputs(model, monkeypatch) -> list[torch.Tensor]:
    """Patch the decoder to record every one-column input (the latent passes' slot embeddings) into the returned list."""
    recorded, decoder = [], model.decoder

    def recording_decoder(embeds_BTD, *args, **kwargs):
        if embeds_BTD.shape[1] == 1:
            recorded.append(embeds_BTD)
        return decoder(embeds_BTD, *args, **kwargs)

    monkeypatch.setattr(model, "decoder", recording_decoder)
    return recorded


def test_joint_mode_adds_the_detached_rollouts_alignment(model, tokenizer, monkeypatch):
    """Stage I joint: teacher-forced loss + w * lambda * MSE of the rolled-out latents, no gradient along the chain."""
    batch, layout = make_batch(model, tokenizer, num_latents=3)
    targets = torch.randn(len(GRIDS_THW), 3, model.text_config.hidden_size)
    with torch.no_grad():
        teacher = model(batch, layout, mode="single", targets_BKD=targets)
        rolled = model(batch, layout, mode="rollout")
        joint = model(batch, layout, mode="joint", targets_BKD=targets, rollout_weight=2.0)
    torch.testing.assert_close(joint.latents_BKD, rolled.latents_BKD)  # detaching changes no value
    rollout_align = F.mse_loss(rolled.latents_BKD, targets)
    torch.testing.assert_close(joint.align, rollout_align)
    torch.testing.assert_close(joint.loss, teacher.loss + 2.0 * model.align_weight * rollout_align)
    latent_inputs = record_latent_inputs(model, monkeypatch)
    out = model(batch, layout, mode="joint", targets_BKD=targets)
    assert len(latent_inputs) == 3 and not any(x.requires_grad for x in latent_inputs)  # the chain is cut
    assert out.loss.requires_grad
    with pytest.raises(ValueError, match="joint.*targets"):
        model(batch, layout, mode="joint")


def test_joint_answer_pass_moves_the_answer_ce_onto_the_rollout(model, tokenizer, monkeypatch):
    """joint + answer_pass (a Stage II variant, session 22): 'rollout' = lambda * teacher-forced alignment + the
    rollout's CE + w * lambda * the rollout's alignment; 'both' keeps the teacher's CE too; chain_grad lets the
    gradient flow along the chain."""
    batch, layout = make_batch(model, tokenizer, num_latents=3)
    targets = torch.randn(len(GRIDS_THW), 3, model.text_config.hidden_size)
    lam = model.align_weight
    with torch.no_grad():
        teacher = model(batch, layout, mode="single", targets_BKD=targets)
        rolled = model(batch, layout, mode="rollout", targets_BKD=targets)
        from_rollout = model(batch, layout, mode="joint", targets_BKD=targets, rollout_weight=2.0,
                             answer_pass="rollout")
        both = model(batch, layout, mode="joint", targets_BKD=targets, rollout_weight=2.0, answer_pass="both")
    torch.testing.assert_close(from_rollout.loss, lam * teacher.align + rolled.ce + 2.0 * lam * rolled.align)
    torch.testing.assert_close(both.loss, teacher.loss + rolled.ce + 2.0 * lam * rolled.align)
    torch.testing.assert_close(from_rollout.ce, rolled.ce)
    latent_inputs = record_latent_inputs(model, monkeypatch)
    model(batch, layout, mode="joint", targets_BKD=targets, answer_pass="rollout")
    assert len(latent_inputs) == 3 and not any(x.requires_grad for x in latent_inputs)
    latent_inputs.clear()
    model(batch, layout, mode="joint", targets_BKD=targets, answer_pass="rollout", chain_grad=True)
    assert all(x.requires_grad for x in latent_inputs)
    with pytest.raises(ValueError, match="answer_pass.*joint"):
        model(batch, layout, mode="rollout", answer_pass="rollout")


def test_answer_grad_latents_trains_the_weights_only_through_the_latent_states(model, tokenizer):
    """rollout + answer_grad='latents' (a Stage II variant, session 23): the reported CE is the rollout's; the
    gradient is dCE/dz * dz/dtheta, computed here by autograd from an explicit z, and it differs from the full
    gradient, which also fits the readout; with targets the anchor adds lambda * the rollout's alignment."""
    batch, layout = make_batch(model, tokenizer, num_latents=3)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(loss):
        return [torch.zeros_like(p) if g is None else g
                for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True))]

    out = model(batch, layout, mode="rollout", answer_grad="latents")
    full = model(batch, layout, mode="rollout")
    torch.testing.assert_close(out.ce, full.ce)
    torch.testing.assert_close(out.loss, torch.zeros_like(out.loss), atol=1e-6, rtol=0)
    latents_BKD = model(batch, layout, mode="rollout").latents_BKD  # the slot inputs, with the chain's graph
    live = model._forward_mode("single", batch, layout, None, *reference_inputs(model, batch, layout),
                               slot_inputs_BKD=latents_BKD)
    torch.testing.assert_close(live.ce, full.ce)  # the naive pass with z in the slots is the rollout
    (dce_dz,) = torch.autograd.grad(live.loss, latents_BKD, retain_graph=True)
    expected = grads((latents_BKD * dce_dz).sum())
    got, full_grads = grads(out.loss), grads(full.loss)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)
    assert sum((g - f).abs().sum() for g, f in zip(got, full_grads)) > 1e-3  # the readout's own gradient is gone
    targets = torch.randn(len(GRIDS_THW), 3, model.text_config.hidden_size)
    with torch.no_grad():
        anchored = model(batch, layout, mode="rollout", targets_BKD=targets, answer_grad="latents")
        rolled = model(batch, layout, mode="rollout", targets_BKD=targets)
    torch.testing.assert_close(anchored.loss, model.align_weight * rolled.align, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(anchored.align, rolled.align)
    with torch.no_grad():  # joint: the rollout's CE through the latents adds 0 to the value, its CE is reported
        teacher = model(batch, layout, mode="single", targets_BKD=targets)
        joint = model(batch, layout, mode="joint", targets_BKD=targets, rollout_weight=2.0, answer_pass="both",
                      answer_grad="latents")
    torch.testing.assert_close(joint.loss, teacher.loss + 2.0 * model.align_weight * rolled.align, atol=1e-6,
                               rtol=1e-5)
    torch.testing.assert_close(joint.ce, rolled.ce)
    with pytest.raises(ValueError, match="answer_grad.*rollout"):
        model(batch, layout, mode="single", answer_grad="latents")
    with pytest.raises(ValueError, match="answer_grad.*answer_pass"):
        model(batch, layout, mode="joint", targets_BKD=targets, answer_grad="latents")


def reference_inputs(model, batch, layout):
    """What forward() computes once for every pass: embeddings, positions, visual features, masks, K."""
    visual = model.encode_video(batch["pixel_values_videos"], batch["video_grid_thw"])
    embeds = model.input_embeddings(batch["input_ids"], visual)
    return (embeds, model.rope_positions(batch), visual, batch["input_ids"] == model.video_token_id,
            layout.num_latents)


def test_detach_chain_keeps_the_rollout_values_and_cuts_its_gradient(model, tokenizer, monkeypatch):
    """rollout + detach_chain (a Stage II variant): the same loss value as the full rollout; each latent enters the
    next pass as a constant, while the answer CE still reaches the parameters."""
    batch, layout = make_batch(model, tokenizer, num_latents=3)
    with torch.no_grad():
        full = model(batch, layout, mode="rollout")
        cut = model(batch, layout, mode="rollout", detach_chain=True)
    torch.testing.assert_close(cut.loss, full.loss)
    latent_inputs = record_latent_inputs(model, monkeypatch)
    out = model(batch, layout, mode="rollout", detach_chain=True)
    assert len(latent_inputs) == 3 and not any(x.requires_grad for x in latent_inputs)
    assert out.loss.requires_grad
    latent_inputs.clear()
    model(batch, layout, mode="rollout")
    assert all(x.requires_grad for x in latent_inputs)  # without the flag the chain carries gradient
    with pytest.raises(ValueError, match="detach_chain.*rollout"):
        model(batch, layout, mode="single", detach_chain=True)


def test_teacher_noise_perturbs_the_slot_inputs_not_the_targets(model, tokenizer, monkeypatch):
    """teacher_noise: the teacher-forced slots get targets + std * N(0, 1); the alignment still compares to the clean
    targets, so the loss equals a clean pass on the noisy inputs aligned to the clean targets."""
    batch, layout = make_batch(model, tokenizer, num_latents=3)
    targets = torch.randn(len(GRIDS_THW), 3, model.text_config.hidden_size)
    torch.manual_seed(0)
    noise = 0.5 * torch.randn_like(targets)
    with torch.no_grad():
        torch.manual_seed(0)
        noisy = model(batch, layout, mode="single", targets_BKD=targets, teacher_noise=0.5)
        clean_inputs = model(batch, layout, mode="single", targets_BKD=targets + noise)
        clean = model(batch, layout, mode="single", targets_BKD=targets)
    torch.testing.assert_close(noisy.latents_BKD, clean_inputs.latents_BKD)
    torch.testing.assert_close(noisy.align, F.mse_loss(clean_inputs.latents_BKD, targets))
    assert not torch.allclose(noisy.latents_BKD, clean.latents_BKD)
    with pytest.raises(ValueError, match="teacher_noise"):
        model(batch, layout, mode="rollout", targets_BKD=targets, teacher_noise=0.5)


def test_k0_equals_plain_backbone(model, tokenizer):
    batch, layout = make_batch(model, tokenizer, num_latents=0)
    assert (batch["input_ids"] == latent_token_ids(tokenizer).pad).sum() == 0
    ours = model(batch, layout, mode="rollout")  # K=0 falls back to one pass
    # positions from the project's rule: transformers >= 5.3 restarts text after a long video elsewhere
    # (model/mrope.py); this test is about the loss, tests/test_mrope.py about the positions
    plain = model.backbone(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=model.rope_positions(batch),
        mm_token_type_ids=batch["mm_token_type_ids"], pixel_values_videos=batch["pixel_values_videos"],
        video_grid_thw=batch["video_grid_thw"], labels=batch["labels"],
    )
    assert abs(ours.loss.item() - plain.loss.item()) <= 1e-5


def test_teacher_forced_alignment_uses_state_before_each_slot(model, tokenizer):
    batch, layout = make_batch(model, tokenizer, num_latents=3)
    targets = torch.randn(len(GRIDS_THW), 3, model.text_config.hidden_size)
    with torch.no_grad():
        out = model(batch, layout, mode="single", targets_BKD=targets)
        # recompute the hidden states directly with the targets written into the slots
        visual = model.encode_video(batch["pixel_values_videos"], batch["video_grid_thw"])
        embeds = model.input_embeddings(batch["input_ids"], visual)
        embeds[:, layout.slots] = targets
        hidden = model.decoder(embeds, model.rope_positions(batch), batch["attention_mask"], None, visual=visual,
                               video_mask_BT=batch["input_ids"] == model.video_token_id)
    torch.testing.assert_close(out.latents_BKD, hidden[:, layout.prefix_len - 1 : layout.suffix_start - 1])
    assert torch.allclose(out.align, F.mse_loss(out.latents_BKD, targets))


@pytest.mark.parametrize("num_latents", [0, 3])
def test_generate_matches_training_forward(model, tokenizer, num_latents):
    """Greedy generation's first answer token is the argmax of the training forward's logits at that column."""
    batch, layout = make_batch(model, tokenizer, num_latents=num_latents)
    model.eval()
    with torch.no_grad():
        out_ids = model.generate(
            {k: (v[:, : layout.prefix_len] if k in PER_TOKEN_KEYS else v) for k, v in batch.items() if k != "labels"},
            num_latents=num_latents, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), max_new_tokens=3)
        # reference: the non-cached rollout's hidden state at the column that predicts the first answer token
        visual = model.encode_video(batch["pixel_values_videos"], batch["video_grid_thw"])
        pos = model.rope_positions(batch)
        embeds = model.input_embeddings(batch["input_ids"], visual)
        P = layout.prefix_len
        for k in range(num_latents):
            hidden = model.decoder(embeds[:, : P + k], pos[:, :, : P + k], batch["attention_mask"][:, : P + k], None,
                                   visual=visual, video_mask_BT=(batch["input_ids"] == model.video_token_id)[:, : P + k])
            embeds[:, P + k] = hidden[:, -1]
        col = layout.suffix_start if num_latents else P - 1
        hidden = model.decoder(embeds[:, : col + 1], pos[:, :, : col + 1], batch["attention_mask"][:, : col + 1], None,
                               visual=visual, video_mask_BT=(batch["input_ids"] == model.video_token_id)[:, : col + 1])
        expected_first = model.backbone.lm_head(hidden[:, -1]).argmax(-1)
    model.train()
    assert out_ids.shape[0] == len(GRIDS_THW) and 1 <= out_ids.shape[1] <= 3
    assert torch.equal(out_ids[:, 0], expected_first)


def test_activation_checkpointing_keeps_the_rollout_exact(tokenizer):
    """HF layer checkpointing drops the KV cache; the rollout must switch it off for its passes and stay exact."""
    cfg = dict(backbone="qwen2_5_vl-micro", dtype="float32", attn_implementation="sdpa")
    plain = build_model(ModelConfig(**cfg), tokenizer, seed=0).train()
    checkpointed = build_model(ModelConfig(**cfg, activation_checkpointing=True), tokenizer, seed=0).train()
    checkpointed.load_state_dict(plain.state_dict())
    batch, layout = make_batch(plain, tokenizer, num_latents=3)
    results = []
    for model in (plain, checkpointed):
        model.zero_grad()
        out = model(batch, layout, mode="rollout")
        out.loss.backward()
        results.append((out.loss.item(), grads(model)))
    assert abs(results[0][0] - results[1][0]) <= 1e-6
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-6, rtol=1e-5, msg=name)
    layers = checkpointed.backbone.model.language_model.layers
    assert all(layer.gradient_checkpointing for layer in layers)  # restored after the rollout


def test_masked_extra_latent_steps_leave_the_result_exact(model, tokenizer):
    """Under ZeRO-3 a rank with K=2 runs as many latent passes as a rank with K=5; the extra ones are masked out
    of every later pass, so its loss and gradients are those of the 2-step rollout."""
    batch, layout = make_batch(model, tokenizer, num_latents=2)

    def rollout(num_steps):
        model.zero_grad()
        visual = model.encode_video(batch["pixel_values_videos"], batch["video_grid_thw"])
        embeds = model.input_embeddings(batch["input_ids"], visual)
        out = model._forward_mode("rollout", batch, layout, None, embeds, model.rope_positions(batch), visual,
                                  batch["input_ids"] == model.video_token_id, num_steps)
        out.loss.backward()
        return out.loss.item(), grads(model)

    (loss2, grads2), (loss5, grads5) = rollout(2), rollout(5)
    assert abs(loss2 - loss5) <= 1e-6
    for name, grad in grads2.items():
        scale = max(1.0, grad.abs().max().item())
        assert (grad - grads5[name]).abs().max().item() <= 1e-5 * scale, name
