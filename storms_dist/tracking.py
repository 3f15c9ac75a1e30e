"""MLflow experiment tracking for STORMS pipelines: one parent run per pipeline, one child run per stage.

    tracker = Tracker(cfg.tracking, runs_dir, is_main_process=rank == 0)
    with tracker.run("pipeline") as parent_id:
        with tracker.run("stage1", parent_run_id=parent_id):
            tracker.log_params(to_dict(cfg))  # nested sections are flattened to "optim.lr"
            for step in ...:
                tracker.log_metrics({"loss": loss}, step=step)

Design notes
- ``mlflow`` is imported lazily (first ``start_run``): the import costs ~1.3 s, and non-main ranks never pay it.
- ``MlflowClient`` is used explicitly instead of the fluent ``mlflow.start_run`` stack, so a parent and a child run
  can be open together and no global active-run state leaks between pipelines or tests.
- Runs opened by this tracker form a stack: logging goes to the most recently started run still open.
- The default backend is ``sqlite:///<runs_dir>/mlflow.db``; a sqlite experiment stores its artifacts in
  ``mlartifacts/`` next to the database file (MLflow's default would be ``./mlruns`` in whatever the cwd is).

Metric batching (measured 2026-11-21 on the 2-core CPU dev machine, sqlite backend, mlflow 3.17.2; reproduce
with ``python -m storms_dist.tracking --bench``). Logging 1000 steps x 8 metrics, quietest of 3 runs
(a run while other jobs loaded both cores: 2.2 s / 29.2 s / 204.6 s):
    per-call ``MlflowClient.log_metric``        40.7 s  (8000 commits, ~5 ms each: ~41 ms per training step)
    ``Tracker.log_metrics``, flush_every=1       8.6 s  (1000 ``log_batch`` calls of 8 metrics)
    ``Tracker.log_metrics``, flush_every=50      1.0 s  (20 ``log_batch`` calls of 400 metrics: ~1 ms per step)
hence the default ``flush_every=50``: ~40x cheaper than per-call logging; a hard crash (no ``end_run``) loses
at most the last 49 steps' metrics.

Non-finite metrics (checked against mlflow 3.17.2 + sqlite, see tests/test_tracking.py): ``log_batch`` accepts
NaN and +-inf; NaN reads back as NaN, +-inf reads back clamped to +-sys.float_info.max. They are logged as-is
(a NaN loss at step N is exactly what one wants to see in the UI), with one RuntimeWarning per metric key.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # type-only: importing mlflow costs seconds
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Run

# MLflow limits (mlflow.utils.validation), duplicated so they are usable without importing mlflow.
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

PARENT_RUN_TAG = "mlflow.parentRunId"
RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
_END_STATUSES = ("FINISHED", "FAILED", "KILLED")


@dataclass(kw_only=True)
class TrackingConfig:
    enabled: bool = True
    tracking_uri: str | None = None  # None -> $MLFLOW_TRACKING_URI, else sqlite:///<runs_dir>/mlflow.db
    experiment: str = "storms"
    flush_every: int = 50  # log_metrics calls buffered per log_batch

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"enabled: expected bool, got {self.enabled!r}")
        if self.tracking_uri is not None and (not isinstance(self.tracking_uri, str) or not self.tracking_uri.strip()):
            raise ValueError(f"tracking_uri: expected a non-empty URI string or None, got {self.tracking_uri!r}")
        if not isinstance(self.experiment, str) or not self.experiment.strip():
            raise ValueError(f"experiment: expected a non-empty experiment name, got {self.experiment!r}")
        if isinstance(self.flush_every, bool) or not isinstance(self.flush_every, int) or self.flush_every < 1:
            raise ValueError(f"flush_every: expected an int >= 1, got {self.flush_every!r}")


def resolve_tracking_uri(cfg: TrackingConfig, runs_dir: Path) -> str:
    """Config value, else ``$MLFLOW_TRACKING_URI``, else an absolute ``sqlite:///<runs_dir>/mlflow.db``."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    env_uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env_uri:
        return env_uri
    return f"sqlite:///{(Path(runs_dir) / 'mlflow.db').resolve()}"


@contextmanager
def tracking_uri_scope(uri: str):
    """Point mlflow's fluent API (``mlflow.search_runs``) at ``uri`` for one block. ``mlflow.set_tracking_uri`` is
    process-global and also exports ``$MLFLOW_TRACKING_URI`` to every later child process, so a bare call leaks
    one store into every later job of the process: both are restored on exit."""
    import mlflow

    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    # is_tracking_uri_set() is also true for the environment alone; only an explicit, different global is kept
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    previous = None if previous == env_before else previous
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if env_before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_before


class TrackingServerUnavailable(ConnectionError):
    """The configured MLflow tracking server does not answer: raised before any job starts (one line)."""


def check_tracking_server(cfg: TrackingConfig, runs_dir: Path, *, timeout_s: float = 10.0) -> str | None:
    """For an ``http(s)://`` tracking URI, ask the server's ``/health`` endpoint; returns the URI checked (None for
    a file or sqlite store, or tracking off). A server that is down would otherwise surface as a retry loop or a
    traceback inside a training job, after the scheduler has already run it."""
    import urllib.error
    import urllib.request

    if not cfg.enabled:
        return None
    uri = resolve_tracking_uri(cfg, runs_dir)
    if not uri.startswith(("http://", "https://")):
        return None
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout_s) as response:  # noqa: S310 (http(s) only, above)
            if response.status == 200:
                return uri
            reason = f"HTTP {response.status}"
    except urllib.error.HTTPError as e:
        reason = f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        reason = str(getattr(e, "reason", e))
    raise TrackingServerUnavailable(
        f"tracking.tracking_uri {uri}: no MLflow server answers at {health} ({reason}); start one (mlflow server "
        f"--host HOST --port PORT --backend-store-uri ...), or point tracking.tracking_uri / $MLFLOW_TRACKING_URI "
        f"at a reachable server or a sqlite:/// file")


def _sqlite_path(uri: str) -> Path | None:
    """Database file of a ``sqlite:///...`` URI, None for any other backend (or in-memory sqlite)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri[len(prefix) :] in ("", ":memory:"):
        return None
    return Path(uri[len(prefix) :])


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"optim": {"lr": 3e-4}} -> {"optim.lr": "0.0003"}``, values stringified and cut to MLflow's 6000 chars."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, name))
        else:
            out[name] = str(value)[:MAX_PARAM_VAL_LENGTH]
    return out


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _now_ms() -> int:
    return int(time.time() * 1000)


class Tracker:
    """MLflow logging on the main process; every method is a no-op returning None elsewhere or when disabled."""

    def __init__(self, cfg: TrackingConfig, runs_dir: Path, *, is_main_process: bool) -> None:
        self.cfg = cfg
        self.runs_dir = Path(runs_dir)
        self.enabled = cfg.enabled and is_main_process
        self.tracking_uri: str | None = resolve_tracking_uri(cfg, self.runs_dir) if self.enabled else None
        self._client: MlflowClient | None = None  # created on first use
        self._experiment_id: str | None = None
        self._open_runs: list[str] = []  # stack; the last one receives params/metrics/artifacts
        self._pending: list[tuple[str, Metric]] = []  # (run_id, metric) awaiting one log_batch
        self._num_pending_calls = 0
        self._warned_keys: set[str] = set()

    # ----------------------------------------------------------------------------------------------- run lifecycle
    @property
    def active_run_id(self) -> str | None:
        return self._open_runs[-1] if self._open_runs else None

    def start_run(
        self,
        name: str,
        *,
        parent_run_id: str | None = None,
        run_id: str | None = None,
        tags: dict[str, Any] | None = None,
    ) -> str | None:
        """Open a new run (child of ``parent_run_id`` if given), or reopen ``run_id``; it becomes the active run."""
        if not self.enabled:
            return None
        client = self._get_client()
        self._flush_pending()  # buffered metrics belong to the previously active run; write them first
        extra_tags = dict(tags or {})
        if parent_run_id is not None:
            extra_tags[PARENT_RUN_TAG] = parent_run_id
        if run_id is not None:
            self._reopen(client, run_id, extra_tags)
        else:
            run_id = self._create(client, name, extra_tags)
        self._open_runs.append(run_id)
        return run_id

    def _create(self, client: MlflowClient, name: str, tags: dict[str, Any]) -> str:
        from mlflow.tracking.context.registry import resolve_tags

        # resolve_tags adds what the fluent API records: user, source script, git commit.
        all_tags = {k: str(v)[:MAX_TAG_VAL_LENGTH] for k, v in resolve_tags(tags).items()}
        run = client.create_run(self._get_experiment_id(), run_name=name, tags=all_tags)
        return run.info.run_id

    def _reopen(self, client: MlflowClient, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.exceptions import MlflowException

        try:
            client.get_run(run_id)
        except MlflowException as e:
            raise ValueError(f"run_id: no MLflow run {run_id!r} at {self.tracking_uri}") from e
        client.update_run(run_id, status="RUNNING")
        if tags:
            self._log_tags(run_id, tags)

    def end_run(self, status: RunStatus = "FINISHED", *, run_id: str | None = None) -> None:
        """Flush and terminate ``run_id`` (default: the active run) with ``status``."""
        if not self.enabled:
            return None
        if status not in _END_STATUSES:
            raise ValueError(f"status: expected one of {', '.join(_END_STATUSES)}, got {status!r}")
        run_id = run_id or self._require_active()
        if run_id not in self._open_runs:
            raise ValueError(f"run_id: {run_id!r} is not open in this tracker (open: {self._open_runs})")
        self._flush_pending()
        self._get_client().set_terminated(run_id, status=status)
        self._open_runs.remove(run_id)
        return None

    @contextmanager
    def run(
        self,
        name: str,
        *,
        parent_run_id: str | None = None,
        run_id: str | None = None,
        tags: dict[str, Any] | None = None,
    ) -> Iterator[str | None]:
        """``with tracker.run("stage1", parent_run_id=pid) as run_id:`` ends FINISHED, FAILED on error (re-raised)."""
        opened = self.start_run(name, parent_run_id=parent_run_id, run_id=run_id, tags=tags)
        try:
            yield opened
        except KeyboardInterrupt:
            if opened is not None:
                self.end_run("KILLED", run_id=opened)
            raise
        except BaseException:
            if opened is not None:
                self.end_run("FAILED", run_id=opened)
            raise
        if opened is not None:
            self.end_run("FINISHED", run_id=opened)

    # ------------------------------------------------------------------------------------------------------ logging
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a (possibly nested) config mapping as flattened ``a.b.c`` params, in batches of 100."""
        if not self.enabled:
            return None
        from mlflow.entities import Param

        run_id = self._require_active()
        flat = [Param(k, v) for k, v in flatten_params(params).items()]
        for chunk in _chunks(flat, MAX_PARAMS_TAGS_PER_BATCH):
            self._get_client().log_batch(run_id, params=chunk)
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer one step of metrics; written with a single ``log_batch`` every ``flush_every`` calls."""
        if not self.enabled:
            return None
        from mlflow.entities import Metric

        run_id = self._require_active()
        timestamp = _now_ms()
        for key, value in metrics.items():
            value = float(value)
            if not math.isfinite(value):
                self._warn_non_finite(key, value, step)
            self._pending.append((run_id, Metric(key, value, timestamp, int(step))))
        self._num_pending_calls += 1
        if self._num_pending_calls >= self.cfg.flush_every:
            self._flush_pending()
        return None

    def flush(self) -> None:
        if not self.enabled:
            return None
        self._flush_pending()
        return None

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.enabled:
            return None
        self._log_tags(self._require_active(), tags)
        return None

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a directory's contents, under ``artifact_path`` of the active run."""
        if not self.enabled:
            return None
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"log_artifact: {path} does not exist")
        client, run_id = self._get_client(), self._require_active()
        if path.is_dir():
            client.log_artifacts(run_id, str(path), artifact_path)
        else:
            client.log_artifact(run_id, str(path), artifact_path)
        return None

    def log_text(self, text: str, artifact_file: str) -> None:
        if not self.enabled:
            return None
        self._get_client().log_text(self._require_active(), text, artifact_file)
        return None

    def find_runs(self, experiment: str | None = None) -> list[Run] | None:
        """All runs of ``experiment`` (default: the configured one), oldest first; [] if it does not exist."""
        if not self.enabled:
            return None
        client = self._get_client()
        exp = client.get_experiment_by_name(experiment or self.cfg.experiment)
        if exp is None:
            return []
        return list(client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"]))

    # ---------------------------------------------------------------------------------------------------- internals
    def _get_client(self) -> MlflowClient:
        if self._client is None:
            from mlflow import MlflowClient

            db_path = _sqlite_path(self.tracking_uri or "")
            if db_path is not None:
                db_path.parent.mkdir(parents=True, exist_ok=True)  # sqlite does not create directories
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _get_experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = self._get_or_create_experiment(self.cfg.experiment)
        return self._experiment_id

    def _get_or_create_experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        client = self._get_client()
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        db_path = _sqlite_path(self.tracking_uri or "")
        artifact_location = (db_path.parent / "mlartifacts").as_uri() if db_path is not None else None
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:
            # Another pipeline created it between our lookup and create (shared DB): use theirs.
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def _require_active(self) -> str:
        if not self._open_runs:
            raise RuntimeError("no active MLflow run: call Tracker.start_run() (or use `with tracker.run(...)`) first")
        return self._open_runs[-1]

    def _log_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        entries = [RunTag(str(k), str(v)[:MAX_TAG_VAL_LENGTH]) for k, v in tags.items()]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self._get_client().log_batch(run_id, tags=chunk)

    def _flush_pending(self) -> None:
        pending, self._pending, self._num_pending_calls = self._pending, [], 0
        by_run: dict[str, list[Metric]] = {}
        for run_id, metric in pending:
            by_run.setdefault(run_id, []).append(metric)
        for run_id, metrics in by_run.items():
            for chunk in _chunks(metrics, MAX_METRICS_PER_BATCH):
                self._get_client().log_batch(run_id, metrics=chunk)

    def _warn_non_finite(self, key: str, value: float, step: int) -> None:
        if key in self._warned_keys:
            return
        self._warned_keys.add(key)
        warnings.warn(
            f"metric {key!r} is {value} at step {step}; logged as-is (sqlite stores +-inf as +-{sys.float_info.max:g})",
            RuntimeWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------------------------------------- benchmark
def _bench(num_steps: int, num_metrics: int) -> dict[str, float]:
    """Seconds to log ``num_steps`` x ``num_metrics`` to a fresh sqlite DB: per-call vs batched (see module doc)."""
    import tempfile

    from mlflow import MlflowClient

    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        keys = [f"m{i}" for i in range(num_metrics)]
        for flush_every in (50, 1):
            tracker = Tracker(TrackingConfig(flush_every=flush_every), Path(tmp), is_main_process=True)
            with tracker.run(f"batched_{flush_every}"):
                start = time.perf_counter()
                for step in range(num_steps):
                    tracker.log_metrics({k: step * 0.5 for k in keys}, step=step)
                tracker.flush()
                timings[f"tracker_flush_every_{flush_every}"] = time.perf_counter() - start
        client = MlflowClient(tracking_uri=tracker.tracking_uri)
        run_id = client.create_run(tracker._get_experiment_id(), run_name="per_call").info.run_id
        start = time.perf_counter()
        for step in range(num_steps):
            for k in keys:
                client.log_metric(run_id, k, step * 0.5, step=step)
        timings["per_call_log_metric"] = time.perf_counter() - start
    return timings


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Time MLflow metric logging on sqlite: per-call vs batched.")
    parser.add_argument("--bench", action="store_true", required=True)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--metrics", type=int, default=8)
    args = parser.parse_args()
    for label, seconds in _bench(args.steps, args.metrics).items():
        print(f"{label:28s} {seconds:8.2f} s")
