"""TempCompass (lmms-eval group ``tempcompass``: four task types) in its HF parquet or original GitHub JSON layout.

Data root, either layout (parquet wins when both are present)::

    multi-choice/test-00000-of-00001.parquet   # HF lmms-lab/TempCompass: one folder per config, one row per
    yes_no/test-00000-of-00001.parquet         #   question with video_id, question, answer, dim (+ mc_question,
    caption_matching/test-...parquet           #   mc_answer for captioning)
    captioning/test-...parquet
    questions/<config>.json                    # GitHub llyx97/TempCompass: {video_id: {dim: [{question, answer}]}};
                                               #   flattened in file order; captioning takes mc_question/mc_answer
                                               #   from the first multi-choice question of the same (video, dim)
    videos/<video_id>.mp4                      # tempcompass_videos.zip (ids include "_reverse" and concatenations)

uid = ``"<config>/<index>"`` (index = 0-based row in that config's file, after flattening for the JSON layout).
Scoring is lmms-eval's (= the official rules): hand-written matching per task type, the LLM judge for predictions
the rules cannot read (without a judge they count wrong, as the official ``--disable_llm``), and captioning judged
only by the LLM (reported under ``judge_required`` without a judge).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from storms_dist.eval.benchmarks.common import (
    BenchItem,
    Benchmark,
    BenchmarkDataError,
    ItemScore,
    accuracy_percent,
    expect_str,
    read_json,
    read_parquet_dir,
)
from storms_dist.eval.benchmarks.judge import Judge, JudgeError

NAME: Final = "tempcompass"
CONFIGS: Final = ("multi-choice", "yes_no", "caption_matching", "captioning")
DIMS: Final = ("action", "speed", "direction", "order", "attribute_change")
RELEASE_COUNTS: Final[dict[str, int]] = {"multi-choice": 1580, "yes_no": 2453, "caption_matching": 1503,
                                         "captioning": 2004}
# lmms-eval default post-prompts (identical to the official answer prompts)
POST_PROMPTS: Final[dict[str, str]] = {"multi-choice": "\nPlease directly give the best option:",
                                       "yes_no": "\nPlease answer yes or no:",
                                       "caption_matching": "\nPlease directly give the best option:",
                                       "captioning": ""}
_KIND_OF_CONFIG: Final = {"multi-choice": "multiple_choice", "yes_no": "yes_no",
                          "caption_matching": "caption_matching", "captioning": "captioning"}
_MC_OPTION_RE: Final = re.compile(r"^([A-Z])\. (.*)$")

# Judge settings of lmms-eval's TempCompass utils (gpt-3.5-turbo-1106 there; the model is the caller's choice).
JUDGE_SYSTEM: Final = "You are an AI assistant for question answering."
JUDGE_MAX_TOKENS: Final = 128
JUDGE_TEMPERATURE: Final = 1.0
_JUDGE_INDENT: Final = " " * 8


def _fallback_judge_intro(question_kind: str) -> str:
    """lmms-eval's ``base_prompt`` (a triple-quoted string indented by 8 spaces, with backslash line joins)."""
    return (f"\n{_JUDGE_INDENT}You will receive a {question_kind}, the ground-truth answer and the prediction from a "
            f"question answering (QA) model. {_JUDGE_INDENT}Your task is to determine whether QA model prediction is "
            f"correct, based on the question and ground-truth answer. {_JUDGE_INDENT}If the prediction is correct, "
            f'respond "Correct". If the prediction is incorrect, respond "Incorrect".\n{_JUDGE_INDENT}')


# kind -> (how the intro names the question, the header before the question)
_FALLBACK_JUDGE_WORDING: Final[dict[str, tuple[str, str]]] = {
    "multiple_choice": ("multi-choice question", "Multi-Choice Question"),
    "yes_no": ("Yes/No question", "Yes/No Question"),
    "caption_matching": ("caption matching question", "Caption Matching Question"),
}

_CAPTION_JUDGE_LINES: Final = (
    ("You will receive a video description and a multi-choice question. Your task is to choose the correct answer and "
     "briefly explain the reason why you choose the answer.     If none of the choice candidates are correct or the "
     "video description lacks enough information to answer the question, just answer \"None of the choices are "
     "correct\".     Please organize your response in this format:"),
    "```", "Reasoning: [Your reason to obtain the answer]", "Answer: [Your answer]", "```", "",
    "Here are some examples of video description, multi-choice question and the expected answer:", "```",
    "Video Description: A person is palying football.", "Multi-Choice Question:",
    "What is the person doing in the video?", "A. cooking", "B. palying football", "C. playing basketball",
    "D. reading book", "Reasoning: The video description mentions that the person is playing football.",
    "Answer: B. palying football", "",
    "Video Description: A bird is flying clockwise.", "Multi-Choice Question:", "In which direction is the bird flying?",
    "A. backwark", "B. counter-clockwise", "C. clockwise", "D. downward",
    "Reasoning: The video description mentions that the bird is flying clockwise", "Answer: C. clockwise", "",
    "Video Description: An air balloon is inflating.", "Multi-Choice Question:", "What is happening to the air balloon?",
    "A. exploding", "B. getting smaller", "C. flying",
    ("Reasoning: The video description mentions that the air balloon is inflating, while none of the coices can be "
     "explained as inflating."),
    "Answer: None of the choices are correct", "```",
)
# lmms-eval's captioning prompt, typos included (a 4-space-indented triple-quoted string; blank lines stay empty).
CAPTION_JUDGE_PROMPT: Final = "\n" + "\n".join(f"    {line}" if line else "" for line in _CAPTION_JUDGE_LINES) + "\n    "


# ---------------------------------------------------------------------------------------------- loading


def _config_rows(data_root: Path) -> tuple[str, dict[str, list[tuple[str, dict[str, Any]]]]]:
    """("parquet" | "json", {config: [(where, row), ...]}) for the configs present."""
    parquet = {config: read_parquet_dir(data_root / config) for config in CONFIGS
               if any((data_root / config).glob("*.parquet"))}
    if parquet:
        return "parquet", parquet
    json_files = {config: data_root / "questions" / f"{config}.json" for config in CONFIGS}
    if any(path.is_file() for path in json_files.values()):
        nested = {config: _flatten_nested(path) for config, path in json_files.items() if path.is_file()}
        if "captioning" in nested:
            if "multi-choice" not in nested:
                raise BenchmarkDataError(f"{json_files['multi-choice']}: file: expected it next to captioning.json "
                                         "(captioning takes mc_question/mc_answer from it)")
            nested["captioning"] = _attach_mc_question(nested["captioning"], nested["multi-choice"])
        return "json", nested
    raise BenchmarkDataError(f"{data_root}: annotations: expected <config>/test-*.parquet (HF lmms-lab/TempCompass) "
                             f"or questions/<config>.json (GitHub) for configs {', '.join(CONFIGS)}")


def _flatten_nested(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """{video_id: {dim: [{question, answer}, ...]}} -> rows with video_id and dim, in file order."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise BenchmarkDataError(f"{path}: json: expected an object keyed by video_id, got {type(data).__name__}")
    rows: list[tuple[str, dict[str, Any]]] = []
    for video_id, by_dim in data.items():
        if not isinstance(by_dim, dict):
            raise BenchmarkDataError(f"{path}: {video_id}: expected an object keyed by dim, "
                                     f"got {type(by_dim).__name__}")
        for dim, questions in by_dim.items():
            if not isinstance(questions, list):
                raise BenchmarkDataError(f"{path}: {video_id}.{dim}: expected a list of questions, "
                                         f"got {type(questions).__name__}")
            for k, question in enumerate(questions):
                if not isinstance(question, dict):
                    raise BenchmarkDataError(f"{path}: {video_id}.{dim}[{k}]: expected an object with question and "
                                             f"answer, got {type(question).__name__}")
                rows.append((f"{path}: {video_id}.{dim}[{k}] (row {len(rows)})",
                             {**question, "video_id": video_id, "dim": dim}))
    return rows


def _attach_mc_question(captioning: list[tuple[str, dict[str, Any]]], multi_choice: list[tuple[str, dict[str, Any]]]
                        ) -> list[tuple[str, dict[str, Any]]]:
    """The official (and HF) pairing: each captioning row gets the first MC question of its (video_id, dim)."""
    first_mc: dict[tuple[str, str], dict[str, Any]] = {}
    for _, row in multi_choice:
        first_mc.setdefault((row["video_id"], row["dim"]), row)
    out = []
    for where, row in captioning:
        mc = first_mc.get((row["video_id"], row["dim"]))
        if mc is None:
            raise BenchmarkDataError(f"{where}: mc_question: expected a multi-choice question for video "
                                     f"{row['video_id']!r}, dim {row['dim']!r} in multi-choice.json")
        out.append((where, {**row, "mc_question": mc.get("question"), "mc_answer": mc.get("answer")}))
    return out


def parse_mc_question(question: str, where: str) -> tuple[str, tuple[str, ...]]:
    """"stem\\nA. x\\nB. y" -> ("stem", ("x", "y")); the options are the trailing "X. text" lines, lettered A, B, ..."""
    lines = question.split("\n")
    options: list[str] = []
    while lines and (match := _MC_OPTION_RE.match(lines[-1])):
        options.insert(0, match.group(2))
        lines.pop()
    letters = [chr(ord("A") + i) for i in range(len(options))]
    found = [line[0] for line in question.split("\n")[len(lines):]]
    if len(options) < 2 or found != letters or not lines:
        raise BenchmarkDataError(f"{where}: question: expected the question then 2-4 lines 'A. ...', 'B. ...', got "
                                 f"{question!r}")
    return "\n".join(lines), tuple(options)


def parse_caption_options(question: str, answer: str, where: str) -> tuple[str, list[str], list[str]]:
    """(instruction line, option labels, option sentences) of a caption-matching question; validates the answer."""
    lines = question.split("\n")
    option_lines = lines[1:]
    if len(option_lines) < 2 or any(": " not in line for line in option_lines):
        raise BenchmarkDataError(f"{where}: question: expected a first line then option lines 'Label: sentence', "
                                 f"got {question!r}")
    if ": " not in answer or len(answer.split(": ")[0].split()) < 2:
        raise BenchmarkDataError(f"{where}: answer: expected a full option line such as 'Caption A: ...', "
                                 f"got {answer!r}")
    return lines[0], [line.split(": ")[0] for line in option_lines], [line.split(": ")[1] for line in option_lines]


def load(data_root: Path) -> list[BenchItem]:
    layout, rows_by_config = _config_rows(data_root)
    items: list[BenchItem] = []
    for config in CONFIGS:
        for index, (where, row) in enumerate(rows_by_config.get(config, [])):
            items.append(_item(data_root, config, index, where, row, layout))
    return items


def _item(data_root: Path, config: str, index: int, where: str, row: Mapping[str, Any], layout: str) -> BenchItem:
    video_id = expect_str(row, "video_id", where)
    question = expect_str(row, "question", where)
    answer = expect_str(row, "answer", where)
    dim = expect_str(row, "dim", where)
    kind = _KIND_OF_CONFIG[config]
    stem, options, letter = question, (), None
    meta: dict[str, Any] = {"video_id": video_id, "released_question": question, "layout": layout}
    if kind == "multiple_choice":
        stem, options = parse_mc_question(question, where)
        letter = answer[:1]
        if not answer[1:2] == "." or not "A" <= letter < chr(ord("A") + len(options)):
            raise BenchmarkDataError(f"{where}: answer: expected 'X. option' with X one of the {len(options)} "
                                     f"option letters, got {answer!r}")
    elif kind == "yes_no":
        if answer not in ("yes", "no"):
            raise BenchmarkDataError(f"{where}: answer: expected 'yes' or 'no', got {answer!r}")
    elif kind == "caption_matching":
        stem, _, sentences = parse_caption_options(question, answer, where)
        options = tuple(sentences)
    else:  # captioning: the judge answers the paired multi-choice question from the model's caption
        meta["mc_question"] = expect_str(row, "mc_question", where)
        meta["mc_answer"] = expect_str(row, "mc_answer", where)
    return BenchItem(
        uid=f"{config}/{index}", benchmark=NAME, video=data_root / "videos" / f"{video_id}.mp4", question=stem,
        options=options, answer=answer, answer_letter=letter, kind=kind,  # type: ignore[arg-type]
        prompt=question + POST_PROMPTS[config],
        groups={"task_type": config, "dim": dim, "task_type_dim": f"{config}/{dim}"}, meta=meta)


# --------------------------------------------------------------------------------------------- scoring


def match_multi_choice(prediction: str, answer: str) -> bool | None:
    """lmms-eval's MC rules: exact answer, a bare letter, or "X." / "X)" at the start; None when none applies."""
    if prediction == answer:
        return True
    if prediction in ("A", "B", "C", "D"):
        return prediction == answer[0]
    if prediction.startswith(("A.", "B.", "C.", "D.")):
        return prediction.split(".")[0] == answer[0]
    if prediction.startswith(("A)", "B)", "C)", "D)")):
        return prediction.split(")")[0] == answer[0]
    return None


def read_yes_no(prediction: str) -> str | None:
    """lmms-eval ``extract_pred``: starts with "yes" / "no" (case-insensitive; so "not sure" reads as "no")."""
    lowered = prediction.lower()
    if lowered.startswith("yes"):
        return "yes"
    if lowered.startswith("no"):
        return "no"
    return None


def match_caption(prediction: str, question: str, answer: str) -> tuple[bool, str] | None:
    """lmms-eval ``eval_rule``: (correct, matched option) or None when the prediction names no option.

    A prediction names an option if it equals a full option line, its sentence (also after a ") "), its label
    ("Caption A", "Option 1") or the bare label id ("A", "1", also with "." removed); later kinds of match win.
    """
    option_lines = question.split("\n")[1:]
    sentences = [line.split(": ")[1] for line in option_lines]
    labels = [line.split(": ")[0] for line in option_lines]
    label_ids = labels + [label.replace("Sentence ", "").replace("Option ", "").replace("Caption ", "")
                          for label in labels]
    matched = None
    for line in option_lines:
        if line == prediction:
            matched = line
    for sentence in sentences:
        if sentence == prediction or (") " in prediction and sentence == prediction.split(") ")[1]):
            matched = sentence
    for label_id in label_ids:
        if label_id == prediction or label_id == prediction.replace(".", ""):
            matched = label_id
    if matched is None:
        return None
    correct = matched in (answer, answer.split(":")[0], answer.split(": ")[1], answer.split(": ")[0].split()[1])
    return correct, matched


def judge_rating(reply: str) -> int | None:
    """lmms-eval ``llm_output_to_rating``; None when the reply says neither Correct nor Incorrect."""
    if "Correct" not in reply and "Incorrect" not in reply:
        return None
    if reply.startswith("Correct"):
        return 1
    if reply.startswith("Incorrect"):
        return 0
    return 1 if "Incorrect" not in reply else 0


def fallback_judge_prompt(item: BenchItem, prediction: str) -> str:
    question_kind, header = _FALLBACK_JUDGE_WORDING[item.kind]
    return (f"{_fallback_judge_intro(question_kind)}\n{header}:\n{item.meta['released_question']}\n"
            f"Ground-Truth Answer: {item.answer}\nModel Prediction: {prediction}")


def caption_judge_prompt(item: BenchItem, prediction: str) -> str:
    return (f"{CAPTION_JUDGE_PROMPT}\nVideo Description:{prediction}\nMulti-Choice Question:\n"
            f"{item.meta['mc_question']}\nAnswer:")


def rate_caption_reply(reply: str, mc_answer: str) -> tuple[int, str | None]:
    """lmms-eval ``parse_llm_output_for_captioning``: (rating, the judge's answer). Rating 1 iff the answer starts
    with the right letter and names exactly one of "A.".."D."; an empty reply is -1 (counted as not correct)."""
    if not reply:
        return -1, None
    chosen = None
    for line in reply.split("\n"):
        line = line.strip()
        if "Answer" in line:
            chosen = line.replace("Answer:", "").strip()
    if chosen is None:
        chosen = reply
    letter_mentions = sum(chosen.count(prefix) for prefix in ("A.", "B.", "C.", "D."))
    rating = 1 if chosen.split(". ")[0] == mc_answer.split(". ")[0] and letter_mentions == 1 else 0
    return rating, chosen


def _ask(judge: Judge, prompt: str) -> str:
    return judge.complete([{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}],
                          max_tokens=JUDGE_MAX_TOKENS, temperature=JUDGE_TEMPERATURE)


def score_item(item: BenchItem, prediction: str, judge: Judge | None) -> ItemScore:
    if item.kind == "captioning":
        if judge is None:
            return ItemScore(item.uid, None, "needs_judge")
        try:
            rating, chosen = rate_caption_reply(_ask(judge, caption_judge_prompt(item, prediction)),
                                                item.meta["mc_answer"])
        except JudgeError:
            return ItemScore(item.uid, False, "judge_failed")
        return ItemScore(item.uid, rating == 1, "judge" if rating != -1 else "judge_failed", chosen)

    if item.kind == "multiple_choice":
        correct, extracted = match_multi_choice(prediction, item.answer), prediction[:1] or None
    elif item.kind == "yes_no":
        extracted = read_yes_no(prediction)
        correct = None if extracted is None else extracted == item.answer
    else:
        matched = match_caption(prediction, item.meta["released_question"], item.answer)
        correct, extracted = (None, None) if matched is None else matched
    if correct is not None:
        return ItemScore(item.uid, correct, "rule", extracted)
    if judge is None:
        return ItemScore(item.uid, False, "unmatched")
    try:
        rating = judge_rating(_ask(judge, fallback_judge_prompt(item, prediction)))
    except JudgeError:
        return ItemScore(item.uid, False, "judge_failed")
    return ItemScore(item.uid, rating == 1, "judge" if rating is not None else "judge_failed")


def extra_summary(items: Sequence[BenchItem], predictions: Mapping[str, str], scores: Sequence[ItemScore]
                  ) -> dict[str, Any]:
    """Mean of the per-task-type accuracies that were scored (papers quote multi-choice alone or this mean)."""
    tally: dict[str, list[int]] = {}
    for item, score in zip(items, scores):
        if score.method == "needs_judge":
            continue
        counts = tally.setdefault(item.groups["task_type"], [0, 0])
        counts[0] += bool(score.correct)
        counts[1] += 1
    values = [accuracy_percent(c, n) or 0.0 for c, n in tally.values()]
    return {"mean_task_type_accuracy": sum(values) / len(values) if values else None,
            "task_types_in_mean": list(tally)}


def notes(data_root: Path, items: Sequence[BenchItem]) -> list[str]:
    counts = {config: sum(item.groups["task_type"] == config for item in items) for config in CONFIGS}
    out = [f"{config}: {count} questions; the public release has {RELEASE_COUNTS[config]}"
           for config, count in counts.items() if count and count != RELEASE_COUNTS[config]]
    missing = [config for config, count in counts.items() if not count]
    if missing:
        out.append(f"configs missing: {', '.join(missing)}")
    return out


BENCHMARK: Final = Benchmark(
    name=NAME, title="TempCompass", load_fn=load, score_item=score_item,
    group_names=("task_type", "dim", "task_type_dim"), sample_qtype_group="dim",
    judge_only_kinds=frozenset({"captioning"}), part_group="task_type", expected_questions=sum(RELEASE_COUNTS.values()),
    extra_summary=extra_summary, notes_fn=notes)
