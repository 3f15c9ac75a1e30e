"""Training manifests: the optional clip fields, and the LLaVA-Video / Video-R1 converters (`storms data convert`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from storms_dist.data.convert import ConvertError, answer_letter, convert, convert_file, split_options
from storms_dist.data.manifest import ManifestError, Sample, read_manifest, write_manifest

# ------------------------------------------------------------------------------------------ clip fields


def base_record(**changes) -> dict:
    record = {"uid": "s0", "video": "v.avi", "question": "What happens?", "options": ["a", "b"], "answer": "A",
              "qtype": "x", "thought_video": None, "split": "train", "meta": {}}
    record.update(changes)
    return record


def test_clip_fields_round_trip_and_are_only_written_when_set(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(base_record(start_s=1.5, end_s=4)) + "\n" + json.dumps(base_record(uid="s1")) + "\n")
    clipped, whole = read_manifest(path)
    assert (clipped.start_s, clipped.end_s, whole.start_s, whole.end_s) == (1.5, 4, None, None)
    write_manifest(tmp_path / "copy.jsonl", [clipped, whole])
    lines = [json.loads(line) for line in (tmp_path / "copy.jsonl").read_text().splitlines()]
    assert lines[0]["start_s"] == 1.5 and lines[0]["end_s"] == 4 and "start_s" not in lines[1]
    only_start = Sample(**{**base_record(), "options": ("a", "b")}, root=tmp_path, start_s=2.0)
    assert "end_s" not in only_start.to_json_dict() and only_start.to_json_dict()["start_s"] == 2.0


@pytest.mark.parametrize("changes, message", [
    ({"start_s": -1}, "start_s: expected a finite time in seconds >= 0 or null, got -1"),
    ({"end_s": "3"}, "end_s: expected a finite time in seconds >= 0 or null, got '3'"),
    ({"start_s": True}, "start_s: expected a finite time"),
    ({"start_s": 3, "end_s": 3}, "end_s: expected end_s > start_s=3, got 3"),
])
def test_clip_fields_are_validated_with_file_and_line(tmp_path: Path, changes: dict, message: str) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(base_record()) + "\n" + json.dumps(base_record(uid="s1", **changes)) + "\n")
    with pytest.raises(ManifestError) as caught:
        read_manifest(path)
    assert str(caught.value).startswith(f"{path}:2: {message}"), str(caught.value)


def test_dataset_samples_frames_from_the_clip_only(tmp_path: Path) -> None:
    from storms_dist.data.dataset import DataConfig, VideoQADataset, load_video_inputs
    from storms_dist.data.preprocess import VisionSpec
    from storms_dist.data.sampling import FrameSamplingConfig
    from storms_dist.data.video_io import write_video

    frames = np.zeros((40, 56, 56, 3), np.uint8)
    frames[:] = np.arange(40, dtype=np.uint8)[:, None, None, None] * 6  # brightness encodes the frame index
    write_video(tmp_path / "v.avi", frames, 10.0, "mjpeg")
    spec = VisionSpec(family="qwen2_5_vl", patch_size=14, temporal_patch_size=2, merge_size=2,
                      image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    cfg = DataConfig(frames=FrameSamplingConfig(fps=None, num_frames=4, min_frames=4, max_frames=4),
                     max_pixels=56 * 56, decoder="pyav")
    whole = load_video_inputs(tmp_path / "v.avi", spec, cfg)
    clip = load_video_inputs(tmp_path / "v.avi", spec, cfg, start_s=1.0, end_s=2.5)
    assert whole.timestamps_s == [0.0, 1.3, 2.6, 3.9]
    assert clip.timestamps_s == [1.0, 1.5, 2.0, 2.5]

    samples = [Sample(**{**base_record(uid=uid), "options": ("a", "b")}, root=tmp_path, **clip_fields)
               for uid, clip_fields in (("whole", {}), ("clip", {"start_s": 1.0, "end_s": 2.5}))]

    class Tok:  # the dataset only needs a tokenizer for prompts; video inputs are what this test checks
        pass

    dataset = VideoQADataset(samples, Tok(), spec, cfg)
    assert dataset.video(samples[1].video_path, 1.0, 2.5).timestamps_s == clip.timestamps_s
    assert dataset.video(samples[0].video_path).timestamps_s == whole.timestamps_s
    assert set(dataset._video_cache) == {samples[0].video_path, (samples[1].video_path, 1.0, 2.5)}


# ------------------------------------------------------------------------------------------ parsing helpers


@pytest.mark.parametrize("text, expected", [
    (("<image>\nWhat is the man doing?\nA. Cooking\nB. Running\nC. Sleeping\nD. Reading\n"
      "Answer with the option's letter from the given choices directly."),
     ("What is the man doing?", ["Cooking", "Running", "Sleeping", "Reading"])),
    (("<video>\nWhy did the boy fall?\nOptions:\n(A) he slipped\n(B) he was pushed\n(C) he tripped\n"
      "Please respond with only the letter."),
     ("Why did the boy fall?", ["he slipped", "he was pushed", "he tripped"])),
    ("Context line.\nWhich one?\nA) red\nB) blue", ("Context line.\nWhich one?", ["red", "blue"])),
    ("Pick: A: yes\nB: no", None),  # the A line must start a line
    ("A. only one option\nThen text", None),
    ("Describe the video in detail.", None),
    ("Which is right?\nA. x\nC. y", None),  # letters out of order: not an option block
])
def test_split_options(text: str, expected) -> None:
    assert split_options(text) == expected


@pytest.mark.parametrize("reply, letter", [
    ("B", "B"), ("B.", "B"), ("(C) he tripped", "C"), ("C. he tripped", "C"), ("<answer> D </answer>", "D"),
    ("he was pushed", "B"), ("He slipped.", "A"), ("E", None), ("Because he slipped", None),
])
def test_answer_letter(reply: str, letter) -> None:
    assert answer_letter(reply, ["he slipped", "he was pushed", "he tripped", "she fell"]) == letter


# ------------------------------------------------------------------------------------------ LLaVA-Video


def llava_item(item_id: str = "v_abc", video: str = "academic_source/clip1.mp4", question: str | None = None,
               answer: str = "B.", **extra) -> dict:
    question = question or "<image>\nWhat does the dog do?\nA. Sits\nB. Jumps\nC. Sleeps\nAnswer with the letter."
    return {"id": item_id, "video": video, "data_source": "0_30_s_academic_v0_1",
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}], **extra}


def write_json(path: Path, items) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(items))
    return path


def test_llava_video_conversion(tmp_path: Path) -> None:
    items = [
        llava_item(),
        llava_item(answer="(C) Sleeps"),  # same id again: LLaVA-Video reuses ids per video
        llava_item("v_open", question="<image>\nDescribe the video.", answer="A dog jumps."),  # open-ended
        {"id": "v_multi", "video": "academic_source/clip2.mp4", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the car?\nA. red\nB. blue"},
            {"from": "gpt", "value": "A"},
            {"from": "human", "value": "Is it moving?"}, {"from": "gpt", "value": "Yes."},
            {"from": "human", "value": "Where does it go?\nA. left\nB. right\nC. nowhere"},
            {"from": "gpt", "value": "right"}]},
    ]
    source = write_json(tmp_path / "0_30_s_academic_v0_1" / "mc.json", items)
    out = tmp_path / "manifests" / "train.jsonl"
    report = convert_file(source, "llava_video", out)
    assert (report.num_items, report.num_samples, dict(report.skipped)) == (4, 4, {"not_multiple_choice": 2})
    assert report.summary().endswith("skipped: 2 not_multiple_choice")

    samples = read_manifest(out)
    assert [s.uid for s in samples] == ["llava_video-v_abc", "llava_video-v_abc-2", "llava_video-v_multi-q0",
                                        "llava_video-v_multi-q2"]
    first = samples[0]
    assert (first.question, first.options, first.answer) == ("What does the dog do?", ("Sits", "Jumps", "Sleeps"),
                                                              "B")
    assert samples[1].answer == "C" and samples[3].answer == "B" and samples[3].options == ("left", "right", "nowhere")
    assert first.video_path == (tmp_path / "0_30_s_academic_v0_1" / "academic_source" / "clip1.mp4").resolve()
    assert (first.qtype, first.split, first.thought_video) == ("llava_video", "train", None)
    assert first.meta == {"source_format": "llava_video", "source_id": "v_abc", "data_source": "0_30_s_academic_v0_1",
                          "source_file": "mc.json", "source_item": 0}

    inside = tmp_path / "0_30_s_academic_v0_1" / "train.jsonl"  # next to the videos: relative paths
    convert_file(source, "llava_video", inside, split="val", qtype="academic", uid_prefix="")
    line = json.loads(inside.read_text().splitlines()[0])
    assert (line["video"], line["uid"], line["split"], line["qtype"]) == ("academic_source/clip1.mp4", "v_abc",
                                                                          "val", "academic")


@pytest.mark.parametrize("item, message", [
    ("not an object", "item: expected a JSON object, got str"),
    ({"id": "x", "conversations": []}, "video: expected a video path string"),
    (llava_item(conversations=None), "conversations: expected a non-empty list"),
    (llava_item(conversations=[{"from": "gpt", "value": "B"}]), "conversations[0].from: expected 'human'"),
    (llava_item(conversations=[{"from": "human", "value": "A. x\nB. y"}]), "conversations: expected human/gpt"),
    (llava_item(answer="Maybe"), "conversations[1].value: expected an option letter A-C or an option's text"),
    (llava_item(question="<image>\nA. x\nB. y"), "conversations[0].value: expected question text before"),
    (llava_item(question="Which?\nA. same\nB. same"), "options: expected distinct options"),
    (llava_item(item_id=[1]), "id: expected a string or integer id"),
])
def test_llava_video_errors_name_file_item_and_field(tmp_path: Path, item, message: str) -> None:
    source = write_json(tmp_path / "mc.json", [llava_item(), item])
    with pytest.raises(ConvertError) as caught:
        convert(source, "llava_video")
    assert str(caught.value).startswith(f"{source}:1: {message}"), str(caught.value)
    samples, report = convert(source, "llava_video", on_error="skip")
    assert len(samples) == 1 and report.skipped["invalid"] == 1
    assert report.errors[0].startswith(f"{source}:1: {message}")


# ------------------------------------------------------------------------------------------ Video-R1


def r1_item(problem_id=2, **changes) -> dict:
    item = {"problem_id": problem_id, "problem": "What appears on the screen during the ascent?",
            "data_type": "video", "problem_type": "multiple choice",
            "options": ["A. A notification", "B. A military command", "C. A warning", "D. A weather update"],
            "process": "<think>...</think>", "solution": "<answer>B</answer>",
            "path": "./LLaVA-Video-178K/videos/ytb_1.mp4", "data_source": "LLaVA-Video-178K/30_60_s_youtube_v0_1"}
    item.update(changes)
    return item


def test_video_r1_conversion_jsonl_and_skips(tmp_path: Path) -> None:
    items = [r1_item(), r1_item(3, problem_type="numerical", solution="<answer>3</answer>", options=[]),
             r1_item(4, data_type="image", path="./img.jpg"), r1_item(5, options=["yes", "no"],
                                                                     solution="<answer>A</answer>"),
             r1_item(6, problem_type="free-form")]
    source = tmp_path / "Video-R1-data" / "r1.jsonl"
    source.parent.mkdir()
    source.write_text("".join(json.dumps(i) + "\n" for i in items))
    out = tmp_path / "Video-R1-data" / "train.jsonl"
    report = convert_file(source, "video_r1", out)
    assert report.num_items == 5 and report.num_samples == 2
    assert dict(report.skipped) == {"not_multiple_choice": 2, "not_video": 1}
    first, second = read_manifest(out)
    assert (first.uid, first.answer, first.options[1], first.qtype) == ("video_r1-2", "B", "A military command",
                                                                        "video_r1")
    assert json.loads(out.read_text().splitlines()[0])["video"] == "LLaVA-Video-178K/videos/ytb_1.mp4"
    assert first.meta["problem_type"] == "multiple choice" and first.meta["source_item"] == 1  # JSONL: line number
    assert second.options == ("yes", "no") and second.answer == "A"


@pytest.mark.parametrize("item, message", [
    (r1_item(solution="B is right"), "solution: expected '<answer>X</answer>' with a letter A-D, got 'B is right'"),
    (r1_item(solution="<answer>E</answer>"), "solution: expected '<answer>X</answer>' with a letter A-D"),
    (r1_item(solution=None), "solution: expected '<answer>X</answer>', got None"),
    (r1_item(problem=""), "problem: expected a non-empty question string"),
    (r1_item(options="A. x"), "options: expected a list of non-empty strings"),
    (r1_item(options=["B. x", "A. y"]), "options: expected the letter prefixes A., B., C. ... in order"),
    (r1_item(options=["only"], solution="<answer>A</answer>"), "options: expected a list of 2-16 strings"),
    (r1_item(path=None), "path: expected a video path string"),
    (r1_item(problem_type=None), "problem_type: expected a string such as 'multiple choice', got None"),
])
def test_video_r1_errors_name_file_item_and_field(tmp_path: Path, item, message: str) -> None:
    source = write_json(tmp_path / "r1.json", [r1_item(), r1_item(9), item])
    with pytest.raises(ConvertError) as caught:
        convert(source, "video_r1")
    assert str(caught.value).startswith(f"{source}:2: {message}"), str(caught.value)


def test_input_file_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(ConvertError, match=r"broken.json: json: expected a JSON array"):
        convert(broken, "video_r1")
    wrapped = write_json(tmp_path / "wrapped.json", {"annotations": [r1_item()]})
    assert len(convert(wrapped, "video_r1")[0]) == 1
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text(json.dumps(r1_item()) + "\n{oops\n")
    with pytest.raises(ConvertError, match=r"bad.jsonl:2: json: expected one JSON object per line"):
        convert(bad_line, "video_r1")
    with pytest.raises(ValueError, match="format"):
        convert(wrapped, "sharegpt")


def test_cli_data_convert(tmp_path: Path, capsys) -> None:
    from storms_dist.cli import main

    source = write_json(tmp_path / "r1.json", [r1_item(), r1_item(7, problem_type="OCR"), r1_item(8, solution="?")])
    out, report_path = tmp_path / "out" / "train.jsonl", tmp_path / "report.json"
    assert main(["data", "convert", "--format", "video_r1", str(source), "--out", str(out)]) == 2
    assert f"storms data convert: error: {source}:2: solution" in capsys.readouterr().err
    assert main(["data", "convert", "--format", "video_r1", str(source), "--out", str(out), "--on-error", "skip",
                 "--report", str(report_path)]) == 0
    captured = capsys.readouterr()
    assert "3 items -> 1 multiple-choice samples" in captured.out and f"skipped: {source}:2: solution" in captured.err
    report = json.loads(report_path.read_text())
    assert report["skipped"] == {"not_multiple_choice": 1, "invalid": 1} and len(read_manifest(out)) == 1
