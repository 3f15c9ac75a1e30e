"""Manifest JSONL: round trip, path resolution, and FILE:LINE errors for every malformed kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from storms_dist.data.manifest import (
    OPTION_LETTERS,
    ManifestError,
    Sample,
    SkippedLine,
    letter,
    read_manifest,
    write_manifest,
)


def record(uid: str = "s0", **changes) -> dict:
    base = {"uid": uid, "video": "videos/a.webm", "question": "How many balls are there?",
            "options": ["1", "2", "3"], "answer": "B", "qtype": "static", "thought_video": "thoughts/a.webm",
            "split": "train", "meta": {"variant": "num_balls"}}
    base.update(changes)
    return base


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_letters() -> None:
    assert OPTION_LETTERS == tuple("ABCDEFGHIJKLMNOP")  # 16: the grid task's 4 x 4 cells
    assert [letter(i) for i in range(16)] == list(OPTION_LETTERS)
    with pytest.raises(ValueError, match="0..15"):
        letter(16)


def test_round_trip_and_path_resolution(tmp_path: Path) -> None:
    absolute_video = str(tmp_path / "elsewhere" / "b.mp4")
    path = write_lines(tmp_path / "m.jsonl", [
        record("s0"),
        record("s1", video=absolute_video, thought_video=None, answer="A", options=["yes", "no"], meta=None),
    ])
    samples = read_manifest(path)
    assert [s.uid for s in samples] == ["s0", "s1"] and samples.skipped == []
    first, second = samples
    assert first.video_path == (tmp_path / "videos" / "a.webm").resolve()
    assert first.thought_path == (tmp_path / "thoughts" / "a.webm").resolve()
    assert (first.answer_index, first.answer_text, first.options) == (1, "2", ("1", "2", "3"))
    assert second.video_path == Path(absolute_video) and second.thought_path is None and second.meta == {}

    copy = tmp_path / "copy.jsonl"
    write_manifest(copy, samples)
    assert read_manifest(copy) == samples
    assert json.loads(copy.read_text().splitlines()[0]) == record("s0")


def test_writing_elsewhere_keeps_paths_pointing_at_the_same_files(tmp_path: Path) -> None:
    samples = read_manifest(write_lines(tmp_path / "m.jsonl", [record("s0")]))
    moved = tmp_path / "sub" / "moved.jsonl"
    write_manifest(moved, samples)
    (reread,) = read_manifest(moved)
    assert reread.video_path == samples[0].video_path and reread.thought_path == samples[0].thought_path
    assert json.loads(moved.read_text())["video"] == str(samples[0].video_path)  # outside sub/: absolute


def test_sample_is_hashable_and_validates_on_construction(tmp_path: Path) -> None:
    sample = Sample(**{**record(), "options": ("1", "2", "3")}, root=tmp_path)
    assert hash(sample) == hash(Sample(**{**record(), "options": ("1", "2", "3")}, root=tmp_path))
    with pytest.raises(ManifestError, match="^answer: "):
        Sample(**{**record(), "answer": "D"}, root=tmp_path)


@pytest.mark.parametrize("line, message", [
    ('{"uid": "x", ', "json: expected one JSON object per line"),
    ("[1, 2]", "line: expected a JSON object, got list"),
    (record(question=None) | {"question": None}, "question: expected a non-empty string"),
    ({k: v for k, v in record().items() if k != "video"}, "video: missing required field"),
    ({k: v for k, v in record().items() if k != "thought_video"}, "thought_video: missing required field"),
    (record(answer="Z"), "answer: expected a letter A-P, got 'Z'"),
    (record(answer="b"), "answer: expected a letter A-P, got 'b'"),
    (record(answer="D"), "answer: expected a letter A-C for 3 options, got 'D'"),
    (record(options=["only one"], answer="A"), "options: expected a list of 2-16 strings"),
    (record(options=[str(i) for i in range(17)]), "options: expected a list of 2-16 strings"),
    (record(options=["1", "1", "2"]), "options: expected distinct options"),
    (record(options=["1", 2, "3"]), "options: expected every option to be a non-empty string"),
    (record(split="dev"), "split: expected one of train, val, test, got 'dev'"),
    (record(meta=[1]), "meta: expected a JSON object, got list"),
    (record(thought_video=""), "thought_video: expected a non-empty path string or null"),
    (record(extra=1), "extra: unknown field"),
    (record(uid="s0"), "uid: expected a unique uid; 's0' already appears on line 1"),
])
def test_malformed_line_reports_file_line_field(tmp_path: Path, line, message: str) -> None:
    path = write_lines(tmp_path / "bad.jsonl", [record("s0"), "", line])
    with pytest.raises(ManifestError) as caught:
        read_manifest(path)
    text = str(caught.value)
    assert text.startswith(f"{path}:3: "), text  # line numbers count blank lines
    assert message in text and "\n" not in text

    skipping = read_manifest(path, on_error="skip")
    assert [s.uid for s in skipping] == ["s0"]
    assert skipping.skipped == [SkippedLine(3, text)]


def test_skip_mode_keeps_good_lines_in_order_and_first_of_duplicates(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "m.jsonl", [record("a"), "not json", record("b", answer="Q"), record("c"),
                                              record("a", question="duplicate"), record("d")])
    samples = read_manifest(path, on_error="skip")
    assert [s.uid for s in samples] == ["a", "c", "d"]
    assert samples[0].question == "How many balls are there?"
    assert [line_no for line_no, _ in samples.skipped] == [2, 3, 5]
    with pytest.raises(ValueError, match="on_error"):
        read_manifest(path, on_error="ignore")  # type: ignore[arg-type]


def test_write_rejects_duplicate_uids_and_is_atomic(tmp_path: Path) -> None:
    sample = Sample(**record(), root=tmp_path)
    target = tmp_path / "out.jsonl"
    with pytest.raises(ManifestError, match="'s0' appears twice"):
        write_manifest(target, [sample, sample])
    assert list(tmp_path.iterdir()) == []
    write_manifest(target, [])
    assert target.read_text() == "" and read_manifest(target) == []
