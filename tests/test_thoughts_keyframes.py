"""Keyframe selection (uniform, scene change on videos with hard cuts) and the prompt sources' pure parts."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from storms_dist.data.manifest import Sample
from storms_dist.data.video_io import write_video
from storms_dist.thoughts.keyframes import (
    Keyframes,
    frame_difference_scores,
    grayscale_thumbnails,
    pick_condition,
    scene_change_keyframes,
    select_keyframes,
    uniform_keyframes,
)
from storms_dist.thoughts.prompts import (
    DEFAULT_TEMPLATE,
    PromptError,
    TeacherPrompt,
    TemplatePrompt,
    check_template,
    parse_teacher_reply,
    teacher_messages,
)

FPS = 10.0


def shots(cuts: dict[int, int], num_frames: int = 40, size: int = 32) -> np.ndarray:
    """A square moving right over a flat background whose grey level changes at each cut (frame -> level)."""
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    level = 20
    for t in range(num_frames):
        level = cuts.get(t, level)
        frames[t] = level
        x = 2 + (t % 10) * 2
        frames[t, 12:18, x:x + 6] = (230, 60, 60)
    return frames


CUTS = {20: 200, 30: 120}  # a big cut at 20, a smaller one at 30


def sample(tmp_path: Path, **changes) -> Sample:
    fields = dict(uid="q1", video="v.avi", question="Where does the red square go?", options=("left", "right"),
                  answer="B", qtype="motion", thought_video=None, split="train", root=tmp_path)
    return Sample(**{**fields, **changes})


def test_uniform_keyframes_spread_over_video_and_clip() -> None:
    assert uniform_keyframes(40, FPS, 4) == [0, 13, 26, 39]
    assert uniform_keyframes(40, FPS, 1) == [0]
    assert uniform_keyframes(3, FPS, 8) == [0, 1, 2]  # fewer frames than asked: no repeats
    assert uniform_keyframes(40, FPS, 3, start_s=1.0, end_s=2.0) == [10, 15, 20]
    with pytest.raises(ValueError, match="num_keyframes"):
        uniform_keyframes(40, FPS, 0)


def test_thumbnails_and_scores() -> None:
    frames = shots(CUTS)
    thumbs = grayscale_thumbnails(frames, size=8)
    assert thumbs.shape == (40, 8, 8) and thumbs.dtype == np.float32
    flat = np.full((2, 5, 7, 3), 100, np.uint8)
    assert np.allclose(grayscale_thumbnails(flat, size=32), 100.0)  # sides smaller than size: no upsampling
    scores = frame_difference_scores(frames)
    assert scores[0] == 0 and np.argmax(scores) == 20
    assert sorted(np.argsort(scores)[-2:]) == [20, 30]
    assert scores[30] > 5 * np.median(scores[1:])


def test_scene_change_finds_hard_cuts_and_always_keeps_the_first_frame() -> None:
    frames = shots(CUTS)
    assert scene_change_keyframes(frames, 2) == [0, 20]
    assert scene_change_keyframes(frames, 3) == [0, 20, 30]
    four = scene_change_keyframes(frames, 4)
    assert len(four) == 4 and {0, 20, 30} <= set(four)
    assert scene_change_keyframes(frames, 1) == [0]
    assert scene_change_keyframes(frames[:2], 5) == [0, 1]


def test_scene_change_on_static_video_falls_back_to_uniform() -> None:
    static = np.full((9, 16, 16, 3), 77, np.uint8)
    assert scene_change_keyframes(static, 3) == [0, 4, 8]


def test_scene_change_min_gap_suppresses_neighbouring_peaks() -> None:
    frames = shots({20: 200, 22: 30})
    assert scene_change_keyframes(frames, 3) == [0, 20, 22]
    picked = scene_change_keyframes(frames, 3, min_gap=5)
    assert 20 in picked and 22 not in picked and len(picked) == 3


@pytest.mark.parametrize("codec", ["mjpeg", "vp9"])
def test_select_keyframes_on_an_encoded_video(tmp_path: Path, codec: str) -> None:
    suffix = {"mjpeg": ".avi", "vp9": ".webm"}[codec]
    path = tmp_path / f"cut{suffix}"
    frames = shots(CUTS)
    write_video(path, frames, FPS, codec)
    keyframes = select_keyframes(path, "scene_change", 3)
    assert keyframes.indices == (0, 20, 30) and keyframes.method == "scene_change"
    assert keyframes.times_s == (0.0, 2.0, 3.0)
    assert keyframes.frames.shape == (3, 32, 32, 3)
    assert np.abs(keyframes.frames.astype(int) - frames[[0, 20, 30]].astype(int)).mean() < 4
    assert keyframes.to_json() == {"method": "scene_change", "indices": [0, 20, 30], "times_s": [0.0, 2.0, 3.0]}

    clipped = select_keyframes(path, "scene_change", 2, start_s=1.0, end_s=3.9)  # frames 10..39
    assert clipped.indices == (10, 20)
    # about every other frame is analysed: a cut lands on the first analysed frame after it
    analysed_subset = select_keyframes(path, "scene_change", 3, max_analysis_frames=20)
    first, after_20, after_30 = analysed_subset.indices
    assert first == 0 and 20 <= after_20 <= 22 and 30 <= after_30 <= 32
    uniform = select_keyframes(path, "uniform", 4, start_s=1.0)
    assert uniform.indices == (10, 20, 29, 39) and uniform.frames.shape[0] == 4
    with pytest.raises(ValueError, match="keyframes"):
        select_keyframes(path, "random", 3)  # type: ignore[arg-type]


def test_pick_condition() -> None:
    indices = [0, 5, 9]
    assert [pick_condition(indices, c) for c in ("first", "middle", "last")] == [0, 1, 2]
    assert pick_condition(indices, "auto") == 0
    assert pick_condition(indices, "auto", teacher_choice=2) == 2
    assert pick_condition(indices, "auto", teacher_choice=7) == 0  # out of range: ignored
    with pytest.raises(ValueError, match="condition"):
        pick_condition(indices, "best")


def test_template_prompt(tmp_path: Path) -> None:
    s = sample(tmp_path)
    text = TemplatePrompt()(s).text
    assert "Where does the red square go?" in text and "A. left; B. right" in text and "visible: right" in text
    custom = TemplatePrompt("Show how {question} plays out; answer {answer_letter} ({answer}), kind {qtype}.")
    assert custom(s).text == "Show how Where does the red square go? plays out; answer B (right), kind motion."
    assert custom(s).condition is None and custom.config() == {"source": "template", "template": custom.template}
    assert check_template(DEFAULT_TEMPLATE) == DEFAULT_TEMPLATE
    with pytest.raises(ValueError, match=r"unknown field \{solution\}"):
        TemplatePrompt("Show {solution}")
    with pytest.raises(ValueError, match="malformed"):
        TemplatePrompt("Show {question")


@pytest.mark.parametrize("reply, expected", [
    ('{"keyframe": 2, "prompt": "The square slides to the right."}', ("The square slides to the right.", 1)),
    ('```json\n{"keyframe": 1, "prompt": "A  ball\\n rolls."}\n```', ("A ball rolls.", 0)),
    ('Sure! {"keyframe": 9, "prompt": "Out of range keyframe."}', ("Out of range keyframe.", None)),
    ('{"keyframe": "2", "prompt": "String keyframe."}', ("String keyframe.", None)),
    ("The square slides right, then stops.", ("The square slides right, then stops.", None)),
])
def test_parse_teacher_reply(reply: str, expected: tuple) -> None:
    assert parse_teacher_reply(reply, 3) == expected


def test_parse_teacher_reply_rejects_empty() -> None:
    for reply in ("", "   ", '{"keyframe": 1, "prompt": "  "}'):
        with pytest.raises(PromptError):
            parse_teacher_reply(reply, 3)


class RecordingJudge:
    def __init__(self, reply: str) -> None:
        self.reply, self.calls = reply, []

    def complete(self, messages, *, max_tokens: int, temperature: float) -> str:
        self.calls.append((messages, max_tokens, temperature))
        return self.reply


def test_teacher_messages_and_prompt(tmp_path: Path) -> None:
    frames = shots(CUTS)[[0, 20, 30]]
    keyframes = Keyframes(method="scene_change", indices=(0, 20, 30), times_s=(0.0, 2.0, 3.0), frames=frames,
                          info=None)  # type: ignore[arg-type]
    s = sample(tmp_path)
    system, user = teacher_messages(s, keyframes, image_max_side=16)
    assert system["role"] == "system" and "JSON" in system["content"]
    images = [part for part in user["content"] if part["type"] == "image_url"]
    assert len(images) == 3
    jpeg = base64.b64decode(images[0]["image_url"]["url"].split(",", 1)[1])
    assert jpeg[:2] == b"\xff\xd8"
    text = user["content"][-1]["text"]
    assert "3 keyframes (1 at 0.00 s, 2 at 2.00 s, 3 at 3.00 s)" in text and "Correct answer: B. right" in text

    _, user = teacher_messages(s, keyframes, include_answer=False, send_images=False)
    assert [p["type"] for p in user["content"]] == ["text"] and "Correct answer" not in user["content"][0]["text"]

    judge = RecordingJudge(json.dumps({"keyframe": 3, "prompt": "The square keeps sliding right."}))
    teacher = TeacherPrompt(judge, max_tokens=50)
    result = teacher(s, keyframes)
    assert (result.text, result.condition, result.source) == ("The square keeps sliding right.", 2, "teacher")
    assert judge.calls[0][1:] == (50, 0.0) and teacher.needs_keyframes
    assert teacher.config()["include_answer"] is True
