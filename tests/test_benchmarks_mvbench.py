"""MVBench: json/<task>.json + video-branch folders, derived answer letters, lmms-eval mcq_acc, both averages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from storms_dist.data.video_io import encoder_available, write_video
from storms_dist.eval.benchmarks import BENCHMARKS, BenchmarkDataError
from storms_dist.eval.benchmarks.mvbench import build_prompt, normalize_answer

needs_h264 = pytest.mark.skipif(not encoder_available("h264"), reason="libx264 is not in this PyAV build")

CHARADES = ["The clothes.", "The pillow.", "The shoe.", "The phone/camera."]
TASKS = {
    "action_sequence": [  # bounded; the first names the raw clip, whose pre-cut segment is on disk
        {"video": "USNP1.mp4", "question": "Which object was taken by the person?", "candidates": CHARADES,
         "answer": "The phone/camera.", "start": 1.2999999999999998, "end": 15.4},
        {"video": "ABC12_3.0_9.5.mp4", "question": "What happened first?", "candidates": CHARADES,
         "answer": "The clothes.", "start": 3.0, "end": 9.5},
    ],
    "object_existence": [
        {"video": "video_10001.mp4", "question": "Are there any cubes?", "candidates": ["yes", "no", "maybe"],
         "answer": "no"},
        {"video": "video_10002.mp4", "question": "How many spheres enter?", "candidates": ["1", "2", "3"],
         "answer": "3"},
        {"video": "video_10003.mp4", "question": "Is a cylinder moving?", "candidates": ["yes", "no"],
         "answer": "yes"},
    ],
    "fine_grained_pose": [
        {"video": "S001C001P001R001A001_rgb.avi", "question": "What is the person doing?",
         "candidates": ["walking", "sitting down", "standing up"], "answer": "standing up"},
    ],
}


def write_tasks(root: Path, tasks: dict[str, list[dict]]) -> Path:
    (root / "json").mkdir(parents=True, exist_ok=True)
    for task, records in tasks.items():
        (root / "json" / f"{task}.json").write_text(json.dumps(records), encoding="utf-8")
    return root


def tiny_video(path: Path) -> None:
    write_video(path, np.full((4, 16, 16, 3), 90, np.uint8), 4.0, "h264")


@pytest.fixture()
def mvbench_root(tmp_path: Path) -> Path:
    return write_tasks(tmp_path / "MVBench", TASKS)


def test_load_derives_letters_prompts_and_paths(mvbench_root: Path) -> None:
    items = BENCHMARKS["mvbench"].load(mvbench_root)
    # tasks in MVBench's order, uid = task/index
    assert [item.uid for item in items] == ["action_sequence/0", "action_sequence/1", "object_existence/0",
                                            "object_existence/1", "object_existence/2", "fine_grained_pose/0"]
    first = items[0]
    assert first.answer == "The phone/camera." and first.answer_letter == "D"
    assert first.meta["start_s"] == 1.2999999999999998 and first.meta["end_s"] == 15.4
    assert first.prompt == ("Question:Which object was taken by the person?\nOption:\n(A) The clothes.\n"
                            "(B) The pillow.\n(C) The shoe.\n(D) The phone/camera.\nOnly give the best option.\n")
    assert items[5].answer_letter == "C" and items[5].groups == {"task": "fine_grained_pose"}
    assert items[5].video == mvbench_root.resolve() / "nturgbd_convert" / "S001C001P001R001A001_rgb.avi"
    assert items[2].video == mvbench_root.resolve() / "clevrer" / "video_validation" / "video_10001.mp4"


@needs_h264
def test_segment_and_data0613_fallbacks(mvbench_root: Path) -> None:
    segment = mvbench_root / "star" / "Charades_segment" / "USNP1_1.2999999999999998_15.4.mp4"
    segment.parent.mkdir(parents=True)
    tiny_video(segment)
    tiny_video(mvbench_root / "star" / "Charades_segment" / "ABC12_3.0_9.5.mp4")
    fallback = mvbench_root / "data0613" / "clevrer" / "video_validation" / "video_10001.mp4"
    fallback.parent.mkdir(parents=True)
    tiny_video(fallback)
    items = {item.uid: item for item in BENCHMARKS["mvbench"].load(mvbench_root)}
    assert items["action_sequence/0"].video == segment.resolve()
    assert items["action_sequence/1"].video.name == "ABC12_3.0_9.5.mp4"
    assert items["object_existence/0"].video == fallback.resolve()


def test_mcq_acc_normalization_quirks() -> None:
    assert normalize_answer("(D) The phone/camera.") == "D"
    assert normalize_answer("B. The pillow") == "B"
    assert normalize_answer("A.") == "A"
    assert normalize_answer("Option C") == "C"
    assert normalize_answer("a person holds it") == "A"  # the article reads as option A
    assert normalize_answer("I'd pick C") == "D"  # the "d" of "I'd" stands alone after the apostrophe
    assert normalize_answer("standing up") == "standing up"  # answer text is not mapped to its letter
    assert normalize_answer("") == ""


def test_score_known_predictions(mvbench_root: Path) -> None:
    bench = BENCHMARKS["mvbench"]
    items = bench.load(mvbench_root)
    predictions = {
        "action_sequence/0": "(D) The phone/camera.",  # right
        "action_sequence/1": "A.",                      # right
        "object_existence/0": "",                       # empty: wrong, and out of lmms-eval's denominator
        "object_existence/1": "Option C",               # right
        # object_existence/2: missing -> wrong
        "fine_grained_pose/0": "standing up",           # the text, not a letter: wrong under mcq_acc
    }
    summary = bench.score(items, predictions)
    assert summary["num_questions"] == 6 and summary["accuracy"] == pytest.approx(50.0)
    assert summary["breakdown"]["task"] == pytest.approx(
        {"action_sequence": 100.0, "object_existence": 100 / 3, "fine_grained_pose": 0.0})
    assert summary["mean_task_accuracy"] == pytest.approx((100 + 100 / 3 + 0) / 3)
    # lmms-eval: per task, correct / non-empty predictions -> 100, 100 (1 of 1 answered), 0
    assert summary["task_accuracy_lmms_eval"] == pytest.approx(
        {"action_sequence": 100.0, "object_existence": 100.0, "fine_grained_pose": 0.0})
    assert summary["mean_task_accuracy_lmms_eval"] == pytest.approx(200 / 3)
    assert summary["counts"]["missing_predictions"] == 1


@needs_h264
def test_check_lists_missing_corrupt_and_frame_folders(mvbench_root: Path) -> None:
    clevrer = mvbench_root / "clevrer" / "video_validation"
    clevrer.mkdir(parents=True)
    tiny_video(clevrer / "video_10001.mp4")
    (clevrer / "video_10002.mp4").write_bytes(b"")  # empty file
    (mvbench_root / "nturgbd_convert" / "S001C001P001R001A001_rgb.avi").mkdir(parents=True)  # a folder, not a file
    segment = mvbench_root / "star" / "Charades_segment"
    segment.mkdir(parents=True)
    tiny_video(segment / "USNP1_1.2999999999999998_15.4.mp4")
    tiny_video(segment / "ABC12_3.0_9.5.mp4")
    report = BENCHMARKS["mvbench"].check(mvbench_root, workers=3)
    assert [path.name for path, _, _ in report.missing] == ["video_10003.mp4"]
    assert sorted(path.name for path, _ in report.unreadable) == ["S001C001P001R001A001_rgb.avi", "video_10002.mp4"]
    reasons = {path.name: reason for path, reason in report.unreadable}
    assert "empty" in reasons["video_10002.mp4"] and "not a regular file" in reasons["S001C001P001R001A001_rgb.avi"]
    assert any("17 of 20 task files missing" in note for note in report.notes)


def test_malformed_records(tmp_path: Path) -> None:
    bad_answer = {"video": "x.mp4", "question": "q?", "candidates": ["a", "b"], "answer": "c"}
    write_tasks(tmp_path / "a", {"object_existence": [TASKS["object_existence"][0], bad_answer]})
    with pytest.raises(BenchmarkDataError, match=r"object_existence\.json: item 1: answer: expected the text of one"):
        BENCHMARKS["mvbench"].load(tmp_path / "a")
    bad_bounds = {**TASKS["action_sequence"][0], "end": "15.4"}
    write_tasks(tmp_path / "b", {"action_sequence": [bad_bounds]})
    with pytest.raises(BenchmarkDataError, match=r"item 0: end: expected seconds as a number"):
        BENCHMARKS["mvbench"].load(tmp_path / "b")
    write_tasks(tmp_path / "c", {"not_a_task": []})
    with pytest.raises(BenchmarkDataError, match=r"not_a_task\.json: task: expected one of the 20 MVBench tasks"):
        BENCHMARKS["mvbench"].load(tmp_path / "c")
    with pytest.raises(BenchmarkDataError, match=r"expected json/<task>\.json files"):
        BENCHMARKS["mvbench"].load(tmp_path / "c" / "json")


def test_prompt_letters_follow_stored_order() -> None:
    assert build_prompt("Q?", ["x", "y"]) == "Question:Q?\nOption:\n(A) x\n(B) y\nOnly give the best option.\n"


def test_to_samples_keeps_bounds_in_meta(mvbench_root: Path) -> None:
    bench = BENCHMARKS["mvbench"]
    samples = bench.to_samples(bench.load(mvbench_root))
    assert len(samples) == 6
    assert samples[0].answer == "D" and samples[0].options == tuple(CHARADES) and samples[0].qtype == "action_sequence"
    assert samples[0].meta["start_s"] == 1.2999999999999998
