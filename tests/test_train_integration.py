"""Integration: real synthetic videos, real DeepSpeed ZeRO-3 engines on 2 gloo ranks (torchrun), real exports,
real MLflow. Stage I then Stage II on a tiny config; the export reloads in plain transformers with identical logits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_run_config

from storms_dist.pipeline import run_training
from storms_dist.train.trainer import TrainJob

pytestmark = pytest.mark.distributed


def mean(values):
    return sum(values) / len(values)


def test_zero3_two_ranks_stage1_then_stage2(tmp_path, tiny_synth_root):
    cfg = tiny_run_config(tmp_path, tiny_synth_root)
    run_dir = cfg.run_dir
    stage1 = run_training(cfg, TrainJob(name="stage1", stage=1, stage_cfg=cfg.stage1, out_dir=run_dir / "stage1",
                                        init_from=None, targets_dir=run_dir / "targets"))
    stage2 = run_training(cfg, TrainJob(name="stage2", stage=2, stage_cfg=cfg.stage2, out_dir=run_dir / "stage2",
                                        init_from=stage1["export"]))

    # both stages ran on 2 ranks under ZeRO-3 and learned (memorising 32 samples at lr 3e-3)
    for summary in (stage1, stage2):
        ds_config = json.loads((Path(summary["export"]).parent / "ds_config.json").read_text())
        assert ds_config["zero_optimization"]["stage"] == 3
        assert ds_config["train_batch_size"] == 4 * 2  # micro x accumulation x world size 2
        curve = summary["loss_curve"]
        assert len(curve) == 6 and mean(curve[-2:]) < mean(curve[:2]), curve
    # Stage I logged an alignment term; Stage II did not
    log1 = [json.loads(line) for line in open(run_dir / "stage1" / "train_log.jsonl")]
    log2 = [json.loads(line) for line in open(run_dir / "stage2" / "train_log.jsonl")]
    assert all(m["align"] > 0 for m in log1) and "align" not in log2[0]
    assert (run_dir / "targets" / "stamp.json").is_file()
    assert json.loads((run_dir / "targets" / "stamp.json").read_text())["num_latents"] == 3
    # end-of-stage DeepSpeed checkpoints hold both ranks' ZeRO partitions
    ckpt = run_dir / "stage2" / "checkpoints" / "step000006"
    assert len(list(ckpt.glob("*zero_pp_rank_*optim_states.pt"))) == 2

    # the export reloads in plain transformers with the engine's logits
    from transformers import AutoModelForImageTextToText

    probe = torch.load(run_dir / "stage2" / "export_probe.pt")
    reloaded = AutoModelForImageTextToText.from_pretrained(stage2["export"]).eval()
    with torch.no_grad():
        logits = reloaded(**probe["inputs"]).logits
    assert torch.equal(logits, probe["logits"]) or (logits - probe["logits"]).abs().max() <= 1e-6
    settings = json.loads((Path(stage2["export"]) / "storms_latent.json").read_text())
    assert settings["num_latents"] == 3 and settings["stage"] == 2

    # the stage runs are in MLflow with their metrics
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("storms").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert {"stage1", "stage2"} <= by_name.keys()
    history = client.get_metric_history(by_name["stage1"].info.run_id, "align")
    assert [m.step for m in history] == list(range(1, 7))
    assert by_name["stage2"].data.params["model.num_latents"] == "3"


def test_zero3_two_ranks_joint_stage1(tmp_path, tiny_synth_root):
    """stage1.mode: joint (teacher-forced pass + a detached rollout, both per step) under ZeRO-3 on 2 ranks: the
    two passes' gathers match across ranks, the loss falls, and the logged align is the rollout's."""
    cfg = tiny_run_config(tmp_path, tiny_synth_root, **{"stage1.mode": "joint", "stage1.rollout_weight": "1.0"})
    summary = run_training(cfg, TrainJob(name="stage1", stage=1, stage_cfg=cfg.stage1, out_dir=cfg.run_dir / "joint",
                                         init_from=None, targets_dir=cfg.run_dir / "targets"))
    ds_config = json.loads((Path(summary["export"]).parent / "ds_config.json").read_text())
    assert ds_config["zero_optimization"]["stage"] == 3 and ds_config["train_batch_size"] == 4 * 2
    curve = summary["loss_curve"]
    assert len(curve) == 6 and mean(curve[-2:]) < mean(curve[:2]), curve
    log = [json.loads(line) for line in open(cfg.run_dir / "joint" / "train_log.jsonl")]
    assert all(m["align"] > 0 and m["loss"] > m["ce"] for m in log)


def test_zero3_two_ranks_answer_through_latents(tmp_path, tiny_synth_root):
    """answer_grad: latents (a rollout, then two full passes per step; here as a rollout Stage I, which builds the
    target cache an anchored Stage II would reuse) under ZeRO-3 on 2 ranks: every rank runs the same passes, the
    logged loss is the alignment alone (the routed CE adds 0 to the value) and every step has a finite, non-zero
    gradient (the gradient itself is checked against autograd in tests/test_model.py)."""
    cfg = tiny_run_config(tmp_path, tiny_synth_root, **{"stage1.mode": "rollout", "stage1.answer_grad": "latents"})
    summary = run_training(cfg, TrainJob(name="stage1", stage=1, stage_cfg=cfg.stage1, out_dir=cfg.run_dir / "s1",
                                         init_from=None, targets_dir=cfg.run_dir / "targets"))
    ds_config = json.loads((Path(summary["export"]).parent / "ds_config.json").read_text())
    assert ds_config["zero_optimization"]["stage"] == 3 and ds_config["train_batch_size"] == 4 * 2
    log = [json.loads(line) for line in open(cfg.run_dir / "s1" / "train_log.jsonl")]
    assert len(log) == 6 and all(0 < m["grad_norm"] < float("inf") and m["ce"] > 0 for m in log), log
    lam = cfg.model.align_weight
    assert all(m["loss"] == pytest.approx(lam * m["align"], rel=1e-4, abs=1e-6) for m in log), log


def test_demo_quick_end_to_end(tmp_path):
    """`storms demo --quick` through the CLI, two methods trained at a time as the default demo does (one-rank
    torchrun processes sharing one target cache): report, predictions and the MLflow parent/child runs."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    env.pop("MLFLOW_TRACKING_URI")
    runs = tmp_path / "runs"
    result = subprocess.run(
        [sys.executable, "-m", "storms_dist", "demo", "--quick", f"runs_dir={runs}",
         f"data.root={tmp_path / 'data'}", "synth.workers=1", "demo.parallel=2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = runs / "demo_quick"
    report = (run_dir / "report.md").read_text()
    for method in ("sft_k0", "stage1_only", "stage2_only", "storms"):
        assert method in report
        metrics = json.loads((run_dir / "seed0" / method / "eval" / "metrics.json").read_text())
        assert metrics["overall"]["num"] == 24
        assert (run_dir / "seed0" / method / "eval" / "predictions.jsonl").read_text().count("\n") == 24
    assert (run_dir / "report.png").stat().st_size > 10_000
    assert "storms" in result.stdout and "ms/item" in result.stdout

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    all_runs = client.search_runs([client.get_experiment_by_name("storms").experiment_id])
    parents = [r for r in all_runs if r.info.run_name == "demo_quick/pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {r.info.run_name for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert {"stage0", "storms/stage1", "storms/stage2", "sft_k0/sft", "stage1_only/stage1_continued",
            "stage2_only/stage2"} <= children
    # Stage I only shares STORMS's Stage I (trained once) and continues it for the Stage II budget
    assert not (run_dir / "seed0" / "stage1_only" / "stage1").exists()
    continued = json.loads((run_dir / "seed0" / "stage1_only" / "stage1_continued" / "summary.json").read_text())
    assert continued["steps"] == 3 and continued["stage"] == 1
    # ... aligned to the cache Stage I aligned to, not re-encoded by the continued export's moved merger
    from storms_dist.model.build import load_exported
    from storms_dist.targets import STAMP_FILE, vision_fingerprint

    stamp = json.loads((run_dir / "seed0" / "targets" / STAMP_FILE).read_text())
    assert stamp["vision_fingerprint"] == vision_fingerprint(load_exported(run_dir / "seed0" / "stage0" / "export")[0])
    eval_runs = {r.info.run_name: r for r in all_runs if r.info.run_name.endswith("/eval")}
    assert set(eval_runs) == {f"{m}/eval" for m in ("sft_k0", "stage1_only", "stage2_only", "storms")}
    storms_eval = eval_runs["storms/eval"]
    assert storms_eval.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    metrics = json.loads((run_dir / "seed0" / "storms" / "eval" / "metrics.json").read_text())
    assert storms_eval.data.metrics["accuracy"] == pytest.approx(metrics["overall"]["accuracy"])
    assert "predictions.jsonl" in {a.path for a in client.list_artifacts(storms_eval.info.run_id)}
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"report.md", "report.png", "results.json", "config.yaml"} <= artifacts


def test_demo_ablation_quick_end_to_end(tmp_path):
    """`storms demo --quick --ablation`: STORMS for K in 4/8/16 and lambda in 0/0.1/1 from one Stage 0, the settings
    trained two jobs at a time as one-rank torchrun processes; table + chart, MLflow runs per setting."""
    runs = tmp_path / "runs"
    result = subprocess.run(
        [sys.executable, "-m", "storms_dist", "demo", "--quick", "--ablation", f"runs_dir={runs}",
         f"data.root={tmp_path / 'data'}", "synth.workers=1", "demo.parallel=2", "stage1.num_steps=2",
         "stage2.num_steps=2"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out_dir = runs / "demo_quick" / "ablation"
    # the quick config's K = 4 and lambda = 0.1: K 4/8/16 at lambda 0.1, then lambda 0 and 1 at K = 4
    settings = ["K=4 λ=0.1", "K=8 λ=0.1", "K=16 λ=0.1", "K=4 λ=0", "K=4 λ=1"]
    report = (out_dir / "report.md").read_text()
    for name in settings:
        assert name in report
    assert (out_dir / "report.png").stat().st_size > 10_000
    for folder, k in (("k4_lambda0.1", 4), ("k8_lambda0.1", 8), ("k16_lambda0.1", 16), ("k4_lambda0", 4)):
        metrics = json.loads((out_dir / folder / "eval" / "metrics.json").read_text())
        assert metrics["num_latents"] == k and metrics["overall"]["num"] == 24
        assert json.loads((out_dir / folder / "storms" / "stage2" / "summary.json").read_text())["num_latents"] == k

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    all_runs = client.search_runs([client.get_experiment_by_name("storms").experiment_id])
    (parent,) = [r for r in all_runs if r.info.run_name == "demo_quick/ablation"]
    evals = {r.info.run_name for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
             and r.info.run_name.endswith("/eval")}
    assert evals == {f"{name}/eval" for name in settings}
