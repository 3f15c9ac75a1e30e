"""`storms eval --benchmark`: a model export over a Video-MME layout with lmms-eval's prompt, scored by the benchmark's
own rules; an unreadable video counts as a wrong answer and is listed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from storms_dist.data.dataset import DataConfig
from storms_dist.data.video_io import write_video
from storms_dist.eval.evaluate import EvalConfig, evaluate_benchmark
from storms_dist.model.build import ModelConfig, build_model, export_model

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
OPTIONS = ["A. Red.", "B. Green.", "C. Blue.", "D. Yellow."]


def row(question_id, duration, youtube_id, answer):
    return {"video_id": question_id.split("-")[0], "duration": duration, "domain": "Knowledge",
            "sub_category": "Art", "url": f"https://www.youtube.com/watch?v={youtube_id}", "videoID": youtube_id,
            "question_id": question_id, "task_type": "Counting Problem", "question": f"What colour is {question_id}?",
            "options": OPTIONS, "answer": answer}


def test_eval_benchmark_videomme(tmp_path, tokenizer):
    root = tmp_path / "Video-MME"
    (root / "videomme").mkdir(parents=True)
    rows = [row("001-1", "short", "vidA", "A"), row("001-2", "short", "vidA", "C"), row("002-1", "long", "vidB", "B")]
    pq.write_table(pa.Table.from_pylist(rows), root / "videomme" / "test-00000-of-00001.parquet")
    (root / "data").mkdir()
    frames = np.zeros((16, 56, 56, 3), np.uint8)
    frames[:, 10:40, 10:40, 0] = 220
    write_video(root / "data" / "vidA.mp4", frames, 8.0, "h264")
    (root / "data" / "vidB.mp4").write_bytes(b"not a video" * 50)

    model = build_model(ModelConfig(backbone="qwen2_5_vl-micro", num_latents=2), tokenizer)
    export = export_model(model, tokenizer, tmp_path / "export", num_latents=2, max_latents=4)
    cfg = EvalConfig(batch_size=2, num_latency_items=1, benchmark_num_frames=8, benchmark_min_pixels=56 * 56,
                     benchmark_max_pixels=56 * 56, benchmark_max_new_tokens=3)
    metrics = evaluate_benchmark(export, "videomme", root, DataConfig(), cfg, tmp_path / "out")

    assert metrics["benchmark"] == "videomme" and metrics["num_questions"] == 3
    assert len(metrics["unreadable_videos"]) == 1 and "vidB" in metrics["unreadable_videos"][0]
    assert metrics["settings"]["num_frames"] == 8 and metrics["num_latents"] == 2
    assert set(metrics["breakdown"]["duration"]) >= {"short", "long"}
    predictions = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [p["uid"] for p in predictions] == ["001-1", "001-2"]  # storms-score format: uid + raw prediction
    assert all(isinstance(p["prediction"], str) for p in predictions)
    # the random model's answers are scored by Video-MME's own rules (recomputed here from the raw texts)
    from storms_dist.eval.benchmarks import get_benchmark

    bench = get_benchmark("videomme")
    rescored = bench.score(bench.load(root), {p["uid"]: p["prediction"] for p in predictions})
    assert rescored["accuracy"] == metrics["accuracy"]
