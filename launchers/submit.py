"""Submitting a pipeline: one submitit executor per stage, ``afterok`` dependencies, the state file, MLflow.

- ``slurm``: every stage is submitted at once, each ``--dependency=afterok:<previous>`` and
  ``--kill-on-invalid-dep=yes`` (Slurm's default would leave the dependents of a failed stage pending forever),
  ``--requeue`` (preempted jobs come back). ``storms launch`` returns right away; ``--status`` follows.
- ``local``: the same stage callables through submitit's LocalExecutor (subprocesses on this machine, one per
  task), one stage after the other, in the foreground.
- ``debug``: the same callables in this process (one rank), for breakpoints.
"""

from __future__ import annotations

import datetime as dt
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

from .prepare import LaunchError, LaunchOptions, StagePlan
from .stages import StageJob
from .state import mark_parent, write_state


def slurm_parameters(stage: StagePlan, opts: LaunchOptions, run_name: str,
                     dependency: list[str] | None = None) -> dict[str, Any]:
    """Native SlurmExecutor parameters of one stage's job(s)."""
    params: dict[str, Any] = {
        "job_name": f"storms:{run_name}:{stage.name}", "time": opts.time_minutes, "nodes": stage.nodes,
        "ntasks_per_node": stage.tasks_per_node, "cpus_per_task": stage.cpus_per_task,
        "signal_delay_s": opts.signal_delay_s, "stderr_to_stdout": True,
        # a failed dependency cancels this job instead of leaving it PENDING (DependencyNeverSatisfied) forever;
        # --requeue: preempted jobs come back even where JobRequeue=0 is the cluster default
        "additional_parameters": {"kill_on_invalid_dep": "yes", "requeue": True},
        # the job runs a pickled StageJob; say in the script which storms command it stands for
        "setup": [f"# storms: {storms_command(stage)}"],
    }
    if stage.gpus_per_node:
        params["gpus_per_node"] = stage.gpus_per_node
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if getattr(opts, key):
            params[key] = getattr(opts, key)
    if dependency:
        params["dependency"] = "afterok:" + ":".join(dependency)
    return params


def storms_command(stage: StagePlan) -> str:
    """The ``storms`` command line a stage's job is equivalent to (the job itself runs the pickled StageJob, which
    also logs to the pipeline's MLflow parent run and, for the targets array, writes one part per task)."""
    spec = stage.spec
    config = shlex.quote(str(Path(spec["run_dir"]) / "config.yaml"))
    if stage.kind == "synth":
        return f"storms synth {config}"
    if stage.kind == "targets":
        t = spec["targets"]
        return (f"storms targets {config} --init-from {shlex.quote(str(t['init_from']))} --out "
                f"{shlex.quote(t['out_dir'])}  (here one part per array task, into {t['parts_dir']})")
    if stage.kind == "train":
        job = spec["job"]
        init = f" --init-from {shlex.quote(str(job['init_from']))}" if job.get("init_from") else ""
        return f"storms train {config} --stage {job['stage']}{init}"
    if stage.kind == "eval":
        e = spec["eval"]
        return f"storms eval {config} --model {shlex.quote(e['export'])} --out {shlex.quote(e['out_dir'])}"
    if stage.kind == "throughput":  # storms study: one measured point
        return f"storms study {config} (throughput point {spec['point_name']} of study {spec['study_id']})"
    raise ValueError(f"stage {stage.name}: unknown kind {stage.kind!r}")


def cpu_only_note(opts: LaunchOptions) -> str | None:
    """Slurm without --gpus-per-node requests no GPU at all: say so rather than submit CPU jobs silently."""
    if opts.cluster != "slurm" or opts.gpus_per_node:
        return None
    return ("no --gpus-per-node: every job requests CPUs only (gloo backend, --tasks-per-node ranks per node); "
            "pass --gpus-per-node N for GPU jobs")


def stage_folder(run_dir: Path, stage: StagePlan) -> Path:
    """submitit's folder for a stage: pickles and one log per task, ``<job id>_<task>_log.out``."""
    return run_dir / "slurm" / stage.name


def make_executor(cluster: str, folder: Path, stage: StagePlan, opts: LaunchOptions, run_name: str,
                  dependency: list[str] | None = None):
    import submitit

    if cluster == "slurm":
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=opts.max_timeouts)
        executor.update_parameters(**slurm_parameters(stage, opts, run_name, dependency))
    elif cluster == "local":
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=opts.max_timeouts)
        executor.update_parameters(timeout_min=opts.time_minutes, tasks_per_node=stage.tasks_per_node,
                                   gpus_per_node=stage.gpus_per_node, signal_delay_s=opts.signal_delay_s,
                                   stderr_to_stdout=True)
    else:
        executor = submitit.DebugExecutor(folder=folder)
    return executor


def submission_args(stage: StagePlan) -> list[tuple]:
    """Arguments of each submission of a stage: an array's tasks get (index, count)."""
    if stage.kind == "targets":
        return [(i, stage.array) for i in range(stage.array or 1)]
    return [()]


# ---- dry run ----
def sbatch_scripts(plan: list[StagePlan], opts: LaunchOptions, run_dir: Path, run_name: str) -> list[tuple[str, str]]:
    """The sbatch script of every stage that would be submitted (dependencies as ``<stage>``), without Slurm."""
    from submitit.slurm.slurm import _make_sbatch_string

    scripts = []
    submitted: set[str] = set()
    for stage in plan:
        if stage.done:
            continue
        deps = [f"<{d} job id>" for d in stage.depends_on if d in submitted]
        folder = stage_folder(run_dir, stage)
        command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
        params = slurm_parameters(stage, opts, run_name, deps)
        map_count = stage.array if stage.array and stage.array > 1 else None
        text = _make_sbatch_string(command=command, folder=folder, map_count=map_count, **params)
        scripts.append((stage.name, text))
        submitted.add(stage.name)
    return scripts


# ---- MLflow ----
def start_parent_run(cfg, *, cluster: str, tags: dict[str, str], reopen: str | None = None) -> dict | None:
    """The pipeline's MLflow parent run (left RUNNING: the eval job ends it FINISHED, --status/--cancel FAILED or
    KILLED). Every stage's run is its child."""
    from storms_dist.config import flatten
    from storms_dist.tracking import Tracker

    tracker = Tracker(cfg.tracking, Path(cfg.runs_dir), is_main_process=True)
    if not tracker.enabled:
        return None
    run_id = tracker.start_run(f"{cfg.name}/pipeline", run_id=reopen,
                               tags={"pipeline": cfg.name, "launch": cluster, **tags})
    if reopen is None:
        tracker.log_params(flatten(cfg))
        tracker.log_artifact(cfg.run_dir / "config.yaml")
    tracker.flush()
    return {"parent_run_id": run_id, "tracking_uri": tracker.tracking_uri, "experiment": cfg.tracking.experiment}


# ---- state ----
def new_state(cfg, opts: LaunchOptions, plan: list[StagePlan], *, mlflow: dict | None, sweep: dict | None,
              config_path: str | None, overrides: list[str], fingerprint: str) -> dict:
    run_dir = cfg.run_dir.resolve()
    return {
        "version": 1, "name": cfg.name, "run_dir": str(run_dir), "cluster": opts.cluster,
        "submitted_at": dt.datetime.now().isoformat(timespec="seconds"),
        "config": str(run_dir / "config.yaml"), "config_source": config_path, "overrides": overrides,
        "config_fingerprint": fingerprint, "config_split": cfg.eval.split,
        "options": opts.to_json(), "mlflow": mlflow, "sweep": sweep,
        "stages": [{"name": s.name, "kind": s.kind, "job_id": None, "array": s.array, "depends_on": s.depends_on,
                    "log_dir": str(stage_folder(run_dir, s)), "out_dir": s.out_dir,
                    "tasks": s.nodes * s.tasks_per_node, "nodes": s.nodes,
                    "skipped": "finished before" if s.done else None} for s in plan],
    }


# ---- submission ----
def submit_slurm(plan: list[StagePlan], opts: LaunchOptions, state: dict, run_dir: Path, run_name: str,
                 *, extra_dependency: str | None = None) -> None:
    """Submit every stage now, chained with afterok; the state file is written after each submission.
    ``extra_dependency``: a job the first submitted stage also waits for (a sweep's shared synth job)."""
    ids: dict[str, str] = {}
    entries = {e["name"]: e for e in state["stages"]}
    for stage in plan:
        if stage.done:
            continue
        deps = [ids[d] for d in stage.depends_on if d in ids]
        if not ids and extra_dependency:
            deps.append(extra_dependency)
        executor = make_executor("slurm", stage_folder(run_dir, stage), stage, opts, run_name, deps)
        try:
            calls = submission_args(stage)
            if len(calls) > 1:
                with executor.batch():
                    jobs = [executor.submit(StageJob(stage.spec), *args) for args in calls]
            else:
                jobs = [executor.submit(StageJob(stage.spec), *calls[0])]
        except Exception as e:  # noqa: BLE001 - sbatch refused: undo what was submitted, one-line error
            import subprocess

            if ids:
                subprocess.run(["scancel", *ids.values()], check=False)
            first = str(e).strip().splitlines()
            raise LaunchError(f"sbatch refused stage {stage.name}: {first[-1] if first else e}"
                              f"{' (cancelled the stages submitted before it)' if ids else ''}") from None
        ids[stage.name] = jobs[0].job_id.split("_")[0]
        entries[stage.name]["job_id"] = ids[stage.name]
        if len(jobs) == 1:
            entries[stage.name]["array"] = None
        write_state(run_dir, state)


def wait_failing_fast(job, poll_s: float = 1.0) -> list:
    """Every task's result, like ``job.results()``, but the first task that fails cancels the job and raises its
    error at once: ``results()`` waits for every task, and a rank whose peer died before the rendezvous waits in
    ``init_process_group`` until the distributed timeout (30 min) instead."""
    if job.num_tasks == 1:  # nobody to wait for (and a DebugJob runs only inside results())
        return job.results()
    from submitit.core.utils import FailedJobError, pickle_load

    tasks = [job.task(i) for i in range(job.num_tasks)]
    while not job.done():
        # a LocalJob's per-task done() follows the job's one controller process, so read each task's result file
        for task in tasks:
            try:
                outcome, trace = pickle_load(task.paths.result_pickle)
            except (FileNotFoundError, EOFError):  # still running, or its result is being written
                continue
            if outcome == "error":
                _cancel(job)
                raise FailedJobError(f"task {task.task_id} of job {job.job_id} failed (the job's other tasks were "
                                     f"cancelled); log: {task.paths.stderr}\n{trace}")
        time.sleep(poll_s)
    return job.results()


def _cancel(job) -> None:
    """``job.cancel``, and for a local job also SIGKILL to its tasks: submitit cancels a LocalJob by SIGINT to its
    controller, which ignores SIGINT when the driver does (a script's ``cmd &`` starts it so, and children inherit
    it), and then the peers wait in init_process_group for the whole distributed timeout."""
    job.cancel(check=False)
    controller = getattr(job, "_process", None)  # LocalJob's controller Popen (submitit keeps it private)
    if controller is None:
        return
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, ppid = stat.parent.name, stat.read_text().rsplit(")", 1)[1].split()[1]
            if int(ppid) == controller.pid:
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, IndexError, ValueError):  # gone meanwhile, or not ours to kill
            continue


def run_sequential(plan: list[StagePlan], opts: LaunchOptions, state: dict, run_dir: Path, run_name: str) -> bool:
    """local / debug: run the stages one after the other (same callables); True when all succeeded."""
    entries = {e["name"]: e for e in state["stages"]}
    failed: str | None = None
    for stage in plan:
        entry = entries[stage.name]
        if stage.done:
            continue
        if failed:
            entry["local_state"], entry["note"] = "CANCELLED", f"dependency {failed} failed"
            continue
        executor = make_executor(opts.cluster, stage_folder(run_dir, stage), stage, opts, run_name)
        calls = submission_args(stage)
        started = time.time()
        jobs = [executor.submit(StageJob(stage.spec), *args) for args in calls]
        entry["job_id"], entry["jobs"], entry["array"] = jobs[0].job_id, [j.job_id for j in jobs], None
        entry["local_state"], entry["driver_pid"] = "RUNNING", os.getpid()
        write_state(run_dir, state)
        print(f"[storms launch] {stage.name}: {opts.cluster} job{'s' if len(jobs) > 1 else ''} "
              f"{', '.join(j.job_id for j in jobs)} ({stage.tasks_per_node} task(s)); logs in "
              f"{stage_folder(run_dir, stage)}", flush=True)
        try:
            for job in jobs:
                wait_failing_fast(job)
            entry["local_state"] = "COMPLETED"
        except KeyboardInterrupt:
            for job in jobs:
                job.cancel(check=False) if hasattr(job, "cancel") else None
            entry["local_state"] = "CANCELLED"
            write_state(run_dir, state)
            raise
        except Exception as e:  # noqa: BLE001 - the stage failed: report, cancel the rest
            entry["local_state"] = "FAILED"
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            entry["note"] = lines[-1][:300] if lines else type(e).__name__
            failed = stage.name
        entry["runtime"] = str(dt.timedelta(seconds=round(time.time() - started)))
        write_state(run_dir, state)
    write_state(run_dir, state)
    if failed:
        mark_parent(state, "FAILED")
    return failed is None
