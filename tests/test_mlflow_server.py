"""A real MLflow tracking server: `mlflow server` on 127.0.0.1 (sqlite backend, local artifact store) and a 2-rank
ZeRO-3 training job logging to it over HTTP as the child of a pipeline run; a server that is down is one line
before anything starts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO, closed_port, tiny_run_config

from storms_dist.cli import main

QUICK = str(REPO / "configs/demo/synth_quick.yaml")


@pytest.mark.parametrize("command", ["train", "launch", pytest.param("launch-slurm", marks=pytest.mark.skipif(
    shutil.which("sbatch") is None, reason="needs a Slurm login node (sbatch on PATH): without one, 'sbatch not found' "
    "is the launcher's first one-line error"))])
def test_a_server_that_is_down_is_one_line_before_anything_runs(tmp_path, capsys, command):
    uri = f"http://127.0.0.1:{closed_port()}"
    runs = tmp_path / "runs"
    argv = {"train": ["train", QUICK, "--stage", "0"], "launch": ["launch", QUICK, "--cluster", "local"],
            "launch-slurm": ["launch", QUICK, "--cluster", "slurm"]}[command]
    assert main([*argv, f"tracking.tracking_uri={uri}", f"runs_dir={runs}"]) == 2
    err = capsys.readouterr().err
    name = command.split("-")[0]
    assert err.startswith(f"storms {name}: error: tracking.tracking_uri {uri}: no MLflow server answers at "
                          f"{uri}/health (") and err.count("\n") == 1, err
    assert not runs.exists()  # nothing was started or submitted


@pytest.mark.distributed
def test_two_rank_job_logs_to_the_server_over_http(tmp_path, tiny_synth_root, mlflow_server):
    from mlflow import MlflowClient

    from storms_dist.pipeline import run_training
    from storms_dist.tracking import Tracker, check_tracking_server
    from storms_dist.train.trainer import TrainJob

    uri, folder = mlflow_server
    cfg = tiny_run_config(tmp_path, tiny_synth_root, name="srv", **{"tracking.tracking_uri": uri,
                                                                    "stage2.num_steps": "4"})
    assert check_tracking_server(cfg.tracking, cfg.runs_dir) == uri
    tracker = Tracker(cfg.tracking, cfg.runs_dir, is_main_process=True)
    with tracker.run("srv/pipeline") as parent_id:
        summary = run_training(cfg, TrainJob(name="srv/stage2", stage=2, stage_cfg=cfg.stage2,
                                             out_dir=cfg.run_dir / "stage2", init_from=None,
                                             parent_run_id=parent_id))
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("storms")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert {"srv/pipeline", "srv/stage2"} <= runs.keys()
    child = runs["srv/stage2"]
    assert child.data.tags["mlflow.parentRunId"] == parent_id
    assert runs["srv/pipeline"].info.status == "FINISHED" and child.info.status == "FINISHED"
    losses = [m.value for m in sorted(client.get_metric_history(child.info.run_id, "loss"), key=lambda m: m.step)]
    assert losses == pytest.approx(summary["loss_curve"], abs=1e-5) and len(losses) == 4
    norms = client.get_metric_history(child.info.run_id, "grad_norm")
    assert len(norms) == 4 and all(m.value == m.value and m.value > 0 for m in norms)  # finite, every step
    assert child.data.params["stage.num_steps"] == "4"
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"config.yaml", "summary.json"} <= artifacts
    local = client.download_artifacts(child.info.run_id, "summary.json", str(tmp_path))
    assert json.loads(Path(local).read_text())["steps"] == 4
    # the artifacts went through the server into its own store, not into the job's folders
    assert list((folder / "artifacts").rglob("summary.json"))
    assert not (Path(cfg.runs_dir) / "mlflow.db").exists()
