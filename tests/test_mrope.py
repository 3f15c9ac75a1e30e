"""The one mRoPE rule (model/mrope.py): hand examples, bad input, and training == inference at long-video timing.

Long-video timing: 2 s and 30 s per temporal patch (32 frames of a 16-min Video-MME video is ~30 s per 2-frame
patch). With the micro Qwen2.5-VL's 8 temporal units per second that is 16 and 240 position units per patch, so a
4-patch video's temporal axis ends 48 / 720 positions after its start while its spatial axes end 1 after it.
"""

from __future__ import annotations

import pytest
import torch

from storms_dist.model.build import ModelConfig, build_model, latent_token_ids
from storms_dist.model.latent import collate_latent_batch
from storms_dist.model.mrope import (
    continuation_positions,
    mrope_positions,
    vision_block_positions,
)

BACKBONES = ["qwen2_5_vl-micro", "qwen3_vl-micro"]
GRIDS_THW = [(4, 4, 4), (2, 4, 6), (4, 4, 8)]  # raw patch grids; merged LLM grids are (t, h/2, w/2)
PER_TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")


# ---- the rule, by hand ----
def test_text_after_a_video_continues_at_the_video_max_plus_one():
    # 2 text tokens, a video of LLM grid (t=3, h=2, w=2) at 10 units per patch, 2 text tokens
    types = torch.tensor([[0, 0] + [2] * 12 + [0, 0]])
    pos = mrope_positions(types, None, torch.tensor([[3, 4, 4]]), family="qwen2_5_vl", spatial_merge_size=2,
                          tokens_per_second=5, second_per_grid_ts_N=[2.0])
    assert pos[:, 0, :2].tolist() == [[0, 1]] * 3
    video = pos[:, 0, 2:14]
    assert video[0].tolist() == [2] * 4 + [12] * 4 + [22] * 4  # time: start + 10 * patch
    assert video[1].tolist() == [2, 2, 3, 3] * 3 and video[2].tolist() == [2, 3, 2, 3] * 3
    assert pos[:, 0, 14:].tolist() == [[23, 24]] * 3  # 22 + 1 on every axis, not start + max(h, w) = 4


def test_qwen3_blocks_per_temporal_patch_and_padding():
    # left padding (mask 0), then per temporal patch: one timestamp token + a block of h*w = 1 merged token
    types = torch.tensor([[0, 0, 0, 2, 0, 2, 0], [0, 0, 0, 2, 0, 2, 0]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    grids = torch.tensor([[2, 2, 2], [2, 2, 2]])
    pos = mrope_positions(types, mask, grids, family="qwen3_vl", spatial_merge_size=2)
    assert pos[0, 0].tolist() == [0, 0, 1, 2, 3, 4, 5]  # padded column at 0, then 0.. (time step 0 per block)
    assert pos[0, 1].tolist() == [0, 1, 2, 3, 4, 5, 6]
    # one merged token per block: its three axes coincide, so max + 1 is the plain running count
    assert torch.equal(pos[0], pos[1]) and torch.equal(pos[0], pos[2])


def test_fractional_steps_accumulate_before_truncation():
    # 0.5 s per patch at 3 units/s = 1.5 units: 0, 1.5, 3, 4.5 -> 0, 1, 3, 4 (not 0, 1, 2, 3)
    assert vision_block_positions(0, (4, 1, 1), 1.5)[0].tolist() == [0, 1, 3, 4]


@pytest.mark.parametrize("types, grids, message", [
    ([[0, 2, 2, 2, 0]], [[1, 4, 4]], r"^mm_token_type_ids row 0: a video block of 3 tokens, but video 0's grid gives 4$"),
    ([[0, 2, 0, 2, 0]], [[1, 2, 2]], r"^mm_token_type_ids row 0: more video blocks than video_grid_thw describes"),
    ([[0, 0, 0]], [[1, 2, 2]], r"^video_grid_thw describes 1 video blocks, the token types hold 0$"),
    ([[0, 1, 0]], None, r"^mm_token_type_ids row 0: token type 1 is not supported"),
    ([[0, 2, 0]], [[1, 3, 2]], r"^video_grid_thw\[0\]: h, w must be multiples of the spatial merge size 2"),
])
def test_bad_input_is_one_clear_error(types, grids, message):
    with pytest.raises(ValueError, match=message):
        mrope_positions(torch.tensor(types), None, None if grids is None else torch.tensor(grids),
                        family="qwen2_5_vl", spatial_merge_size=2, tokens_per_second=2)


# ---- training == inference on the micro backbones, long-video timing ----
@pytest.fixture(scope="module", params=BACKBONES)
def model(request, tokenizer):
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone=request.param, dtype="float32", attn_implementation="sdpa"),
                       tokenizer, seed=0).eval()


def long_video_batch(model, tokenizer, num_latents: int, second_per_grid_t: float):
    """Prompts of different lengths (so rows are left-padded differently), a real video placeholder layout per
    family, and a short question after the video: the temporal overhang is not hidden by a long text tail."""
    ids = tokenizer.convert_tokens_to_ids
    vs, ve, vid, im_end = ids("<|vision_start|>"), ids("<|vision_end|>"), ids("<|video_pad|>"), ids("<|im_end|>")
    patch = model.backbone.config.vision_config.patch_size
    gen = torch.Generator().manual_seed(1)
    prompts, answers, pixels = [], [], []
    for row, (t, h, w) in enumerate(GRIDS_THW):
        prompt = torch.randint(10, 5000, (row + 2,), generator=gen).tolist()
        if model.spec.family == "qwen2_5_vl":
            prompt += [vs] + [vid] * (t * h * w // 4) + [ve]
        else:  # one block per temporal patch after its "<x.y seconds>" text
            for chunk in range(t):
                prompt += tokenizer.encode(f"<{chunk * second_per_grid_t:.1f} seconds>") + [vs]
                prompt += [vid] * (h * w // 4) + [ve]
        prompts.append(prompt + [11, 12])
        answers.append([int(torch.randint(20, 80, (1,), generator=gen)), im_end])
        pixels.append(torch.randn(t * h * w, 3 * 2 * patch * patch, generator=gen))
    types = [[2 if x == vid else 0 for x in p] for p in prompts]
    batch, layout = collate_latent_batch(prompts, types, answers, num_latents=num_latents,
                                         ids=latent_token_ids(tokenizer), pad_id=tokenizer.pad_token_id)
    batch.update(pixel_values_videos=torch.cat(pixels), video_grid_thw=torch.tensor(GRIDS_THW),
                 second_per_grid_ts=torch.full((len(GRIDS_THW),), second_per_grid_t))
    return batch, layout


def prefix_only(batch, layout):
    return {k: (v[:, : layout.prefix_len] if k in PER_TOKEN_KEYS else v) for k, v in batch.items() if k != "labels"}


@pytest.mark.parametrize("second_per_grid_t", [2.0, 30.0])
def test_rollout_training_positions_equal_inference_positions(model, tokenizer, second_per_grid_t):
    batch, layout = long_video_batch(model, tokenizer, 4, second_per_grid_t)
    train_pos = model.rope_positions(batch)  # what forward(mode="rollout") slices per pass
    prefix_pos = model.rope_positions(prefix_only(batch, layout))
    assert torch.equal(train_pos[:, :, : layout.prefix_len], prefix_pos)
    # slots, then <|latent_end|> and the first answer token: generate's continuation of the prefix
    appended = continuation_positions(prefix_pos, layout.num_latents + 2)
    cols = slice(layout.prefix_len, layout.suffix_start + 2)
    assert torch.equal(train_pos[:, :, cols], appended)
    if model.spec.family == "qwen2_5_vl":  # the temporal axis holds the prefix maximum: the case that broke
        step = 8 * second_per_grid_t
        assert int(prefix_pos[0].amax()) >= 3 * step and int(appended[0, 0, 0]) > 3 * step


@pytest.mark.parametrize("second_per_grid_t", [2.0, 30.0])
def test_generate_per_step_logits_equal_a_full_recompute(model, tokenizer, second_per_grid_t):
    """Every lm_head call of the cached ``generate`` equals the same sequence recomputed from scratch with the
    rule's positions for the whole sequence (fp32, 1e-5)."""
    num_latents, max_new = 3, 3
    batch, layout = long_video_batch(model, tokenizer, num_latents, second_per_grid_t)
    prefix = prefix_only(batch, layout)
    recorded = []
    hook = model.backbone.lm_head.register_forward_hook(lambda _m, _i, out: recorded.append(out.detach().clone()))
    try:
        with torch.no_grad():
            out_ids = model.generate(prefix, num_latents=num_latents, eos_token_id=-1, max_new_tokens=max_new)
    finally:
        hook.remove()
    assert out_ids.shape == (len(GRIDS_THW), max_new) and len(recorded) == max_new

    with torch.no_grad():
        visual = model.encode_video(batch["pixel_values_videos"], batch["video_grid_thw"])
        embeds = model.input_embeddings(prefix["input_ids"], visual)
        types, mask = prefix["mm_token_type_ids"], prefix["attention_mask"]
        num_rows = types.shape[0]

        def full_pass(embeds_BTD):
            """No cache: the whole sequence so far, appended columns being text, positions from the rule."""
            extra = embeds_BTD.shape[1] - types.shape[1]
            zeros = types.new_zeros(num_rows, extra)
            full_batch = dict(prefix, mm_token_type_ids=torch.cat([types, zeros], 1),
                              attention_mask=torch.cat([mask, mask.new_ones(num_rows, extra)], 1))
            video_mask = torch.cat([prefix["input_ids"] == model.video_token_id, zeros.bool()], 1)
            return model.decoder(embeds_BTD, model.rope_positions(full_batch), full_batch["attention_mask"], None,
                                 visual=visual, video_mask_BT=video_mask)[:, -1:]

        for _ in range(num_latents):  # each latent slot is fed the last hidden state of a full recompute
            embeds = torch.cat([embeds, full_pass(embeds)], dim=1)
        end = torch.full((num_rows, 1), model.token_ids.end)
        embeds = torch.cat([embeds, model.embed(end)], dim=1)
        for t in range(max_new):
            expected = model.backbone.lm_head(full_pass(embeds)[:, -1])
            torch.testing.assert_close(recorded[t], expected, atol=1e-5, rtol=0, msg=f"decode step {t}")
            embeds = torch.cat([embeds, model.embed(out_ids[:, t : t + 1])], dim=1)
