"""What a new user hits first: `storms infer` checks its inputs before loading weights and names both latencies;
`storms train` option mistakes are one-line usage errors (exit 2)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import REPO

from storms_dist.cli import main
from storms_dist.data.video_io import write_video
from storms_dist.eval.evaluate import format_answer
from storms_dist.model.build import ModelConfig, build_model, export_model

QUICK = str(REPO / "configs/demo/synth_quick.yaml")


@pytest.fixture(scope="module")
def export_and_video(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("infer")
    model = build_model(ModelConfig(backbone="qwen2_5_vl-micro", dtype="float32", attn_implementation="sdpa"),
                        tokenizer, seed=0)
    export = export_model(model, tokenizer, folder / "export", num_latents=2, max_latents=4)
    video = folder / "clip.webm"
    write_video(video, np.random.default_rng(0).integers(0, 256, (16, 56, 56, 3), dtype=np.uint8), fps=8.0,
                codec="vp9")
    return export, video


def infer_args(export, video, *extra):
    return ["infer", "--model", str(export), "--video", str(video), "--question", "Which wall next?",
            "--options", "left", "right", "top", "bottom", *extra]


def test_infer_reports_cold_and_warm_latency(export_and_video, capsys):
    export, video = export_and_video
    assert main(infer_args(export, video, "--warm-runs", "2")) == 0
    out = capsys.readouterr().out
    assert re.search(r"^answer: ([A-D]  \(raw '.*'\)|none \(the model emitted no option letter; raw '.*'\))$", out,
                     re.M), out
    assert re.search(r"^K=2, latency: cold \d+\.\d ms \(first call\), warm \d+\.\d ms \(median of 2\)$", out, re.M), out


def test_infer_checks_the_video_before_loading_the_model(export_and_video, tmp_path, capsys):
    export, _ = export_and_video
    broken = tmp_path / "broken_export"  # valid settings, unloadable weights: loading them would raise a traceback
    broken.mkdir()
    (broken / "storms_latent.json").write_text((export / "storms_latent.json").read_text())
    (broken / "config.json").write_text("{not json")
    missing = tmp_path / "nope.webm"
    assert main(infer_args(broken, missing)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("storms infer: error: ") and str(missing) in err and "\n" not in err
    assert main(infer_args(tmp_path, missing)) == 2  # no export at all: named before the video
    assert "not a STORMS export" in capsys.readouterr().err


def test_infer_takes_a_sample_from_a_manifest_in_its_option_order(export_and_video, capsys):
    import json

    export, video = export_and_video
    manifest = video.parent / "test.jsonl"
    manifest.write_text(json.dumps({"uid": "s0", "video": video.name, "question": "Where next?",
                                    "options": ["r1c1", "r1c2", "r2c1"], "answer": "B", "qtype": "future_cell",
                                    "thought_video": None, "split": "test"}) + "\n")
    assert main(["infer", "--model", str(export), "--sample", f"{manifest}:s0", "--warm-runs", "0"]) == 0
    assert re.search(r"^K=2, latency: cold \d+\.\d ms \(first call\)$", capsys.readouterr().out, re.M)
    for argv, message in [
        (["--sample", f"{manifest}:nope"], f"--sample: {manifest} has no uid 'nope' (1 samples)"),
        (["--sample", f"{manifest}:s0", "--video", str(video)], "--sample takes video, question and options from "
                                                                "the manifest; drop --video"),
        (["--video", str(video)], "pass --sample MANIFEST:UID, or --video, --question and --options (missing: "
                                  "--options, --question)"),
    ]:
        assert main(["infer", "--model", str(export), *argv]) == 2
        assert capsys.readouterr().err == f"storms infer: error: {message}\n"


def test_an_answer_without_a_letter_says_so():
    line = format_answer({"answer": None, "raw": "", "num_latents": 4, "cold_latency_ms": 612.0,
                          "warm_latency_ms": 115.25, "warm_runs": 3})
    assert line == ("answer: none (the model emitted no option letter; raw '')\n"
                    "K=4, latency: cold 612.0 ms (first call), warm 115.2 ms (median of 3)")


@pytest.mark.parametrize("args, message", [
    ([], "--stage is required (0, 1 or 2)"),
    (["--stage", "1"], "--init-from not given and {runs}/demo_quick/stage0/export does not exist; train stage 0 "
                       "first or pass --init-from"),
    (["--stage", "2", "--init-from", "{runs}/nothing"], "--init-from {runs}/nothing: no such export folder"),
])
def test_train_option_mistakes_are_usage_errors(tmp_path, capsys, args, message):
    runs = tmp_path / "runs"
    argv = ["train", QUICK, *[a.format(runs=runs) for a in args], f"runs_dir={runs}"]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"storms train: error: {message.format(runs=runs)}\n"
