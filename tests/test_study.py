"""storms study end to end on CPU: throughput points over the random-init shapes through the launcher's debug
executor (real Trainer, DeepSpeed ZeRO-3, MLflow), the report read back with search_runs, and the planner checked
against the measured peak memory of those runs. Plus the Slurm dry run of the real-backbone study."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ["qwen2_5_vl-micro", "qwen2_5_vl-tiny", "qwen2_5_vl-wide", "qwen2_5_vl-deep"]


@pytest.fixture(scope="module")
def cpu_study(tmp_path_factory):
    from storms_dist.cli import main

    runs = tmp_path_factory.mktemp("study") / "runs"
    code = main(["study", str(ROOT / "configs/study/cpu_base.yaml"), "--name", "ci", "--cluster", "debug",
                 "--sweep", "model.backbone=" + ",".join(SHAPES), "--steps", "1", "--warmup", "1", "--frames", "4",
                 "--num-videos", "2", f"runs_dir={runs}", "model.num_latents=2", "stage2.micro_batch_size=1"])
    assert code == 0
    return runs


def _runs(runs_dir: Path):
    import mlflow

    from storms_dist.tracking import tracking_uri_scope

    with tracking_uri_scope(f"sqlite:///{runs_dir / 'mlflow.db'}"):
        return mlflow.search_runs(experiment_names=["storms"], output_format="pandas")


def test_study_runs_every_point_as_a_child_of_one_tagged_parent(cpu_study):
    runs = _runs(cpu_study)
    parent = runs[runs["tags.study_role"] == "parent"]
    assert len(parent) == 1
    p = parent.iloc[0]
    for tag in ("tags.git_sha", "tags.version.torch", "tags.version.deepspeed", "tags.version.transformers",
                "tags.hardware.cpu", "tags.hardware.gpu"):
        assert p[tag], tag
    points = runs[runs["tags.study_role"] != "parent"]
    assert sorted(points["params.model.backbone"]) == sorted(SHAPES)
    assert (points["tags.mlflow.parentRunId"] == p["run_id"]).all()
    assert (points["tags.study_id"] == p["tags.study_id"]).all()
    assert (points["tags.status"] == "ok").all()
    for key in ("tokens_per_s_per_device", "frames_per_s", "tflops_per_device", "data_share", "peak_mem_gib",
                "plan_peak_gib"):
        assert (points[f"metrics.study.{key}"] > 0).all(), key
    assert (points["metrics.study.data_share"] < 1).all()
    # more parameters -> more measured memory (the random-init shapes differ mostly in the embedding width)
    by = points.set_index("params.model.backbone")["metrics.study.peak_mem_gib"]
    assert by["qwen2_5_vl-wide"] > by["qwen2_5_vl-tiny"] > by["qwen2_5_vl-micro"]


def test_plan_matches_measured_peak_memory(cpu_study):
    from storms_dist.scale.plan import VALIDATED_ERROR

    points = _runs(cpu_study)
    points = points[points["tags.study_role"] != "parent"]
    errors = dict(zip(points["params.model.backbone"], points["metrics.study.plan_error"]))
    print("plan error (planned - measured) / measured:", {k: f"{v:+.1%}" for k, v in errors.items()})
    assert all(abs(e) <= VALIDATED_ERROR for e in errors.values()), errors


def test_report_table_and_plots_are_logged_to_the_parent(cpu_study, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from storms_dist.cli import main

    runs = _runs(cpu_study)
    parent = runs[runs["tags.study_role"] == "parent"].iloc[0]
    study_id = parent["tags.study_id"]
    report = cpu_study / "studies" / study_id / "report.md"
    text = report.read_text()
    assert "| point |" in text and "plan err" in text
    for shape in SHAPES:
        assert f"| {shape} |" in text
    client = MlflowClient(f"sqlite:///{cpu_study / 'mlflow.db'}")
    logged = {Path(a.path).name for a in client.list_artifacts(parent["run_id"], "report")}
    assert {"report.md", "tokens_per_s_per_device_vs_size.png", "memory_vs_frames.png"} <= logged
    # the report command on its own reads the same runs back
    out = cpu_study / "again"
    assert main(["study", "report", study_id, "--out", str(out), f"runs_dir={cpu_study}"]) == 0
    assert sum(line.startswith("| qwen2_5_vl-") for line in (out / "report.md").read_text().splitlines()) == len(SHAPES)
    assert main(["study", "report", "no-such-study", f"runs_dir={cpu_study}"]) == 2
    # reading a study back leaves no tracking URI behind for the process's later jobs (it once leaked into
    # $MLFLOW_TRACKING_URI, and the next pipeline in the same pytest process logged into this study's store)
    assert "MLFLOW_TRACKING_URI" not in os.environ
    # the report logs to the study's store, never to MLflow's default one in the working directory (./mlflow.db)
    monkeypatch.chdir(tmp_path)
    assert main(["study", "report", study_id, "--out", str(tmp_path / "third"), f"runs_dir={cpu_study}"]) == 0
    assert not (tmp_path / "mlflow.db").exists()


def test_real_backbone_study_dry_run_shows_what_it_would_submit(capsys):
    from storms_dist.cli import main

    assert main(["study", str(ROOT / "studies/qwen2_5_vl_cluster.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("#SBATCH --nodes=") == 12  # 4 backbones x 1, 2, 4 nodes
    assert "#SBATCH --gpus-per-node=8" in out
    assert "qwen2_5_vl-72b-nodes1" in out and "DOES NOT FIT" in out
    assert "qwen2_5_vl-72b-nodes4" in out


def test_bad_study_input_is_one_line(tmp_path, capsys):
    from storms_dist.cli import main

    spec = tmp_path / "s.yaml"
    spec.write_text("name: x\nkind: throughput\nsweeep: {}\n")
    assert main(["study", str(spec)]) == 2
    assert "unknown key 'sweeep'" in capsys.readouterr().err
    assert main(["study", str(ROOT / "configs/study/cpu_base.yaml"), "--sweep", "throughput.fps=1,2"]) == 2
    err = capsys.readouterr().err
    assert "sweep.throughput.fps: unknown throughput key" in err and err.count("\n") == 1


def test_pipeline_study_dry_run_submits_one_pipeline_per_point(tmp_path, capsys):
    from storms_dist.cli import main

    code = main(["study", str(ROOT / "configs/demo/synth_quick.yaml"), "--kind", "pipeline", "--cluster", "slurm",
                 "--sweep", "model.num_latents=0,4", "--dry-run", f"runs_dir={tmp_path}",
                 f"data.root={tmp_path / 'data'}"])
    assert code == 0
    out = capsys.readouterr().out
    assert "2 pipeline point(s) on slurm (dry run" in out
    for k in (0, 4):
        assert f"# ===== pipeline synth_quick-num_latents{k}" in out
    assert out.count("stage2: sbatch") == 2
