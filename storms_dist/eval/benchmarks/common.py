"""Shared plumbing for the public video-QA benchmarks: items, the registry entry type, readers, scoring, checks.

A benchmark module (``videomme``, ``mvbench``, ``tempcompass``, ``mmvu``) supplies a loader that turns the
public-release files under a data root into :class:`BenchItem` objects and a per-question rule
(``score_item``); :class:`Benchmark` turns those into the summary ``storms score`` prints, the video check
``storms data check`` prints, and the project's :class:`~storms_dist.data.manifest.Sample` list ``storms eval``
runs the model over. Every data error is one line naming the file, the row and the field (``BenchmarkDataError``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, get_args

if TYPE_CHECKING:
    from storms_dist.data.manifest import Sample
    from storms_dist.eval.benchmarks.judge import Judge

Kind = Literal["multiple_choice", "yes_no", "caption_matching", "open", "captioning"]
KINDS: Final[tuple[str, ...]] = get_args(Kind)

# How one question was decided (ItemScore.method).
Method = Literal[
    "rule",          # the benchmark's hand-written rules decided
    "judge",         # the LLM judge decided
    "judge_failed",  # the judge call failed or its reply was unusable: counted wrong (lmms-eval does the same)
    "unmatched",     # the rules could not read an answer and no judge is configured: counted wrong
    "needs_judge",   # a judge-only question and no judge: not scored, reported under "judge_required"
    "missing",       # no prediction for this uid: counted wrong
]

# lmms-eval strips these reasoning blocks from every response before any task scores it (``--reasoning_tags``
# default, lmms_eval/__main__.py), then strips surrounding whitespace.
LMMS_EVAL_REASONING_TAGS: Final[tuple[tuple[str, str], ...]] = (("<think>", "</think>"), ("<analysis>", "</analysis>"))


class BenchmarkDataError(ValueError):
    """A malformed annotation or predictions file. One line: ``FILE: [row N: ]field: what was expected``."""


@dataclass(frozen=True, kw_only=True)
class BenchItem:
    """One benchmark question about one video, normalised across the four benchmarks.

    ``answer`` is the key exactly as released (a letter, a candidate text, "yes"/"no", a "Caption A: ..." line or a
    free-text answer); ``answer_letter`` is the option letter for the lettered kinds (multiple_choice,
    caption_matching with letter labels), else None. ``prompt`` is the text lmms-eval sends after the video.
    ``groups`` holds this question's key for every breakdown group; ``meta`` holds JSON-able extras the rules need.
    """

    uid: str
    benchmark: str
    video: Path
    question: str
    options: tuple[str, ...]
    answer: str
    answer_letter: str | None
    kind: Kind
    prompt: str
    groups: Mapping[str, str] = field(default_factory=dict, hash=False)
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.uid}: kind: expected one of {', '.join(KINDS)}, got {self.kind!r}")
        object.__setattr__(self, "options", tuple(self.options))
        if self.answer_letter is not None:
            index = ord(self.answer_letter) - ord("A")
            if len(self.answer_letter) != 1 or not 0 <= index < max(len(self.options), 1):
                raise ValueError(f"{self.uid}: answer_letter: expected a letter indexing {len(self.options)} options, "
                                 f"got {self.answer_letter!r}")


@dataclass(frozen=True)
class ItemScore:
    uid: str
    correct: bool | None  # None only for method "needs_judge"
    method: Method
    extracted: str | None = None  # what the rules (or the judge) read from the prediction, for the details file

    def to_json_dict(self) -> dict[str, Any]:
        return {"uid": self.uid, "correct": self.correct, "method": self.method, "extracted": self.extracted}


ScoreItemFn = Callable[[BenchItem, str, "Judge | None"], ItemScore]
ExtraSummaryFn = Callable[[Sequence[BenchItem], Mapping[str, str], Sequence[ItemScore]], dict[str, Any]]


@dataclass(frozen=True, kw_only=True)
class CheckReport:
    """What ``storms data check`` found: missing and unreadable videos (one line each) plus annotation notes."""

    benchmark: str
    data_root: Path
    num_questions: int
    num_videos: int
    missing: tuple[tuple[Path, int, str], ...]  # (path, questions using it, first uid)
    unreadable: tuple[tuple[Path, str], ...]  # (path, one-line reason)
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unreadable

    def lines(self) -> list[str]:
        out = [f"{self.benchmark}: {self.num_questions} questions, {self.num_videos} videos under {self.data_root}"]
        out += [f"note: {note}" for note in self.notes]
        out += [f"missing: {path} ({count} question{'s' if count != 1 else ''}, e.g. {uid})"
                for path, count, uid in self.missing]
        out += [f"unreadable: {path}: {reason}" for path, reason in self.unreadable]
        out.append("ok: every video is present and readable" if self.ok else
                   f"{len(self.missing)} missing, {len(self.unreadable)} unreadable of {self.num_videos} videos")
        return out

    def to_json_dict(self) -> dict[str, Any]:
        return {"benchmark": self.benchmark, "data_root": str(self.data_root), "num_questions": self.num_questions,
                "num_videos": self.num_videos, "ok": self.ok,
                "missing": [{"path": str(p), "num_questions": n, "example_uid": u} for p, n, u in self.missing],
                "unreadable": [{"path": str(p), "reason": r} for p, r in self.unreadable], "notes": list(self.notes)}


@dataclass(frozen=True, kw_only=True)
class Benchmark:
    """One registry entry. ``load(data_root)`` reads the public release; ``score``/``check``/``to_samples`` are
    shared. ``judge_only_kinds`` are the parts reported separately (not in ``accuracy``) when no judge is given."""

    name: str
    title: str
    load_fn: Callable[[Path], list[BenchItem]]
    score_item: ScoreItemFn
    group_names: tuple[str, ...]
    sample_qtype_group: str  # the group whose key becomes Sample.qtype
    judge_only_kinds: frozenset[str] = frozenset()
    part_group: str = ""  # the group whose keys name the judge-only parts in "judge_required"
    expected_questions: int | None = None  # size of the public release, for a `data check` note
    extra_summary: ExtraSummaryFn | None = None
    notes_fn: Callable[[Path, Sequence[BenchItem]], list[str]] | None = None

    def load(self, data_root: str | Path) -> list[BenchItem]:
        root = Path(data_root)
        if not root.is_dir():
            raise BenchmarkDataError(f"{root}: data root: expected a directory holding the {self.title} release")
        return self.load_fn(root.resolve())

    def score(self, items: Sequence[BenchItem], predictions: Mapping[str, str], judge: Judge | None = None, *,
              judge_workers: int = 8) -> dict[str, Any]:
        """Summary dict: benchmark, num_questions, accuracy (%), breakdown, counts (+ judge_required, extras)."""
        return score_benchmark(self, items, predictions, judge, judge_workers=judge_workers)[0]

    def score_with_details(self, items: Sequence[BenchItem], predictions: Mapping[str, str],
                           judge: Judge | None = None, *, judge_workers: int = 8
                           ) -> tuple[dict[str, Any], list[ItemScore]]:
        return score_benchmark(self, items, predictions, judge, judge_workers=judge_workers)

    def check(self, data_root: str | Path, *, workers: int = 8) -> CheckReport:
        items = self.load(data_root)
        notes = list(self.notes_fn(Path(data_root), items)) if self.notes_fn else []
        if self.expected_questions is not None and len(items) != self.expected_questions:
            notes.append(f"{len(items)} questions; the public release has {self.expected_questions}")
        return check_videos(self.name, Path(data_root), items, notes=notes, workers=workers)

    def to_samples(self, items: Iterable[BenchItem]) -> list[Sample]:
        return to_samples(items, qtype_group=self.sample_qtype_group)


# --------------------------------------------------------------------------------------------------- readers


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BenchmarkDataError(f"{path}: json: expected a JSON document ({e.msg} at line {e.lineno} column "
                                 f"{e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BenchmarkDataError(f"{path}: file: expected a readable UTF-8 file ({type(e).__name__}: {e})") from None


def read_parquet_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a parquet file as plain dicts (lists stay lists, structs become dicts)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading the HF parquet release needs pyarrow, which is not installed; "
                          "install it with `pip install pyarrow`") from None
    import pyarrow as pa

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:  # ArrowInvalid for damaged files
        message = " ".join(str(e).split())
        raise BenchmarkDataError(f"{path}: parquet: expected a readable parquet file ({message})") from None


def read_parquet_dir(folder: Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) for every row of the ``*.parquet`` shards of one HF split, concatenated in file-name order
    (HF names them ``-00000-of-0000N``); ``where`` is ``"FILE: row N"`` for error messages."""
    rows: list[tuple[str, dict[str, Any]]] = []
    for file in sorted(folder.glob("*.parquet")):
        rows += [(f"{file}: row {index}", row) for index, row in enumerate(read_parquet_rows(file))]
    return rows


def read_predictions(path: str | Path) -> dict[str, str]:
    """``{"uid": ..., "prediction": "<raw model text>"}`` JSONL (other keys ignored) -> {uid: raw text}."""
    path = Path(path)
    predictions: dict[str, str] = {}
    line_of_uid: dict[str, int] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BenchmarkDataError(f"{path}: file: expected a readable UTF-8 JSONL file ({type(e).__name__})") from None
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchmarkDataError(f"{where}: json: expected one JSON object per line ({e.msg} at column "
                                     f"{e.colno})") from None
        if not isinstance(record, dict):
            raise BenchmarkDataError(f"{where}: line: expected a JSON object, got {type(record).__name__}")
        uid, prediction = record.get("uid"), record.get("prediction")
        if not isinstance(uid, str) or not uid:
            raise BenchmarkDataError(f"{where}: uid: expected a non-empty string, got {uid!r}")
        if not isinstance(prediction, str):
            raise BenchmarkDataError(f"{where}: prediction: expected the raw model text as a string, "
                                     f"got {prediction!r}")
        if uid in line_of_uid:
            raise BenchmarkDataError(f"{where}: uid: expected unique uids; {uid!r} already on line {line_of_uid[uid]}")
        line_of_uid[uid] = line_no
        predictions[uid] = prediction
    return predictions


# --------------------------------------------------------------------------------------- field validation


def expect_str(record: Mapping[str, Any], name: str, where: str, *, allow_empty: bool = False) -> str:
    if name not in record:
        raise BenchmarkDataError(f"{where}: {name}: missing required field")
    value = record[name]
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise BenchmarkDataError(f"{where}: {name}: expected a {'' if allow_empty else 'non-empty '}string, "
                                 f"got {value!r}")
    return value


def expect_str_list(record: Mapping[str, Any], name: str, where: str, *, min_len: int, max_len: int) -> list[str]:
    if name not in record:
        raise BenchmarkDataError(f"{where}: {name}: missing required field")
    value = record[name]
    if hasattr(value, "tolist"):  # numpy arrays from pandas-written parquet
        value = value.tolist()
    if (not isinstance(value, list) or not min_len <= len(value) <= max_len
            or not all(isinstance(v, str) for v in value)):
        raise BenchmarkDataError(f"{where}: {name}: expected a list of {min_len}-{max_len} strings, got {value!r}")
    return value


def expect_unique(uid: str, seen: dict[str, str], where: str, field_name: str) -> None:
    if uid in seen:
        raise BenchmarkDataError(f"{where}: {field_name}: expected unique ids; {uid!r} already at {seen[uid]}")
    seen[uid] = where


# ------------------------------------------------------------------------------------- answer extraction


def strip_reasoning(text: str, tag_pairs: Sequence[tuple[str, str]] = LMMS_EVAL_REASONING_TAGS) -> str:
    """Remove ``<think>...</think>``-style blocks, as lmms-eval does before scoring; then strip whitespace.

    A closing tag without an opening one (chat templates that prefill ``<think>``) keeps only the text after it.
    """
    result = text
    for start_tag, end_tag in tag_pairs:
        while start_tag in result and end_tag in result:
            start = result.find(start_tag)
            end = result.find(end_tag, start)
            if end == -1:
                break
            result = result[:start] + result[end + len(end_tag):]
        if end_tag in result and start_tag not in result:
            result = result.rsplit(end_tag, 1)[-1]
    return result.strip()


# lmms-eval's shared MCQ extractor (lmms_eval/tasks/_task_utils/mcq_extract.py, used by Video-MME since
# 2026-04-11): candidate letters in several formats, each with a priority; the highest priority wins, ties go to
# the later position. Phrases are matched case-insensitively, letters case-sensitively.
_MCQ_ANSWER_PHRASES: Final[tuple[str, ...]] = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select", "i pick",
    "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
)
_MCQ_PRIORITY: Final[dict[str, int]] = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5,
                                        "colon": 4, "right_paren": 3, "space": 2, "fallback": 0}


def extract_mcq_letter(response: str, choices: Sequence[str] = tuple("ABCDEFGH")) -> str:
    """The option letter lmms-eval's ``extract_mcq_answer`` reads from ``response``; "" when there is none."""
    if not response or not response.strip():
        return ""
    text = response.strip()
    for char in ",.!?;:'\"":  # one character class at a time, in this order, as lmms-eval does
        text = text.strip(char)
    text = f" {text} "
    candidates: list[tuple[str, int, str]] = []  # (letter, position, format)
    for fmt, template in (("parentheses", "({})"), ("period", "{}."), ("colon", "{}:"), ("right_paren", "{})"),
                          ("space", "{} ")):
        for letter in choices:
            needle = template.format(letter)
            if needle in text:
                candidates.append((letter, text.rfind(needle), fmt))
    lowered = text.lower()
    for phrase in _MCQ_ANSWER_PHRASES:
        index = lowered.find(phrase)
        if index != -1:
            after = index + len(phrase)
            for letter in choices:
                position = text.find(letter, after)
                if position != -1:
                    candidates.append((letter, position, "phrase"))
    stripped = text.strip()
    for letter in choices:
        if stripped.startswith(letter) and (len(stripped) == 1 or not stripped[1].isalpha()):
            candidates.append((letter, 0, "start"))
    for letter in choices:
        if stripped.endswith(letter) and (len(stripped) == 1 or not stripped[-2].isalpha()):
            candidates.append((letter, len(text) - 1, "end"))
    if not candidates:
        candidates = [(letter, text.rfind(letter), "fallback") for letter in choices if letter in text]
    if not candidates:
        return ""
    candidates.sort(key=lambda c: (_MCQ_PRIORITY[c[2]], c[1]), reverse=True)  # stable: equal keys keep order
    return candidates[0][0]


# ----------------------------------------------------------------------------------------------- scoring


def accuracy_percent(num_correct: int, num_total: int) -> float | None:
    return None if num_total == 0 else 100.0 * num_correct / num_total


def group_accuracies(items: Sequence[BenchItem], scores: Sequence[ItemScore], group_names: Sequence[str]
                     ) -> dict[str, dict[str, float | None]]:
    """{group: {key: accuracy %}} over ``items``; keys in first-seen order."""
    breakdown: dict[str, dict[str, float | None]] = {}
    for group in group_names:
        tally: dict[str, list[int]] = {}
        for item, score in zip(items, scores):
            key = item.groups.get(group)
            if key is None:
                continue
            counts = tally.setdefault(key, [0, 0])
            counts[0] += bool(score.correct)
            counts[1] += 1
        breakdown[group] = {key: accuracy_percent(c, n) for key, (c, n) in tally.items()}
    return breakdown


def score_benchmark(benchmark: Benchmark, items: Sequence[BenchItem], predictions: Mapping[str, str],
                    judge: Judge | None, *, judge_workers: int = 8) -> tuple[dict[str, Any], list[ItemScore]]:
    """Score every item; a missing prediction counts wrong. Judge-only kinds without a judge go to judge_required."""
    cleaned = {uid: strip_reasoning(text) for uid, text in predictions.items()}

    def score_one(item: BenchItem) -> ItemScore:
        if item.uid not in cleaned:
            needs_judge = judge is None and item.kind in benchmark.judge_only_kinds
            return ItemScore(item.uid, None if needs_judge else False, "needs_judge" if needs_judge else "missing")
        return benchmark.score_item(item, cleaned[item.uid], judge)

    if judge is not None and len(items) > 1 and judge_workers > 1:  # judge calls are network-bound
        with ThreadPoolExecutor(max_workers=judge_workers) as pool:
            scores = list(pool.map(score_one, items))
    else:
        scores = [score_one(item) for item in items]

    separated = {i for i, item in enumerate(items) if judge is None and item.kind in benchmark.judge_only_kinds}
    main_items = [item for i, item in enumerate(items) if i not in separated]
    main_scores = [score for i, score in enumerate(scores) if i not in separated]
    num_correct = sum(bool(s.correct) for s in main_scores)
    methods = [s.method for s in main_scores]
    summary: dict[str, Any] = {
        "benchmark": benchmark.name,
        "num_questions": len(main_items),
        "accuracy": accuracy_percent(num_correct, len(main_items)),
        "breakdown": group_accuracies(main_items, main_scores, benchmark.group_names),
        "counts": {
            "correct": num_correct,
            "missing_predictions": methods.count("missing"),
            "unmatched_by_rules": methods.count("unmatched"),
            "judged": methods.count("judge") + methods.count("judge_failed"),
            "judge_failures": methods.count("judge_failed"),
        },
        "unknown_prediction_uids": len(set(predictions) - {item.uid for item in items}),
    }
    if separated:
        summary["judge_required"] = _judge_required_summary(
            [items[i] for i in sorted(separated)], [scores[i] for i in sorted(separated)], benchmark.part_group,
            set(cleaned))
    if benchmark.extra_summary is not None:
        summary.update(benchmark.extra_summary(items, cleaned, scores))
    return summary, scores


def _judge_required_summary(items: Sequence[BenchItem], scores: Sequence[ItemScore], part_group: str,
                            predicted_uids: set[str]) -> dict[str, Any]:
    """Per judge-only part: how many questions wait for a judge, and what the rules alone could confirm."""
    by_part: dict[str, list[tuple[BenchItem, ItemScore]]] = defaultdict(list)
    for item, score in zip(items, scores):
        by_part[item.groups.get(part_group, item.kind)].append((item, score))
    out: dict[str, Any] = {}
    for part, pairs in by_part.items():
        rule_correct = sum(score.correct is True for _, score in pairs)
        out[part] = {
            "num_questions": len(pairs),
            "num_predictions": sum(item.uid in predicted_uids for item, _ in pairs),
            "rule_correct": rule_correct,
            "rule_only_accuracy": accuracy_percent(rule_correct, len(pairs)),
            "note": "not in accuracy: needs an LLM judge (--judge-url URL --judge-model NAME); "
                    "rule_only_accuracy counts only what the rules alone accept (a lower bound)",
        }
    return out


# ------------------------------------------------------------------------------------------ data check


def _probe_one(path: Path) -> str | None:
    """None when ``path`` decodes, else a one-line reason."""
    from storms_dist.data.video_io import VideoDecodeError, probe_video

    try:
        probe_video(path)
    except VideoDecodeError as e:
        reason = str(e)
        return reason[len(str(path)) + 2:] if reason.startswith(f"{path}: ") else reason
    return None


def check_videos(name: str, data_root: Path, items: Sequence[BenchItem], *, notes: Sequence[str] = (),
                 workers: int = 8) -> CheckReport:
    """Probe every distinct video once (in parallel); missing files are listed apart from undecodable ones."""
    users: dict[Path, list[str]] = {}
    for item in items:
        users.setdefault(item.video, []).append(item.uid)
    present = [path for path in users if path.exists()]
    missing = tuple((path, len(uids), uids[0]) for path, uids in users.items() if not path.exists())
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = list(pool.map(_probe_one, present))
    unreadable = tuple((path, reason) for path, reason in zip(present, reasons) if reason is not None)
    return CheckReport(benchmark=name, data_root=data_root, num_questions=len(items), num_videos=len(users),
                       missing=missing, unreadable=unreadable, notes=tuple(notes))


# ------------------------------------------------------------------------------------------ to Sample


def to_samples(items: Iterable[BenchItem], *, qtype_group: str) -> list[Sample]:
    """The multiple-choice items as the project's Samples (split "test", no thought video); other kinds skipped.

    ``meta`` keeps the benchmark name, the lmms-eval prompt, the breakdown groups and the item's own meta, so an
    eval run can use either the project's prompt (``format_question``) or lmms-eval's.
    """
    from storms_dist.data.manifest import ManifestError, Sample

    samples = []
    for item in items:
        if item.kind != "multiple_choice":
            continue
        try:
            samples.append(Sample(
                uid=item.uid, video=str(item.video), question=item.question, options=item.options,
                answer=item.answer_letter or "", qtype=item.groups.get(qtype_group, item.benchmark),
                thought_video=None, split="test", root=item.video.parent,
                meta={"benchmark": item.benchmark, "prompt": item.prompt, "groups": dict(item.groups),
                      **dict(item.meta)}))
        except ManifestError as e:
            raise BenchmarkDataError(f"{item.benchmark} question {item.uid}: {e}") from None
    return samples
