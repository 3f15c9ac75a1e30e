"""The pipeline state file (``RUN_DIR/launch.json``) and what ``--status`` / ``--cancel`` make of it.

The file records what was submitted: per stage its job id (``12345``; an array: ``12346`` with ``array: N``), the
folder of its per-task logs, its output folder and what it depends on; plus the MLflow parent run, the launch
options and the submission time. ``--status`` joins it with Slurm (``squeue`` for live jobs and pending reasons,
``sacct`` for finished ones; without accounting, the files on disk) and says which stage failed and which were
cancelled because of it, with log paths.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "launch.json"
FAILED_STATES = ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED")
ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED", "SUBMITTED")


def state_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / STATE_FILE


def read_state(run_dir: str | Path) -> dict:
    path = state_path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {run_dir} is not a launched pipeline's run folder")
    return json.loads(path.read_text())


def write_state(run_dir: str | Path, state: dict) -> None:
    path = state_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, path)


# ---- job ids and log files ----
def task_ids(stage: dict) -> list[str]:
    """The Slurm ids of a stage's jobs: ``["12345"]``, or an array's ``["12346_0", "12346_1", ...]``."""
    if stage.get("jobs"):  # local / debug: one id per submission
        return [str(j) for j in stage["jobs"]]
    if not stage.get("job_id"):
        return []
    if stage.get("array"):
        return [f"{stage['job_id']}_{i}" for i in range(stage["array"])]
    return [str(stage["job_id"])]


def log_files(stage: dict) -> list[Path]:
    """Per-task log files of a stage (submitit: ``<job id>_<task>_log.out``), existing ones first."""
    folder = Path(stage["log_dir"])
    files = []
    for job_id in task_ids(stage):
        found = sorted(folder.glob(f"{job_id}_*_log.out"), key=lambda p: int(p.name.split("_")[-2]))
        files += found or [folder / f"{job_id}_0_log.out"]
    return files


def main_log(stage: dict) -> Path | None:
    """Rank 0's log (the first task's), if the job wrote one."""
    files = [p for p in log_files(stage) if p.is_file()]
    return files[0] if files else None


def error_excerpt(stage: dict, max_chars: int = 300) -> tuple[Path | None, str]:
    """The log of the first task that shows a Python error, and that error's last line."""
    for path in log_files(stage):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if "Traceback" in text or "Error" in text:
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            errors = [ln for ln in lines if ("Error" in ln or "Exception" in ln) and not ln.startswith(("File ", "raise"))
                      and "submitit" not in ln]
            return path, (errors[-1] if errors else lines[-1])[:max_chars]
    return None, ""


# ---- querying Slurm ----
def _run(command: list[str]) -> subprocess.CompletedProcess | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None


@dataclass
class JobInfo:
    state: str
    elapsed: str = ""
    reason: str = ""
    exit_code: str = ""
    requeues: int = 0


def squeue_info(job_ids: list[str]) -> dict[str, JobInfo]:
    """Live jobs (pending / running), array tasks expanded (``-r``)."""
    if not job_ids:
        return {}
    raw = sorted({j.split("_")[0] for j in job_ids})
    out = _run(["squeue", "-h", "-r", "-j", ",".join(raw), "-o", "%i|%T|%M|%r"])
    info: dict[str, JobInfo] = {}
    if out is None or out.returncode != 0:
        return info
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4:
            info[parts[0]] = JobInfo(state=parts[1], elapsed=parts[2], reason=parts[3])
    return info


def sacct_info(job_ids: list[str]) -> dict[str, JobInfo] | None:
    """Finished and live jobs from accounting (the latest run of each, and how often it was requeued); None when
    accounting is not available."""
    if not job_ids:
        return {}
    raw = sorted({j.split("_")[0] for j in job_ids})
    out = _run(["sacct", "-X", "-D", "-n", "-P", "-j", ",".join(raw), "-o", "JobID,State,Elapsed,ExitCode"])
    if out is None or out.returncode != 0:
        return None
    info: dict[str, JobInfo] = {}
    for line in out.stdout.splitlines():  # -D: one line per run of a job, oldest first
        parts = line.strip().split("|")
        if len(parts) == 4:
            requeues = info[parts[0]].requeues if parts[0] in info else 0
            state = parts[1].split()[0]
            info[parts[0]] = JobInfo(state=state, elapsed=parts[2], exit_code=parts[3],
                                     requeues=requeues + (state in ("REQUEUED", "PREEMPTED")))
    return info


def files_state(stage: dict) -> str | None:
    """What the files on disk say: COMPLETED (outputs complete), FAILED (submitit wrote an error result)."""
    from .stages import eval_done, training_done

    out_dir = Path(stage["out_dir"])
    if stage["kind"] == "train" and training_done(out_dir):
        return "COMPLETED"
    if stage["kind"] == "eval" and eval_done(out_dir):
        return "COMPLETED"
    folder = Path(stage["log_dir"])
    for job_id in task_ids(stage):
        result = folder / f"{job_id}_0_result.pkl"
        if result.is_file() and _result_outcome(result) == "error":
            return "FAILED"
    return None


def _result_outcome(path: Path) -> str | None:
    """submitit's result pickle: ("success", value) or ("error", traceback); None if unreadable."""
    import pickle

    try:
        outcome, _ = pickle.loads(path.read_bytes())
    except Exception:  # noqa: BLE001 - a partial or foreign pickle says nothing
        return None
    return outcome


def _aggregate(states: list[str]) -> str:
    """One state for an array: a failure wins, then activity, then completion."""
    if not states:
        return "UNKNOWN"
    for group in (FAILED_STATES, ("RUNNING", "COMPLETING"), ("REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"),
                  ("PENDING",)):
        hit = [s for s in states if s in group]
        if hit:
            return hit[0]
    if all(s == "COMPLETED" for s in states):
        return "COMPLETED"
    if any(s.startswith("CANCELLED") for s in states):
        return "CANCELLED"
    return states[0]


@dataclass
class StageStatus:
    name: str
    job: str
    state: str
    runtime: str = ""
    log: str = ""
    note: str = ""
    tasks: list[tuple[str, str]] = field(default_factory=list)
    requeues: int = 0


def query_stage(stage: dict, cluster: str, squeue: dict[str, JobInfo], sacct: dict[str, JobInfo] | None) -> StageStatus:
    ids = task_ids(stage)
    job = "-" if not ids else (f"{stage['job_id']}[0-{stage['array'] - 1}]" if stage.get("array") else ids[0])
    log = main_log(stage)
    status = StageStatus(stage["name"], job, "UNKNOWN", log=str(log) if log else "")
    if stage.get("skipped"):
        status.state, status.note, status.log = "SKIPPED", stage["skipped"], ""
        return status
    if cluster != "slurm" or not ids:
        status.state = stage.get("local_state") or (files_state(stage) if ids else None) or "NOT SUBMITTED"
        status.runtime, status.note = stage.get("runtime", ""), stage.get("note", "")
        if status.state == "RUNNING" and not _alive(stage.get("driver_pid")):
            status.state, status.note = "UNKNOWN", "the `storms launch` process that ran it is gone"
        return status
    per_task = []
    for job_id in ids:
        live = squeue.get(job_id) or (squeue.get(stage["job_id"]) if not stage.get("array") else None)
        done = None if sacct is None else sacct.get(job_id)
        if done is None and sacct is not None and stage.get("array"):  # a pending array shows as 123_[0-3]
            done = next((v for k, v in sacct.items() if k.startswith(f"{stage['job_id']}_[")), None)
        info = live or done
        per_task.append((job_id, info))
    states = [i.state if i else "" for _, i in per_task]
    if any(not s for s in states):
        fallback = files_state(stage)
        states = [s or fallback or "UNKNOWN" for s in states]
    status.state = _aggregate(states)
    status.tasks = [(j, s) for (j, _), s in zip(per_task, states)]
    elapsed = [i.elapsed for _, i in per_task if i and i.elapsed]
    status.runtime = max(elapsed, key=_seconds) if elapsed else ""
    reasons = {i.reason for _, i in per_task if i and i.reason and i.reason != "None"}
    if reasons:
        status.note = ", ".join(sorted(f"waiting: {r}" if r in ("Dependency", "Priority", "Resources") else r
                                       for r in reasons))
    status.requeues = max((sacct.get(j).requeues for j in ids if sacct and sacct.get(j)), default=0)
    return status


def _alive(pid: int | None) -> bool:
    if not pid:
        return True  # unknown: trust the recorded state
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def _seconds(elapsed: str) -> int:
    days, _, rest = elapsed.rpartition("-")
    parts = [int(p) for p in rest.split(":") if p.isdigit()]
    while len(parts) < 3:
        parts.insert(0, 0)
    return (int(days) if days else 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def pipeline_status(run_dir: str | Path, state: dict | None = None) -> list[StageStatus]:
    """Every stage's status, with failures explained: the failed stage's error line and log, and the stages
    cancelled (or stuck pending) because of it."""
    state = state or read_state(run_dir)
    cluster = state["cluster"]
    ids = [j for stage in state["stages"] for j in task_ids(stage)]
    squeue = squeue_info(ids) if cluster == "slurm" else {}
    sacct = sacct_info(ids) if cluster == "slurm" else {}
    statuses = [query_stage(stage, cluster, squeue, sacct) for stage in state["stages"]]
    by_name = {s.name: s for s in statuses}
    for stage, status in zip(state["stages"], statuses):
        if status.state in FAILED_STATES:
            path, line = error_excerpt(stage)
            if path is not None:
                status.log = str(path)
            hint = {"TIMEOUT": "time limit reached and not requeued (too many timeouts?); --resume continues "
                               "from the latest checkpoint",
                    "OUT_OF_MEMORY": "out of memory: raise --mem or lower the micro batch size",
                    "NODE_FAIL": "node failure; --resume continues from the latest checkpoint"}.get(status.state)
            status.note = hint or line or status.note
        failed_dep = _failed_dependency(stage, state, by_name)
        if failed_dep and (status.state.startswith("CANCELLED") or "DependencyNeverSatisfied" in status.note):
            status.note = (f"dependency {failed_dep} failed" if status.state.startswith("CANCELLED")
                           else f"will never start: dependency {failed_dep} failed (storms launch --cancel)")
        if status.requeues:
            requeued = f"requeued {status.requeues}x (preemption / time limit), resumed from its checkpoint"
            status.note = "; ".join(filter(None, [status.note, requeued]))
    return statuses


def _failed_dependency(stage: dict, state: dict, by_name: dict[str, StageStatus]) -> str | None:
    stages = {s["name"]: s for s in state["stages"]}
    todo, seen = list(stage.get("depends_on", [])), set()
    while todo:
        name = todo.pop()
        if name in seen or name not in by_name:
            continue
        seen.add(name)
        if by_name[name].state in FAILED_STATES:
            return name
        todo += stages[name].get("depends_on", [])
    return None


def overall(statuses: list[StageStatus]) -> str:
    """FAILED, CANCELLED, COMPLETED or RUNNING (something still pending or running)."""
    states = [s.state for s in statuses if s.state != "SKIPPED"]
    if any(s in FAILED_STATES for s in states):
        return "FAILED"
    if any(s in ACTIVE_STATES for s in states):
        if any("DependencyNeverSatisfied" in s.note for s in statuses):
            return "FAILED"
        return "RUNNING"
    if any(s.startswith("CANCELLED") for s in states):
        return "CANCELLED"
    if all(s == "COMPLETED" for s in states):
        return "COMPLETED"
    return "UNKNOWN"


def format_status(run_dir: str | Path, state: dict, statuses: list[StageStatus]) -> str:
    lines = [f"pipeline {state['name']}  ({run_dir})",
             f"  submitted {state['submitted_at']} on {state['cluster']}"
             + (f", sweep {state['sweep']['name']}: {state['sweep']['point']}" if state.get("sweep") else "")]
    mlflow = state.get("mlflow") or {}
    if mlflow.get("parent_run_id"):
        lines.append(f"  MLflow parent run {mlflow['parent_run_id']} (experiment {mlflow['experiment']}, "
                     f"{mlflow['tracking_uri']})")
    header = ("stage", "job", "state", "runtime", "log")
    rows = [(s.name, s.job, s.state, s.runtime or "-", s.log or "-") for s in statuses]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines.append("")
    lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(header[:4], widths)) + "  " + header[4])
    for status, row in zip(statuses, rows):
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])
        if status.note:
            lines.append(f"  {'':{widths[0]}}  -> {status.note}")
    verdict = overall(statuses)
    lines.append("")
    failed = [s for s in statuses if s.state in FAILED_STATES]
    if failed:
        f = failed[0]
        cancelled = [s.name for s in statuses if s.note.startswith(("dependency", "will never start"))]
        lines.append(f"FAILED: stage {f.name} ({f.state}); log: {f.log}"
                     + (f"; cancelled because of it: {', '.join(cancelled)}" if cancelled else ""))
        lines.append(f"  fix the cause, then `storms launch --resume {run_dir}` re-submits what is unfinished "
                     "(finished stages are kept; training resumes from its latest checkpoint)")
    elif verdict == "COMPLETED":
        summary = Path(state["run_dir"]) / "eval" / "summary.json"
        if summary.is_file():
            acc = json.loads(summary.read_text())["accuracy"]
            lines.append(f"COMPLETED: accuracy {acc:.3f} on {state.get('config_split', 'the eval split')}; "
                         f"metrics in {summary.parent}")
        else:
            lines.append("COMPLETED")
    else:
        lines.append(verdict)
    return "\n".join(lines)


# ---- waiting and cancelling ----
def wait(run_dir: str | Path, *, timeout_s: float = 3600, poll_s: float = 3.0,
         settle_s: float = 120.0) -> tuple[str, list[StageStatus]]:
    """Block until the pipeline is over (COMPLETED, FAILED or CANCELLED) or ``timeout_s`` passed.

    A failed Slurm pipeline is over once Slurm has cancelled the stages that depended on the failure: it does
    so on its next scheduling pass (--kill-on-invalid-dep), so for up to ``settle_s`` we wait for that too.
    """
    deadline = time.time() + timeout_s
    failed_since = None
    while True:
        state = read_state(run_dir)  # re-read: a local pipeline's driver updates it as stages run
        statuses = pipeline_status(run_dir, state)
        verdict = overall(statuses)
        if verdict == "FAILED" and state["cluster"] == "slurm" and _awaiting_cancellation(state, statuses):
            failed_since = failed_since or time.time()
            over = time.time() - failed_since >= settle_s
        else:
            over = verdict in ("COMPLETED", "FAILED", "CANCELLED")
        if over or time.time() > deadline:
            return verdict, statuses
        time.sleep(poll_s)


def _awaiting_cancellation(state: dict, statuses: list[StageStatus]) -> bool:
    """Some stage still waits on a dependency that has failed, and Slurm has not yet ruled on it."""
    by_name = {s.name: s for s in statuses}
    return any(status.state in ACTIVE_STATES and "DependencyNeverSatisfied" not in status.note
               and _failed_dependency(stage, state, by_name)
               for stage, status in zip(state["stages"], statuses))


def cancel(run_dir: str | Path) -> list[str]:
    """Cancel the stages still pending or running (``scancel``; local: the job's process). Returns their ids."""
    state = read_state(run_dir)
    statuses = pipeline_status(run_dir, state)
    targets = [stage for stage, status in zip(state["stages"], statuses)
               if stage.get("job_id") and (status.state in ACTIVE_STATES or status.state == "UNKNOWN")]
    ids = [str(s["job_id"]) for s in targets]
    if not ids:
        return []
    if state["cluster"] == "slurm":
        subprocess.run(["scancel", *ids], check=False)
    else:  # stop the foreground `storms launch` (it cancels its running job), then the job's processes
        drivers = {s.get("driver_pid") for s in targets if s.get("driver_pid")}
        for pid, sig in [*((p, signal.SIGINT) for p in drivers), *((j, signal.SIGTERM) for j in ids)]:
            try:
                os.kill(int(pid), sig)
            except (ValueError, ProcessLookupError, PermissionError):
                pass
        for stage in targets:
            stage["local_state"] = "CANCELLED"
        write_state(run_dir, state)
    mark_parent(state, "KILLED")
    return ids


def mark_parent(state: dict, status: str) -> None:
    """End the pipeline's MLflow parent run (FAILED / KILLED) when the pipeline will not finish."""
    mlflow = state.get("mlflow") or {}
    run_id = mlflow.get("parent_run_id")
    if not run_id:
        return
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=mlflow["tracking_uri"])
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status=status)
    except Exception as e:  # noqa: BLE001 - status reporting must not fail on MLflow trouble
        print(f"(could not update MLflow run {run_id}: {e})")


def summarize_for_json(statuses: list[StageStatus]) -> list[dict[str, Any]]:
    return [{"stage": s.name, "job": s.job, "state": s.state, "runtime": s.runtime, "log": s.log, "note": s.note}
            for s in statuses]
