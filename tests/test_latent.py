"""The latent mechanism's pure rules: batch layout, target pooling, alignment loss, continuation positions."""

from __future__ import annotations

import math

import pytest
import torch

from storms_dist.model.build import latent_token_ids
from storms_dist.model.latent import (
    IGNORE_INDEX,
    LATENT_TOKENS,
    LatentTokenIds,
    SlotLayout,
    alignment_loss,
    answer_turn,
    collate_latent_batch,
    continuation_positions,
    pool_region_targets,
    pool_targets,
)


@pytest.fixture(scope="module")
def ids(tokenizer) -> LatentTokenIds:
    return latent_token_ids(tokenizer)


@pytest.fixture(scope="module")
def special(tokenizer) -> dict[str, int]:
    conv = tokenizer.convert_tokens_to_ids
    return {"pad": tokenizer.pad_token_id, "im_end": conv("<|im_end|>"), "video": conv("<|video_pad|>"),
            "vs": conv("<|vision_start|>"), "ve": conv("<|vision_end|>")}


def make_rows(special):
    """Three prompts of lengths 9, 5, 12 with video placeholders (mm type 2) and answers of lengths 2, 3, 1."""
    v = special["video"]
    prompts = [
        [11, 12, special["vs"], v, v, v, special["ve"], 13, 14],
        [21, special["vs"], v, special["ve"], 22],
        [31, 32, 33, special["vs"], v, v, v, v, v, special["ve"], 34, 35],
    ]
    types = [[2 if t == v else 0 for t in p] for p in prompts]
    answers = [[40, special["im_end"]], [41, 42, special["im_end"]], [special["im_end"]]]
    return prompts, types, answers


def test_latent_tokens_are_distinct_special_tokens(tokenizer, ids):
    assert len({ids.start, ids.pad, ids.end}) == 3
    assert tokenizer.convert_ids_to_tokens([ids.start, ids.pad, ids.end]) == list(LATENT_TOKENS)
    # each is a single token, never split by the tokenizer
    for token, tid in zip(LATENT_TOKENS, (ids.start, ids.pad, ids.end)):
        assert tokenizer.encode(token, add_special_tokens=False) == [tid]
    assert tokenizer.pad_token_id not in (ids.start, ids.pad, ids.end)


@pytest.mark.parametrize("num_latents", [0, 3])
def test_collate_layout(ids, special, num_latents):
    prompts, types, answers = make_rows(special)
    pad = special["pad"]
    batch, layout = collate_latent_batch(prompts, types, answers, num_latents=num_latents, ids=ids, pad_id=pad)
    K = num_latents
    tail = 1 if K else 0  # <|latent_start|> joins the prefix, <|latent_end|> leads the suffix
    assert layout == SlotLayout(prefix_len=12 + tail, num_latents=K, suffix_len=3 + tail)
    B, L = 3, layout.seq_len
    assert set(batch) == {"input_ids", "attention_mask", "mm_token_type_ids", "labels"}
    for key, tensor in batch.items():
        assert tensor.shape == (B, L), key
    assert batch["input_ids"].dtype == torch.long and batch["labels"].dtype == torch.long
    assert batch["attention_mask"].dtype == torch.long and batch["mm_token_type_ids"].dtype == torch.int32

    P, S = layout.prefix_len, layout.suffix_start
    for row, (prompt, mm, answer) in enumerate(zip(prompts, types, answers)):
        ids_row = batch["input_ids"][row].tolist()
        mask_row = batch["attention_mask"][row].tolist()
        types_row = batch["mm_token_type_ids"][row].tolist()
        labels_row = batch["labels"][row].tolist()
        prefix = [*prompt, ids.start] if K else list(prompt)
        suffix = [ids.end, *answer] if K else list(answer)
        left = P - len(prefix)
        right = layout.suffix_len - len(suffix)
        # left-padded prefix, then K slots of <|latent_pad|>, then the right-padded suffix
        expected_ids = [pad] * left + prefix + [ids.pad] * K + suffix + [pad] * right
        assert ids_row == expected_ids
        if K:
            assert ids_row[P - 1] == ids.start  # every row's <|latent_start|> in the same column
            assert ids_row[S] == ids.end and ids_row[S + 1 : S + 1 + len(answer)] == answer
        else:
            assert ids_row[P - len(prompt) : P] == prompt  # prompt ends right before the answer column
            assert ids_row[S : S + len(answer)] == answer
        # attention exactly on the real tokens (prefix, slots, suffix) and never on padding
        assert mask_row == [0] * left + [1] * (len(prefix) + K + len(suffix)) + [0] * right
        # mm token types: the prompt's, at the prompt's columns; zero elsewhere (markers, slots, suffix, padding)
        assert types_row == [0] * left + mm + [0] * (tail + K + len(suffix) + right)
        # labels: the answer tokens only, at their own columns
        expected_labels = [IGNORE_INDEX] * L
        answer_start = S + tail
        expected_labels[answer_start : answer_start + len(answer)] = answer
        assert labels_row == expected_labels
    if K:
        assert (batch["input_ids"][:, P - 1] == ids.start).all()
        assert (batch["input_ids"][:, layout.slots] == ids.pad).all()
        assert (batch["attention_mask"][:, layout.slots] == 1).all()
        assert (batch["input_ids"][:, S] == ids.end).all()
        # the markers and slots are never supervised
        for tid in (ids.start, ids.pad, ids.end):
            assert not (batch["labels"] == tid).any()
        assert (batch["labels"][:, : S + 1] == IGNORE_INDEX).all()
    else:
        for tid in (ids.start, ids.pad, ids.end):
            assert not (batch["input_ids"] == tid).any()
    # supervised tokens = sum of answer lengths
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == sum(map(len, answers))


def test_collate_prompts_of_equal_length_need_no_padding(ids, special):
    prompt = [5, 6, 7]
    batch, layout = collate_latent_batch([prompt, prompt], [[0, 0, 0]] * 2, [[8, 9], [8, 9]], num_latents=2, ids=ids,
                                         pad_id=special["pad"])
    assert layout == SlotLayout(4, 2, 3)
    assert (batch["attention_mask"] == 1).all()
    assert batch["input_ids"][0].tolist() == [5, 6, 7, ids.start, ids.pad, ids.pad, ids.end, 8, 9]


def test_collate_without_answers_is_prefix_only(ids, special):
    """Inference batches (empty answers): the suffix is just <|latent_end|> (K > 0) or empty (K = 0)."""
    prompts, types, _ = make_rows(special)
    batch, layout = collate_latent_batch(prompts, types, [[], [], []], num_latents=2, ids=ids, pad_id=special["pad"])
    assert layout == SlotLayout(13, 2, 1)
    assert (batch["labels"] == IGNORE_INDEX).all()
    batch0, layout0 = collate_latent_batch(prompts, types, [[], [], []], num_latents=0, ids=ids, pad_id=special["pad"])
    assert layout0 == SlotLayout(12, 0, 0)
    assert (batch0["labels"] == IGNORE_INDEX).all()


def test_collate_mismatched_mm_types_raises(ids, special):
    prompts, types, answers = make_rows(special)
    types[1] = types[1][:-1]
    with pytest.raises(ValueError, match=r"5 tokens but 4 mm_token_type_ids"):
        collate_latent_batch(prompts, types, answers, num_latents=3, ids=ids, pad_id=special["pad"])


def test_collate_mismatched_row_counts_raise(ids, special):
    prompts, types, answers = make_rows(special)
    with pytest.raises(ValueError):
        collate_latent_batch(prompts, types, answers[:2], num_latents=3, ids=ids, pad_id=special["pad"])


def test_answer_turn(ids):
    assert answer_turn(0, [7, 8], ids) == ([], [7, 8])
    assert answer_turn(4, [7, 8], ids) == ([ids.start], [ids.end, 7, 8])
    assert answer_turn(1, [], ids) == ([ids.start], [ids.end])
    with pytest.raises(ValueError, match="num_latents"):
        answer_turn(-1, [7], ids)


def test_slot_layout_properties():
    layout = SlotLayout(prefix_len=10, num_latents=4, suffix_len=3)
    assert layout.slots == slice(10, 14)
    assert layout.suffix_start == 14
    assert layout.seq_len == 17
    assert list(range(17))[layout.slots] == [10, 11, 12, 13]
    empty = SlotLayout(prefix_len=5, num_latents=0, suffix_len=2)
    assert empty.slots == slice(5, 5) and list(range(7))[empty.slots] == []
    assert empty.suffix_start == 5 and empty.seq_len == 7
    with pytest.raises(AttributeError):
        layout.prefix_len = 3  # frozen


# ---- pool_targets ----
def test_pool_targets_divisible():
    tokens = torch.arange(6 * 2, dtype=torch.float32).reshape(6, 2)  # rows [0,1],[2,3],...,[10,11]
    pooled = pool_targets(tokens, 3)
    expected = torch.tensor([[1.0, 2.0], [5.0, 6.0], [9.0, 10.0]])  # means of rows (0,1), (2,3), (4,5)
    assert pooled.shape == (3, 2)
    torch.testing.assert_close(pooled, expected)
    torch.testing.assert_close(pool_targets(tokens, 1), tokens.mean(0, keepdim=True))
    torch.testing.assert_close(pool_targets(tokens, 6), tokens)


def test_pool_targets_not_divisible_first_groups_larger():
    tokens = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0], [6.0], [7.0]])  # M = 7, K = 3 -> groups 3, 2, 2
    pooled = pool_targets(tokens, 3)
    torch.testing.assert_close(pooled, torch.tensor([[2.0], [4.5], [6.5]]))
    # M = 11, K = 4 -> 11 % 4 = 3 groups of 3, then one of 2
    tokens = torch.randn(11, 5, generator=torch.Generator().manual_seed(0))
    pooled = pool_targets(tokens, 4)
    bounds = [(0, 3), (3, 6), (6, 9), (9, 11)]
    expected = torch.stack([tokens[a:b].mean(0) for a, b in bounds])
    torch.testing.assert_close(pooled, expected)
    # no token dropped: the size-weighted mean of the groups is the mean of all tokens
    sizes = torch.tensor([b - a for a, b in bounds], dtype=torch.float32)
    torch.testing.assert_close((pooled * sizes[:, None]).sum(0) / 11, tokens.mean(0))


def test_pool_targets_fewer_tokens_than_slots_repeats_each_state():
    tokens = torch.arange(6.0).view(3, 2)
    torch.testing.assert_close(pool_targets(tokens, 6), tokens[[0, 0, 1, 1, 2, 2]])
    torch.testing.assert_close(pool_targets(tokens[:2], 8), tokens[[0, 0, 0, 0, 1, 1, 1, 1]])


def test_pool_targets_errors():
    with pytest.raises(ValueError, match="cannot pool 3 visual tokens into 4 groups"):
        pool_targets(torch.zeros(3, 2), 4)
    with pytest.raises(ValueError, match="num_latents must be > 0"):
        pool_targets(torch.zeros(3, 2), 0)
    with pytest.raises(ValueError, match="num_latents must be > 0"):
        pool_targets(torch.zeros(3, 2), -1)


# ---- alignment_loss ----
def test_alignment_loss_mse_hand_computed():
    latents = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])  # [B=1, K=2, D=2]
    targets = torch.tensor([[[0.0, 0.0], [3.0, -1.0]]])
    # squared errors 1, 4, 9, 1 -> mean 15 / 4
    loss = alignment_loss(latents, targets, "mse")
    assert loss.shape == ()
    assert loss.item() == pytest.approx(15 / 4)
    assert alignment_loss(latents, latents.clone(), "mse").item() == 0.0


def test_alignment_loss_cosine_hand_computed():
    latents = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[2.0, 0.0], [0.0, 3.0]]])  # [B=2, K=2, D=2]
    targets = torch.tensor([[[0.0, 5.0], [2.0, 2.0]], [[-1.0, 0.0], [0.0, 1.0]]])
    # cosines: 0 (orthogonal), 1 (parallel), -1 (opposite), 1 (parallel) -> 1 - cos = 1, 0, 2, 0 -> mean 0.75
    loss = alignment_loss(latents, targets, "cosine")
    assert loss.item() == pytest.approx(0.75)
    # scale-invariant, unlike mse
    assert alignment_loss(latents * 7, targets, "cosine").item() == pytest.approx(0.75)
    theta = torch.tensor(math.pi / 3)
    one = alignment_loss(torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[torch.cos(theta), torch.sin(theta)]]]), "cosine")
    assert one.item() == pytest.approx(0.5)


def test_alignment_loss_casts_targets_and_keeps_gradient():
    latents = torch.tensor([[[1.0, 2.0]]], dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[[0.0, 0.0]]], dtype=torch.float32)
    loss = alignment_loss(latents, targets, "mse")
    assert loss.dtype == torch.float64
    loss.backward()
    torch.testing.assert_close(latents.grad, torch.tensor([[[1.0, 2.0]]], dtype=torch.float64))  # 2 * x / 2


def test_alignment_loss_unknown_kind():
    x = torch.zeros(1, 1, 2)
    with pytest.raises(ValueError, match="'l1'"):
        alignment_loss(x, x, "l1")  # type: ignore[arg-type]


# ---- continuation_positions ----
def test_continuation_positions_hand_example():
    # [3, B=2, P=4]: row 0's maximum (9) is on the height axis, row 1's (5) on the temporal axis
    prefix = torch.tensor([
        [[0, 1, 2, 3], [0, 0, 5, 4]],   # temporal
        [[0, 1, 9, 3], [0, 0, 1, 2]],   # height
        [[0, 1, 2, 3], [0, 0, 1, 3]],   # width
    ])
    pos = continuation_positions(prefix, 3)
    assert pos.shape == (3, 2, 3)
    expected_rows = torch.tensor([[10, 11, 12], [6, 7, 8]])
    for axis in range(3):
        assert torch.equal(pos[axis], expected_rows)
    assert pos.dtype == prefix.dtype
    assert continuation_positions(prefix, 0).shape == (3, 2, 0)
    single = continuation_positions(prefix, 1)
    assert torch.equal(single[:, :, 0], torch.tensor([[10, 6]] * 3))


def test_pool_region_targets_pools_each_panel_apart():
    tokens = torch.arange(12.0).repeat_interleave(2).view(12, 2)  # 6 temporal patches x 2 panels, (patch, panel) order
    pooled = pool_region_targets(tokens, 3, 2)
    assert pooled.shape == (3, 2, 2)
    torch.testing.assert_close(pooled[:, 0], pool_targets(tokens[0::2], 3))  # panel 0: tokens 0, 2, 4, ...
    torch.testing.assert_close(pooled[:, 1, 0], torch.tensor([2.0, 6.0, 10.0]))  # panel 1: (1+3)/2, (5+7)/2, ...
    with pytest.raises(ValueError, match="into 5 panels"):
        pool_region_targets(tokens, 3, 5)
