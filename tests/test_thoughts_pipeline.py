"""``storms thoughts``: procedural / files backends, a teacher over HTTP, sharding, resuming, merging, the CLI."""

from __future__ import annotations

import dataclasses
import filecmp
import json
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from storms_dist.data.manifest import read_manifest, write_manifest
from storms_dist.data.synth import SynthConfig, generate
from storms_dist.data.video_io import decode_frames, probe_video, write_video
from storms_dist.eval.benchmarks.judge import OpenAIJudge
from storms_dist.thoughts.cli import main as thoughts_main
from storms_dist.thoughts.generators import FilesGenerator, GeneratedVideo, GenerationRequest, ProceduralGenerator
from storms_dist.thoughts.pipeline import (
    STAMP_NAME,
    ThoughtsError,
    ThoughtsSettings,
    file_stem,
    merge_thoughts,
    part_path,
    resolve_shard,
    run_thoughts,
    sample_seed,
)
from storms_dist.thoughts.prompts import TeacherPrompt, TemplatePrompt


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> dict[str, Path]:
    """6 train + 2 test synthetic videos (stamped set: the procedural backend's exact mode)."""
    root = tmp_path_factory.mktemp("synth") / "data"
    return generate(SynthConfig(task="balls", num_train=6, num_val=0, num_test=2, size=56, workers=1), root)


def test_procedural_reproduces_the_synthetic_thought_videos_exactly(synth, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = run_thoughts(synth["train"], out, ProceduralGenerator(), None, shard_index=0, num_shards=2)
    assert (first.num_samples, first.generated, first.merged) == (3, 3, None)
    assert first.merge_note == "not merged yet: 1 of 2 parts missing"
    second = run_thoughts(synth["train"], out, ProceduralGenerator(), None, shard_index=1, num_shards=2)
    assert second.merged == out / "train.jsonl" and second.generated == 3 and not second.failed

    source, merged = read_manifest(synth["train"]), read_manifest(out / "train.jsonl")
    assert [s.uid for s in merged] == [s.uid for s in source]  # input order, not shard order
    for before, after in zip(source, merged):
        assert after.video_path == before.video_path and after.question == before.question
        assert after.thought_video == f"thoughts/train/{before.uid}.webm"
        assert filecmp.cmp(after.thought_path, before.thought_path, shallow=False)  # byte-identical
        provenance = after.meta["thought_gen"]
        assert provenance["mode"] == "exact" and provenance["num_frames"] == 16
        assert {k: v for k, v in after.meta.items() if k != "thought_gen"} == before.meta
    stamp = json.loads((out / STAMP_NAME).read_text())
    assert stamp["generator"]["backend"] == "procedural" and stamp["prompt"] is None and stamp["keyframes"] is None


def test_procedural_without_the_synth_stamp_renders_from_meta_scene(synth, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(synth["train"].parent / "videos", copy / "videos")
    samples = read_manifest(synth["train"])
    write_manifest(copy / "train.jsonl", samples[:3])
    report = run_thoughts(copy / "train.jsonl", tmp_path / "out", ProceduralGenerator(), None)
    assert report.generated == 3 and report.merged is not None
    for before, after in zip(samples, read_manifest(report.merged)):
        assert after.meta["thought_gen"]["mode"] == "approximate"
        assert after.meta["thought_gen"]["thought"] == before.meta["thought"]
        info = probe_video(after.thought_path)
        assert (info.num_frames, info.fps, info.height) == (16, 8.0, 56)
    # a continuation without marks: the same balls as the exact render, where no event ring is drawn
    continuation = next(i for i, s in enumerate(samples[:3]) if s.meta["thought"] == "continuation")
    exact = decode_frames(samples[continuation].thought_path, range(16)).astype(int)
    approx = decode_frames(read_manifest(report.merged)[continuation].thought_path, range(16)).astype(int)
    assert (np.abs(exact - approx) > 40).mean() < 0.02


def test_resume_skips_finished_samples_and_redoes_missing_or_broken_ones(synth, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_thoughts(synth["train"], out, ProceduralGenerator(), None, shard_index=0, num_shards=2)
    videos = sorted((out / "thoughts" / "train").glob("*.webm"))
    mtimes = {v: v.stat().st_mtime_ns for v in videos}

    again = run_thoughts(synth["train"], out, ProceduralGenerator(), None, shard_index=0, num_shards=2)
    assert (again.generated, again.resumed) == (0, 3)
    assert {v: v.stat().st_mtime_ns for v in videos} == mtimes

    videos[0].unlink()
    videos[1].write_bytes(b"not a video")
    Path(f"{videos[2].with_suffix('')}.json").unlink()  # video written, record lost: still counts as done
    redo = run_thoughts(synth["train"], out, ProceduralGenerator(), None, shard_index=0, num_shards=2)
    assert (redo.generated, redo.resumed) == (2, 1)
    parts = {s.uid: s for s in read_manifest(redo.part)}
    assert parts[videos[2].stem].meta["thought_gen"] == {"resumed_without_record": True}

    # a video that decodes but does not match its record (here: 8 of 16 frames) is redone
    write_video(videos[0], decode_frames(videos[0], range(8)), 8.0, "vp9")
    assert probe_video(videos[0]).num_frames == 8
    fixed = run_thoughts(synth["train"], out, ProceduralGenerator(), None, shard_index=0, num_shards=2)
    assert (fixed.generated, fixed.resumed) == (1, 2) and probe_video(videos[0]).num_frames == 16

    # a different shard count reuses every finished video
    whole = run_thoughts(synth["train"], out, ProceduralGenerator(), None, shard_index=0, num_shards=1)
    assert (whole.generated, whole.resumed) == (3, 3) and whole.merged == out / "train.jsonl"


def test_changed_settings_are_refused_unless_overwrite(synth, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_thoughts(synth["train"], out, ProceduralGenerator(), None)
    with pytest.raises(ThoughtsError, match=r"other settings \(codec differ\)"):
        run_thoughts(synth["train"], out, ProceduralGenerator(), None, ThoughtsSettings(codec="mjpeg"))
    report = run_thoughts(synth["train"], out, ProceduralGenerator(), None, ThoughtsSettings(codec="mjpeg"),
                          overwrite=True)
    assert report.generated == 6 and not list((out / "thoughts").rglob("*.webm"))
    assert all(s.thought_video.endswith(".avi") for s in read_manifest(out / "train.jsonl"))
    with pytest.raises(ThoughtsError, match="another folder"):
        run_thoughts(synth["train"], synth["train"].parent, ProceduralGenerator(), None)


def test_files_backend_failures_merge_and_retry(synth, tmp_path: Path) -> None:
    samples = read_manifest(synth["train"])[:3]
    manifest = tmp_path / "in" / "train.jsonl"
    write_manifest(manifest, samples)
    supplied = tmp_path / "supplied"
    frames = np.zeros((5, 32, 32, 3), np.uint8)
    write_video(supplied / f"{samples[0].uid}.avi", frames, 4.0, "mjpeg")
    write_video(supplied / f"{samples[1].uid}.webm", frames + 90, 4.0, "vp9")
    out = tmp_path / "out"

    with pytest.raises(ThoughtsError, match=f"{samples[2].uid}: files: no thought video"):
        run_thoughts(manifest, out, FilesGenerator(supplied), None)
    report = run_thoughts(manifest, out, FilesGenerator(supplied), None, ThoughtsSettings(on_error="skip"))
    # the raising run had made the first two already
    assert (report.generated, report.resumed, len(report.failed), report.merged) == (0, 2, 1, None)
    assert report.merge_note.startswith("not merged: 1 samples have no thought video")
    dropped = merge_thoughts(manifest, out, 1, drop_failed=True)
    assert dropped.dropped == [samples[2].uid] and dropped.num_samples == 2
    merged = read_manifest(out / "train.jsonl")
    assert filecmp.cmp(merged[0].thought_path, supplied / f"{samples[0].uid}.avi", shallow=False)
    assert merged[1].thought_video.endswith(".webm")

    write_video(supplied / f"{samples[2].uid}.avi", frames, 4.0, "mjpeg")
    retry = run_thoughts(manifest, out, FilesGenerator(supplied), None, ThoughtsSettings(on_error="skip"))
    assert (retry.generated, retry.resumed, retry.failed) == (1, 2, [])
    assert [s.uid for s in read_manifest(retry.merged)] == [s.uid for s in samples]


def test_splits_filter_passes_other_samples_through(synth, tmp_path: Path) -> None:
    mixed = synth["train"].parent / "mixed.jsonl"
    write_manifest(mixed, [*read_manifest(synth["train"])[:2], *read_manifest(synth["test"])])
    report = run_thoughts(mixed, tmp_path / "out", ProceduralGenerator(), None, ThoughtsSettings(splits=("train",)))
    assert (report.generated, report.passed_through) == (2, 2)
    merged = read_manifest(report.merged)
    assert [s.thought_video.startswith("thoughts/") for s in merged] == [True, True, False, False]
    assert merged[2].thought_path == read_manifest(synth["test"])[0].thought_path  # still the original file
    assert "thought_gen" not in merged[2].meta


# -------------------------------------------------------------------------------- teacher over HTTP, clips


class FakeTeacher:
    """An OpenAI-compatible /v1/chat/completions server on loopback that answers with a fixed reply."""

    def __init__(self, reply: str) -> None:
        self.reply, self.bodies = reply, []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                owner.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant",
                                                                        "content": owner.reply}}]}).encode()
                self.send_response(200 if self.path == "/v1/chat/completions" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"


@pytest.fixture
def teacher() -> Iterator[FakeTeacher]:
    server = FakeTeacher(json.dumps({"keyframe": 2, "prompt": "The balls keep moving and bounce off the wall."}))
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


class RecordingGenerator:
    """A stand-in image-to-video backend: 5 frames of the conditioning keyframe; records every request."""

    name: ClassVar[str] = "recording"
    needs_keyframes: ClassVar[bool] = True
    needs_prompt: ClassVar[bool] = True

    def __init__(self) -> None:
        self.requests: list[GenerationRequest] = []

    def config(self) -> dict[str, Any]:
        return {"backend": self.name}

    def generate(self, request: GenerationRequest) -> GeneratedVideo:
        self.requests.append(request)
        frame = request.keyframes.frames[request.condition]
        return GeneratedVideo(frames=np.repeat(frame[None], 5, axis=0), fps=4.0, info={"fake": True})


def test_teacher_prompts_pick_the_condition_frame_and_clips_bound_keyframes(synth, tmp_path: Path,
                                                                             teacher: FakeTeacher) -> None:
    samples = read_manifest(synth["train"])[:2]
    clipped = [samples[0], dataclasses.replace(samples[1], start_s=1.0, end_s=1.875)]
    manifest = synth["train"].parent / "clipped.jsonl"
    write_manifest(manifest, clipped)
    assert read_manifest(manifest)[1].start_s == 1.0  # the optional fields round-trip

    generator = RecordingGenerator()
    source = TeacherPrompt(OpenAIJudge(base_url=teacher.base_url, model="teacher-test", max_retries=0))
    settings = ThoughtsSettings(keyframes="uniform", num_keyframes=3, seed=7)
    report = run_thoughts(manifest, tmp_path / "out", generator, source, settings)
    assert report.generated == 2 and report.merged is not None

    first, second = generator.requests
    assert first.keyframes.indices == (0, 8, 15) and second.keyframes.indices == (8, 12, 15)  # 16 frames at 8 fps
    assert first.condition == 1 and first.prompt == "The balls keep moving and bounce off the wall."
    assert first.seed == sample_seed(7, samples[0].uid) != second.seed
    body = teacher.bodies[0]
    assert body["model"] == "teacher-test" and body["temperature"] == 0.0
    parts = body["messages"][1]["content"]
    assert sum(p["type"] == "image_url" for p in parts) == 3 and samples[0].question in parts[-1]["text"]

    merged = read_manifest(report.merged)
    provenance = merged[1].meta["thought_gen"]
    assert provenance["condition_frame"] == 12 and provenance["teacher_keyframe"] == 1
    assert provenance["keyframes"] == {"method": "uniform", "indices": [8, 12, 15], "times_s": [1.0, 1.5, 1.875]}
    assert provenance["prompt_source"] == "teacher" and provenance["num_frames"] == 5
    assert (merged[1].start_s, merged[1].end_s) == (1.0, 1.875)
    stamp = json.loads((tmp_path / "out" / STAMP_NAME).read_text())
    assert stamp["prompt"]["model"] == "teacher-test" and "url" not in stamp["prompt"]
    assert stamp["keyframes"] == {"method": "uniform", "num_keyframes": 3, "condition": "auto"}

    template_run = run_thoughts(manifest, tmp_path / "out2", RecordingGenerator(), TemplatePrompt(),
                                ThoughtsSettings(condition="last"))
    assert read_manifest(template_run.merged)[0].meta["thought_gen"]["condition_frame"] == 15


# -------------------------------------------------------------------------------- helpers and the CLI


def test_resolve_shard_from_arguments_and_environment() -> None:
    assert resolve_shard(environ={}) == (0, 1)
    assert resolve_shard(2, 4, environ={"RANK": "1", "WORLD_SIZE": "8"}) == (2, 4)
    assert resolve_shard(environ={"RANK": "3", "WORLD_SIZE": "8"}) == (3, 8)
    slurm = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "10", "RANK": "0",
             "WORLD_SIZE": "2"}
    assert resolve_shard(environ=slurm) == (4, 10)
    with pytest.raises(ValueError, match="shard 4 of 4"):
        resolve_shard(4, 4, environ={})


def test_file_stem_is_safe_and_injective() -> None:
    assert file_stem("synth-train-000001") == "synth-train-000001"
    a, b = file_stem("a/b c"), file_stem("a_b c")
    assert "/" not in a and " " not in a and a != b and a.startswith("a_b_c-")
    assert not file_stem("../x").startswith(".") and len(file_stem("x" * 500)) < 140


def test_cli_shards_then_merge(synth, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    common = ["thoughts", "--manifest", str(synth["train"]), "--out", str(out), "--no-progress"]
    assert thoughts_main([*common, "--backend", "procedural", "--shard-index", "1", "--num-shards", "2"]) == 0
    assert "not merged yet" in capsys.readouterr().out
    assert thoughts_main([*common, "--backend", "procedural", "--shard-index", "0", "--num-shards", "2",
                          "--no-auto-merge"]) == 0
    assert not (out / "train.jsonl").exists() and part_path(out, "train.jsonl", 0, 2).is_file()
    assert thoughts_main([*common, "--merge", "--num-shards", "2"]) == 0
    assert "merged 2 parts" in capsys.readouterr().out and len(read_manifest(out / "train.jsonl")) == 6

    assert thoughts_main([*common, "--backend", "files"]) == 2
    assert "--files-dir: required" in capsys.readouterr().err
    assert thoughts_main([*common, "--merge", "--num-shards", "3"]) == 2
    assert "3 of 3 parts missing" in capsys.readouterr().err
    assert thoughts_main([*common, "--backend", "diffusers"]) == 2
    assert "--model-dir: required" in capsys.readouterr().err
