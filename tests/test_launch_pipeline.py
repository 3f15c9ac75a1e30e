"""`storms launch` for real: the tiny pipeline on a single-node Slurm cluster and through submitit's LocalExecutor.

Three pipelines share the machine, submitted together so that Slurm's waits (dependencies, requeues) overlap:

- ``slurm_full``  synth-free full pipeline on Slurm (Stage 0 -> targets array -> Stage I -> Stage II -> eval), 2 tasks
  per training job with a real gloo rendezvous, logging over HTTP to a real ``mlflow server`` on 127.0.0.1; its Stage I is requeued mid-run twice: ``scontrol requeue``
  (Slurm's SIGTERM path) and then SIGUSR2 (what Slurm sends before a time limit: our rank 0 hands the signal to
  submitit, which calls checkpoint() and requeues);
- ``slurm_fail``  synth job -> targets -> a Stage I that diverges (lr 1e30, on_nonfinite_loss=stop): Stage II and
  eval must be cancelled (``--kill-on-invalid-dep=yes``; the cluster keeps Slurm's default of pending forever) and
  reported;
- ``local_full``  the same pipeline as ``slurm_full`` through the LocalExecutor (2 local tasks), uninterrupted: the
  reference that the interrupted Slurm run must match exactly (loss curves, export logits, eval predictions).

The Slurm tests are skipped, with the reason, when no cluster answers (``sudo bash launchers/slurm/local_cluster.sh
start`` brings one up; ``.ci/run`` does it when run as root).
"""

from __future__ import annotations

import io
import itertools
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs/demo/synth_quick.yaml")
STAGE1_STEPS = 10


def slurm_unavailable() -> str | None:
    """Why the Slurm tests cannot run here, or None."""
    start = "start one with `sudo bash launchers/slurm/local_cluster.sh start`"
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return f"no Slurm client on PATH (sinfo/sbatch); {start}"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo failed ({e}); {start}"
    if out.returncode != 0:
        return f"no Slurm cluster answers (sinfo: {out.stderr.strip()[:120]}); {start}"
    if not any(s.strip().rstrip("*") in ("idle", "mixed", "allocated") for s in out.stdout.split()):
        return f"no usable Slurm node (sinfo states: {out.stdout.split()})"
    acct = subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True, text=True, timeout=20, check=False)
    if acct.returncode != 0:
        return "Slurm accounting (sacct) is off: jobs that die without a result cannot be followed"
    return None


def common_overrides(tmp: Path, data_root: Path, name: str) -> list[str]:
    return [f"runs_dir={tmp / 'runs'}", f"name={name}", f"data.root={data_root}", "synth.num_train=16",
            "synth.num_val=4", "synth.num_test=8", "synth.workers=1", "stage0.num_steps=3",
            f"stage1.num_steps={STAGE1_STEPS}", "stage2.num_steps=3", "eval.batch_size=8",
            "eval.num_latency_items=2"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("launch")


@pytest.fixture(scope="module")
def data_root(workdir) -> Path:
    """The tiny synthetic set, made once for the pipelines that share it (the failing one makes its own)."""
    from storms_dist.cli import load_run_config
    from storms_dist.pipeline import ensure_synth

    root = workdir / "data"
    ensure_synth(load_run_config(CONFIG, common_overrides(workdir, root, "data")), progress=False)
    return root


def _launch(overrides: list[str], **options) -> tuple[Path, str]:
    from storms_dist.launchers.cli import launch
    from storms_dist.launchers.prepare import LaunchOptions

    out = io.StringIO()
    opts = LaunchOptions(**{"targets_shards": 2, "time": "30", **options})
    [run_dir] = launch(CONFIG, overrides, opts, out=out)
    return run_dir, out.getvalue()


def _train_steps(run_dir: Path, stage: str) -> int:
    path = run_dir / stage / "train_log.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


class Interrupter(threading.Thread):
    """Requeues a running training job twice, at step boundaries it observes: SIGTERM (scontrol requeue), then
    SIGUSR2 (scancel --signal=USR2, as Slurm does ahead of a time limit)."""

    def __init__(self, run_dir: Path, stage: str):
        super().__init__(daemon=True)
        self.run_dir, self.stage = run_dir, stage
        self.events: list[tuple[str, int]] = []
        self.error: str | None = None

    def job_id(self) -> str:
        from storms_dist.launchers.state import read_state

        return next(s["job_id"] for s in read_state(self.run_dir)["stages"] if s["name"] == self.stage)

    def rank0_log(self, job_id: str) -> str:
        path = self.run_dir / "slurm" / self.stage / f"{job_id}_0_log.out"
        return path.read_text(errors="replace") if path.is_file() else ""

    def wait_for(self, what: str, condition, timeout_s: float = 600) -> None:
        deadline = time.time() + timeout_s
        while not condition():
            if time.time() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(0.3)

    def running(self, job_id: str) -> bool:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, check=False)
        return out.stdout.strip() == "RUNNING"

    def run(self) -> None:
        try:
            job_id = self.job_id()
            self.wait_for("2 steps of the first run", lambda: self.running(job_id) and _train_steps(
                self.run_dir, self.stage) >= 2)
            self.events.append(("scontrol requeue", _train_steps(self.run_dir, self.stage)))
            subprocess.run(["scontrol", "requeue", job_id], check=True)
            self.wait_for("the requeued run to resume and make 2 steps", lambda: self.rank0_log(job_id).count(
                "resumed from") >= 1 and self.running(job_id) and _train_steps(self.run_dir, self.stage) >= 2 + int(
                self.rank0_log(job_id).rsplit("at step ", 1)[-1].split()[0]))
            self.events.append(("SIGUSR2", _train_steps(self.run_dir, self.stage)))
            subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = f"{type(e).__name__}: {e}"


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    reason = slurm_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm_runs(slurm_cluster, workdir, data_root, mlflow_server):  # slurm_cluster first: skip before making data
    from storms_dist.launchers.state import cancel, overall, pipeline_status

    # the full pipeline logs over HTTP to a real `mlflow server` (what a cluster should use); the others to sqlite
    full, full_out = _launch([*common_overrides(workdir, data_root, "slurm_full"),
                              f"tracking.tracking_uri={mlflow_server[0]}"], cluster="slurm", tasks_per_node=2)
    interrupter = Interrupter(full, "stage1")
    interrupter.start()
    fail_root = workdir / "data_fail"  # not there yet: the pipeline starts with a synth job
    fail, fail_out = _launch([*common_overrides(workdir, fail_root, "slurm_fail"), "stage1.lr=1e30",
                              "robustness.on_nonfinite_loss=stop"], cluster="slurm", tasks_per_node=1, stage0="no",
                              targets_shards=1)
    runs = {"full": full, "full_out": full_out, "fail": fail, "fail_out": fail_out, "interrupter": interrupter}
    yield runs
    for run_dir in (full, fail):  # never leave jobs behind
        if overall(pipeline_status(run_dir)) == "RUNNING":
            cancel(run_dir)


@pytest.fixture(scope="module")
def local_run(workdir, data_root) -> Path:
    # 2 target parts as on Slurm: the parts are encoded in batches, and the same batches give the same bits
    run_dir, _ = _launch(common_overrides(workdir, data_root, "local_full"), cluster="local", tasks_per_node=2)
    return run_dir


def _mlflow_runs(run_dir: Path) -> tuple[dict, list]:
    from mlflow import MlflowClient

    state = json.loads((run_dir / "launch.json").read_text())
    client = MlflowClient(tracking_uri=state["mlflow"]["tracking_uri"])
    parent = client.get_run(state["mlflow"]["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return parent, children


def _check_completed_pipeline(run_dir: Path, stages: list[str]) -> None:
    from storms_dist.launchers.state import overall, pipeline_status

    statuses = pipeline_status(run_dir)
    assert [s.name for s in statuses] == stages
    assert overall(statuses) == "COMPLETED", [(s.name, s.state, s.note) for s in statuses]
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["overall"]["num"] == 8 and 0.0 <= metrics["overall"]["accuracy"] <= 1.0
    parent, children = _mlflow_runs(run_dir)
    assert parent.info.status == "FINISHED" and "accuracy" in parent.data.metrics
    names = sorted(r.info.run_name for r in children)
    name = run_dir.name
    assert names == sorted(f"{name}/{s}" for s in ("stage0", "stage1", "stage2", "eval")), names
    assert all(r.info.status == "FINISHED" for r in children)
    for stage in ("stage0", "stage1", "stage2"):  # 2 ranks, one log per task, a real 2-process rendezvous
        logs = sorted((run_dir / "slurm" / stage).glob("*_log.out"))
        assert {p.name.split("_")[-2] for p in logs} == {"0", "1"}, logs
        assert any("RANK=1 WORLD_SIZE=2" in p.read_text() for p in logs)
        tracker = (run_dir / stage / "checkpoints" / "latest").read_text().strip()
        assert json.loads((run_dir / stage / "checkpoints" / tracker / "trainer_state.json").read_text())[
            "world_size"] == 2


@pytest.mark.slurm
def test_slurm_submission(slurm_runs):
    """Everything is submitted at once, chained with afterok and --kill-on-invalid-dep; ids and MLflow printed."""
    from storms_dist.launchers.state import read_state

    full = slurm_runs["full"]
    state = read_state(full)
    assert [s["name"] for s in state["stages"]] == ["stage0", "targets", "stage1", "stage2", "eval"]
    ids = {s["name"]: s["job_id"] for s in state["stages"]}
    assert all(ids.values()) and state["stages"][1]["array"] == 2
    for name, job_id in ids.items():
        assert f"{name:<8} job {job_id}" in slurm_runs["full_out"]
    assert state["mlflow"]["parent_run_id"] in slurm_runs["full_out"]
    for prev, stage in zip(["stage0", "targets", "stage1", "stage2"], ["targets", "stage1", "stage2", "eval"]):
        script = next((full / "slurm" / stage).glob("*_submission.sh")).read_text()
        assert f"#SBATCH --dependency=afterok:{ids[prev]}\n" in script
        assert "#SBATCH --kill-on-invalid-dep=yes" in script and "#SBATCH --requeue" in script
    assert "#SBATCH --ntasks-per-node=2" in next((full / "slurm" / "stage1").glob("*_submission.sh")).read_text()
    fail = read_state(slurm_runs["fail"])
    assert [s["name"] for s in fail["stages"]] == ["synth", "targets", "stage1", "stage2", "eval"]


@pytest.mark.distributed
def test_local_executor_pipeline(local_run):
    """The same stage callables through submitit's LocalExecutor: 2 local tasks per training job, gloo."""
    _check_completed_pipeline(local_run, ["stage0", "targets", "stage1", "stage2", "eval"])


@pytest.mark.slurm
def test_slurm_failing_stage1_cancels_dependents(slurm_runs):
    from storms_dist.launchers.cli import show_status
    from storms_dist.launchers.state import wait

    run_dir = slurm_runs["fail"]
    verdict, statuses = wait(run_dir, timeout_s=800)
    by_name = {s.name: s for s in statuses}
    assert verdict == "FAILED"
    assert by_name["synth"].state == by_name["targets"].state == "COMPLETED"
    assert by_name["stage1"].state == "FAILED" and "FloatingPointError" in by_name["stage1"].note
    assert by_name["stage1"].log.endswith("_0_log.out") and Path(by_name["stage1"].log).is_file()
    for name in ("stage2", "eval"):  # cancelled by Slurm, not left pending
        assert by_name[name].state == "CANCELLED", by_name[name]
        assert by_name[name].note == "dependency stage1 failed"
    out = io.StringIO()
    assert show_status([str(run_dir)], out=out) == 1
    text = out.getvalue()
    assert "FAILED: stage stage1 (FAILED); log: " + by_name["stage1"].log in text
    assert "cancelled because of it: stage2, eval" in text
    parent, _ = _mlflow_runs(run_dir)
    assert parent.info.status == "FAILED"


@pytest.mark.slurm
def test_slurm_full_pipeline(slurm_runs, mlflow_server):
    from storms_dist.launchers.state import read_state, wait

    run_dir = slurm_runs["full"]
    verdict, statuses = wait(run_dir, timeout_s=850)
    assert verdict == "COMPLETED", [(s.name, s.state, s.note) for s in statuses]
    _check_completed_pipeline(run_dir, ["stage0", "targets", "stage1", "stage2", "eval"])
    # every Slurm job logged over HTTP to the server, and its artifacts went into the server's store
    uri, server_folder = mlflow_server
    assert read_state(run_dir)["mlflow"]["tracking_uri"] == uri
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    _, children = _mlflow_runs(run_dir)
    for child in children:
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        if child.info.run_name.endswith("/eval"):
            assert {"metrics.json", "predictions.jsonl"} <= artifacts
        else:
            assert {"config.yaml", "summary.json"} <= artifacts, child.info.run_name
            assert client.get_metric_history(child.info.run_id, "loss"), child.info.run_name
    assert len(list(server_folder.rglob("summary.json"))) >= 3 and list(server_folder.rglob("predictions.jsonl"))
    # the dependency chain: no stage started before the one it depends on ended
    ids = [s["job_id"] for s in read_state(run_dir)["stages"]]
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(ids), "-o", "JobID,Start,End"],
                         capture_output=True, text=True, check=True).stdout
    times: dict[str, tuple[str, str]] = {}
    for line in out.splitlines():
        job, start, end = line.split("|")
        base = job.split("_")[0]
        first_start, last_end = times.get(base, (start, end))
        times[base] = (min(first_start, start), max(last_end, end))
    for prev, nxt in itertools.pairwise(ids):
        assert times[nxt][0] >= times[prev][1], (prev, nxt, times)


@pytest.mark.slurm
def test_slurm_preempted_stage_resumes_exactly(slurm_runs, local_run):
    """Requeued twice mid-run (SIGTERM, then SIGUSR2), Stage I resumes from its checkpoints and the pipeline ends
    with exactly the results of the uninterrupted run through the local executor."""
    import torch

    from storms_dist.launchers.state import pipeline_status, read_state, wait

    run_dir, interrupter = slurm_runs["full"], slurm_runs["interrupter"]
    interrupter.join(timeout=900)
    assert interrupter.error is None, interrupter.error
    (kind1, step1), (kind2, step2) = interrupter.events
    assert kind1 == "scontrol requeue" and kind2 == "SIGUSR2"
    assert 2 <= step1 < step2 < STAGE1_STEPS, interrupter.events
    verdict, _ = wait(run_dir, timeout_s=850)
    assert verdict == "COMPLETED"
    job_id = next(s["job_id"] for s in read_state(run_dir)["stages"] if s["name"] == "stage1")
    log = (run_dir / "slurm" / "stage1" / f"{job_id}_0_log.out").read_text()
    assert log.count("resumed from") == 2
    saved = [line for line in log.splitlines() if "checkpoint saved at step" in line and "rank 0" in line]
    assert len(saved) == 2, saved  # our message lists the signals the rank received
    assert "SIGTERM" in saved[0] and "SIGUSR2" not in saved[0] and "SIGUSR2" in saved[1]
    assert f"Requeued job {job_id}" in log  # submitit's requeue, from rank 0's hand-over
    runs = subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-j", job_id, "-o", "State"], capture_output=True,
                          text=True, check=True).stdout.split()
    assert runs == ["REQUEUED", "REQUEUED", "COMPLETED"], runs
    stage1 = next(s for s in pipeline_status(run_dir) if s.name == "stage1")
    assert "requeued 2x" in stage1.note
    for stage in ("stage0", "stage1", "stage2"):
        ours = json.loads((run_dir / stage / "summary.json").read_text())
        ref = json.loads((local_run / stage / "summary.json").read_text())
        assert ours["loss_curve"] == ref["loss_curve"], stage
        assert ours["steps"] == ref["steps"]
        logits = [torch.load(d / stage / "export_probe.pt")["logits"] for d in (run_dir, local_run)]
        assert torch.equal(*logits), stage
    preds = [[{k: v for k, v in json.loads(line).items() if k != "latency_ms"}
              for line in (d / "eval" / "predictions.jsonl").read_text().splitlines()] for d in (run_dir, local_run)]
    assert preds[0] == preds[1]
    metrics = [json.loads((d / "eval" / "metrics.json").read_text()) for d in (run_dir, local_run)]
    assert metrics[0]["overall"] == metrics[1]["overall"] and metrics[0]["by_type"] == metrics[1]["by_type"]
    _, children = _mlflow_runs(run_dir)  # one Stage I run, reopened by each resumed run, with every step
    [stage1_run] = [r for r in children if r.info.run_name.endswith("/stage1")]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=read_state(run_dir)["mlflow"]["tracking_uri"])
    history = client.get_metric_history(stage1_run.info.run_id, "loss")
    assert sorted({m.step for m in history}) == list(range(1, STAGE1_STEPS + 1))
