"""Sample manifests: JSONL, one multiple-choice video question per line.

Line schema (see docs/data.md)::

    {"uid": "synth-train-000000", "video": "videos/train/000000.webm", "question": "...",
     "options": ["...", "..."], "answer": "B", "qtype": "count", "thought_video": "thoughts/train/000000.webm",
     "split": "train", "meta": {...}}

Optional ``start_s`` / ``end_s`` (seconds, either or both) restrict the question to a clip of ``video``; frames are
then sampled from that clip only (``sampling.sample_frame_indices(start_s=, end_s=)``).
Relative ``video`` / ``thought_video`` paths resolve against the manifest's folder. Every malformed line is
reported as ``FILE:LINE: <field>: <what was expected>``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

# 16: the grid task asks for one of 4 x 4 cells (public benchmarks use at most 8)
OPTION_LETTERS: tuple[str, ...] = tuple("ABCDEFGHIJKLMNOP")
MIN_OPTIONS, MAX_OPTIONS = 2, len(OPTION_LETTERS)
SPLITS: tuple[str, ...] = ("train", "val", "test")

_REQUIRED_FIELDS = ("uid", "video", "question", "options", "answer", "qtype", "thought_video", "split")
_OPTIONAL_FIELDS = ("meta", "start_s", "end_s")


class ManifestError(ValueError):
    """A malformed manifest line or sample; the message is one line: ``FILE:LINE: field: what was expected``."""


class SkippedLine(NamedTuple):
    line_no: int  # 1-based
    message: str  # the full "FILE:LINE: field: expected" message


class Manifest(list):  # list[Sample]
    """The samples of one manifest file (a plain list) plus the lines that ``on_error="skip"`` dropped."""

    def __init__(self, samples: Iterable[Sample] = (), *, path: Path, skipped: Iterable[SkippedLine] = ()):
        super().__init__(samples)
        self.path = path
        self.skipped: list[SkippedLine] = list(skipped)


def letter(index: int) -> str:
    """0 -> "A", ..., 15 -> "P"."""
    if not isinstance(index, int) or not 0 <= index < len(OPTION_LETTERS):
        raise ValueError(f"option index must be an int in 0..{len(OPTION_LETTERS) - 1}, got {index!r}")
    return OPTION_LETTERS[index]


def _expect(condition: bool, field_name: str, expected: str) -> None:
    if not condition:
        raise ManifestError(f"{field_name}: {expected}")


def _is_nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _is_time(value: Any) -> bool:
    """None, or a finite number of seconds >= 0 (JSON ints are fine; bools are not)."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                             and math.isfinite(value) and value >= 0)


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One multiple-choice question about one video. ``root`` is the folder relative paths resolve against."""

    uid: str
    video: str
    question: str
    options: tuple[str, ...]
    answer: str
    qtype: str
    thought_video: str | None
    split: Literal["train", "val", "test"]
    root: Path
    meta: dict[str, Any] = field(default_factory=dict, hash=False)
    start_s: float | None = None
    """Clip start in seconds of ``video`` (None: from the beginning)."""
    end_s: float | None = None
    """Clip end in seconds of ``video`` (None: to the end)."""

    def __post_init__(self) -> None:
        _expect(_is_nonempty_str(self.uid), "uid", "expected a non-empty string")
        _expect(_is_nonempty_str(self.video), "video", "expected a non-empty path string")
        _expect(_is_nonempty_str(self.question), "question", "expected a non-empty string")
        _expect(isinstance(self.options, (list, tuple)) and MIN_OPTIONS <= len(self.options) <= MAX_OPTIONS,
                "options", f"expected a list of {MIN_OPTIONS}-{MAX_OPTIONS} strings, got {self.options!r}")
        _expect(all(_is_nonempty_str(o) for o in self.options), "options",
                "expected every option to be a non-empty string")
        _expect(len(set(self.options)) == len(self.options), "options",
                f"expected distinct options, got {list(self.options)}")
        object.__setattr__(self, "options", tuple(self.options))  # JSON gives lists; keep the dataclass hashable
        _expect(isinstance(self.answer, str) and self.answer in OPTION_LETTERS, "answer",
                f"expected a letter A-{OPTION_LETTERS[-1]}, got {self.answer!r}")
        _expect(OPTION_LETTERS.index(self.answer) < len(self.options), "answer",
                f"expected a letter A-{OPTION_LETTERS[len(self.options) - 1]} for {len(self.options)} options, "
                f"got {self.answer!r}")
        _expect(_is_nonempty_str(self.qtype), "qtype", "expected a non-empty string")
        _expect(self.thought_video is None or _is_nonempty_str(self.thought_video), "thought_video",
                "expected a non-empty path string or null")
        _expect(self.split in SPLITS, "split", f"expected one of {', '.join(SPLITS)}, got {self.split!r}")
        _expect(isinstance(self.meta, dict), "meta", f"expected a JSON object, got {type(self.meta).__name__}")
        for name in ("start_s", "end_s"):
            _expect(_is_time(getattr(self, name)), name,
                    f"expected a finite time in seconds >= 0 or null, got {getattr(self, name)!r}")
        _expect(self.start_s is None or self.end_s is None or self.start_s < self.end_s, "end_s",
                f"expected end_s > start_s={self.start_s}, got {self.end_s!r}")
        object.__setattr__(self, "root", Path(self.root))

    @property
    def answer_index(self) -> int:
        return OPTION_LETTERS.index(self.answer)

    @property
    def answer_text(self) -> str:
        return self.options[self.answer_index]

    @property
    def video_path(self) -> Path:
        return _resolve(self.root, self.video)

    @property
    def thought_path(self) -> Path | None:
        return None if self.thought_video is None else _resolve(self.root, self.thought_video)

    def to_json_dict(self, root: Path | None = None) -> dict[str, Any]:
        """The manifest line for this sample; relative paths are rewritten when written under another ``root``."""
        root = self.root if root is None else root
        return {
            "uid": self.uid,
            "video": _relocate(self.video, self.root, root),
            "question": self.question,
            "options": list(self.options),
            "answer": self.answer,
            "qtype": self.qtype,
            "thought_video": None if self.thought_video is None else _relocate(self.thought_video, self.root, root),
            "split": self.split,
            "meta": self.meta,
            # written only when set, so manifests without clips keep their exact lines
            **({"start_s": self.start_s} if self.start_s is not None else {}),
            **({"end_s": self.end_s} if self.end_s is not None else {}),
        }


def _resolve(root: Path, relative_or_absolute: str) -> Path:
    path = Path(relative_or_absolute)
    return path if path.is_absolute() else (root / path).resolve()


def _relocate(path_text: str, old_root: Path, new_root: Path) -> str:
    """Keep a path pointing at the same file when the manifest moves to ``new_root``."""
    if Path(path_text).is_absolute() or old_root.resolve() == new_root.resolve():
        return path_text
    target = _resolve(old_root, path_text)
    try:
        return target.relative_to(new_root.resolve()).as_posix()
    except ValueError:
        return str(target)


def sample_from_json(record: Any, root: Path) -> Sample:
    """Validate one decoded manifest line; raises ManifestError("field: expected ...")."""
    _expect(isinstance(record, dict), "line", f"expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(_REQUIRED_FIELDS) - set(_OPTIONAL_FIELDS))
    _expect(not unknown, unknown[0] if unknown else "",
            f"unknown field; expected only {', '.join(_REQUIRED_FIELDS + _OPTIONAL_FIELDS)} (put extras in meta)")
    for name in _REQUIRED_FIELDS:
        _expect(name in record, name, "missing required field")
    meta = record.get("meta")
    return Sample(**{name: record[name] for name in _REQUIRED_FIELDS}, meta={} if meta is None else meta, root=root,
                  start_s=record.get("start_s"), end_s=record.get("end_s"))


def read_manifest(path: str | Path, *, on_error: Literal["raise", "skip"] = "raise") -> Manifest:
    """Read a JSONL manifest.

    ``on_error="raise"`` raises ManifestError at the first malformed line. ``on_error="skip"`` drops malformed lines
    (and later duplicates of a uid) and lists them in the returned ``Manifest.skipped`` as ``(line_no, message)``.
    Blank lines are ignored.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"read_manifest: on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    root = path.parent.resolve()
    manifest = Manifest(path=path)
    line_of_uid: dict[str, int] = {}
    with path.open(encoding="utf-8") as lines:
        for line_no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ManifestError(
                        f"json: expected one JSON object per line ({e.msg} at column {e.colno})") from None
                sample = sample_from_json(record, root)
                _expect(sample.uid not in line_of_uid, "uid",
                        f"expected a unique uid; {sample.uid!r} already appears on line {line_of_uid.get(sample.uid)}")
            except ManifestError as e:
                message = f"{path}:{line_no}: {e}"
                if on_error == "raise":
                    raise ManifestError(message) from None
                manifest.skipped.append(SkippedLine(line_no, message))
                continue
            line_of_uid[sample.uid] = line_no
            manifest.append(sample)
    return manifest


def write_manifest(path: str | Path, samples: Iterable[Sample]) -> None:
    """Write samples as JSONL atomically (temp file + rename); paths are made relative to the new folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = path.parent.resolve()
    seen: set[str] = set()
    lines = []
    for sample in samples:
        if sample.uid in seen:
            raise ManifestError(f"{path}: uid: expected unique uids; {sample.uid!r} appears twice")
        seen.add(sample.uid)
        lines.append(json.dumps(sample.to_json_dict(root), ensure_ascii=False, sort_keys=False))
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp_path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
