"""MVBench (lmms-eval group ``mvbench``, 20 tasks) in the HF ``OpenGVLab/MVBench`` ``video``-branch layout.

Data root (a snapshot of OpenGVLab/MVBench at revision ``video``, which lmms-eval links as ``mvbench_video``)::

    json/<task>.json                           # a list of {video, question, candidates, answer[, start, end]}
    <task folder>/<video>                      # e.g. star/Charades_segment/..., clevrer/video_validation/...

uid = ``"<task>/<index>"`` (index = 0-based position in ``json/<task>.json``). The answer is released as candidate
text; its letter is the candidate's position. Video paths follow lmms-eval's ``DATA_LIST``; when that file is
missing, two fallbacks are tried: ``data0613/<folder>/<video>`` (lmms-eval's clevrer/star fallback, which its own
code never reaches because it tests the folder's basename) and, for the five bounded tasks, the pre-cut clip name
``<stem>_<start>_<end>.mp4`` (start/end as Python writes the floats), in case the json is the ``main``-branch copy.
Scoring is lmms-eval's ``mcq_acc``; the headline accuracy counts every question, the lmms-eval per-task number
(empty predictions left out of the denominator) is reported as ``mean_task_accuracy_lmms_eval``.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from storms_dist.eval.benchmarks.common import (
    BenchItem,
    Benchmark,
    BenchmarkDataError,
    ItemScore,
    expect_str,
    expect_str_list,
    read_json,
)

NAME: Final = "mvbench"
# lmms-eval DATA_LIST (the video-branch folder of each task), in the MVBench paper's task order.
TASK_FOLDERS: Final[dict[str, str]] = {
    "action_sequence": "star/Charades_segment",
    "action_prediction": "star/Charades_segment",
    "action_antonym": "ssv2_video_mp4",
    "fine_grained_action": "Moments_in_Time_Raw/videos",
    "unexpected_action": "FunQA_test/test",
    "object_existence": "clevrer/video_validation",
    "object_interaction": "star/Charades_segment",
    "object_shuffle": "perception/videos",
    "moving_direction": "clevrer/video_validation",
    "action_localization": "sta/sta_video_segment",
    "scene_transition": "scene_qa/video",
    "action_count": "perception/videos",
    "moving_count": "clevrer/video_validation",
    "moving_attribute": "clevrer/video_validation",
    "state_change": "perception/videos",
    "fine_grained_pose": "nturgbd_convert",
    "character_order": "perception/videos",
    "egocentric_navigation": "vlnqa",
    "episodic_reasoning": "tvqa/video_fps3_hq_segment",
    "counterfactual_inference": "clevrer/video_validation",
}
BOUNDED_TASKS: Final = frozenset({"action_sequence", "action_prediction", "object_interaction",
                                  "action_localization", "episodic_reasoning"})
QUESTIONS_PER_TASK: Final = 200
POST_PROMPT: Final = "Only give the best option.\n"
OPTION_LETTERS: Final = string.ascii_uppercase  # lmms-eval letters candidates A, B, C, ... in stored order


def build_prompt(question: str, candidates: Sequence[str]) -> str:
    """lmms-eval ``mvbench_doc_to_text``: "Question:{q}\\nOption:\\n(A) ...\\n(B) ...\\nOnly give the best option.\\n"."""
    options = "".join(f"({OPTION_LETTERS[i]}) {candidate}\n" for i, candidate in enumerate(candidates))
    return "Question:" + question + "\nOption:\n" + options + POST_PROMPT


def video_candidates(data_root: Path, task: str, video: str, bounds: tuple[Any, Any] | None) -> list[Path]:
    folder = TASK_FOLDERS[task]
    candidates = [data_root / folder / video]
    if folder.split("/")[0] in ("clevrer", "star"):
        candidates.append(data_root / "data0613" / folder / video)
    if bounds is not None:
        stem = Path(video).stem
        candidates.append(data_root / folder / f"{stem}_{bounds[0]!r}_{bounds[1]!r}.mp4")
    return candidates


def resolve_video(data_root: Path, task: str, video: str, bounds: tuple[Any, Any] | None) -> Path:
    candidates = video_candidates(data_root, task, video, bounds)
    return next((path for path in candidates if path.exists()), candidates[0])


def task_files(data_root: Path) -> list[Path]:
    folder = data_root / "json"
    files = sorted(folder.glob("*.json"))
    if not files:
        raise BenchmarkDataError(f"{data_root}: annotations: expected json/<task>.json files (the HF OpenGVLab/MVBench "
                                 "release, revision 'video') under the data root")
    unknown = [file for file in files if file.stem not in TASK_FOLDERS]
    if unknown:
        raise BenchmarkDataError(f"{unknown[0]}: task: expected one of the 20 MVBench tasks "
                                 f"({', '.join(TASK_FOLDERS)}), got {unknown[0].stem!r}")
    order = list(TASK_FOLDERS)
    return sorted(files, key=lambda file: order.index(file.stem))


def _bounds(record: Mapping[str, Any], where: str) -> tuple[Any, Any] | None:
    if "start" not in record and "end" not in record:
        return None
    start, end = record.get("start"), record.get("end")
    for name, value in (("start", start), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BenchmarkDataError(f"{where}: {name}: expected seconds as a number (with both start and end), "
                                     f"got {value!r}")
    if not 0 <= start < end:
        raise BenchmarkDataError(f"{where}: end: expected 0 <= start < end, got start={start!r} end={end!r}")
    return start, end


def load(data_root: Path) -> list[BenchItem]:
    items: list[BenchItem] = []
    for file in task_files(data_root):
        task = file.stem
        records = read_json(file)
        if not isinstance(records, list):
            raise BenchmarkDataError(f"{file}: json: expected a list of question records, "
                                     f"got {type(records).__name__}")
        for index, record in enumerate(records):
            where = f"{file}: item {index}"
            if not isinstance(record, dict):
                raise BenchmarkDataError(f"{where}: item: expected a JSON object, got {type(record).__name__}")
            video = expect_str(record, "video", where)
            question = expect_str(record, "question", where)
            candidates = expect_str_list(record, "candidates", where, min_len=2, max_len=len(OPTION_LETTERS))
            answer = expect_str(record, "answer", where)
            if answer not in candidates:  # lmms-eval would crash on this record (no ground-truth letter)
                raise BenchmarkDataError(f"{where}: answer: expected the text of one of the candidates "
                                         f"{candidates}, got {answer!r}")
            bounds = _bounds(record, where)
            meta: dict[str, Any] = {"video_as_released": video}
            if bounds is not None:
                meta["start_s"], meta["end_s"] = bounds
            items.append(BenchItem(
                uid=f"{task}/{index}", benchmark=NAME, video=resolve_video(data_root, task, video, bounds),
                question=question, options=tuple(candidates), answer=answer,
                answer_letter=OPTION_LETTERS[candidates.index(answer)],  # the first equal candidate, as lmms-eval
                kind="multiple_choice", prompt=build_prompt(question, candidates), groups={"task": task}, meta=meta))
    return items


# ------------------------------------------------------------------------------- lmms-eval mcq_acc

_PUNCTUATION: Final = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                       ",", "?", "!")
# As written in lmms-eval (VQA eval): "(?!<=\d)" is a lookahead, not a lookbehind, so every "." not followed by a
# digit goes.
_PERIOD_STRIP: Final = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP: Final = re.compile(r"(\d)(\,)(\d)")
_LETTER_DOT_RE: Final = re.compile(r"^([A-E])\.\s*(.+)$", re.IGNORECASE)
_STANDALONE_LETTER_RE: Final = re.compile(r"\b([A-E])\b", re.IGNORECASE)


def _strip_punctuation(text: str) -> str:
    out = text
    for mark in _PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    # lmms-eval passes re.UNICODE (= 32) positionally, i.e. as sub()'s `count`: at most 32 periods are removed.
    return _PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def normalize_answer(text: str) -> str:
    """lmms-eval MVBench ``process``: "X. ..." -> X; else normalise punctuation, lowercase, and return the first
    standalone letter A-E (so the article "a" reads as A), or the normalised text when there is none."""
    match = _LETTER_DOT_RE.match(text.strip())
    if match:
        return match.group(1).upper()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _strip_punctuation(text)
    text = text.strip("'").strip('"').strip(")").strip("(").strip().lower()
    letter = _STANDALONE_LETTER_RE.search(text)
    return letter.group(1).upper() if letter else text


def score_item(item: BenchItem, prediction: str, judge: Any) -> ItemScore:
    extracted = normalize_answer(prediction)
    return ItemScore(item.uid, extracted == normalize_answer(item.answer_letter or ""), "rule", extracted or None)


def extra_summary(items: Sequence[BenchItem], predictions: Mapping[str, str], scores: Sequence[ItemScore]
                  ) -> dict[str, Any]:
    """Macro averages over tasks: every question counted (as ``accuracy``), and lmms-eval's own per-task rule,
    which leaves empty (and missing) predictions out of the denominator."""
    tally: dict[str, list[int]] = {}  # task -> [correct, questions, correct among answered, answered]
    for item, score in zip(items, scores):
        counts = tally.setdefault(item.groups["task"], [0, 0, 0, 0])
        counts[0] += bool(score.correct)
        counts[1] += 1
        if predictions.get(item.uid, "") != "":
            counts[2] += bool(score.correct)
            counts[3] += 1
    per_task = [100.0 * c / n for c, n, _, _ in tally.values()]  # n >= 1: every task in the tally has a question
    # lmms-eval reports 0 for a task with no non-empty prediction
    per_task_answered = {task: 100.0 * c / n if n else 0.0 for task, (_, _, c, n) in tally.items()}
    return {
        "mean_task_accuracy": sum(per_task) / len(per_task) if per_task else None,
        "mean_task_accuracy_lmms_eval": (sum(per_task_answered.values()) / len(per_task_answered)
                                         if per_task_answered else None),
        "task_accuracy_lmms_eval": per_task_answered,
    }


def notes(data_root: Path, items: Sequence[BenchItem]) -> list[str]:
    present = {item.groups["task"] for item in items}
    out = []
    missing_tasks = [task for task in TASK_FOLDERS if task not in present]
    if missing_tasks:
        out.append(f"{len(missing_tasks)} of 20 task files missing under json/: {', '.join(missing_tasks)}")
    for task in present:
        count = sum(item.groups["task"] == task for item in items)
        if count != QUESTIONS_PER_TASK:
            out.append(f"json/{task}.json has {count} questions; the public release has {QUESTIONS_PER_TASK}")
    return out


BENCHMARK: Final = Benchmark(
    name=NAME, title="MVBench", load_fn=load, score_item=score_item, group_names=("task",),
    sample_qtype_group="task", expected_questions=20 * QUESTIONS_PER_TASK, extra_summary=extra_summary,
    notes_fn=notes)
