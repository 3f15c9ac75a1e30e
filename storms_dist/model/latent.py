"""The latent mechanism's rules, each written once as a pure function (training, targets and eval all call these).

Answer turn layout (K = num_latents):

    prompt ... <|im_start|>assistant\\n <|latent_start|> <|latent_pad|> x K <|latent_end|> answer <|im_end|>
    `------------------ prefix (left-padded) -----------'`- K slots --'`------ suffix (right-padded) -----'

A latent slot's input embedding is the last-layer hidden state of the position before it (Coconut). Left-padding the
prefix puts every row's slots in the same columns, so the rollout advances one column at a time for the whole batch.
K = 0 drops the three latent tokens entirely: the answer-only SFT baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from storms_dist.model.mrope import continuation_positions  # noqa: F401  (re-exported: the rule lives in mrope)

LATENT_START, LATENT_PAD, LATENT_END = "<|latent_start|>", "<|latent_pad|>", "<|latent_end|>"
LATENT_TOKENS = (LATENT_START, LATENT_PAD, LATENT_END)
IGNORE_INDEX = -100


@dataclass(frozen=True)
class LatentTokenIds:
    start: int
    pad: int
    end: int


@dataclass(frozen=True)
class SlotLayout:
    """Column geometry of a collated batch: ``[0, prefix_len)`` prefix, then K slots, then the suffix."""

    prefix_len: int
    num_latents: int
    suffix_len: int

    @property
    def slots(self) -> slice:
        return slice(self.prefix_len, self.prefix_len + self.num_latents)

    @property
    def suffix_start(self) -> int:
        return self.prefix_len + self.num_latents

    @property
    def seq_len(self) -> int:
        return self.prefix_len + self.num_latents + self.suffix_len


def answer_turn(num_latents: int, answer_ids: Sequence[int], ids: LatentTokenIds) -> tuple[list[int], list[int]]:
    """(prefix tail, suffix) token ids that follow the prompt: ``[start]``, ``[end] + answer`` (both empty tails at K=0)."""
    if num_latents < 0:
        raise ValueError(f"num_latents must be >= 0, got {num_latents}")
    if num_latents == 0:
        return [], list(answer_ids)
    return [ids.start], [ids.end, *answer_ids]


def collate_latent_batch(
    prompts: Sequence[Sequence[int]],
    prompt_mm_types: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    *,
    num_latents: int,
    ids: LatentTokenIds,
    pad_id: int,
) -> tuple[dict[str, torch.Tensor], SlotLayout]:
    """Lay a batch out as ``[left-padded prefix | K latent slots | right-padded suffix]``.

    Returns ``input_ids``/``attention_mask``/``mm_token_type_ids``/``labels`` of shape [B, L] and the column layout.
    Labels are set on answer tokens only (``answer`` already ends with the end-of-turn token); the latent markers
    and slots are never supervised: ``<|latent_end|>`` is forced at inference.
    """
    num_rows = len(prompts)
    prefixes, suffixes, prefix_types = [], [], []
    for prompt, mm_types, answer in zip(prompts, prompt_mm_types, answers, strict=True):
        if len(prompt) != len(mm_types):
            raise ValueError(f"prompt has {len(prompt)} tokens but {len(mm_types)} mm_token_type_ids")
        tail, suffix = answer_turn(num_latents, answer, ids)
        prefixes.append([*prompt, *tail])
        prefix_types.append([*mm_types, *([0] * len(tail))])
        suffixes.append(suffix)
    layout = SlotLayout(max(map(len, prefixes)), num_latents, max(map(len, suffixes)))

    input_ids = torch.full((num_rows, layout.seq_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((num_rows, layout.seq_len), dtype=torch.long)
    mm_token_type_ids = torch.zeros((num_rows, layout.seq_len), dtype=torch.int32)
    labels = torch.full((num_rows, layout.seq_len), IGNORE_INDEX, dtype=torch.long)
    input_ids[:, layout.slots] = ids.pad
    attention_mask[:, layout.slots] = 1
    for row, (prefix, types, suffix) in enumerate(zip(prefixes, prefix_types, suffixes)):
        start = layout.prefix_len - len(prefix)
        input_ids[row, start : layout.prefix_len] = torch.tensor(prefix)
        mm_token_type_ids[row, start : layout.prefix_len] = torch.tensor(types, dtype=torch.int32)
        attention_mask[row, start : layout.prefix_len] = 1
        end = layout.suffix_start + len(suffix)
        input_ids[row, layout.suffix_start : end] = torch.tensor(suffix)
        attention_mask[row, layout.suffix_start : end] = 1
        num_answer = len(suffix) - (1 if num_latents > 0 else 0)
        labels[row, end - num_answer : end] = torch.tensor(suffix[len(suffix) - num_answer :])
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids, labels=labels)
    return batch, layout


def pool_targets(visual_tokens_MD: torch.Tensor, num_latents: int) -> torch.Tensor:
    """Thought-video targets: split the M visual tokens (temporal order) into K contiguous groups and mean each.

    Groups differ in size by at most one token (the first ``M % K`` groups take the extra one), so no token is
    dropped; group i covers roughly the i-th temporal chunk of the thought video. With fewer tokens than slots
    (K a multiple of M, e.g. the K = 16 ablation on an 8-token thought video) slot i takes token ``i * M // K``:
    each state is held for K / M consecutive latent steps.
    """
    num_tokens = visual_tokens_MD.shape[0]
    if num_latents <= 0:
        raise ValueError(f"num_latents must be > 0 to pool targets, got {num_latents}")
    if num_tokens < num_latents:
        if num_latents % num_tokens:
            raise ValueError(f"cannot pool {num_tokens} visual tokens into {num_latents} groups (K must be <= the "
                             "token count or a multiple of it); use more frames or pixels")
        return visual_tokens_MD.repeat_interleave(num_latents // num_tokens, dim=0)
    return torch.stack([group.mean(dim=0) for group in visual_tokens_MD.tensor_split(num_latents, dim=0)])


def pool_region_targets(visual_tokens_MD: torch.Tensor, num_latents: int, regions: int) -> torch.Tensor:
    """[K, R, D] targets of a thought video whose frames hold R side-by-side panels (the scene | a timer panel): the
    tokens come in (temporal patch, panel) order, and each panel's tokens are pooled on their own by
    :func:`pool_targets`, so two panels' codes are not summed into one ambiguous mean."""
    if regions < 1 or visual_tokens_MD.shape[0] % regions:
        raise ValueError(f"cannot split {visual_tokens_MD.shape[0]} visual tokens into {regions} panels per temporal "
                         "patch (targets.regions must divide the tokens of every temporal patch)")
    return torch.stack([pool_targets(visual_tokens_MD[r::regions], num_latents) for r in range(regions)], dim=1)


AlignLoss = Literal["mse", "cosine"]


def alignment_loss(latents_BKD: torch.Tensor, targets_BKD: torch.Tensor, kind: AlignLoss) -> torch.Tensor:
    """Distance between latent states and thought-video targets, averaged over slots (and features for mse)."""
    targets_BKD = targets_BKD.to(latents_BKD.dtype)
    if kind == "mse":
        return F.mse_loss(latents_BKD, targets_BKD)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(latents_BKD, targets_BKD, dim=-1)).mean()
    raise ValueError(f"alignment loss must be 'mse' or 'cosine', got {kind!r}")
