"""Video-MME: HF parquet layout, lmms-eval prompts (with and without subtitles), both extractors, scoring, check."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from storms_dist.data.video_io import encoder_available, write_video
from storms_dist.eval.benchmarks import (
    BENCHMARKS,
    BenchmarkDataError,
    extract_mcq_letter,
    videomme,
)

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
needs_h264 = pytest.mark.skipif(not encoder_available("h264"), reason="libx264 is not in this PyAV build")

OPTIONS = ["A. Apples.", "B. Candles.", "C. Berries.", "D. The three kinds are of the same number."]


def row(question_id: str, duration: str, youtube_id: str, answer: str, **overrides) -> dict:
    record = {"video_id": question_id.split("-")[0], "duration": duration, "domain": "Knowledge",
              "sub_category": "Humanity & History", "url": f"https://www.youtube.com/watch?v={youtube_id}",
              "videoID": youtube_id, "question_id": question_id, "task_type": "Counting Problem",
              "question": f"Question {question_id}?", "options": OPTIONS, "answer": answer}
    record.update(overrides)
    return record


# Six questions over four videos: every duration, a .MP4 file, a missing video and a corrupt one.
ROWS = [
    row("001-1", "short", "vidShort01", "C"),
    row("001-2", "short", "vidShort01", "A", task_type="OCR Problems"),
    row("002-1", "medium", "vidMedium2", "B", domain="Sports Competition", sub_category="Basketball"),
    row("003-1", "long", "vidLong003", "D"),
    row("003-2", "long", "vidLong003", "B"),
    row("004-1", "short", "vidMissing", "D"),
]


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def tiny_video(path: Path, num_frames: int = 4, fps: float = 4.0) -> Path:
    frames = np.zeros((num_frames, 16, 16, 3), np.uint8)
    frames[:, 4:12, 4:12] = 200
    write_video(path, frames, fps, "h264")
    return path


@pytest.fixture()
def videomme_root(tmp_path: Path) -> Path:
    root = tmp_path / "Video-MME"
    write_parquet(root / "videomme" / "test-00000-of-00001.parquet", ROWS)
    return root


def with_videos(root: Path) -> Path:
    tiny_video(root / "data" / "vidShort01.mp4", num_frames=40)  # 10 s at 4 fps, for the subtitle frames
    tiny_video(root / "data" / "vidMedium2.mp4").rename(root / "data" / "vidMedium2.MP4")
    (root / "data" / "vidLong003.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 8)
    return root


def test_load_builds_items_prompt_and_groups(videomme_root: Path) -> None:
    items = BENCHMARKS["videomme"].load(videomme_root)
    assert [item.uid for item in items] == [r["question_id"] for r in ROWS]
    first = items[0]
    assert first.options == ("Apples.", "Candles.", "Berries.", "The three kinds are of the same number.")
    assert first.answer_letter == "C" and first.kind == "multiple_choice"
    assert first.groups == {"duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
                            "task_type": "Counting Problem"}
    assert first.video == videomme_root.resolve() / "data" / "vidShort01.mp4"
    # lmms-eval default kwargs: instruction, question, options as stored, then a blank line and the post-prompt
    assert first.prompt == (
        "Select the best answer to the following multiple-choice question based on the video and the subtitles. "
        "Respond with only the letter (A, B, C, or D) of the correct option.\n"
        "Question 001-1?\n"
        "A. Apples.\nB. Candles.\nC. Berries.\nD. The three kinds are of the same number.\n"
        "\nAnswer with the option's letter from the given choices directly.")


@needs_h264
def test_video_suffix_fallback_follows_lmms_eval(videomme_root: Path) -> None:
    with_videos(videomme_root)
    items = {item.uid: item for item in BENCHMARKS["videomme"].load(videomme_root)}
    assert items["002-1"].video.name == "vidMedium2.MP4"
    assert items["004-1"].video.name == "vidMissing.mp4"  # nothing exists: the primary path, for the report


def test_extract_mcq_letter_priorities() -> None:
    cases = {
        "C": "C",
        "(B) Candles.": "B",
        "The answer is C.": "C",
        "The correct option is D": "D",
        "Answer: B": "B",
        "A man walks to the tree.": "A",  # a standalone leading letter has the top priority
        "I think it's B, not A": "A",  # ending on a standalone letter beats "B,"
        "答案是B": "B",
        "none of these": "",
        "E": "",  # not a Video-MME choice
        "   ": "",
    }
    for response, expected in cases.items():
        assert extract_mcq_letter(response, choices=("A", "B", "C", "D")) == expected, response


def test_official_extractor_is_first_letter_after_phrases() -> None:
    assert videomme.official_extract_letter("The best answer is B") == "B"
    assert videomme.official_extract_letter("A man walks; the answer is B") == "A"
    assert videomme.official_extract_letter("this answer has more than ten words and no letter from the set at all") == ""
    assert videomme.official_extract_letter("") == ""


def test_score_known_predictions(videomme_root: Path) -> None:
    bench = BENCHMARKS["videomme"]
    items = bench.load(videomme_root)
    predictions = {
        "001-1": "C",                          # right
        "001-2": "The answer is (A).",         # right
        "002-1": "A man walks. Answer: B",     # the leading "A" wins: wrong
        "003-1": "",                           # empty: wrong (official: skipped)
        # 003-2 has no prediction: wrong
        "004-1": "<think>maybe A</think> D",   # reasoning stripped: right
        "999-9": "B",                          # not a question
    }
    summary = bench.score(items, predictions)
    assert summary["benchmark"] == "videomme"
    assert summary["num_questions"] == 6
    assert summary["accuracy"] == pytest.approx(50.0)
    assert summary["breakdown"]["duration"] == {"short": 100.0, "medium": 0.0, "long": 0.0}
    assert summary["breakdown"]["task_type"] == pytest.approx({"Counting Problem": 40.0, "OCR Problems": 100.0})
    assert summary["counts"]["missing_predictions"] == 1 and summary["counts"]["correct"] == 3
    assert summary["unknown_prediction_uids"] == 1
    # official script: first A-D letter, empty extractions out of the denominator -> 3 of 4
    assert summary["official_accuracy"] == pytest.approx(75.0) and summary["official_answered"] == 4


def test_subtitle_frames_follow_lmms_eval() -> None:
    blocks = videomme.parse_srt(
        "1\n00:00:00,000 --> 00:00:01,000\n<font color=\"white\" size=\".72c\">hello</font>\n\n"
        "2\n00:00:01,000 --> 00:00:01,250\n<font color=\"white\" size=\".72c\">between samples</font>\n\n"
        "3\n00:00:01,250 --> 00:00:02,000\nno font tag here\n\n"
        "4\n00:00:05,000 --> 00:00:06,000\n<font color=\"white\" size=\".72c\">later</font>\n")
    assert len(blocks) == 4
    # 40 frames at 4 fps, 32 samples at linspace(0, 39, 32) -> frame 4 (block 2 spans [4, 5)) is never sampled
    assert videomme.subtitle_text(blocks, fps=4.0, total_frames=40) == "hello\nlater"
    assert videomme.subtitle_text(blocks, fps=4.0, total_frames=40, frame_num=-1) == "hello\nbetween samples\nlater"


@needs_h264
def test_subtitle_prompt_and_missing_srt(videomme_root: Path) -> None:
    with_videos(videomme_root)
    (videomme_root / "subtitle").mkdir()
    (videomme_root / "subtitle" / "vidShort01.srt").write_text(
        "1\n00:00:00,000 --> 00:00:01,000\n<font color=\"white\" size=\".72c\">hello</font>\n\n"
        "2\n00:00:01,000 --> 00:00:01,250\n<font color=\"white\" size=\".72c\">between samples</font>\n",
        encoding="utf-8")
    items = {item.uid: item for item in BENCHMARKS["videomme_w_subtitle"].load(videomme_root)}
    assert items["001-1"].prompt.startswith("This video's subtitles are listed below: \nhello\nSelect the best")
    assert items["001-1"].prompt.endswith("D. The three kinds are of the same number.\nThe best answer is:")
    assert items["002-1"].prompt.startswith("This video's subtitles are listed below: \nNo subtitles available\n")


@needs_h264
def test_check_lists_missing_and_corrupt_videos(videomme_root: Path) -> None:
    with_videos(videomme_root)
    report = BENCHMARKS["videomme"].check(videomme_root, workers=2)
    assert report.num_questions == 6 and report.num_videos == 4
    assert [(path.name, count) for path, count, _ in report.missing] == [("vidMissing.mp4", 1)]
    assert [path.name for path, _ in report.unreadable] == ["vidLong003.mp4"]
    lines = report.lines()
    assert any(line.startswith("missing: ") and "vidMissing.mp4" in line and "004-1" in line for line in lines)
    assert any(line.startswith("unreadable: ") and "vidLong003.mp4" in line for line in lines)
    assert any("the public release has 2700" in line for line in lines)
    assert not report.ok


def test_malformed_rows_name_file_row_and_field(tmp_path: Path) -> None:
    for bad, field_name in ((row("001-1", "short", "v", "F"), "answer"),
                            (row("001-1", "tiny", "v", "A"), "duration"),
                            (row("001-1", "short", "v", "A", options=OPTIONS[:3]), "options")):
        root = tmp_path / field_name
        write_parquet(root / "videomme" / "test-00000-of-00001.parquet", [ROWS[1], bad])
        with pytest.raises(BenchmarkDataError) as error:
            BENCHMARKS["videomme"].load(root)
        message = str(error.value)
        assert "test-00000-of-00001.parquet: row 1: " + field_name + ":" in message and "\n" not in message
    write_parquet(tmp_path / "dup" / "videomme" / "a.parquet", [ROWS[0], ROWS[0]])
    with pytest.raises(BenchmarkDataError, match="question_id: expected unique ids"):
        BENCHMARKS["videomme"].load(tmp_path / "dup")
    with pytest.raises(BenchmarkDataError, match="expected videomme/test-00000-of-00001.parquet"):
        BENCHMARKS["videomme"].load(tmp_path)


def test_damaged_parquet_is_a_one_line_error(tmp_path: Path) -> None:
    damaged = tmp_path / "videomme" / "test-00000-of-00001.parquet"
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"PAR1 truncated download")
    with pytest.raises(BenchmarkDataError, match=r"test-00000-of-00001\.parquet: parquet: expected a readable") as e:
        BENCHMARKS["videomme"].load(tmp_path)
    assert "\n" not in str(e.value)


def test_missing_pyarrow_names_the_package(videomme_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        BENCHMARKS["videomme"].load(videomme_root)


def test_to_samples_strips_letter_prefixes(videomme_root: Path) -> None:
    bench = BENCHMARKS["videomme"]
    samples = bench.to_samples(bench.load(videomme_root))
    assert len(samples) == 6
    sample = samples[0]
    assert sample.uid == "001-1" and sample.answer == "C" and sample.answer_text == "Berries."
    assert sample.qtype == "Counting Problem" and sample.split == "test" and sample.thought_video is None
    assert sample.meta["prompt"].endswith("directly.") and sample.meta["groups"]["duration"] == "short"
