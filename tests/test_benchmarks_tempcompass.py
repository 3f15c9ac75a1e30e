"""TempCompass: both layouts (HF parquet, nested GitHub JSON), the official matching rules, judge fallback and
captioning through a scripted judge, per task type / dim breakdowns."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from storms_dist.data.video_io import encoder_available, write_video
from storms_dist.eval.benchmarks import (
    BENCHMARKS,
    BenchmarkDataError,
    JudgeError,
    tempcompass,
)

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
needs_h264 = pytest.mark.skipif(not encoder_available("h264"), reason="libx264 is not in this PyAV build")

MC_ACTION_Q = ("What is the man doing in the video?\nA. dunking a basketball\nB. dribbling a basketball\n"
               "C. passing a basketball")
# Rows are contiguous per (video_id, dim), as in the nested release, so both layouts flatten to the same order.
ROWS: dict[str, list[dict]] = {
    "multi-choice": [
        {"video_id": "1034419625", "dim": "action", "question": MC_ACTION_Q, "answer": "A. dunking a basketball"},
        {"video_id": "1034419625", "dim": "direction",
         "question": "Which way does the man move?\nA. towards the camera\nB. away from the camera\n"
                     "C. from left to right\nD. from right to left",
         "answer": "C. from left to right"},
        {"video_id": "1034419625_reverse", "dim": "direction",
         "question": "Which way does the man move?\nA. from left to right\nB. from right to left\nC. upwards",
         "answer": "B. from right to left"},
        {"video_id": "2_concat_3", "dim": "speed", "question": "How fast is the car?\nA. slow\nB. fast",
         "answer": "A. slow"},
    ],
    "yes_no": [
        {"video_id": "1034419625", "dim": "action", "question": "Is the man dunking?", "answer": "yes"},
        {"video_id": "1034419625_reverse", "dim": "direction", "question": "Is the man moving left to right?",
         "answer": "no"},
        {"video_id": "2_concat_3", "dim": "speed", "question": "Is the car fast at first?", "answer": "yes"},
    ],
    "caption_matching": [
        {"video_id": "1034419625", "dim": "action",
         "question": "Which caption matches the video better?\nCaption A: A man is dunking a basketball.\n"
                     "Caption B: The man is shooting a basketball.",
         "answer": "Caption A: A man is dunking a basketball."},
        {"video_id": "7_8_9", "dim": "order",
         "question": "Which description is a more suitable match for the video?\nOption 1: The dog sits, then "
                     "runs.\nOption 2: The dog runs, then sits.",
         "answer": "Option 2: The dog runs, then sits."},
        {"video_id": "55", "dim": "attribute_change",
         "question": "Which sentence better captures the essence of the video?\nSentence A: The light turns red."
                     "\nSentence B: The light turns green.",
         "answer": "Sentence B: The light turns green."},
    ],
    "captioning": [
        {"video_id": "1034419625", "dim": "action",
         "question": "Please identify the information consistent with the video and generate a caption.\n"
                     "Information A: {'subject': 'man', 'action': 'dribbling'}\n"
                     "Information B: {'subject': 'man', 'action': 'dunking'}\nGenerated Caption:",
         "answer": "B. dunking", "mc_question": MC_ACTION_Q, "mc_answer": "A. dunking a basketball"},
        {"video_id": "1034419625", "dim": "action", "question": "Describe the action.\nGenerated Caption:",
         "answer": "B. dunking", "mc_question": MC_ACTION_Q, "mc_answer": "A. dunking a basketball"},
    ],
}

PREDICTIONS = {
    "multi-choice/0": "A",                               # bare letter: right
    "multi-choice/1": "C) from left to right",           # "X)": right
    "multi-choice/2": "The man is moving right to left",  # no rule matches: judge or wrong
    "multi-choice/3": "B. fast",                         # wrong
    "yes_no/0": "Yes, he is.",                           # right
    "yes_no/1": "not sure",                              # starts with "no": right (official quirk)
    "yes_no/2": "Maybe",                                 # no rule matches: judge or wrong
    "caption_matching/0": "Caption A",                   # label: right
    "caption_matching/1": "1",                           # bare label id of the wrong option
    "caption_matching/2": "(B) The light turns green.",  # sentence after ") ": right
    "captioning/0": "A man dunks a basketball.",         # judge only
    # captioning/1: missing
}


def write_parquet_layout(root: Path) -> Path:
    for config, rows in ROWS.items():
        (root / config).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), root / config / "test-00000-of-00001.parquet")
    return root


def write_json_layout(root: Path) -> Path:
    (root / "questions").mkdir(parents=True, exist_ok=True)
    for config, rows in ROWS.items():
        nested: dict[str, dict[str, list[dict]]] = {}
        for row in rows:
            nested.setdefault(row["video_id"], {}).setdefault(row["dim"], []).append(
                {"question": row["question"], "answer": row["answer"]})
        (root / "questions" / f"{config}.json").write_text(json.dumps(nested, indent=1), encoding="utf-8")
    return root


class ScriptedJudge:
    """Replies by the first needle found in the last message; records every call."""

    def __init__(self, replies: list[tuple[str, str | Exception]], default: str = "Incorrect") -> None:
        self.replies, self.default = replies, default
        self.calls: list[tuple[list[dict], int, float]] = []
        self._lock = threading.Lock()

    def complete(self, messages, *, max_tokens: int, temperature: float) -> str:
        with self._lock:
            self.calls.append((list(messages), max_tokens, temperature))
        prompt = messages[-1]["content"]
        for needle, reply in self.replies:
            if needle in prompt:
                if isinstance(reply, Exception):
                    raise reply
                return reply
        return self.default


@pytest.fixture()
def parquet_root(tmp_path: Path) -> Path:
    return write_parquet_layout(tmp_path / "TempCompass")


def test_load_items_from_parquet(parquet_root: Path) -> None:
    items = BENCHMARKS["tempcompass"].load(parquet_root)
    assert len(items) == 12
    mc = items[0]
    assert mc.uid == "multi-choice/0" and mc.kind == "multiple_choice"
    assert mc.question == "What is the man doing in the video?"
    assert mc.options == ("dunking a basketball", "dribbling a basketball", "passing a basketball")
    assert mc.answer_letter == "A" and mc.prompt == MC_ACTION_Q + "\nPlease directly give the best option:"
    assert mc.groups == {"task_type": "multi-choice", "dim": "action", "task_type_dim": "multi-choice/action"}
    by_uid = {item.uid: item for item in items}
    assert by_uid["yes_no/1"].prompt == "Is the man moving left to right?\nPlease answer yes or no:"
    assert by_uid["yes_no/1"].video == parquet_root.resolve() / "videos" / "1034419625_reverse.mp4"
    assert by_uid["caption_matching/1"].options == ("The dog sits, then runs.", "The dog runs, then sits.")
    assert by_uid["captioning/0"].prompt == ROWS["captioning"][0]["question"]  # no post-prompt for captioning
    assert by_uid["captioning/0"].meta["mc_answer"] == "A. dunking a basketball"


def test_nested_json_layout_matches_parquet(tmp_path: Path) -> None:
    from_parquet = BENCHMARKS["tempcompass"].load(write_parquet_layout(tmp_path / "hf"))
    from_json = BENCHMARKS["tempcompass"].load(write_json_layout(tmp_path / "github"))
    assert [i.uid for i in from_json] == [i.uid for i in from_parquet]
    for a, b in zip(from_json, from_parquet):
        assert (a.prompt, a.answer, a.options, dict(a.groups), a.video.name) == \
               (b.prompt, b.answer, b.options, dict(b.groups), b.video.name)
        assert a.meta.get("mc_question") == b.meta.get("mc_question")  # first MC question of the (video, dim)


def test_rules_follow_the_official_matching() -> None:
    assert tempcompass.match_multi_choice("A. dunking a basketball", "A. dunking a basketball") is True
    assert tempcompass.match_multi_choice("B", "A. dunking") is False
    assert tempcompass.match_multi_choice("A) dunking", "A. dunking") is True
    assert tempcompass.match_multi_choice("The answer is A", "A. dunking") is None
    assert tempcompass.read_yes_no("No.") == "no" and tempcompass.read_yes_no("nope") == "no"
    assert tempcompass.read_yes_no("I think yes") is None
    question = ROWS["caption_matching"][1]["question"]
    answer = ROWS["caption_matching"][1]["answer"]
    assert tempcompass.match_caption("Option 2", question, answer) == (True, "Option 2")
    assert tempcompass.match_caption("2.", question, answer) == (True, "2")
    assert tempcompass.match_caption("The dog runs, then sits.", question, answer)[0] is True
    assert tempcompass.match_caption("Option 2: The dog runs, then sits.", question, answer)[0] is True
    assert tempcompass.match_caption("the second one", question, answer) is None
    assert tempcompass.judge_rating("Correct.") == 1 and tempcompass.judge_rating("Incorrect") == 0
    assert tempcompass.judge_rating("The prediction is Correct") == 1 and tempcompass.judge_rating("hmm") is None
    assert tempcompass.rate_caption_reply("Reasoning: r\nAnswer: A. dunking a basketball", "A. dunking")[0] == 1
    assert tempcompass.rate_caption_reply("Answer: A. dunking or B. dribbling", "A. dunking")[0] == 0
    assert tempcompass.rate_caption_reply("Answer: None of the choices are correct", "A. dunking")[0] == 0
    assert tempcompass.rate_caption_reply("", "A. dunking")[0] == -1


def test_score_without_judge_reports_captioning_apart(parquet_root: Path) -> None:
    bench = BENCHMARKS["tempcompass"]
    summary = bench.score(bench.load(parquet_root), PREDICTIONS)
    assert summary["num_questions"] == 10 and summary["accuracy"] == pytest.approx(60.0)
    assert summary["breakdown"]["task_type"] == pytest.approx(
        {"multi-choice": 50.0, "yes_no": 200 / 3, "caption_matching": 200 / 3})
    assert summary["breakdown"]["dim"] == pytest.approx(
        {"action": 100.0, "direction": 200 / 3, "speed": 0.0, "order": 0.0, "attribute_change": 100.0})
    assert summary["counts"]["unmatched_by_rules"] == 2 and summary["counts"]["judged"] == 0
    assert summary["judge_required"]["captioning"]["num_questions"] == 2
    assert summary["judge_required"]["captioning"]["num_predictions"] == 1
    assert summary["mean_task_type_accuracy"] == pytest.approx((50 + 200 / 3 + 200 / 3) / 3)


def test_score_with_judge(parquet_root: Path) -> None:
    judge = ScriptedJudge([
        ("Model Prediction: The man is moving right to left", "Correct"),
        ("Model Prediction: Maybe", "Incorrect."),
        ("Video Description:A man dunks a basketball.", "Reasoning: it says dunking.\nAnswer: A. dunking a basketball"),
    ])
    bench = BENCHMARKS["tempcompass"]
    summary = bench.score(bench.load(parquet_root), PREDICTIONS, judge)
    assert "judge_required" not in summary
    assert summary["num_questions"] == 12 and summary["accuracy"] == pytest.approx(8 / 12 * 100)
    assert summary["breakdown"]["task_type"]["captioning"] == pytest.approx(50.0)
    assert summary["breakdown"]["task_type"]["multi-choice"] == pytest.approx(75.0)
    assert summary["counts"]["judged"] == 3 and summary["counts"]["missing_predictions"] == 1
    assert len(judge.calls) == 3
    for messages, max_tokens, temperature in judge.calls:
        assert messages[0] == {"role": "system", "content": "You are an AI assistant for question answering."}
        assert (max_tokens, temperature) == (128, 1.0)
    prompts = {m[-1]["content"] for m, _, _ in judge.calls}
    mc_prompt = next(p for p in prompts if "Multi-Choice Question:\nWhich way" in p)
    assert mc_prompt.startswith("\n        You will receive a multi-choice question, the ground-truth answer")
    assert mc_prompt.endswith("Ground-Truth Answer: B. from right to left\n"
                              "Model Prediction: The man is moving right to left")
    caption_prompt = next(p for p in prompts if "Video Description:A man" in p)
    assert caption_prompt.endswith(f"Multi-Choice Question:\n{MC_ACTION_Q}\nAnswer:")
    assert "    Answer: None of the choices are correct\n    ```\n    \nVideo Description:" in caption_prompt


def test_judge_failure_counts_wrong(parquet_root: Path) -> None:
    judge = ScriptedJudge([("Video Description:", JudgeError("judge http://x: HTTP 500"))], default="Correct")
    bench = BENCHMARKS["tempcompass"]
    summary = bench.score(bench.load(parquet_root), PREDICTIONS, judge, judge_workers=1)
    assert summary["counts"]["judge_failures"] == 1
    assert summary["breakdown"]["task_type"]["captioning"] == 0.0
    assert summary["breakdown"]["task_type"]["yes_no"] == 100.0  # "Maybe" judged Correct by the default reply


@needs_h264
def test_check_reverse_ids_and_missing_videos(parquet_root: Path) -> None:
    videos = parquet_root / "videos"
    videos.mkdir()
    for video_id in ("1034419625", "1034419625_reverse", "2_concat_3", "7_8_9"):
        write_video(videos / f"{video_id}.mp4", np.zeros((4, 16, 16, 3), np.uint8), 4.0, "h264")
    (videos / "7_8_9.mp4").write_bytes(b"truncated")
    report = BENCHMARKS["tempcompass"].check(parquet_root, workers=2)
    assert report.num_videos == 5
    assert [path.name for path, _, _ in report.missing] == ["55.mp4"]
    assert [path.name for path, _ in report.unreadable] == ["7_8_9.mp4"]
    assert any(note.startswith("multi-choice: 4 questions; the public release has 1580") for note in report.notes)


def test_malformed_rows(tmp_path: Path) -> None:
    cases = {
        "yes_no": ({**ROWS["yes_no"][0], "answer": "Yes"}, "answer: expected 'yes' or 'no'"),
        "multi-choice": ({**ROWS["multi-choice"][0], "answer": "D. flying"}, "answer: expected 'X. option'"),
        "caption_matching": ({**ROWS["caption_matching"][0], "question": "Which?\nno label here\nnor here"},
                             "question: expected a first line then option lines"),
    }
    for config, (bad_row, message) in cases.items():
        root = tmp_path / config
        (root / config).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist([bad_row]), root / config / "test-00000-of-00001.parquet")
        with pytest.raises(BenchmarkDataError, match=f"row 0: {message}"):
            BENCHMARKS["tempcompass"].load(root)
    (tmp_path / "nested" / "questions").mkdir(parents=True)
    (tmp_path / "nested" / "questions" / "captioning.json").write_text("{}", encoding="utf-8")
    with pytest.raises(BenchmarkDataError, match="multi-choice.json: file: expected it next to captioning.json"):
        BENCHMARKS["tempcompass"].load(tmp_path / "nested")


def test_only_multi_choice_becomes_samples(parquet_root: Path) -> None:
    bench = BENCHMARKS["tempcompass"]
    samples = bench.to_samples(bench.load(parquet_root))
    assert [s.uid for s in samples] == [f"multi-choice/{i}" for i in range(4)]
    assert samples[3].options == ("slow", "fast") and samples[3].answer == "A" and samples[3].qtype == "speed"
