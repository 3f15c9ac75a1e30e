"""Video-MME (lmms-eval tasks ``videomme`` and ``videomme_w_subtitle``) in the HF ``lmms-lab/Video-MME`` layout.

Data root (an HF snapshot of lmms-lab/Video-MME or lmms-eval/Video-MME with its zips extracted in place)::

    videomme/test-00000-of-00001.parquet   # 2700 rows: video_id, duration, domain, sub_category, url, videoID,
                                           # question_id, task_type, question, options ["A. ...", ...], answer
    data/<videoID>.mp4                     # from videos_chunked_XX.zip (.MP4 and .mkv are tried next, as lmms-eval)
    subtitle/<videoID>.srt                 # from subtitle.zip; only some videos have one

The parquet may also sit directly in the data root. uid = ``question_id``. Scoring follows lmms-eval HEAD: the
shared priority-based letter extractor, a case-insensitive compare, and every question in the denominator. The
official script's rule (first A-D character after deleting answer phrases; empty extractions skipped) is reported
alongside as ``official_accuracy``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Final

import numpy as np

from storms_dist.eval.benchmarks.common import (
    BenchItem,
    Benchmark,
    BenchmarkDataError,
    ItemScore,
    accuracy_percent,
    expect_str,
    expect_str_list,
    expect_unique,
    extract_mcq_letter,
    read_parquet_dir,
)

NAME: Final = "videomme"
LETTERS: Final = ("A", "B", "C", "D")
DURATIONS: Final = ("short", "medium", "long")
INSTRUCTION: Final = ("Select the best answer to the following multiple-choice question based on the video and the "
                      "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")
# lmms-eval's default post_prompt; it starts with "\n", so a blank line separates it from the options.
POST_PROMPT: Final = "\nAnswer with the option's letter from the given choices directly."
SUBTITLE_HEADER: Final = "This video's subtitles are listed below: \n"
NO_SUBTITLES: Final = "No subtitles available"
SUBTITLE_POST_PROMPT: Final = "The best answer is:"  # hard-coded in lmms-eval's subtitle variant
SUBTITLE_FRAMES: Final = 32  # lmms-eval default frame_num for the subtitle variant
_FONT_TEXT_RE: Final = re.compile(r'<font color="white" size=".72c">(.*?)</font>')
_OPTION_PREFIX_RE: Final = re.compile(r"^([A-D])\.\s*")
_VIDEO_SUFFIXES: Final = (".mp4", ".MP4", ".mkv")

_COLUMNS: Final = ("video_id", "duration", "domain", "sub_category", "videoID", "question_id", "task_type",
                   "question", "options", "answer")


def annotation_folder(data_root: Path) -> Path:
    """``videomme/`` (the HF config folder), else the data root itself: the first one holding parquet shards."""
    for folder in (data_root / "videomme", data_root):
        if any(folder.glob("*.parquet")):
            return folder
    raise BenchmarkDataError(f"{data_root}: annotations: expected videomme/test-00000-of-00001.parquet (the HF "
                             "lmms-lab/Video-MME release) under the data root")


def resolve_video(data_root: Path, video_youtube_id: str) -> Path:
    """``data/<videoID>.mp4``, else ``.MP4``, else ``.mkv`` (lmms-eval's order); the .mp4 path when none exists."""
    candidates = [data_root / "data" / f"{video_youtube_id}{suffix}" for suffix in _VIDEO_SUFFIXES]
    return next((path for path in candidates if path.exists()), candidates[0])


def build_prompt(question: str, options: Sequence[str]) -> str:
    """lmms-eval ``videomme_doc_to_text`` with the default kwargs (options shown exactly as stored)."""
    return INSTRUCTION + "\n" + question + "\n" + "\n".join(options) + "\n" + POST_PROMPT


def build_subtitle_prompt(question: str, options: Sequence[str], subtitles: str) -> str:
    """lmms-eval ``videomme_doc_to_text_subtitle`` (default model kwargs)."""
    return (SUBTITLE_HEADER + subtitles + "\n" + INSTRUCTION + "\n" + question + "\n" + "\n".join(options) + "\n"
            + SUBTITLE_POST_PROMPT)


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    """SRT blocks as (start s, end s, text), parsed as lmms-eval does: blank-line separated blocks of >= 3 lines,
    text lines joined by spaces, and a repeated (start, end) pair keeping its first position but the last text."""
    blocks: dict[tuple[float, float], str] = {}
    for section in text.replace("\r\n", "\n").split("\n\n"):
        lines = section.split("\n")
        if not section.strip() or len(lines) < 3:
            continue
        times = lines[1].split(" --> ")
        if len(times) != 2:
            continue
        try:
            blocks[(_srt_seconds(times[0]), _srt_seconds(times[1]))] = " ".join(lines[2:])
        except ValueError:
            continue
    return [(start, end, text) for (start, end), text in blocks.items()]


def _srt_seconds(stamp: str) -> float:
    hours, minutes, rest = stamp.strip().split(":")
    seconds, millis = rest.split(",")
    return int(hours) * 3600 + int(minutes) * 60 + int(seconds) + int(millis) / 1000


def subtitle_text(blocks: Sequence[tuple[float, float, str]], fps: float, total_frames: int,
                  frame_num: int = SUBTITLE_FRAMES) -> str:
    """The subtitle lines lmms-eval shows: blocks whose [start, end) frame span holds one of ``frame_num``
    uniformly sampled frames (-1: every frame), reduced to the text inside ``<font color="white" size=".72c">``."""
    if frame_num == -1:
        frame_num = total_frames
    sampled = np.linspace(0, total_frames - 1, frame_num, dtype=int).tolist() if total_frames > 0 else []
    spans = [(int(start * fps), int(end * fps)) for start, end, _ in blocks]
    # lmms-eval collects the hits in a set; we keep them in block (chronological) order.
    kept = sorted({index for frame in sampled for index, (first, stop) in enumerate(spans) if first <= frame < stop})
    texts = []
    for index in kept:
        match = _FONT_TEXT_RE.search(blocks[index][2])
        if match:
            texts.append(match.group(1))
    return "\n".join(texts)


def _header_fps_and_frames(video: Path) -> tuple[float, int] | None:
    """fps and frame count from the container header (what OpenCV's CAP_PROP_* give lmms-eval); None if
    unreadable. Header values, not a demux count: the subtitle prompt needs this for 900 long videos."""
    import av

    try:
        with av.open(str(video)) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            frames = stream.frames
            if not frames and stream.duration and stream.time_base and fps:
                frames = int(float(stream.duration * stream.time_base) * fps)
            return (fps, int(frames)) if fps > 0 and frames > 0 else None
    except (av.FFmpegError, OSError, IndexError, ValueError):
        return None


def subtitles_for(data_root: Path, video_youtube_id: str, video: Path, frame_num: int) -> str:
    srt_path = data_root / "subtitle" / f"{video_youtube_id}.srt"
    if not srt_path.is_file():
        return NO_SUBTITLES
    try:
        blocks = parse_srt(srt_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise BenchmarkDataError(f"{srt_path}: subtitle: expected a readable UTF-8 .srt file ({e})") from None
    header = _header_fps_and_frames(video)
    if header is None:
        # The video is missing or unreadable (`storms data check` lists it): fall back to every block, which is
        # what lmms-eval's gemini_api "full subtitle" mode shows.
        return "\n".join(m.group(1) for _, _, text in blocks if (m := _FONT_TEXT_RE.search(text)))
    fps, total_frames = header
    return subtitle_text(blocks, fps, total_frames, frame_num)


def load(data_root: Path, *, with_subtitles: bool = False, subtitle_frames: int = SUBTITLE_FRAMES,
         benchmark_name: str = NAME) -> list[BenchItem]:
    rows = read_parquet_dir(annotation_folder(data_root))
    items: list[BenchItem] = []
    seen: dict[str, str] = {}
    for where, row in rows:
        for column in _COLUMNS:
            if column not in row:
                raise BenchmarkDataError(f"{where}: {column}: missing required column")
        question_id = expect_str(row, "question_id", where)
        expect_unique(question_id, seen, where, "question_id")
        duration = expect_str(row, "duration", where)
        if duration not in DURATIONS:
            raise BenchmarkDataError(f"{where}: duration: expected one of {', '.join(DURATIONS)}, got {duration!r}")
        options = expect_str_list(row, "options", where, min_len=4, max_len=4)
        answer = expect_str(row, "answer", where).strip()
        if answer.upper() not in LETTERS:
            raise BenchmarkDataError(f"{where}: answer: expected a letter A-D, got {answer!r}")
        question = expect_str(row, "question", where)
        youtube_id = expect_str(row, "videoID", where)
        video = resolve_video(data_root, youtube_id)
        prompt = (build_subtitle_prompt(question, options, subtitles_for(data_root, youtube_id, video,
                                                                         subtitle_frames))
                  if with_subtitles else build_prompt(question, options))
        items.append(BenchItem(
            uid=question_id, benchmark=benchmark_name, video=video, question=question,
            options=tuple(_OPTION_PREFIX_RE.sub("", option, count=1) for option in options),
            answer=answer, answer_letter=answer.upper(), kind="multiple_choice", prompt=prompt,
            groups={"duration": duration, "domain": expect_str(row, "domain", where),
                    "sub_category": expect_str(row, "sub_category", where),
                    "task_type": expect_str(row, "task_type", where)},
            meta={"video_id": expect_str(row, "video_id", where), "videoID": youtube_id,
                  "options_as_released": list(options)}))
    return items


def official_extract_letter(response: str) -> str:
    """The official Video-MME rule (eval_your_results.py; also lmms-eval before 2026-04): delete answer phrases,
    give up on long answers with no A-D character, else the first A-D character anywhere ("A man..." -> "A")."""
    text = response.strip()
    # The missing commas in the official list glue two pairs of phrases into one string each; kept as released.
    for phrase in ("The best answer is", "The correct answer is", "The answer is", "The answer",
                   "The best option isThe correct option is", "Best answer:Best option:"):
        text = text.replace(phrase, "")
    if len(text.split()) > 10 and not re.search("[ABCD]", text):
        return ""
    match = re.search("[ABCD]", text)
    return match.group(0) if match else ""


def score_item(item: BenchItem, prediction: str, judge: Any) -> ItemScore:
    letter = extract_mcq_letter(prediction, choices=LETTERS)
    return ItemScore(item.uid, letter.lower() == item.answer.lower(), "rule", letter or None)


def extra_summary(items: Sequence[BenchItem], predictions: Mapping[str, str], scores: Sequence[ItemScore]
                  ) -> dict[str, Any]:
    """The official script's number: its extractor, and questions with an empty extraction left out entirely."""
    answered = correct = 0
    for item in items:
        letter = official_extract_letter(predictions.get(item.uid, ""))
        if letter:
            answered += 1
            correct += letter == item.answer
    return {"official_accuracy": accuracy_percent(correct, answered), "official_answered": answered}


BENCHMARK: Final = Benchmark(
    name=NAME, title="Video-MME", load_fn=load, score_item=score_item,
    group_names=("duration", "domain", "sub_category", "task_type"), sample_qtype_group="task_type",
    expected_questions=2700, extra_summary=extra_summary)

BENCHMARK_WITH_SUBTITLES: Final = Benchmark(
    name="videomme_w_subtitle", title="Video-MME (with subtitles)",
    load_fn=partial(load, with_subtitles=True, benchmark_name="videomme_w_subtitle"), score_item=score_item,
    group_names=("duration", "domain", "sub_category", "task_type"), sample_qtype_group="task_type",
    expected_questions=2700, extra_summary=extra_summary)
