"""MMVU validation set (lmms-eval task ``mmvu_val``) in the official JSON or the lmms-eval parquet layout.

Data root, either layout::

    validation.json                    # HF yale-nlp/MMVU (also data/validation.json as in the GitHub repo): a list
                                       #   of {id, video (HF resolve URL), question_type, metadata, question,
                                       #   choices {A..E}, answer}
    data/validation-*.parquet          # HF lmms-lab/MMVU: the same rows plus video_path ("videos/<Subject>/<n>.mp4")
    videos/<Subject_Folder>/<n>.mp4    # videos.zip; the folder names the subject (lmms-eval's category)

uid = ``id``. The subject is the video's folder, as lmms-eval reads it (``metadata.subject`` disagrees with the
folder for 7 validation questions). Scoring is lmms-eval HEAD's: multiple-choice by rules only; open-ended by rules,
then the LLM judge for what the rules reject. Without a judge the open-ended questions are reported apart under
``judge_required``. One deliberate difference, switchable with ``lmms_eval_compat=True``: two open-ended rules
that accept any empty or one-letter prediction are guarded (see ``open_ended_rule``).
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlparse

from storms_dist.eval.benchmarks.common import (
    BenchItem,
    Benchmark,
    BenchmarkDataError,
    ItemScore,
    expect_str,
    expect_unique,
    read_json,
    read_parquet_dir,
    strip_reasoning,
)
from storms_dist.eval.benchmarks.judge import Judge, JudgeError

NAME: Final = "mmvu"
LETTERS: Final = ("A", "B", "C", "D", "E")
QUESTION_TYPES: Final = ("multiple-choice", "open-ended")
# lmms-eval's TASK_MAP: subject folder -> discipline
DISCIPLINE_OF_SUBJECT: Final[dict[str, str]] = {
    **dict.fromkeys(("Biology", "Chemistry", "Modern_Physics", "Astronomy", "Geography", "Materials_Science",
                     "Neurobiology", "Electromagnetism", "Thermodynamics", "Mechanics"), "Science"),
    **dict.fromkeys(("Civil_Engineering", "Electrical_Engineering", "Mechanical_Engineering", "Biomedical_Engineering",
                     "Electronics_and_Communication", "Computer_Science"), "Engineering"),
    **dict.fromkeys(("Clinical_Medicine", "Basic_Medicine", "Preventive_Medicine", "Pharmacy", "Dentistry"),
                    "Healthcare"),
    **dict.fromkeys(("Art", "Literature", "History", "Law", "Economics", "Management"),
                    "Humanities_and_Social_Science"),
}

# lmms-eval mmvu_val prompts ("direct"); the line break inside the MC instruction is in the template.
MULTIPLE_CHOICE_PROMPT: Final = (
    "\nQuestion:{question}\nA: {a}\nB: {b}\nC: {c}\nD: {d}\nE: {e}\nVisual Information: processed video\n"
    "Do not generate any intermediate reasoning process. Answer directly with the option letter from the\n"
    "given choices.\n")
OPEN_ENDED_PROMPT: Final = (
    "\nQuestion:{question}\nVisual Information: processed video\n"
    "Do not generate any intermediate reasoning process. Directly output the final answer.\n")

# lmms-eval's open-ended judge (OpenAIVerifier, binary, custom prompt as the only user message).
JUDGE_MAX_TOKENS: Final = 1024
JUDGE_TEMPERATURE: Final = 0.0
JUDGE_PROMPT: Final = """You are a strict evaluator assessing answer correctness. You must output 1 for fully correct answers and 0 for any other case.

# Evaluation Rules for Open-Ended Questions
- The model prediction may contain reasoning, focus on extracting the final answer.
- Score 1 if the prediction matches the answer semantically, even if in different format.
- For mathematical notation, treat equivalent forms as correct (e.g., O(n²) = O(n^2), n² = n^2).
- Score 0 for partially correct answers or answers with extra incorrect information.
- Ignore minor differences in formatting, capitalization, or spacing.
- Treat numerical answers as correct if they match within reasonable precision.
- For questions requiring units, both value and unit must be correct.

Return only "1" or "0" with no additional text or formatting.

Question: {question}
Correct Answer: {ground_truth}
Model Prediction: {prediction}"""
_JUDGE_REASONING_TAGS: Final = (("<think>", "</think>"), ("<thinking>", "</thinking>"))


# ---------------------------------------------------------------------------------------------- loading


def annotation_rows(data_root: Path) -> list[tuple[str, dict[str, Any]]]:
    for path in (data_root / "validation.json", data_root / "data" / "validation.json"):
        if path.is_file():
            records = read_json(path)
            if not isinstance(records, list):
                raise BenchmarkDataError(f"{path}: json: expected a list of question records, "
                                         f"got {type(records).__name__}")
            return [(f"{path}: item {index}", record) for index, record in enumerate(records)]
    for folder in (data_root / "data", data_root):
        if any(folder.glob("*.parquet")):
            return read_parquet_dir(folder)
    raise BenchmarkDataError(f"{data_root}: annotations: expected validation.json (HF yale-nlp/MMVU) or "
                             "data/validation-*.parquet (HF lmms-lab/MMVU) under the data root")


def relative_video_path(record: Mapping[str, Any], where: str) -> str:
    """``video_path`` (lmms-eval parquet), else the path after ``/resolve/<revision>/`` in the ``video`` URL."""
    if isinstance(record.get("video_path"), str) and record["video_path"].strip():
        return record["video_path"].strip().lstrip("/")
    url = expect_str(record, "video", where)
    path = urlparse(url).path if "://" in url else url
    parts = path.split("/")
    if "resolve" in parts:
        parts = parts[parts.index("resolve") + 2:]  # drop ".../resolve/<revision>"
    relative = "/".join(p for p in parts if p)
    if len(relative.split("/")) < 2:
        raise BenchmarkDataError(f"{where}: video: expected a URL or path ending in videos/<Subject>/<n>.mp4, "
                                 f"got {url!r}")
    return relative


def _choices(record: Mapping[str, Any], where: str) -> dict[str, str]:
    choices = record.get("choices")
    if isinstance(choices, str):  # some parquet exports keep nested objects as JSON text
        try:
            choices = json.loads(choices)
        except json.JSONDecodeError:
            pass
    if not isinstance(choices, dict) or any(not isinstance(choices.get(k, ""), str) for k in LETTERS):
        raise BenchmarkDataError(f"{where}: choices: expected an object with string values for keys A-E, "
                                 f"got {choices!r}")
    return {letter: choices.get(letter) or "" for letter in LETTERS}


def build_prompt(question_type: str, question: str, choices: Mapping[str, str]) -> str:
    if question_type == "multiple-choice":
        return MULTIPLE_CHOICE_PROMPT.format(question=question, a=choices["A"], b=choices["B"], c=choices["C"],
                                             d=choices["D"], e=choices["E"])
    return OPEN_ENDED_PROMPT.format(question=question)


def load(data_root: Path) -> list[BenchItem]:
    items: list[BenchItem] = []
    seen: dict[str, str] = {}
    for where, record in annotation_rows(data_root):
        if not isinstance(record, dict):
            raise BenchmarkDataError(f"{where}: item: expected a JSON object, got {type(record).__name__}")
        uid = expect_str(record, "id", where)
        expect_unique(uid, seen, where, "id")
        question_type = expect_str(record, "question_type", where)
        if question_type not in QUESTION_TYPES:
            raise BenchmarkDataError(f"{where}: question_type: expected one of {', '.join(QUESTION_TYPES)}, "
                                     f"got {question_type!r}")
        question = expect_str(record, "question", where)
        answer = expect_str(record, "answer", where).strip()
        choices = _choices(record, where)
        options: tuple[str, ...] = ()
        letter = None
        if question_type == "multiple-choice":
            if answer not in LETTERS or not choices[answer]:
                raise BenchmarkDataError(f"{where}: answer: expected a letter A-E naming a non-empty choice, "
                                         f"got {answer!r}")
            letter = answer
            filled = [choices[k] for k in LETTERS]
            while filled and not filled[-1]:  # unused trailing letters are not options
                filled.pop()
            options = tuple(filled)
        relative = relative_video_path(record, where)
        subject = relative.split("/")[-2]
        metadata = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
        items.append(BenchItem(
            uid=uid, benchmark=NAME, video=data_root / relative, question=question, options=options,
            answer=answer, answer_letter=letter,
            kind="multiple_choice" if question_type == "multiple-choice" else "open",
            prompt=build_prompt(question_type, question, choices),
            groups={"question_type": question_type, "discipline": DISCIPLINE_OF_SUBJECT.get(subject, "Other"),
                    "subject": subject},
            meta={"choices": choices, "metadata_subject": metadata.get("subject")}))
    return items


# --------------------------------------------------------------------------------------------- scoring


def multiple_choice_rule(prediction: str, answer: str, choices: Mapping[str, str]) -> tuple[bool, str | None]:
    """lmms-eval HEAD's MC rules: (correct, first standalone letter). Correct if the first standalone A-E letter
    is the answer, or the answer letter stands alone anywhere, or the answer's choice text appears, or the letter
    appears (even inside a word) together with one of the choice's words longer than 2 characters."""
    text = prediction.strip()
    first = re.search(r"\b([A-E])\b", text, re.IGNORECASE)
    first_letter = first.group(1).upper() if first else None
    if first_letter == answer.upper():
        return True, first_letter
    if answer.upper() in text.upper() and re.search(rf"\b{re.escape(answer)}\b", text, re.IGNORECASE):
        return True, first_letter
    if answer in choices:
        choice_text = choices[answer].strip().lower()
        lowered = text.lower()
        if choice_text in lowered:
            return True, first_letter
        if answer.upper() in text.upper():
            words = [w.strip(string.punctuation) for w in choice_text.split() if len(w.strip(string.punctuation)) > 2]
            if words and any(word in lowered for word in words):
                return True, first_letter
    return False, first_letter


_SUPERSCRIPTS: Final = {"²": "^2", "³": "^3", "¹": "^1", "⁰": "^0", "⁴": "^4", "⁵": "^5", "⁶": "^6", "⁷": "^7",
                        "⁸": "^8", "⁹": "^9"}


def _normalize_math(text: str) -> str:
    for superscript, caret in _SUPERSCRIPTS.items():
        text = text.replace(superscript, caret)
    return text


def open_ended_rule(prediction: str, answer: str, *, lmms_eval_compat: bool = False) -> bool:
    """lmms-eval HEAD's open-ended rules (lowercase, superscripts -> ^n, whitespace collapsed). Correct on: exact
    match; answer in prediction; prediction in answer; first numbers within 0.01; every answer word longer than
    2 characters among the prediction's words (2-5 word answers); equal O(...) notation.

    Guards (off with ``lmms_eval_compat``): "prediction in answer" needs a non-empty prediction that is a run of
    whole answer words with one word longer than 2 characters (lmms-eval accepts "" and "a" for "Dolly Zoom"), and
    the word rule needs at least one answer word longer than 2 characters (lmms-eval accepts anything there).
    """
    pred = _normalize_math(prediction.strip().lower())
    gold = _normalize_math(answer.strip().lower())
    pred_clean, gold_clean = " ".join(pred.split()), " ".join(gold.split())
    if pred_clean == gold_clean or gold_clean in pred_clean:
        return True
    if lmms_eval_compat:
        if pred_clean in gold_clean:
            return True
    elif (pred_clean and any(len(w) > 2 for w in pred_clean.split())
          and re.search(rf"(?<!\w){re.escape(pred_clean)}(?!\w)", gold_clean)):
        return True
    pred_numbers = re.findall(r"\d+\.?\d*", pred)
    gold_numbers = re.findall(r"\d+\.?\d*", gold)
    if pred_numbers and gold_numbers and abs(float(gold_numbers[0]) - float(pred_numbers[0])) < 0.01:
        return True
    gold_words = [w.strip(string.punctuation) for w in gold_clean.split() if w.strip(string.punctuation)]
    pred_words = [w.strip(string.punctuation) for w in pred_clean.split() if w.strip(string.punctuation)]
    long_gold_words = [w for w in gold_words if len(w) > 2]
    if (2 <= len(gold_words) <= 5 and (lmms_eval_compat or long_gold_words)
            and all(word in pred_words for word in long_gold_words)):
        return True
    pred_big_o = re.search(r"O\s*\([^)]+\)", pred_clean, re.IGNORECASE)
    gold_big_o = re.search(r"O\s*\([^)]+\)", gold_clean, re.IGNORECASE)
    return bool(pred_big_o and gold_big_o
                and _normalize_math(pred_big_o.group(0).lower()) == _normalize_math(gold_big_o.group(0).lower()))


def parse_binary_verdict(reply: str) -> bool:
    """lmms-eval ``parse_binary_response``: INCORRECT/NOT_ATTEMPTED -> False; CORRECT, or any of correct / yes /
    true / 1 -> True; anything else False."""
    upper = reply.strip().upper()
    if "INCORRECT" in upper or "NOT_ATTEMPTED" in upper:
        return False
    if "CORRECT" in upper:
        return True
    lower = reply.strip().lower()
    return any(signal in lower for signal in ("correct", "yes", "true", "1", "[1]"))


def judge_prompt(item: BenchItem, prediction: str) -> str:
    return JUDGE_PROMPT.format(question=f"Question: {item.question}", ground_truth=item.answer,
                              prediction=strip_reasoning(prediction, _JUDGE_REASONING_TAGS))


def score_item(item: BenchItem, prediction: str, judge: Judge | None, *, lmms_eval_compat: bool = False
               ) -> ItemScore:
    if item.kind == "multiple_choice":
        correct, letter = multiple_choice_rule(prediction, item.answer, item.meta["choices"])
        return ItemScore(item.uid, correct, "rule", letter)
    if open_ended_rule(prediction, item.answer, lmms_eval_compat=lmms_eval_compat):
        return ItemScore(item.uid, True, "rule", prediction[:100])
    if judge is None:
        return ItemScore(item.uid, None, "needs_judge")
    try:
        reply = judge.complete([{"role": "user", "content": judge_prompt(item, prediction)}],
                               max_tokens=JUDGE_MAX_TOKENS, temperature=JUDGE_TEMPERATURE)
    except JudgeError:
        return ItemScore(item.uid, False, "judge_failed")
    return ItemScore(item.uid, parse_binary_verdict(reply), "judge", reply[:100])


def notes(data_root: Path, items: Sequence[BenchItem]) -> list[str]:
    unknown = sorted({item.groups["subject"] for item in items if item.groups["discipline"] == "Other"})
    out = []
    if unknown:
        out.append(f"subject folders outside lmms-eval's 27 (discipline 'Other'; lmms-eval drops them from its "
                   f"score): {', '.join(unknown)}")
    mismatched = [item.uid for item in items
                  if item.meta.get("metadata_subject") not in (None, item.groups["subject"].replace("_", " "))]
    if mismatched:
        out.append(f"{len(mismatched)} questions whose metadata.subject differs from their video folder "
                   f"(the folder is used, as lmms-eval does): {', '.join(mismatched[:5])}"
                   f"{' ...' if len(mismatched) > 5 else ''}")
    return out


def _make(name: str, *, lmms_eval_compat: bool) -> Benchmark:
    return Benchmark(
        name=name, title="MMVU (validation)", load_fn=load,
        score_item=partial(score_item, lmms_eval_compat=lmms_eval_compat),
        group_names=("question_type", "discipline", "subject"), sample_qtype_group="discipline",
        judge_only_kinds=frozenset({"open"}), part_group="question_type", expected_questions=1000, notes_fn=notes)


BENCHMARK: Final = _make(NAME, lmms_eval_compat=False)
BENCHMARK_LMMS_EVAL_COMPAT: Final = _make(NAME, lmms_eval_compat=True)  # exact lmms-eval rules, for parity checks
