"""MMVU: official JSON and lmms-eval parquet layouts, lmms-eval HEAD rules (MC lenient, open-ended rules + judge),
the guarded open-ended rules and the exact-parity switch, judge-required reporting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from storms_dist.data.video_io import encoder_available, write_video
from storms_dist.eval.benchmarks import BENCHMARKS, BenchmarkDataError, mmvu

needs_h264 = pytest.mark.skipif(not encoder_available("h264"), reason="libx264 is not in this PyAV build")
URL = "https://huggingface.co/datasets/yale-nlp/MMVU/resolve/main/videos/{}"
EMPTY = {letter: "" for letter in "ABCDE"}


def record(index: int, video: str, question_type: str, answer: str, choices: dict | None = None,
           subject: str | None = None) -> dict:
    return {"id": f"validation_{index}", "video": URL.format(video),
            "youtube_url": "https://www.youtube.com/watch?v=x", "question_type": question_type,
            "metadata": {"subject": subject or video.split("/")[0].replace("_", " "), "textbook": "T",
                         "rationale": "R", "knowledge": []},
            "question": f"Question {index}?", "choices": choices or EMPTY, "answer": answer}


CHEM = {"A": "10.0", "B": "5.0", "C": "12.0", "D": "15.0", "E": "20.0"}
CS = {"A": "Depth-first search", "B": "Breadth-first search", "C": "Dijkstra", "D": "A*", "E": "Prim"}
PHARMA = {"A": "Aspirin", "B": "Insulin", "C": "Heparin", "D": "Ibuprofen", "E": "Warfarin"}
RECORDS = [
    record(0, "Art/0.mp4", "open-ended", "Dolly Zoom"),
    record(1, "Chemistry/0.mp4", "multiple-choice", "A", CHEM),
    record(2, "Computer_Science/3.mp4", "multiple-choice", "A", CS),
    record(3, "Pharmacy/5.mp4", "multiple-choice", "D", PHARMA, subject="Dentistry"),  # metadata disagrees
    record(4, "Computer_Science/7.mp4", "open-ended", "O(n log n)"),
    record(5, "Law/1.mp4", "open-ended", "force majeure"),
    record(6, "Biology/1.mp4", "multiple-choice", "B", CHEM),
]
PREDICTIONS = {
    "validation_0": "It is a dolly zoom shot.",  # answer inside the prediction: rule
    "validation_1": "A",
    "validation_2": "A is wrong, so B",          # first standalone letter is A: right under lmms-eval's rule
    "validation_3": "E",
    "validation_4": "",                          # lmms-eval: "" is inside every answer -> right; guarded: judge
    "validation_5": "an act of god clause",      # no rule: judge
    # validation_6: missing
}


def write_official(root: Path, records: list[dict] = RECORDS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "validation.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return root


class ScriptedJudge:
    def __init__(self, replies: dict[str, str]) -> None:
        self.replies = replies
        self.calls: list[tuple[list[dict], int, float]] = []

    def complete(self, messages, *, max_tokens: int, temperature: float) -> str:
        self.calls.append((list(messages), max_tokens, temperature))
        return next((reply for needle, reply in self.replies.items() if needle in messages[-1]["content"]), "0")


@pytest.fixture()
def mmvu_root(tmp_path: Path) -> Path:
    return write_official(tmp_path / "MMVU")


def test_load_official_json(mmvu_root: Path) -> None:
    items = BENCHMARKS["mmvu"].load(mmvu_root)
    assert [item.uid for item in items] == [f"validation_{i}" for i in range(7)]
    open_ended, chem = items[0], items[1]
    assert open_ended.kind == "open" and open_ended.options == () and open_ended.answer_letter is None
    assert open_ended.video == mmvu_root.resolve() / "videos" / "Art" / "0.mp4"
    assert open_ended.prompt == ("\nQuestion:Question 0?\nVisual Information: processed video\nDo not generate any "
                                 "intermediate reasoning process. Directly output the final answer.\n")
    assert chem.options == ("10.0", "5.0", "12.0", "15.0", "20.0") and chem.answer_letter == "A"
    assert chem.prompt == ("\nQuestion:Question 1?\nA: 10.0\nB: 5.0\nC: 12.0\nD: 15.0\nE: 20.0\nVisual Information: "
                           "processed video\nDo not generate any intermediate reasoning process. Answer directly "
                           "with the option letter from the\ngiven choices.\n")
    assert chem.groups == {"question_type": "multiple-choice", "discipline": "Science", "subject": "Chemistry"}
    # the subject comes from the video folder, as lmms-eval reads it, not from metadata.subject
    assert items[3].groups["subject"] == "Pharmacy" and items[3].groups["discipline"] == "Healthcare"


def test_parquet_layout_with_video_path_matches_json(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{**r, "video_path": "videos/" + r["video"].split("/videos/")[1]} for r in RECORDS]
    (tmp_path / "lmms" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "lmms" / "data" / "validation-00000-of-00001.parquet")
    from_parquet = BENCHMARKS["mmvu"].load(tmp_path / "lmms")
    from_json = BENCHMARKS["mmvu"].load(write_official(tmp_path / "official"))
    assert [(i.uid, i.prompt, i.options, dict(i.groups), i.video.relative_to(tmp_path / "lmms")) for i in from_parquet] \
        == [(i.uid, i.prompt, i.options, dict(i.groups), i.video.relative_to(tmp_path / "official")) for i in from_json]


def test_multiple_choice_rule_is_lmms_eval_lenient() -> None:
    rule = mmvu.multiple_choice_rule
    assert rule("A", "A", CHEM) == (True, "A")
    assert rule("The answer is (c).", "C", CHEM) == (True, "C")
    assert rule("A is wrong, so B", "B", CHEM)[0] is True  # the answer letter stands alone somewhere
    assert rule("I pick 12.0", "C", CHEM) == (True, None)  # the choice text appears
    assert rule("E", "D", PHARMA) == (False, "E")
    assert rule("ibuprofen, option D", "D", PHARMA)[0] is True


def test_open_ended_rules_guarded_and_compat() -> None:
    rule = mmvu.open_ended_rule
    assert rule("Dolly zoom", "Dolly Zoom") and rule("It is a DOLLY   zoom.", "Dolly Zoom")
    assert rule("zoom", "Dolly Zoom")  # a whole-word part of the answer (lmms-eval's "prediction in answer")
    assert rule("O(n²)", "O(n^2)") and rule("about 2.504 m", "2.5 m")
    assert rule("the superposition of quantum states", "Quantum superposition")  # 2-5 word answer, all words in
    for prediction in ("", "o", "oll"):  # lmms-eval accepts these because they are substrings of the answer
        assert not rule(prediction, "Dolly Zoom") and rule(prediction, "Dolly Zoom", lmms_eval_compat=True)
    assert not rule("anything", "to be") and rule("anything", "to be", lmms_eval_compat=True)
    assert not rule("Tracking shot", "Dolly Zoom", lmms_eval_compat=True)
    assert mmvu.parse_binary_verdict("1") and not mmvu.parse_binary_verdict("0")
    assert not mmvu.parse_binary_verdict("INCORRECT") and mmvu.parse_binary_verdict("Correct")


def test_score_without_judge_reports_open_ended_apart(mmvu_root: Path) -> None:
    bench = BENCHMARKS["mmvu"]
    summary = bench.score(bench.load(mmvu_root), PREDICTIONS)
    assert summary["num_questions"] == 4 and summary["accuracy"] == pytest.approx(50.0)
    assert summary["breakdown"]["question_type"] == {"multiple-choice": 50.0}
    assert summary["breakdown"]["discipline"] == {"Science": 50.0, "Engineering": 100.0, "Healthcare": 0.0}
    part = summary["judge_required"]["open-ended"]
    assert (part["num_questions"], part["num_predictions"], part["rule_correct"]) == (3, 3, 1)
    assert part["rule_only_accuracy"] == pytest.approx(100 / 3)
    compat = mmvu.BENCHMARK_LMMS_EVAL_COMPAT.score(bench.load(mmvu_root), PREDICTIONS)
    assert compat["judge_required"]["open-ended"]["rule_correct"] == 2  # the empty prediction counts there


def test_score_with_judge(mmvu_root: Path) -> None:
    judge = ScriptedJudge({"Model Prediction: an act of god clause": "1"})
    bench = BENCHMARKS["mmvu"]
    summary = bench.score(bench.load(mmvu_root), PREDICTIONS, judge, judge_workers=2)
    assert "judge_required" not in summary
    assert summary["num_questions"] == 7 and summary["accuracy"] == pytest.approx(400 / 7)
    assert summary["breakdown"]["question_type"] == pytest.approx({"open-ended": 200 / 3, "multiple-choice": 50.0})
    assert summary["counts"] == {"correct": 4, "missing_predictions": 1, "unmatched_by_rules": 0, "judged": 2,
                                 "judge_failures": 0}
    # only the two open-ended questions the rules rejected reach the judge; MC never does
    assert len(judge.calls) == 2
    messages, max_tokens, temperature = judge.calls[0]
    assert (len(messages), messages[0]["role"], max_tokens, temperature) == (1, "user", 1024, 0.0)
    prompts = sorted(m[0]["content"] for m, _, _ in judge.calls)
    assert prompts[0].startswith("You are a strict evaluator assessing answer correctness.")
    assert prompts[0].endswith("Question: Question 4?\nCorrect Answer: O(n log n)\nModel Prediction: ")
    assert prompts[1].endswith("Question: Question 5?\nCorrect Answer: force majeure\n"
                               "Model Prediction: an act of god clause")


@needs_h264
def test_check_and_subject_notes(mmvu_root: Path) -> None:
    for item in BENCHMARKS["mmvu"].load(mmvu_root)[:5]:
        item.video.parent.mkdir(parents=True, exist_ok=True)
        write_video(item.video, np.zeros((4, 16, 16, 3), np.uint8), 4.0, "h264")
    (mmvu_root / "videos" / "Chemistry" / "0.mp4").write_bytes(b"\x1a\x45\xdf\xa3 not a video")
    report = BENCHMARKS["mmvu"].check(mmvu_root)
    assert sorted(str(p.relative_to(mmvu_root.resolve())) for p, _, _ in report.missing) == \
        ["videos/Biology/1.mp4", "videos/Law/1.mp4"]
    assert [p.name for p, _ in report.unreadable] == ["0.mp4"] and "Chemistry" in str(report.unreadable[0][0])
    assert any("metadata.subject differs from their video folder" in n and "validation_3" in n for n in report.notes)


def test_malformed_records(tmp_path: Path) -> None:
    cases = [
        ({**RECORDS[1], "answer": "F"}, "answer: expected a letter A-E naming a non-empty choice"),
        ({**RECORDS[1], "question_type": "mc"}, "question_type: expected one of multiple-choice, open-ended"),
        ({**RECORDS[1], "choices": ["10", "5"]}, "choices: expected an object with string values for keys A-E"),
        ({**RECORDS[1], "video": "https://example.org/video.mp4"}, "video: expected a URL or path ending in"),
        ({**RECORDS[0], "id": "validation_1"}, "id: expected unique ids"),
    ]
    for index, (bad, message) in enumerate(cases):
        bad = {**bad, "id": bad["id"] if "unique" in message else "validation_99"}
        root = write_official(tmp_path / str(index), [RECORDS[1], bad])
        with pytest.raises(BenchmarkDataError, match=f"validation.json: item 1: {message}"):
            BENCHMARKS["mmvu"].load(root)


def test_only_multiple_choice_becomes_samples(mmvu_root: Path) -> None:
    bench = BENCHMARKS["mmvu"]
    samples = bench.to_samples(bench.load(mmvu_root))
    assert [s.uid for s in samples] == ["validation_1", "validation_2", "validation_3", "validation_6"]
    assert samples[0].options == tuple(CHEM.values()) and samples[0].qtype == "Science"
