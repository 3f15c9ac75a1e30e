"""Converters from public video-QA training formats to our JSONL manifest (``storms data convert``).

Formats:

* ``llava_video``: LLaVA-Video-178K style (also LLaVA-OneVision / LLaVA-NeXT-Video SFT json). A JSON array (or
  JSONL) of ``{"id", "video", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt",
  "value": "..."}, ...], "data_source"?}``. Each human/gpt pair is one question; it is multiple-choice when the
  human turn holds a block of option lines ``A. ...`` / ``(A) ...`` / ``A) ...`` / ``A: ...`` (A, B, C ... in order,
  at least two). The question is the text before the block (a ``Options:`` line dropped), lines after it (answer
  instructions) are dropped. The gpt turn's leading letter (``B``, ``B.``, ``(B) text``) or an option's exact text
  is the answer.
* ``video_r1``: Video-R1 style (Video-R1-260k / Video-R1-COT-165k). ``{"problem_id", "problem", "data_type":
  "video", "problem_type": "multiple choice", "options": ["A. ...", ...], "solution": "<answer>B</answer>",
  "path": "./..."}``; option letter prefixes are stripped.

Our pipeline is multiple-choice: other items (open-ended, numerical, free-form, images) are skipped and counted by
reason. A malformed item is an error ``FILE:ITEM: field: what was expected`` where ITEM is the 0-based index in the
JSON array (for JSONL input, the 1-based line number), or, with ``on_error="skip"``, counted and listed.

Video paths are kept relative to ``video_root`` (default: the input file's folder, where both datasets keep their
videos) and rewritten relative to the output manifest's folder (absolute when outside it).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from storms_dist.data.manifest import OPTION_LETTERS, SPLITS, ManifestError, Sample, write_manifest

FORMATS: tuple[str, ...] = ("llava_video", "video_r1")


class ConvertError(ValueError):
    """A malformed input item; the message is one line: ``FILE:ITEM: field: what was expected``."""


class _ItemError(ValueError):
    def __init__(self, field_name: str, expected: str):
        super().__init__(f"{field_name}: {expected}")


@dataclass
class ConvertReport:
    """What a conversion read, wrote and left out."""

    source: str
    format: str
    num_items: int = 0
    num_samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    """reason -> count: ``not_multiple_choice``, ``not_video``, ``invalid`` (skip mode only)."""
    errors: list[str] = field(default_factory=list)
    """The ``FILE:ITEM: field: expected`` messages of the invalid items (skip mode)."""
    out: Path | None = None

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        return (f"{self.source} ({self.format}): {self.num_items} items -> {self.num_samples} multiple-choice samples"
                f"{f' in {self.out}' if self.out else ''}; skipped: {skipped}")


# ---------------------------------------------------------------------------------------------------- reading


def _looks_like_item(record: dict) -> bool:
    return any(key in record for key in ("video", "path", "problem", "conversations", "id", "problem_id"))


def read_items(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(item number, item)``: the 0-based index for a JSON array (also one wrapped in an object such as
    ``{"annotations": [...]}``), the 1-based line number for JSONL (``.jsonl``, or JSON lines in a ``.json``)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if not text.lstrip().startswith("{"):
                raise ConvertError(f"{path}: json: expected a JSON array of items ({e.msg} at line {e.lineno} "
                                   f"column {e.colno})") from None
        else:
            if isinstance(data, dict) and not _looks_like_item(data):
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise ConvertError(f"{path}: json: expected a JSON array of items, got an object")
                data = lists[0]
            if isinstance(data, list):
                yield from enumerate(data)
                return
            if not isinstance(data, dict):
                raise ConvertError(f"{path}: json: expected a JSON array of items, got {type(data).__name__}")
    for line_no, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                raise ConvertError(f"{path}:{line_no}: json: expected one JSON object per line "
                                   f"({e.msg} at column {e.colno})") from None


# ---------------------------------------------------------------------------------------------------- parsing


_OPTION_LINE = re.compile(r"^\(?([A-H])\s*[.):]\s*(\S.*?)\s*$")
_OPTIONS_HEADER = re.compile(r"^(options|choices)\s*:?\s*$", re.IGNORECASE)
_MEDIA_TOKENS = re.compile(r"<(image|video)>")
_LEADING_LETTER = re.compile(r"^\(?([A-H])(?:\s*[.):]|\s|$)")
_ANSWER_TAG = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL | re.IGNORECASE)


def split_options(text: str) -> tuple[str, list[str]] | None:
    """``(question, options)`` from a prompt with an ``A. ..``/``B. ..`` block, or None when it has no such block
    (at least two options lettered A, B, ... in order on consecutive lines)."""
    lines = [line.strip() for line in _MEDIA_TOKENS.sub("", text).splitlines()]
    lines = [line for line in lines if line]
    for start, line in enumerate(lines):
        match = _OPTION_LINE.match(line)
        if not match or match.group(1) != "A":
            continue
        options = [match.group(2)]
        for following in lines[start + 1:]:
            next_match = _OPTION_LINE.match(following)
            if not next_match or next_match.group(1) != OPTION_LETTERS[len(options)]:
                break
            options.append(next_match.group(2))
            if len(options) == len(OPTION_LETTERS):
                break
        if len(options) < 2:
            continue
        question_lines = lines[:start]
        if question_lines and _OPTIONS_HEADER.match(question_lines[-1]):
            question_lines = question_lines[:-1]
        return "\n".join(question_lines), options
    return None


def answer_letter(reply: str, options: list[str]) -> str | None:
    """The option letter a reference answer names: a leading letter (``B``, ``B.``, ``(B) text``), an
    ``<answer>B</answer>`` tag, or an option's exact text (case-insensitive, trailing period ignored)."""
    text = reply.strip()
    tag = _ANSWER_TAG.search(text)
    if tag:
        text = tag.group(1).strip()
    match = _LEADING_LETTER.match(text)
    if match and OPTION_LETTERS.index(match.group(1)) < len(options):
        return match.group(1)
    normalised = text.rstrip(".").strip().casefold()
    for i, option in enumerate(options):
        if option.rstrip(".").strip().casefold() == normalised:
            return OPTION_LETTERS[i]
    return None


def _strip_letter_prefixes(options: list[str]) -> list[str]:
    """``["A. x", "B. y"]`` -> ``["x", "y"]`` when every option carries its own letter; unchanged when none does."""
    matches = [_OPTION_LINE.match(o.strip()) for o in options]
    if all(m and m.group(1) == OPTION_LETTERS[i] for i, m in enumerate(matches)):
        return [m.group(2) for m in matches]
    if all(matches):
        raise _ItemError("options", "expected the letter prefixes A., B., C. ... in order")
    return [o.strip() for o in options]


def _video_path(item: dict, *names: str) -> str:
    for name in names:
        value = item.get(name)
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, str) and value.strip():
            return os.path.normpath(value.strip())  # "./LLaVA-Video-178K/x.mp4" -> "LLaVA-Video-178K/x.mp4"
    raise _ItemError(names[0], "expected a video path string")


def _source_id(item: dict, name: str, number: int) -> str:
    value = item.get(name, number)
    if isinstance(value, bool) or not isinstance(value, (str, int)) or (isinstance(value, str) and not value.strip()):
        raise _ItemError(name, f"expected a string or integer id, got {value!r}")
    return str(value)


@dataclass(frozen=True)
class _Question:
    local_id: str
    question: str
    options: list[str]
    answer: str
    video: str
    meta: dict


def _llava_video_questions(item: Any, number: int) -> tuple[list[_Question], Counter]:
    if not isinstance(item, dict):
        raise _ItemError("item", f"expected a JSON object, got {type(item).__name__}")
    source_id = _source_id(item, "id", number)
    video = _video_path(item, "video")
    turns = item.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise _ItemError("conversations", "expected a non-empty list of {\"from\", \"value\"} turns")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in (
                "human", "gpt"):
            raise _ItemError(f"conversations[{i}]", "expected {\"from\": \"human\"|\"gpt\", \"value\": string}")
        expected = "human" if i % 2 == 0 else "gpt"
        if turn["from"] != expected:
            raise _ItemError(f"conversations[{i}].from", f"expected {expected!r} (turns alternate, human first), "
                                                         f"got {turn['from']!r}")
    if len(turns) % 2:
        raise _ItemError("conversations", "expected human/gpt pairs; the last human turn has no answer")
    skipped: Counter = Counter()
    questions = []
    pairs = [(turns[i]["value"], turns[i + 1]["value"]) for i in range(0, len(turns), 2)]
    for k, (human, gpt) in enumerate(pairs):
        parsed = split_options(human)
        if parsed is None:
            skipped["not_multiple_choice"] += 1
            continue
        question, options = parsed
        if not question:
            raise _ItemError(f"conversations[{2 * k}].value", "expected question text before the options")
        letter = answer_letter(gpt, options)
        if letter is None:
            raise _ItemError(f"conversations[{2 * k + 1}].value",
                             f"expected an option letter A-{OPTION_LETTERS[len(options) - 1]} or an option's text, "
                             f"got {gpt.strip()[:60]!r}")
        meta = {"source_format": "llava_video", "source_id": source_id}
        if isinstance(item.get("data_source"), str):
            meta["data_source"] = item["data_source"]
        local = source_id if len(pairs) == 1 else f"{source_id}-q{k}"
        questions.append(_Question(local, question, options, letter, video, meta))
    return questions, skipped


def _video_r1_questions(item: Any, number: int) -> tuple[list[_Question], Counter]:
    if not isinstance(item, dict):
        raise _ItemError("item", f"expected a JSON object, got {type(item).__name__}")
    if item.get("data_type", "video") != "video":
        return [], Counter(not_video=1)
    problem_type = item.get("problem_type")
    if not isinstance(problem_type, str):
        raise _ItemError("problem_type", f"expected a string such as 'multiple choice', got {problem_type!r}")
    if problem_type.strip().lower() not in ("multiple choice", "multiple_choice", "multiple-choice"):
        return [], Counter(not_multiple_choice=1)
    source_id = _source_id(item, "problem_id", number)
    problem = item.get("problem")
    if not isinstance(problem, str) or not problem.strip():
        raise _ItemError("problem", "expected a non-empty question string")
    options = item.get("options")
    if not isinstance(options, list) or not all(isinstance(o, str) and o.strip() for o in options):
        raise _ItemError("options", "expected a list of non-empty strings")
    options = _strip_letter_prefixes(options)
    solution = item.get("solution")
    if not isinstance(solution, str):
        raise _ItemError("solution", f"expected '<answer>X</answer>', got {solution!r}")
    tag = _ANSWER_TAG.search(solution)
    letter = answer_letter(tag.group(1), options) if tag else None
    if letter is None:
        raise _ItemError("solution", f"expected '<answer>X</answer>' with a letter "
                                     f"A-{OPTION_LETTERS[max(len(options), 1) - 1]}, got {solution.strip()[:60]!r}")
    meta = {"source_format": "video_r1", "source_id": source_id}
    for key in ("data_source", "problem_type"):
        if isinstance(item.get(key), str):
            meta[key] = item[key]
    return [_Question(source_id, problem.strip(), options, letter, _video_path(item, "path", "video"), meta)], Counter()


_PARSERS = {"llava_video": _llava_video_questions, "video_r1": _video_r1_questions}


# ---------------------------------------------------------------------------------------------------- converting


def convert(path: str | Path, fmt: str, *, video_root: str | Path | None = None,
            split: Literal["train", "val", "test"] = "train", qtype: str | None = None, uid_prefix: str | None = None,
            on_error: Literal["raise", "skip"] = "raise") -> tuple[list[Sample], ConvertReport]:
    """Read ``path`` in format ``fmt`` and return the multiple-choice samples (rooted at ``video_root``) + a report.

    uids are ``uid_prefix`` (default ``"<fmt>-"``) + the item's id (``id`` / ``problem_id``), ``-q<k>`` for the k-th
    question of a multi-question conversation, and ``-2``, ``-3`` ... for later repeats of an id (LLaVA-Video reuses
    one id for several questions about one video). ``qtype`` defaults to the format name.
    """
    if fmt not in _PARSERS:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error: expected raise or skip, got {on_error!r}")
    path = Path(path)
    root = (Path(video_root) if video_root is not None else path.parent).resolve()
    prefix = f"{fmt}-" if uid_prefix is None else uid_prefix
    report = ConvertReport(source=str(path), format=fmt)
    samples: list[Sample] = []
    used: set[str] = set()
    for number, item in read_items(path):
        report.num_items += 1
        try:
            questions, skipped = _PARSERS[fmt](item, number)
            report.skipped.update(skipped)
            built = []
            for q in questions:
                base = uid = f"{prefix}{q.local_id}"
                repeat = 1
                while uid in used:
                    repeat += 1
                    uid = f"{base}-{repeat}"
                used.add(uid)
                try:
                    built.append(Sample(uid=uid, video=q.video, question=q.question, options=tuple(q.options),
                                        answer=q.answer, qtype=qtype or fmt, thought_video=None, split=split,
                                        root=root, meta={**q.meta, "source_file": path.name, "source_item": number}))
                except ManifestError as e:  # e.g. duplicate options, more than 8 options
                    raise _ItemError(*str(e).split(": ", 1)) from None
            samples.extend(built)
        except _ItemError as e:
            message = f"{path}:{number}: {e}"
            if on_error == "raise":
                raise ConvertError(message) from None
            report.skipped["invalid"] += 1
            report.errors.append(message)
    report.num_samples = len(samples)
    return samples, report


def convert_file(path: str | Path, fmt: str, out: str | Path, **kwargs: Any) -> ConvertReport:
    """:func:`convert` and write the manifest to ``out`` (atomically; paths relative to its folder when inside it)."""
    samples, report = convert(path, fmt, **kwargs)
    write_manifest(out, samples)
    report.out = Path(out)
    return report
