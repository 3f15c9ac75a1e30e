"""Chat prompts with the real Qwen tokenizer: exact formats, tokenisation round-trip, placeholder counts, mRoPE
on tiny Qwen2.5-VL / Qwen3-VL models fed by the whole sampling -> preprocessing -> prompt chain, answer parsing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from storms_dist.data.preprocess import ResizeConfig, VisionSpec, preprocess_video
from storms_dist.data.prompt import (
    FAMILY_DEFAULT,
    MC_INSTRUCTION,
    answer_tokens,
    build_prompt,
    build_prompt_text,
    extract_answer_letter,
    load_tokenizer,
    qwen_tokenizer_dir,
)
from storms_dist.data.sampling import FrameSamplingConfig, sample_frame_indices, sampled_timestamps, second_per_grid_t

LATENT_TOKENS = ("<|latent_start|>", "<|latent_pad|>", "<|latent_end|>")
SPECIAL_IDS = {"<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652, "<|vision_end|>": 151653,
               "<|image_pad|>": 151655, "<|video_pad|>": 151656}
QUESTION, OPTIONS = "What is the man holding?", ["a cup", "a phone", "nothing"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(LATENT_TOKENS)


def _prompt(tok, family, grid=(2, 4, 6), times=(0.0, 0.5, 1.0, 1.5), **kwargs):
    args = dict(question=QUESTION, options=OPTIONS, video_grid_thw=torch.tensor(grid), timestamps_s=list(times))
    args.update(kwargs)
    return build_prompt(tok, family, **args), build_prompt_text(family, **args)


# ---------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_is_the_real_qwen_one(tok):
    assert (qwen_tokenizer_dir() / "tokenizer.json").is_file()
    base = load_tokenizer()
    assert len(base) == 151_669  # adding latent tokens elsewhere did not touch the cached base tokenizer
    for token, token_id in SPECIAL_IDS.items():
        assert base.convert_tokens_to_ids(token) == token_id == tok.convert_tokens_to_ids(token)
    assert load_tokenizer(LATENT_TOKENS) is tok  # cached per token tuple
    with pytest.raises(ValueError, match="^extra_special_tokens: expected"):
        load_tokenizer(["<|x|>", "<|x|>"])


def test_latent_tokens_encode_to_single_new_ids(tok):
    ids = tok.convert_tokens_to_ids(list(LATENT_TOKENS))
    assert ids == [151_669, 151_670, 151_671] and len(tok) == 151_672
    text = "x<|latent_start|><|latent_pad|><|latent_pad|><|latent_end|>y"
    encoded = tok.encode(text, add_special_tokens=False)
    assert encoded[1:-1] == [ids[0], ids[1], ids[1], ids[2]]
    assert tok.decode(encoded) == text


# ------------------------------------------------------------------------------------------------- formats
def test_qwen25_prompt_format_is_the_chat_template(tok):
    _, text = _prompt(tok, "qwen2_5_vl", grid=(1, 2, 4))
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|video_pad|><|video_pad|><|vision_end|>"
        "What is the man holding?\nA. a cup\nB. a phone\nC. nothing\n"
        "Answer with the option's letter from the given choices directly.<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_qwen3_prompt_format_has_timestamped_groups_and_no_system_turn(tok):
    _, text = _prompt(tok, "qwen3_vl", grid=(2, 2, 4), times=(0.0, 0.5, 1.0, 1.5))
    assert text == (
        "<|im_start|>user\n"
        "<0.2 seconds><|vision_start|><|video_pad|><|video_pad|><|vision_end|>"  # mean of 0.0 and 0.5, as HF
        "<1.2 seconds><|vision_start|><|video_pad|><|video_pad|><|vision_end|>"
        "What is the man holding?\nA. a cup\nB. a phone\nC. nothing\n"
        "Answer with the option's letter from the given choices directly.<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_system_turn_options(tok):
    _, no_system = _prompt(tok, "qwen2_5_vl", system=None)
    assert no_system.startswith("<|im_start|>user\n")
    _, custom = _prompt(tok, "qwen3_vl", system="Be brief.")
    assert custom.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    _, default = _prompt(tok, "qwen2_vl", system=FAMILY_DEFAULT)
    assert default.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


def test_text_only_and_open_ended_prompts(tok):
    prompt, text = _prompt(tok, "qwen3_vl", video_grid_thw=None, timestamps_s=None, options=[])
    assert text == f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    assert MC_INSTRUCTION not in text and set(prompt.mm_token_type_ids) == {0}


# ----------------------------------------------------------------------------------- ids, counts, round trip
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("grid, times", [((2, 4, 6), (0.0, 0.5, 1.0, 1.5)), ((3, 6, 4), (0.0, 1.0, 2.0, 3.0, 4.0)),
                                         ((1, 2, 2), (7.25,))])
def test_round_trip_counts_and_types(tok, family, grid, times):
    prompt, text = _prompt(tok, family, grid=grid, times=times)
    # Coconut-style verify: the parts tokenised separately equal the whole text tokenised at once
    assert prompt.input_ids == tok.encode(text, add_special_tokens=False)
    answer = answer_tokens(tok, "B")
    assert prompt.input_ids + answer == tok.encode(text + "B<|im_end|>", add_special_tokens=False)
    ids = np.array(prompt.input_ids)
    types = np.array(prompt.mm_token_type_ids)
    grid_t, grid_h, grid_w = grid
    assert len(types) == len(ids)
    assert (ids == SPECIAL_IDS["<|video_pad|>"]).sum() == grid_t * grid_h * grid_w // 4
    assert np.array_equal(types == 2, ids == SPECIAL_IDS["<|video_pad|>"]) and set(types.tolist()) <= {0, 2}
    num_groups = grid_t if family == "qwen3_vl" else 1
    assert (ids == SPECIAL_IDS["<|vision_start|>"]).sum() == (ids == SPECIAL_IDS["<|vision_end|>"]).sum() == num_groups
    assert ids[-3:].tolist() == tok.encode("<|im_start|>assistant\n", add_special_tokens=False)


def test_qwen3_needs_matching_timestamps(tok):
    with pytest.raises(ValueError, match="^timestamps_s: expected"):
        _prompt(tok, "qwen3_vl", timestamps_s=None)
    with pytest.raises(ValueError, match="^timestamps_s: expected 3-4 frame times for grid_t=2, got 6"):
        _prompt(tok, "qwen3_vl", grid=(2, 4, 4), times=(0, 1, 2, 3, 4, 5))
    with pytest.raises(ValueError, match="^video_grid_thw: expected"):
        _prompt(tok, "qwen2_5_vl", grid=(2, 3, 3))
    with pytest.raises(ValueError, match="^family: expected"):
        _prompt(tok, "llava")


def test_answer_tokens(tok):
    assert tok.decode(answer_tokens(tok, "B")) == "B<|im_end|>"
    assert answer_tokens(tok, "B")[-1] == SPECIAL_IDS["<|im_end|>"] and len(answer_tokens(tok, "B")) == 2


# ------------------------------------------------------------------------- whole chain through tiny models
def _tiny_model(family: str, tok):
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    ids = {k: tok.convert_tokens_to_ids(v) for k, v in dict(
        image_token_id="<|image_pad|>", video_token_id="<|video_pad|>", vision_start_token_id="<|vision_start|>",
        vision_end_token_id="<|vision_end|>").items()}
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096, pad_token_id=0,
                tie_word_embeddings=True)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, temporal_patch_size=2,
                  spatial_merge_size=2, out_hidden_size=32)
    if family == "qwen2_5_vl":
        config = Qwen2_5_VLConfig(
            text_config=dict(text, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                    "mrope_section": [2, 3, 3]}),
            vision_config=dict(vision, patch_size=14, window_size=56, fullatt_block_indexes=[0],
                               tokens_per_second=2), **ids)
        return Qwen2_5_VLForConditionalGeneration(config).eval()
    config = Qwen3VLConfig(
        text_config=dict(text, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                             "mrope_section": [4, 2, 2], "mrope_interleaved": True}),
        vision_config=dict(vision, patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0]), **ids)
    return Qwen3VLForConditionalGeneration(config).eval()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_sampling_preprocess_prompt_chain_through_tiny_model(tok, family):
    torch.manual_seed(0)
    model = _tiny_model(family, tok)
    spec = VisionSpec.from_hf_config(model.config)
    indices = sample_frame_indices(45, 15.0, FrameSamplingConfig(fps=2.0, max_frames=6))  # 3 s -> 6 frames
    frames = np.random.default_rng(0).integers(0, 256, (45, 60, 90, 3), dtype=np.uint8)[indices]
    budget = (32 * 32, 28 * 28 * 8) if family == "qwen2_5_vl" else (32 * 32, 32 * 32 * 4 * 6)
    video = preprocess_video(frames, spec, ResizeConfig(min_pixels=budget[0], max_pixels=budget[1]))
    grid_thw = video.video_grid_thw[None]
    prompt = build_prompt(tok, family, question=QUESTION, options=OPTIONS, video_grid_thw=video.video_grid_thw,
                          timestamps_s=sampled_timestamps(indices, 15.0), merge_size=spec.merge_size)
    input_ids = torch.tensor([prompt.input_ids])
    mm_token_type_ids = torch.tensor([prompt.mm_token_type_ids])
    extra = {}
    if family == "qwen2_5_vl":
        extra = dict(second_per_grid_ts=torch.tensor([second_per_grid_t(indices, 15.0, spec.temporal_patch_size)]))
    with torch.no_grad():
        # mRoPE consumes every grid entry: Qwen3-VL splits the grid per temporal patch, one per placeholder group
        position_ids, deltas = model.model.get_rope_index(input_ids, mm_token_type_ids, video_grid_thw=grid_thw,
                                                          **extra)
        assert position_ids.shape == (3, 1, input_ids.shape[1])
        assert int(position_ids.max()) + 1 - input_ids.shape[1] == int(deltas)
        grid_t, grid_h, grid_w = video.video_grid_thw.tolist()
        is_video = mm_token_type_ids[0] == 2
        starts = (is_video & ~torch.cat([torch.tensor([False]), is_video[:-1]])).nonzero().flatten().tolist()
        assert len(starts) == (grid_t if family == "qwen3_vl" else 1)  # placeholder groups
        group_len = grid_t * grid_h * grid_w // 4 // len(starts)
        for start in starts:
            t_pos, h_pos, w_pos = position_ids[:, 0, start:start + group_len]
            assert len(set(h_pos.tolist())) == grid_h // 2 and len(set(w_pos.tolist())) == grid_w // 2
            assert len(set(t_pos.tolist())) == (1 if family == "qwen3_vl" else grid_t)
        logits = model(input_ids=input_ids, mm_token_type_ids=mm_token_type_ids, video_grid_thw=grid_thw,
                       pixel_values_videos=video.pixel_values_videos, **extra).logits
    assert logits.shape == (1, input_ids.shape[1], len(tok)) and torch.isfinite(logits).all()


# --------------------------------------------------------------------------------------- answer extraction
@pytest.mark.parametrize("text, expected", [
    ("B", "B"), ("B.", "B"), ("(B)", "B"), ("[B]", "B"), ("b", "B"), (" c. ", "C"), ("The answer is B", "B"),
    ("The answer is B.", "B"), ("The answer is (C).", "C"), ("Answer: D", "D"), ("answer: (a)", None),
    ("B. blue", "B"), ("B) a phone", "B"), ("**C**", "C"), ("Option C", "C"), ("The correct choice is A.", "A"),
    ("I pick (D) here", "D"), ("C is correct", "C"), ("The answer is not A, the answer is C", "C"),
    ("A dog is running", None), ("E", None), ("The answer is E", None), ("", None), ("   ", None),
    ("It could be A or B", None), ("A is correct", "A"), ("I think it is D", "D"), ("no idea", None),
])
def test_extract_answer_letter(text, expected):
    assert extract_answer_letter(text, 4) == expected


def test_extract_answer_letter_respects_option_count():
    assert extract_answer_letter("E", 5) == "E"
    assert extract_answer_letter("E", 4) is None
    with pytest.raises(ValueError, match="^num_options: expected"):
        extract_answer_letter("A", 0)
