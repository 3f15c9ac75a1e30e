"""Tracker against a real MLflow sqlite backend in tmp_path."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from storms_dist.tracking import (
    MAX_PARAM_VAL_LENGTH,
    PARENT_RUN_TAG,
    Tracker,
    TrackingConfig,
    resolve_tracking_uri,
    tracking_uri_scope,
)


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow schema, created once: migrating a fresh sqlite DB takes 1-6 s, copying it ~0.1 s."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def runs_dir(tmp_path: Path, template_db: Path) -> Path:
    """tmp_path/runs holding a private copy of the template DB (the default tracking location)."""
    (tmp_path / "runs").mkdir()
    shutil.copy(template_db, tmp_path / "runs" / "mlflow.db")
    return tmp_path / "runs"


@pytest.fixture
def tracker(runs_dir: Path) -> Tracker:
    return Tracker(TrackingConfig(experiment="test", flush_every=3), runs_dir, is_main_process=True)


def _client(tracker: Tracker):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracker.tracking_uri)


def _history(tracker: Tracker, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in _client(tracker).get_metric_history(run_id, key))


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="flush_every"):
        TrackingConfig(flush_every=0)
    with pytest.raises(ValueError, match="experiment"):
        TrackingConfig(experiment=" ")
    with pytest.raises(ValueError, match="tracking_uri"):
        TrackingConfig(tracking_uri="")
    with pytest.raises(TypeError):
        TrackingConfig(True)  # kw-only


def test_default_uri_is_absolute_sqlite_in_runs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    uri = resolve_tracking_uri(TrackingConfig(), Path("runs"))
    assert uri == f"sqlite:///{tmp_path.resolve() / 'runs' / 'mlflow.db'}"
    assert resolve_tracking_uri(TrackingConfig(tracking_uri="http://x:5000"), Path("runs")) == "http://x:5000"


def test_tracking_uri_scope_restores_the_global_and_the_environment(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    inner = f"sqlite:///{tmp_path / 'inner.db'}"
    with tracking_uri_scope(inner):
        assert mlflow.get_tracking_uri() == inner and os.environ["MLFLOW_TRACKING_URI"] == inner
    assert "MLFLOW_TRACKING_URI" not in os.environ and not mlflow.is_tracking_uri_set()
    outer = f"sqlite:///{tmp_path / 'outer.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", outer)
    with pytest.raises(RuntimeError), tracking_uri_scope(inner):
        raise RuntimeError("search failed")
    assert os.environ["MLFLOW_TRACKING_URI"] == outer and mlflow.get_tracking_uri() == outer


def test_env_var_overrides_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_db = tmp_path / "elsewhere" / "env.db"  # fresh: also checks the DB and its directory get created
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{env_db}")
    tracker = Tracker(TrackingConfig(experiment="env"), tmp_path / "runs", is_main_process=True)
    with tracker.run("r") as run_id:
        tracker.log_text("hi", "note.txt")
    assert tracker.tracking_uri == f"sqlite:///{env_db}" and env_db.is_file()
    assert not (tmp_path / "runs" / "mlflow.db").exists()
    assert _client(tracker).get_run(run_id).info.status == "FINISHED"
    # sqlite artifacts live next to the database, not in the cwd's ./mlruns
    assert (env_db.parent / "mlartifacts").is_dir()
    # an explicit config URI still wins over the environment
    explicit = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'cfg.db'}")
    assert resolve_tracking_uri(explicit, tmp_path) == explicit.tracking_uri


def test_parent_child_linkage_and_stack(tracker: Tracker) -> None:
    parent = tracker.start_run("pipeline", tags={"pipeline": "demo"})
    assert tracker.active_run_id == parent
    with tracker.run("stage1", parent_run_id=parent) as child:
        assert tracker.active_run_id == child != parent
        tracker.log_metrics({"loss": 1.0}, step=0)
    assert tracker.active_run_id == parent
    tracker.log_metrics({"pipeline_metric": 2.0}, step=0)
    tracker.end_run()
    assert tracker.active_run_id is None

    client = _client(tracker)
    child_run, parent_run = client.get_run(child), client.get_run(parent)
    assert child_run.data.tags[PARENT_RUN_TAG] == parent
    assert PARENT_RUN_TAG not in parent_run.data.tags
    assert parent_run.data.tags["pipeline"] == "demo"
    assert child_run.info.run_name == "stage1"
    assert (child_run.info.status, parent_run.info.status) == ("FINISHED", "FINISHED")
    # metrics went to the run that was active when they were logged
    assert set(child_run.data.metrics) == {"loss"}
    assert set(parent_run.data.metrics) == {"pipeline_metric"}
    assert [r.info.run_id for r in tracker.find_runs("test")] == [parent, child]


def test_params_flattened_truncated_and_batched(tracker: Tracker) -> None:
    params = {
        "optim": {"lr": 3e-4, "betas": [0.9, 0.95]},
        "model": {"num_latents": 8, "vision": {"frames": 16}},
        "long": "x" * (MAX_PARAM_VAL_LENGTH + 500),
        "none": None,
    }
    params.update({f"extra.p{i}": i for i in range(150)})  # > 100 params: needs two log_batch calls
    with tracker.run("stage") as run_id:
        tracker.log_params(params)
    logged = _client(tracker).get_run(run_id).data.params
    assert logged["optim.lr"] == "0.0003"
    assert logged["optim.betas"] == "[0.9, 0.95]"
    assert logged["model.vision.frames"] == "16"
    assert logged["none"] == "None"
    assert logged["long"] == "x" * MAX_PARAM_VAL_LENGTH
    assert logged["extra.p149"] == "149"
    assert len(logged) == 6 + 150


def test_metrics_buffered_then_flushed(tracker: Tracker) -> None:
    client = _client(tracker)
    with tracker.run("stage") as run_id:
        tracker.log_metrics({"loss": 1.0, "lr": 0.1}, step=0)
        tracker.log_metrics({"loss": 0.5, "lr": 0.1}, step=1)
        assert client.get_metric_history(run_id, "loss") == []  # 2 calls < flush_every=3: still buffered
        tracker.log_metrics({"loss": 0.25, "lr": 0.05}, step=2)
        assert len(client.get_metric_history(run_id, "loss")) == 3  # third call flushed
        tracker.log_metrics({"loss": 0.125}, step=3)
        tracker.flush()
        assert _history(tracker, run_id, "loss") == [(0, 1.0), (1, 0.5), (2, 0.25), (3, 0.125)]
        tracker.log_metrics({"loss": 0.0625}, step=4)
    # end_run flushes what is left
    assert _history(tracker, run_id, "loss")[-1] == (4, 0.0625)
    assert _history(tracker, run_id, "lr") == [(0, 0.1), (1, 0.1), (2, 0.05)]


def test_one_flush_spanning_more_than_max_batch(tracker: Tracker) -> None:
    tracker.cfg.flush_every = 1000
    keys = [f"m{i}" for i in range(30)]
    with tracker.run("stage") as run_id:
        for step in range(40):  # 1200 metrics in one flush: split into log_batch calls of <= 1000
            tracker.log_metrics({k: float(step) for k in keys}, step=step)
    assert _history(tracker, run_id, "m29") == [(s, float(s)) for s in range(40)]


def test_non_finite_metrics_logged_as_is_with_one_warning(tracker: Tracker) -> None:
    with tracker.run("stage") as run_id:
        with pytest.warns(RuntimeWarning) as record:
            tracker.log_metrics({"loss": float("nan"), "gnorm": float("inf")}, step=0)
            tracker.log_metrics({"loss": float("nan")}, step=1)
        messages = sorted(str(w.message) for w in record)  # one per key, not per call
        assert len(messages) == 2
        assert messages[0].startswith("metric 'gnorm' is inf at step 0") and "'loss' is nan at step 0" in messages[1]
    loss = _history(tracker, run_id, "loss")
    assert [s for s, _ in loss] == [0, 1] and all(math.isnan(v) for _, v in loss)
    # documented mlflow 3.17 + sqlite behaviour: inf is clamped to the largest float
    assert _history(tracker, run_id, "gnorm") == [(0, sys.float_info.max)]


def test_artifacts_and_text(tracker: Tracker, tmp_path: Path) -> None:
    file = tmp_path / "cfg.yaml"
    file.write_text("a: 1\n")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "weights.txt").write_text("w")
    with tracker.run("stage") as run_id:
        tracker.log_artifact(file)
        tracker.log_artifact(folder, artifact_path="checkpoints")
        tracker.log_text("hello", "notes/readme.md")
        with pytest.raises(FileNotFoundError):
            tracker.log_artifact(tmp_path / "missing.bin")
    client = _client(tracker)
    top = {a.path for a in client.list_artifacts(run_id)}
    assert top == {"cfg.yaml", "checkpoints", "notes"}
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/weights.txt"]
    local = Path(client.download_artifacts(run_id, "notes/readme.md", str(tmp_path / "dl")))
    assert local.read_text() == "hello"
    artifact_root = tmp_path / "runs" / "mlartifacts"
    assert (artifact_root).is_dir() and any(artifact_root.rglob("cfg.yaml"))


def test_resume_by_run_id_continues_same_run(runs_dir: Path) -> None:
    cfg = TrackingConfig(experiment="resume")
    first = Tracker(cfg, runs_dir, is_main_process=True)
    run_id = first.start_run("stage1")
    first.log_metrics({"loss": 1.0}, step=0)
    first.end_run("KILLED")  # e.g. preempted

    second = Tracker(cfg, runs_dir, is_main_process=True)  # a new process resuming from a checkpoint
    with second.run("ignored", run_id=run_id, tags={"resumed": "1"}) as resumed:
        assert resumed == run_id
        assert _client(second).get_run(run_id).info.status == "RUNNING"
        second.log_metrics({"loss": 0.5}, step=1)
    run = _client(second).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "1"
    assert _history(second, run_id, "loss") == [(0, 1.0), (1, 0.5)]
    assert len(second.find_runs()) == 1
    with pytest.raises(ValueError, match="run_id"):
        second.start_run("x", run_id="0" * 32)


def test_exception_marks_failed_and_reraises(tracker: Tracker) -> None:
    parent = tracker.start_run("pipeline")
    with pytest.raises(ZeroDivisionError):
        with tracker.run("stage", parent_run_id=parent):
            child = tracker.active_run_id
            tracker.log_metrics({"loss": 3.0}, step=7)
            raise ZeroDivisionError("a failing stage")
    assert tracker.active_run_id == parent
    tracker.end_run("FAILED")
    client = _client(tracker)
    assert client.get_run(child).info.status == "FAILED"
    assert client.get_run(parent).info.status == "FAILED"
    assert _history(tracker, child, "loss") == [(7, 3.0)]  # buffered metrics survive the failure


def test_keyboard_interrupt_marks_killed(tracker: Tracker) -> None:
    with pytest.raises(KeyboardInterrupt):
        with tracker.run("stage") as run_id:
            raise KeyboardInterrupt
    assert _client(tracker).get_run(run_id).info.status == "KILLED"
    assert tracker.active_run_id is None


def test_misuse_raises(tracker: Tracker) -> None:
    with pytest.raises(RuntimeError, match="no active MLflow run"):
        tracker.log_metrics({"loss": 1.0}, step=0)
    run_id = tracker.start_run("stage")
    with pytest.raises(ValueError, match="status"):
        tracker.end_run("DONE")  # type: ignore[arg-type]
    tracker.end_run()
    with pytest.raises(ValueError, match="not open"):
        tracker.end_run(run_id=run_id)


@pytest.mark.parametrize("cfg_kwargs, is_main", [({}, False), ({"enabled": False}, True)])
def test_non_main_or_disabled_logs_nothing(tmp_path: Path, cfg_kwargs: dict, is_main: bool) -> None:
    tracker = Tracker(TrackingConfig(**cfg_kwargs), tmp_path / "runs", is_main_process=is_main)
    with tracker.run("stage", parent_run_id="p") as run_id:
        assert run_id is None and tracker.active_run_id is None
        calls = [
            tracker.log_params({"a": 1}),
            tracker.log_metrics({"loss": 1.0}, step=0),
            tracker.log_artifact(tmp_path / "does-not-exist"),  # not even checked
            tracker.log_text("x", "x.txt"),
            tracker.set_tags({"a": "b"}),
            tracker.flush(),
            tracker.find_runs(),
            tracker.end_run(),
        ]
    assert calls == [None] * len(calls)
    assert tracker.start_run("again") is None
    assert list(tmp_path.iterdir()) == []  # no database, no artifact dir


def test_import_does_not_import_mlflow() -> None:
    code = (
        "import sys; from pathlib import Path; import storms_dist.tracking as t; "
        "tr = t.Tracker(t.TrackingConfig(), Path('.'), is_main_process=False); tr.log_metrics({'a': 1.0}, 0); "
        "assert 'mlflow' not in sys.modules, 'mlflow imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
