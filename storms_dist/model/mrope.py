"""The mRoPE position rule (time, height, width axes) for Qwen-VL sequences, written once for training and inference.

The rule is the one the released Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints were trained with (the Qwen code that
transformers carried up to 5.2.0, PR #35569): a sequence is a run of segments; every segment starts at the largest
position used so far plus one, on all three axes.

- a text run of n tokens: ``s, s+1, ..., s+n-1`` on every axis;
- a video block with an LLM grid ``(t, h, w)`` (h, w already divided by the spatial merge): token ``(i, j, k)``
  sits at ``(s + floor(i * step), s + j, s + k)``, with ``step`` = ``tokens_per_second * second_per_grid_t``
  (Qwen2.5-VL), 1 (Qwen2-VL) or 0 (Qwen3-VL, whose prompt gives each temporal patch its own block, separated by a
  ``<t seconds>`` text timestamp).

So text after a video starts at the video's largest position + 1, whichever axis holds it; for a long Qwen2.5-VL
video that is the temporal axis. transformers 5.3+ (5.24 included) instead restarts text after a video at
``s + max(h, w)``, ignoring the temporal extent (huggingface/transformers#45381), while its own ``generate`` continues
decoding from max + 1 (``rope_deltas``): the two halves disagree once ``(t - 1) * step > max(h, w) - 1``. Under this
rule the last prefix token always holds the largest position, so every appended token (latent slot, forced
``<|latent_end|>``, decoded answer) continues at max + 1 + i, the same in a full recompute and in a cached step.

Shapes: B batch rows, L columns, N videos (Qwen3-VL: one grid row per video, split per temporal patch here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

MRopeFamily = Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
TEXT_TYPE, VIDEO_TYPE = 0, 2  # mm_token_type_ids values (transformers ProcessorMixin.create_mm_token_type_ids)


def temporal_step(family: MRopeFamily, tokens_per_second: float | None, second_per_grid_t: float | None) -> float:
    """Temporal position units between consecutive temporal patches of one video block."""
    if family == "qwen3_vl":
        return 0.0  # one block per temporal patch: time is carried by the text timestamps
    if family == "qwen2_vl" or tokens_per_second is None:
        return 1.0
    if family == "qwen2_5_vl":
        # transformers' default when second_per_grid_ts is not passed is 1 s per patch
        return float(tokens_per_second) * (1.0 if second_per_grid_t is None else float(second_per_grid_t))
    raise ValueError(f"family: expected one of qwen2_vl, qwen2_5_vl, qwen3_vl, got {family!r}")


def vision_block_positions(start: int, grid_thw: Sequence[int], step: float) -> torch.Tensor:
    """[3, t*h*w] positions of one video block whose LLM grid is ``(t, h, w)`` (spatial merge already applied)."""
    grid_t, grid_h, grid_w = (int(v) for v in grid_thw)
    # float32 product then truncation, as the Qwen code does: fractional steps accumulate before rounding
    time_T = (torch.arange(grid_t) * torch.tensor(step, dtype=torch.float32)).long()
    t_THW, h_THW, w_THW = torch.meshgrid(time_T, torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    return torch.stack([t_THW, h_THW, w_THW]).reshape(3, -1) + start


def _runs(types_L: torch.Tensor) -> list[tuple[int, int, int]]:
    """(type, start, end) of each maximal run of equal values."""
    if types_L.numel() == 0:
        return []
    change = torch.nonzero(types_L[1:] != types_L[:-1]).flatten() + 1
    bounds = [0, *change.tolist(), types_L.numel()]
    return [(int(types_L[a]), a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def video_blocks(family: MRopeFamily, video_grid_thw_N3: torch.Tensor | None, spatial_merge_size: int
                 ) -> list[tuple[int, int, int, int]]:
    """LLM grids ``(t, h, w)`` of the video blocks in sequence order, plus the index of the video each belongs to;
    Qwen3-VL's one grid per video becomes t blocks of one temporal patch."""
    if video_grid_thw_N3 is None:
        return []
    blocks = []
    for video, (grid_t, grid_h, grid_w) in enumerate(torch.as_tensor(video_grid_thw_N3).reshape(-1, 3).tolist()):
        if grid_h % spatial_merge_size or grid_w % spatial_merge_size:
            raise ValueError(f"video_grid_thw[{video}]: h, w must be multiples of the spatial merge size "
                             f"{spatial_merge_size}, got {grid_h}x{grid_w}")
        llm = (grid_h // spatial_merge_size, grid_w // spatial_merge_size)
        if family == "qwen3_vl":
            blocks += [(1, *llm, video)] * grid_t
        else:
            blocks.append((grid_t, *llm, video))
    return blocks


def mrope_positions(
    mm_token_type_ids_BL: torch.Tensor,
    attention_mask_BL: torch.Tensor | None,
    video_grid_thw_N3: torch.Tensor | None,
    *,
    family: MRopeFamily,
    spatial_merge_size: int,
    tokens_per_second: float | None = None,
    second_per_grid_ts_N: torch.Tensor | Sequence[float] | None = None,
) -> torch.Tensor:
    """[3, B, L] positions of a batch under the project's rule (module docstring). Masked columns get 0.

    Videos are consumed in batch order (row 0's videos first), as ``video_grid_thw`` is laid out by the collator.
    A video run whose length does not match its grid is an error naming the row.
    """
    device = torch.as_tensor(mm_token_type_ids_BL).device
    types_BL = torch.as_tensor(mm_token_type_ids_BL).cpu()  # a per-row Python walk: host tensors
    num_rows, num_cols = types_BL.shape
    mask_BL = (torch.ones_like(types_BL, dtype=torch.bool) if attention_mask_BL is None
               else attention_mask_BL.cpu().bool())
    blocks = video_blocks(family, video_grid_thw_N3, spatial_merge_size)
    seconds = None if second_per_grid_ts_N is None else torch.as_tensor(second_per_grid_ts_N).reshape(-1).tolist()
    pos_3BL = torch.zeros(3, num_rows, num_cols, dtype=torch.long)
    next_block = 0
    for row in range(num_rows):
        kept_L = torch.nonzero(mask_BL[row]).flatten()
        pieces, start = [], 0
        for kind, a, b in _runs(types_BL[row, kept_L]):
            if kind == TEXT_TYPE:
                pieces.append((torch.arange(b - a) + start).expand(3, -1))
                start += b - a
                continue
            if kind != VIDEO_TYPE:
                raise ValueError(f"mm_token_type_ids row {row}: token type {kind} is not supported (text 0, video 2)")
            if next_block >= len(blocks):
                raise ValueError(f"mm_token_type_ids row {row}: more video blocks than video_grid_thw describes "
                                 f"({len(blocks)} blocks)")
            grid_t, grid_h, grid_w, video = blocks[next_block]
            next_block += 1
            if b - a != grid_t * grid_h * grid_w:
                raise ValueError(f"mm_token_type_ids row {row}: a video block of {b - a} tokens, but video "
                                 f"{video}'s grid gives {grid_t * grid_h * grid_w}")
            second = None if seconds is None else seconds[video]
            block_3N = vision_block_positions(start, (grid_t, grid_h, grid_w),
                                              temporal_step(family, tokens_per_second, second))
            pieces.append(block_3N)
            start = int(block_3N.max()) + 1
        if pieces:
            pos_3BL[:, row, kept_L] = torch.cat(pieces, dim=1)
    if next_block != len(blocks):
        raise ValueError(f"video_grid_thw describes {len(blocks)} video blocks, the token types hold {next_block}")
    return pos_3BL.to(device)


def continuation_positions(prefix_pos_3BP: torch.Tensor, num_new: int) -> torch.Tensor:
    """mRoPE positions of ``num_new`` text tokens appended after a prefix: ``max(prefix) + 1 + i`` on all three axes.

    Equal to ``mrope_positions`` of the longer sequence (appended tokens are a text run) for any prefix that rule
    produced, so a cached step and a full recompute place a token at the same position."""
    next_BN = prefix_pos_3BP.amax(dim=(0, 2)).unsqueeze(1) + 1 + torch.arange(num_new, device=prefix_pos_3BP.device)
    return next_BN.unsqueeze(0).expand(3, -1, -1)
