"""``storms launch``: submit the STORMS stage sequence to Slurm (or run it locally), watch it, cancel it.

    storms launch CONFIG --cluster {slurm,local,debug} [--nodes N --gpus-per-node G --partition P --time T
                  --account A --qos Q --constraint C --mem M] [--sweep KEY=V1,V2 ...] [--dry-run] [KEY=VALUE ...]
    storms launch --status RUN_DIR [RUN_DIR ...] [--wait] [--json]
    storms launch --cancel RUN_DIR [RUN_DIR ...]
    storms launch --resume RUN_DIR [options]

Wiring: ``add_launch_parser(subparsers)`` adds the sub-command; ``cmd_launch(args)`` runs it (``args.overrides``
holds the KEY=VALUE arguments, as ``storms_dist.cli.main`` collects them). ``python -m storms_dist.launchers.cli``
works on its own too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .prepare import (
    LaunchError,
    LaunchOptions,
    build_plan,
    check_cluster,
    check_data,
    check_fits,
    check_paths,
    config_fingerprint,
    expand_sweep,
    load_resolved_config,
    needs_stage0,
    point_suffix,
)
from .state import (
    cancel,
    format_status,
    mark_parent,
    overall,
    pipeline_status,
    read_state,
    state_path,
    summarize_for_json,
    wait,
    write_state,
)

OPTION_FIELDS = ("cluster", "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "partition", "time",
                 "account", "qos", "constraint", "mem", "targets_shards", "stage0", "gpu", "plan_check")


def add_launch_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "launch", help="submit the pipeline (targets -> Stage I -> Stage II -> eval) to Slurm; --status, --cancel",
        description="Submit one pipeline: thought-video targets (a job array) -> Stage I -> Stage II -> eval, each "
                    "stage afterok on the previous one (plus synthetic data and Stage 0 when the config needs "
                    "them). Prints the job ids and the MLflow parent run, writes RUN_DIR/launch.json. Training "
                    "jobs run one Slurm task per GPU; preempted or timed-out jobs are requeued and resume from "
                    "their latest checkpoint; finished stages are never repeated.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any KEY=VALUE argument is a dotted config override, e.g. stage1.num_steps=500.\n\n"
               "examples:\n"
               "  storms launch configs/demo/synth_quick.yaml --cluster slurm --partition gpu --gpus-per-node 8 "
               "--nodes 2 --time 12:00:00\n"
               "  storms launch configs/demo/synth_quick.yaml --dry-run\n"
               "  storms launch CONFIG --sweep model.num_latents=4,8,16      # one pipeline per value\n"
               "  storms launch --status runs/demo_quick\n"
               "  storms launch --cancel runs/demo_quick\n"
               "  storms launch --resume runs/demo_quick                     # after a failure: re-submit the rest")
    p.add_argument("config", nargs="?", default=None, help="YAML run config (not with --status/--cancel/--resume)")
    what = p.add_argument_group("what to do (default: submit CONFIG)")
    what.add_argument("--status", nargs="+", metavar="RUN_DIR", help="show each stage's state, job id, runtime, log")
    what.add_argument("--cancel", nargs="+", metavar="RUN_DIR", help="cancel the stages still pending or running")
    what.add_argument("--resume", metavar="RUN_DIR",
                      help="re-submit the unfinished stages of a launched pipeline with its saved config and "
                           "options (options and KEY=VALUE overrides given here apply to the unfinished stages)")
    what.add_argument("--dry-run", action="store_true", help="print the sbatch scripts; submit nothing")
    what.add_argument("--wait", action="store_true", help="block until the pipeline(s) finished; exit 0 if all "
                      "completed")
    what.add_argument("--json", action="store_true", help="--status as JSON")
    res = p.add_argument_group("resources (training jobs: one task per GPU on every node)")
    res.add_argument("--cluster", choices=("slurm", "local", "debug"), default=None,
                     help="slurm: sbatch (default); local: submitit's LocalExecutor on this machine; debug: "
                          "in this process")
    res.add_argument("--nodes", type=int, default=None, help="nodes per training job (default 1)")
    res.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node = ranks per node (default 0: CPU, "
                     "gloo)")
    res.add_argument("--tasks-per-node", type=int, default=None,
                     help="ranks per node without GPUs (default 1; with GPUs it is --gpus-per-node)")
    res.add_argument("--cpus-per-task", type=int, default=None, help="default 8 with GPUs, 1 without")
    res.add_argument("--partition", default=None)
    res.add_argument("--time", default=None, help="time limit of every job, Slurm syntax (default 4:00:00)")
    res.add_argument("--account", default=None)
    res.add_argument("--qos", default=None)
    res.add_argument("--constraint", default=None)
    res.add_argument("--mem", default=None, help="memory per node, e.g. 64G (default: the cluster's)")
    res.add_argument("--targets-shards", type=int, default=None, help="tasks of the targets job array (default 8)")
    res.add_argument("--stage0", choices=("auto", "yes", "no"), default=None,
                     help="Stage 0 perception pre-training: auto (default) = only for a random-init backbone "
                          "without model.init_from")
    res.add_argument("--gpu", choices=("h100", "h200", "a100", "b200"), default=None,
                     help="GPU part for the memory check (storms plan; default h100)")
    res.add_argument("--no-plan-check", dest="plan_check", action="store_const", const=False, default=None,
                     help="submit even when storms plan says a training stage cannot fit")
    p.add_argument("--sweep", action="append", metavar="KEY=V1,V2,...",
                   help="one pipeline per value (repeat for a grid), each its own run folder NAME-<key><value>, "
                        "tagged in MLflow")
    return p


# ---- launching ----
def _options(args, saved: dict | None = None) -> LaunchOptions:
    given = {k: getattr(args, k) for k in OPTION_FIELDS if getattr(args, k, None) is not None}
    return LaunchOptions(**{**(saved or {}), **given})


def _check_run_dir(cfg, fingerprint: str, *, resuming: bool = False) -> dict | None:
    """An existing launched pipeline in the run folder: same config (or --resume) -> continue it (returns its
    state); still running -> error."""
    run_dir = cfg.run_dir.resolve()
    if not state_path(run_dir).is_file():
        return None
    state = read_state(run_dir)
    if state.get("config_fingerprint") != fingerprint and not resuming:
        raise LaunchError(f"{run_dir} holds a pipeline launched with another config; pick another name "
                          f"(name=...) or remove the folder")
    if overall(pipeline_status(run_dir, state)) == "RUNNING":
        raise LaunchError(f"{run_dir}: this pipeline is still running (storms launch --status {run_dir}; "
                          f"--cancel to stop it)")
    return state


def launch(config: str | None, overrides: list[str], opts: LaunchOptions, *, sweeps: list[str] | None = None,
           dry_run: bool = False, resume_state: dict | None = None, out=None,
           extra_tags: dict[str, str] | None = None) -> list[Path]:
    """Validate every pipeline of the sweep, then submit them (or print their sbatch scripts). Returns run dirs."""
    from storms_dist.config import dump, to_dict
    from storms_dist.tracking import TrackingServerUnavailable, check_tracking_server

    out = out or sys.stdout
    points = expand_sweep(sweeps)
    base = load_resolved_config(config, overrides)[0].name
    if sweeps and any(k.startswith(("synth.", "data.")) for point in points for k, _ in point):
        raise LaunchError("--sweep over synth.* / data.* keys would write different data into one data.root; "
                          "sweep model/optim/stage keys, or launch each data set separately")
    check_cluster(opts, dry_run=dry_run)
    pipelines = []
    for point in points:
        extra = [f"{k}={v}" for k, v in point] + ([f"name={base}-{point_suffix(point)}"] if point else [])
        cfg, wants_synth = load_resolved_config(config, [*overrides, *extra])
        if resume_state is not None:  # the saved config.yaml always has a synth section: ask the first launch
            wants_synth = bool(resume_state.get("wants_synth"))
        if not dry_run:  # before anything is submitted: the jobs would only find out on the cluster
            try:
                check_tracking_server(cfg.tracking, cfg.runs_dir)
            except TrackingServerUnavailable as e:
                raise LaunchError(str(e)) from None
        check_paths(cfg)
        with_stage0 = needs_stage0(cfg, opts)
        check_fits(cfg, opts, with_stage0=with_stage0)
        with_synth = check_data(cfg, wants_synth, with_stage0)
        fingerprint = config_fingerprint(to_dict(cfg))
        previous = None if dry_run else _check_run_dir(cfg, fingerprint, resuming=resume_state is not None)
        sweep = {"name": base, "point": dict(point)} if point else None
        pipelines.append((cfg, with_synth, fingerprint, previous, sweep, wants_synth))
    from .submit import cpu_only_note

    note = cpu_only_note(opts)
    if dry_run:
        from .submit import sbatch_scripts

        for cfg, with_synth, *_ in pipelines:
            plan = build_plan(cfg, opts, with_synth=with_synth, parent_run_id="<MLflow parent run id>")
            run_dir = cfg.run_dir.resolve()
            print(f"# ===== pipeline {cfg.name}: {run_dir}  (dry run: nothing submitted)", file=out)
            if note:
                print(f"# NOTE: {note}", file=out)
            for stage in plan:
                if stage.done:
                    print(f"# {stage.name}: finished before, not submitted", file=out)
            for name, text in sbatch_scripts(plan, opts, run_dir, cfg.name):
                print(f"\n# ----- {name}: sbatch {run_dir / 'slurm' / name / '%j_submission.sh'}", file=out)
                print(text, file=out)
        return [cfg.run_dir.resolve() for cfg, *_ in pipelines]

    from .submit import new_state, run_sequential, start_parent_run, submit_slurm

    run_dirs = []
    synth_done_by: str | None = None  # sweeps: the first pipeline makes the data, the others wait for it
    for cfg, with_synth, fingerprint, previous, sweep, wants_synth in pipelines:
        run_dir = cfg.run_dir.resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        dump(cfg, run_dir / "config.yaml")
        tags = {"sweep": sweep["name"], **{f"sweep.{k}": v for k, v in sweep["point"].items()}} if sweep else {}
        # storms study: the study id on every run; the study's parent run (mlflow.parentRunId) on the pipeline's only
        study = dict(extra_tags or {})
        nest = {k: study.pop(k) for k in [k for k in study if k.startswith("mlflow.")]}
        tags.update(study)
        reopen = ((previous or {}).get("mlflow") or {}).get("parent_run_id")
        mlflow = start_parent_run(cfg, cluster=opts.cluster, tags={**tags, **nest}, reopen=reopen)
        own_synth = with_synth and synth_done_by is None
        plan = build_plan(cfg, opts, with_synth=own_synth, parent_run_id=mlflow and mlflow["parent_run_id"],
                          tags=tags)
        state = new_state(cfg, opts, plan, mlflow=mlflow, sweep=sweep, config_path=config, overrides=overrides,
                          fingerprint=fingerprint)
        if previous:  # keep the earlier submissions' job ids (their logs stay in the stage folders)
            state["history"] = [*previous.get("history", []), {
                "submitted_at": previous["submitted_at"], "cluster": previous["cluster"],
                "jobs": {s["name"]: s.get("job_id") for s in previous["stages"] if s.get("job_id")}}]
        state["wants_synth"] = wants_synth
        write_state(run_dir, state)
        if opts.cluster == "slurm":
            waits_for = synth_done_by if with_synth and not own_synth else None
            submit_slurm(plan, opts, state, run_dir, cfg.name, extra_dependency=waits_for)
            if own_synth:
                synth_done_by = next(s["job_id"] for s in state["stages"] if s["name"] == "synth")
            _print_submitted(state, out, note=note)
        else:
            _print_submitted(state, out, local=True)
            ok = run_sequential(plan, opts, state, run_dir, cfg.name)
            print(format_status(run_dir, state, pipeline_status(run_dir, state)), file=out)
            if not ok:
                run_dirs.append(run_dir)
                raise PipelineFailed(run_dirs)
        run_dirs.append(run_dir)
    return run_dirs


class PipelineFailed(RuntimeError):
    def __init__(self, run_dirs: list[Path]):
        super().__init__(f"pipeline failed: {run_dirs[-1]}")
        self.run_dirs = run_dirs


def _print_submitted(state: dict, out, local: bool = False, note: str | None = None) -> None:
    run_dir = state["run_dir"]
    verb = "running" if local else "submitted"
    print(f"storms launch: {verb} pipeline {state['name']} on {state['cluster']} (run folder {run_dir})", file=out)
    if note:
        print(f"  NOTE: {note}", file=out)
    for stage in state["stages"]:
        if stage.get("skipped"):
            line = f"skipped ({stage['skipped']})"
        elif stage.get("job_id"):
            deps = [d for d in stage["depends_on"]]
            line = f"job {stage['job_id']}" + (f" (array of {stage['array']})" if stage.get("array") else "")
            line += f", {stage['tasks']} task(s) on {stage['nodes']} node(s)"
            line += f", afterok {', '.join(deps)}" if deps else ""
        else:
            line = "to run"
        print(f"  {stage['name']:<8} {line}", file=out)
    mlflow = state.get("mlflow")
    if mlflow:
        print(f"  MLflow parent run {mlflow['parent_run_id']} (experiment {mlflow['experiment']}, "
              f"{mlflow['tracking_uri']})", file=out)
    print(f"  state file {Path(run_dir) / 'launch.json'}", file=out)
    if not local:
        print(f"  watch:  storms launch --status {run_dir}\n  cancel: storms launch --cancel {run_dir}", file=out)


# ---- status / cancel ----
def show_status(run_dirs: list[str], *, wait_for_end: bool = False, as_json: bool = False, out=None) -> int:
    """Print each pipeline's status (optionally after waiting for its end); 1 if any failed or was cancelled."""
    out = out or sys.stdout
    code = 0
    reports = []
    for run_dir in run_dirs:
        state = read_state(run_dir)
        if wait_for_end:
            verdict, statuses = wait(run_dir)
        else:
            statuses = pipeline_status(run_dir, state)
            verdict = overall(statuses)
        if verdict in ("FAILED", "CANCELLED"):
            code = 1
            mark_parent(state, "FAILED" if verdict == "FAILED" else "KILLED")
        elif wait_for_end and verdict != "COMPLETED":
            code = 1
        if as_json:
            reports.append({"run_dir": str(run_dir), "name": state["name"], "state": verdict,
                            "mlflow": state.get("mlflow"), "stages": summarize_for_json(statuses)})
        else:
            print(format_status(run_dir, state, statuses), file=out)
    if as_json:
        print(json.dumps(reports if len(reports) > 1 else reports[0], indent=2), file=out)
    return code


def cmd_launch(args) -> int:
    from storms_dist.config import ConfigError

    overrides = list(getattr(args, "overrides", []) or [])
    if (args.status or args.cancel or args.resume) and args.config is not None:
        from storms_dist.cli import DEFAULT_CONFIG

        if args.config == DEFAULT_CONFIG:  # storms_dist.cli.main's default, put there when the positional slot
            args.config = None             # held a KEY=VALUE (moved to the overrides): these modes take no config
    try:
        if args.status:
            return show_status(args.status, wait_for_end=args.wait, as_json=args.json)
        if args.cancel:
            for run_dir in args.cancel:
                ids = cancel(run_dir)
                print(f"storms launch: {run_dir}: cancelled {', '.join(ids) if ids else 'nothing (no stage pending or running)'}")
            return 0
        if args.resume:
            if args.config or args.sweep:
                raise LaunchError("--resume RUN_DIR takes no CONFIG or --sweep (it reuses the saved config; "
                                  "KEY=VALUE overrides apply to the stages not finished yet)")
            state = read_state(args.resume)
            opts = _options(args, state["options"])
            run_dirs = launch(state["config"], overrides, opts, dry_run=args.dry_run, resume_state=state)
        else:
            if args.config is None:
                raise LaunchError("a CONFIG is required (or --status / --cancel / --resume RUN_DIR)")
            opts = _options(args)
            run_dirs = launch(args.config, overrides, opts, sweeps=args.sweep, dry_run=args.dry_run)
        if args.wait and not args.dry_run and opts.cluster == "slurm":
            return show_status([str(d) for d in run_dirs], wait_for_end=True)
        return 0
    except PipelineFailed:
        return 1
    except KeyboardInterrupt:
        print("storms launch: interrupted (the running stage was cancelled; --resume continues)", file=sys.stderr)
        return 130
    except (LaunchError, ConfigError, FileNotFoundError) as e:
        print(f"storms launch: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point with the same argument handling as ``storms`` (KEY=VALUE overrides anywhere)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="storms")
    sub = parser.add_subparsers(dest="command", required=True)
    launch_parser = add_launch_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "launch":
        argv = ["launch", *argv]
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if "=" not in a or a.startswith("-")]
    if unknown:
        launch_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = extra
    if args.config is not None and "=" in args.config and not Path(args.config).exists():
        args.overrides = [args.config, *extra]
        args.config = None
    return cmd_launch(args)


if __name__ == "__main__":
    raise SystemExit(main())
