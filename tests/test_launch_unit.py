"""`storms launch` without a cluster: options, checks before submission, the plan, dry-run scripts, status
reporting from Slurm's answers, sharded targets, signal recording, and the debug executor end to end."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storms_dist.launchers import state as state_mod
from storms_dist.launchers.cli import main as launch_main
from storms_dist.launchers.prepare import (
    LaunchError,
    LaunchOptions,
    build_plan,
    expand_sweep,
    load_resolved_config,
    parse_time_minutes,
    point_suffix,
)
from storms_dist.launchers.stages import SignalRecorder, master_port

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs/demo/synth_quick.yaml")


def fake_data(root: Path, *, thought_videos: bool = True) -> Path:
    """Manifests only (no video files): enough for every check made before submission."""
    root.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", "train"), ("val", "val"), ("test", "test"), ("perception_train", "train")):
        lines = [json.dumps({"uid": f"{name}-{i}", "video": f"videos/{i}.webm", "question": "q?", "options": ["a", "b"],
                             "answer": "A", "qtype": "count", "split": split,
                             "thought_video": f"thoughts/{i}.webm" if thought_videos else None})
                 for i in range(4)]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def plain_config(tmp_path: Path, data_root: Path, **extra: str) -> Path:
    """The quick config without its synth section (so missing data is an error, not a synth job)."""
    import yaml

    data = yaml.safe_load(Path(CONFIG).read_text())
    data.pop("synth")
    data["data"]["root"] = str(data_root)
    data["runs_dir"] = str(tmp_path / "runs")
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = launch_main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- options ----
@pytest.mark.parametrize("text, minutes", [("90", 90), ("1:30", 2), ("2:00:00", 120), ("1-0", 1440),
                                           ("1-2:30", 1590), ("0-0:0:30", 1)])
def test_time_syntax(text, minutes):
    assert parse_time_minutes(text) == minutes


def test_bad_options_are_one_line_errors():
    for kwargs, needle in (({"time": "soon"}, "--time"), ({"cluster": "k8s"}, "--cluster"),
                           ({"nodes": 0}, "--nodes"), ({"gpus_per_node": 4, "tasks_per_node": 2}, "one task per GPU"),
                           ({"cluster": "local", "nodes": 2}, "this machine only")):
        with pytest.raises(LaunchError, match=needle) as e:
            LaunchOptions(**kwargs)
        assert "\n" not in str(e.value)
    opts = LaunchOptions(gpus_per_node=8, nodes=2)
    assert (opts.ranks_per_node, opts.world_size, opts.cpus) == (8, 16, 8)
    assert LaunchOptions(tasks_per_node=2).ranks_per_node == 2


def test_sweep_grid():
    points = expand_sweep(["model.num_latents=4,8", "optim.lr=1e-4,3e-4"])
    assert len(points) == 4 and points[0] == [("model.num_latents", "4"), ("optim.lr", "1e-4")]
    assert point_suffix(points[3]) == "num_latents8-lr3e-4"
    assert expand_sweep(None) == [[]]
    with pytest.raises(LaunchError, match="KEY=V1,V2"):
        expand_sweep(["model.num_latents"])


def test_master_port_is_shared_by_a_job_and_changes_on_restart():
    assert master_port("123", 0) == master_port("123", "0")
    assert master_port("123", 0) != master_port("123", 1)
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {master_port(str(job), restart) for job in range(2000) for restart in range(3)}
    assert min(ports) >= 20000 and max(ports) < ephemeral_low  # never a port the kernel hands out by itself


def _task_that_fails_or_waits(pid_dir: str) -> None:
    """Task 0 fails at once; task 1 would wait forever (a rank in init_process_group whose peer died)."""
    import time as time_mod

    import submitit

    task = submitit.JobEnvironment().global_rank
    Path(pid_dir, f"task{task}.pid").write_text(str(os.getpid()))
    if task == 0:
        for _ in range(600):  # fail once the peer is waiting, so the test knows which process to watch
            if Path(pid_dir, "task1.pid").is_file():
                break
            time_mod.sleep(0.1)
        raise OSError("EADDRINUSE: the store port is taken")
    time_mod.sleep(3600)


def test_a_failed_task_cancels_its_waiting_peers(tmp_path, monkeypatch):
    import submitit

    from storms_dist.launchers.submit import wait_failing_fast

    # the tasks unpickle _task_that_fails_or_waits from this module
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                  os.environ.get("PYTHONPATH")])))

    executor = submitit.LocalExecutor(folder=tmp_path / "jobs")
    executor.update_parameters(timeout_min=60, tasks_per_node=2)
    # started as from a script's `cmd &`: SIGINT ignored, which the controller and tasks inherit (a cancel by SIGINT
    # alone then never reaches the waiting peer)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        job = executor.submit(_task_that_fails_or_waits, str(tmp_path))
    finally:
        signal.signal(signal.SIGINT, previous)
    with pytest.raises(Exception, match="EADDRINUSE"):
        wait_failing_fast(job, poll_s=0.2)
    peer = int((tmp_path / "task1.pid").read_text())
    for _ in range(100):  # the cancel's SIGINT/SIGKILL reaches the waiting task within a few seconds
        if not _runs(peer):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"task 1 (pid {peer}) still runs after its peer failed")


def _runs(pid: int) -> bool:
    """Alive and not a zombie: a killed task whose controller exited before reaping it stays a zombie until init
    reaps it, and os.kill(pid, 0) still succeeds on a zombie."""
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (ProcessLookupError, FileNotFoundError):
        return False
    return state != "Z"


# ---- checks before submission ----
def test_errors_before_submission(tmp_path, capsys, monkeypatch):
    data = fake_data(tmp_path / "data")
    plain = plain_config(tmp_path, data)
    cases = [
        ([CONFIG, "--dry-run", "optim.lrr=1"], "unknown key 'optim.lrr'"),
        ([str(tmp_path / "nope.yaml"), "--dry-run"], "does not exist"),
        ([str(plain), "--dry-run", f"data.root={tmp_path / 'missing'}"], "does not exist"),
        ([str(plain), "--dry-run", f"data.root={tmp_path}"], "has no perception_train.jsonl, train.jsonl, test.jsonl"),
        ([str(plain), "--dry-run", f"model.init_from={tmp_path / 'no_export'}"], "model.init_from"),
        ([str(plain), "--dry-run", "--time", "later"], "--time"),
        ([str(plain), "--dry-run", "--sweep", "model.num_latents"], "--sweep"),
        ([str(plain), "--dry-run", "--sweep", "synth.num_train=4,8"], "one data.root"),
    ]
    for argv, needle in cases:
        code, out, err = run_cli(argv, capsys)
        assert code == 2, (argv, out, err)
        assert err.startswith("storms launch: error: ") and needle in err and err.count("\n") == 1, err
    no_thoughts = fake_data(tmp_path / "data2", thought_videos=False)
    code, _, err = run_cli([str(plain), "--dry-run", f"data.root={no_thoughts}"], capsys)
    assert code == 2 and "no sample has a thought_video" in err
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch: not a login node
    code, _, err = run_cli([str(plain), "--cluster", "slurm"], capsys)
    assert code == 2 and "sbatch not found" in err
    assert not (tmp_path / "runs").exists()  # nothing written, nothing submitted


# ---- plan and dry run ----
def test_dry_run_prints_the_sbatch_scripts(tmp_path, capsys):
    data = fake_data(tmp_path / "data")
    plain = plain_config(tmp_path, data)
    code, out, err = run_cli([str(plain), "--dry-run", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu",
                              "--account", "proj", "--qos", "high", "--constraint", "h100", "--mem", "200G",
                              "--time", "12:00:00", "--targets-shards", "3"], capsys)
    assert code == 0, err
    scripts = dict(part.split("\n", 1) for part in out.split("\n# ----- ")[1:])
    assert [k.split(":")[0] for k in scripts] == ["stage0", "targets", "stage1", "stage2", "eval"]
    stage1 = next(v for k, v in scripts.items() if k.startswith("stage1"))
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --qos=high",
                 "#SBATCH --constraint=h100", "#SBATCH --mem=200G", "#SBATCH --time=720",
                 "#SBATCH --signal=USR2@120", "#SBATCH --kill-on-invalid-dep=yes", "#SBATCH --requeue",
                 "#SBATCH --dependency='afterok:<targets job id>'", "srun --unbuffered"):
        assert line in stage1, line
    targets = next(v for k, v in scripts.items() if k.startswith("targets"))
    assert "#SBATCH --array=0-2%3" in targets and "#SBATCH --ntasks-per-node=1" in targets
    assert "#SBATCH --gpus-per-node=1" in targets
    assert "--dependency" not in next(v for k, v in scripts.items() if k.startswith("stage0"))
    # the pickled payload's storms command, as a comment in every script
    run_dir = next(line for line in out.splitlines() if line.startswith("# ===== pipeline")).split(": ", 1)[1]
    run_dir = run_dir.split("  (dry run")[0]
    assert f"# storms: storms train {run_dir}/config.yaml --stage 1 --init-from {run_dir}/stage0/export\n" in stage1
    assert f"# storms: storms eval {run_dir}/config.yaml --model {run_dir}/stage2/export --out {run_dir}/eval" in \
        next(v for k, v in scripts.items() if k.startswith("eval"))
    assert f"# storms: storms targets {run_dir}/config.yaml --init-from {run_dir}/stage0/export" in targets
    assert "NOTE" not in out  # GPUs were asked for
    assert not (tmp_path / "runs").exists()


def test_slurm_without_gpus_says_the_jobs_are_cpu_only(tmp_path, capsys):
    from storms_dist.launchers.cli import _print_submitted

    plain = plain_config(tmp_path, fake_data(tmp_path / "data"))
    code, out, err = run_cli([str(plain), "--dry-run", "--nodes", "2"], capsys)
    assert code == 0, err
    note = "no --gpus-per-node: every job requests CPUs only"
    assert out.count(f"# NOTE: {note}") == 1 and "#SBATCH --gpus-per-node" not in out
    state = {"run_dir": "/r", "name": "p", "cluster": "slurm", "stages": [], "mlflow": None}
    _print_submitted(state, sys.stdout, note="x")
    assert capsys.readouterr().out.splitlines()[1] == "  NOTE: x"


def test_plan_stages_and_skips(tmp_path):
    data = fake_data(tmp_path / "data")
    cfg, wants_synth = load_resolved_config(str(plain_config(tmp_path, data)), [])
    assert not wants_synth and Path(cfg.runs_dir).is_absolute()
    plan = build_plan(cfg, LaunchOptions(tasks_per_node=2, targets_shards=2), with_synth=False, parent_run_id="p")
    assert [s.name for s in plan] == ["stage0", "targets", "stage1", "stage2", "eval"]
    assert [s.depends_on for s in plan] == [[], ["stage0"], ["targets"], ["stage1"], ["stage2"]]
    assert plan[1].array == 2 and plan[1].tasks_per_node == 1 and plan[2].tasks_per_node == 2
    stage1 = plan[2].spec
    assert stage1["job"]["init_from"].endswith("stage0/export") and stage1["merge_targets"]["count"] == 2
    assert stage1["job"]["parent_run_id"] == "p"
    # a finished stage (summary + export) is never submitted again
    for stage in ("stage0", "stage1"):
        out = cfg.run_dir / stage
        (out / "export").mkdir(parents=True)
        (out / "summary.json").write_text("{}")
    plan = build_plan(cfg, LaunchOptions(), with_synth=False, parent_run_id=None)
    assert [(s.name, s.done) for s in plan] == [("stage0", True), ("targets", True), ("stage1", True),
                                                 ("stage2", False), ("eval", False)]
    # an exported starting point: no Stage 0, Stage I and the targets start from it
    cfg2, _ = load_resolved_config(str(plain_config(tmp_path, data)), [f"model.init_from={cfg.run_dir / 'stage0/export'}",
                                                                        "name=other"])
    plan = build_plan(cfg2, LaunchOptions(), with_synth=False, parent_run_id=None)
    assert [s.name for s in plan] == ["targets", "stage1", "stage2", "eval"]
    assert plan[0].spec["targets"]["init_from"] == str(cfg.run_dir / "stage0/export")


# ---- status from Slurm's answers ----
def _fake_state(tmp_path: Path) -> tuple[Path, dict]:
    run_dir = tmp_path / "run"
    stages = []
    for i, (name, kind) in enumerate((("targets", "targets"), ("stage1", "train"), ("stage2", "train"),
                                      ("eval", "eval"))):
        log_dir = run_dir / "slurm" / name
        log_dir.mkdir(parents=True)
        stages.append({"name": name, "kind": kind, "job_id": str(10 + i), "array": 2 if name == "targets" else None,
                       "depends_on": [] if i == 0 else [stages[-1]["name"]], "log_dir": str(log_dir),
                       "out_dir": str(run_dir / name), "tasks": 1, "nodes": 1, "skipped": None})
    (run_dir / "slurm/stage1/11_0_log.out").write_text("step 1\n")
    (run_dir / "slurm/stage1/11_1_log.out").write_text(
        "Traceback (most recent call last):\n  File \"x.py\", line 1\nFloatingPointError: non-finite loss at step 2\n")
    state = {"name": "run", "run_dir": str(run_dir), "cluster": "slurm", "submitted_at": "now", "mlflow": None,
             "config_split": "test", "stages": stages}
    state_mod.write_state(run_dir, state)
    return run_dir, state


def test_status_names_the_failed_stage_and_its_victims(tmp_path, monkeypatch):
    run_dir, state = _fake_state(tmp_path)
    sacct = {"10_0": state_mod.JobInfo("COMPLETED", "00:00:20"), "10_1": state_mod.JobInfo("COMPLETED", "00:00:21"),
             "11": state_mod.JobInfo("FAILED", "00:00:40", requeues=1), "12": state_mod.JobInfo("CANCELLED", "00:00:00"),
             "13": state_mod.JobInfo("CANCELLED", "00:00:00")}
    monkeypatch.setattr(state_mod, "sacct_info", lambda ids: sacct)
    monkeypatch.setattr(state_mod, "squeue_info", lambda ids: {})
    statuses = state_mod.pipeline_status(run_dir)
    assert [s.state for s in statuses] == ["COMPLETED", "FAILED", "CANCELLED", "CANCELLED"]
    assert state_mod.overall(statuses) == "FAILED"
    text = state_mod.format_status(run_dir, state, statuses)
    assert "FloatingPointError: non-finite loss at step 2" in text
    assert f"FAILED: stage stage1 (FAILED); log: {run_dir}/slurm/stage1/11_1_log.out" in text  # the task that failed
    assert "cancelled because of it: stage2, eval" in text and "requeued 1x" in text
    assert "10[0-1]" in text
    # Slurm's default (no kill-on-invalid-dep): dependents pending forever -> reported, pipeline counts as failed
    monkeypatch.setattr(state_mod, "sacct_info", lambda ids: {**sacct, "12": state_mod.JobInfo("PENDING"),
                                                              "13": state_mod.JobInfo("PENDING")})
    monkeypatch.setattr(state_mod, "squeue_info", lambda ids: {
        "12": state_mod.JobInfo("PENDING", reason="DependencyNeverSatisfied"),
        "13": state_mod.JobInfo("PENDING", reason="Dependency")})
    statuses = state_mod.pipeline_status(run_dir)
    assert statuses[2].note.startswith("will never start: dependency stage1 failed")
    assert state_mod.overall(statuses) == "FAILED"


def test_wait_on_a_failed_pipeline_lets_slurm_cancel_the_dependents(tmp_path, monkeypatch):
    """stage1 has failed but Slurm's next scheduling pass has not yet cancelled stage2/eval: not over yet."""
    run_dir, _ = _fake_state(tmp_path)
    done = {"10_0": state_mod.JobInfo("COMPLETED"), "10_1": state_mod.JobInfo("COMPLETED"),
            "11": state_mod.JobInfo("FAILED")}
    pending = {"12": state_mod.JobInfo("PENDING", reason="Dependency"),
               "13": state_mod.JobInfo("PENDING", reason="Dependency")}
    polls = itertools.count()
    # polls 0-1: dependents still pending; from poll 2 on Slurm has cancelled them
    monkeypatch.setattr(state_mod, "squeue_info", lambda ids: pending if next(polls) < 2 else {})
    monkeypatch.setattr(state_mod, "sacct_info", lambda ids: {**done, "12": state_mod.JobInfo("CANCELLED"),
                                                              "13": state_mod.JobInfo("CANCELLED")})
    verdict, statuses = state_mod.wait(run_dir, timeout_s=30, poll_s=0.01)
    assert verdict == "FAILED" and [s.state for s in statuses[2:]] == ["CANCELLED", "CANCELLED"]
    assert next(polls) == 3
    # dependents that stay pending (no kill-on-invalid-dep): reported after settle_s, not after timeout_s
    monkeypatch.setattr(state_mod, "squeue_info", lambda ids: pending)
    monkeypatch.setattr(state_mod, "sacct_info", lambda ids: {**done, **pending})
    verdict, statuses = state_mod.wait(run_dir, timeout_s=30, poll_s=0.01, settle_s=0.05)
    assert verdict == "FAILED" and [s.state for s in statuses[2:]] == ["PENDING", "PENDING"]


def test_status_without_accounting_falls_back_to_files(tmp_path, monkeypatch):
    run_dir, _ = _fake_state(tmp_path)
    out = run_dir / "stage2"
    (out / "export").mkdir(parents=True)
    (out / "summary.json").write_text("{}")
    monkeypatch.setattr(state_mod, "sacct_info", lambda ids: None)
    monkeypatch.setattr(state_mod, "squeue_info", lambda ids: {"13": state_mod.JobInfo("RUNNING", "0:05")})
    statuses = state_mod.pipeline_status(run_dir)
    assert [s.state for s in statuses] == ["UNKNOWN", "UNKNOWN", "COMPLETED", "RUNNING"]


# ---- signals ----
def test_signal_recorder_sees_signals_without_replacing_handlers():
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda *a: seen.append("handler"))
    try:
        recorder = SignalRecorder()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert seen == ["handler"]  # the installed handler still runs
        assert recorder.received() == {signal.SIGUSR2}
        recorder.close()
    finally:
        signal.signal(signal.SIGUSR2, previous)


# ---- sharded targets ----
def test_part_ranges_cover_every_sample_once():
    from storms_dist.targets import part_range

    for n in (0, 1, 5, 16):
        for count in (1, 3, 8):
            ranges = [part_range(n, i, count) for i in range(count)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    from storms_dist.cli import load_run_config
    from storms_dist.pipeline import ensure_synth

    tmp = tmp_path_factory.mktemp("launch_unit")
    overrides = [f"runs_dir={tmp / 'runs'}", f"data.root={tmp / 'data'}", "synth.num_train=6", "synth.num_val=1",
                 "synth.num_test=2", "synth.workers=1"]
    cfg = load_run_config(CONFIG, overrides)
    ensure_synth(cfg, progress=False)
    return tmp, cfg, overrides


def test_sharded_targets_equal_build_targets(tiny_set):
    import torch

    from storms_dist.data.manifest import read_manifest
    from storms_dist.data.preprocess import VisionSpec
    from storms_dist.model.build import build_model, build_tokenizer
    from storms_dist.targets import (
        TargetStore,
        build_target_part,
        build_targets,
        is_current,
        merge_target_parts,
    )

    tmp, cfg, _ = tiny_set
    model = build_model(cfg.model, build_tokenizer(), seed=0)
    spec = VisionSpec.from_hf_config(model.backbone.config)
    samples = list(read_manifest(cfg.data.manifest_path("train"), on_error="skip"))
    whole = build_targets(model, samples, spec, cfg.data, tmp / "whole", num_latents=3)
    parts = tmp / "parts"
    for index in (2, 0, 1):  # any order, as array tasks finish
        build_target_part(model, samples, spec, cfg.data, parts, index=index, count=3, num_latents=3)
    with pytest.raises(FileNotFoundError, match="part-00003-of-00004"):
        merge_target_parts(parts, tmp / "merged", count=4)
    merged = merge_target_parts(parts, tmp / "merged", count=3)
    assert merged.stamp == whole.stamp and is_current(tmp / "merged", whole.stamp)
    uids = [s.uid for s in samples]
    assert torch.equal(merged[uids], whole[uids])
    assert not parts.exists() and len(TargetStore(tmp / "merged")) == len(uids)
    # a current merged cache: array tasks do nothing, a second merge returns it
    assert build_target_part(model, samples, spec, cfg.data, parts, index=0, count=3, num_latents=3,
                             cache_dir=tmp / "merged") is None
    assert merge_target_parts(parts, tmp / "merged", count=3).stamp == whole.stamp


# ---- the debug executor, end to end (in a subprocess: it trains in its own process) ----
def test_debug_executor_reports_a_failed_stage(tiny_set):
    tmp, _, overrides = tiny_set
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    argv = [sys.executable, "-m", "storms_dist.launchers.cli", CONFIG, "--cluster", "debug", "--stage0", "no",
            "--targets-shards", "1", *overrides, "name=dbg", "stage1.num_steps=3", "stage1.micro_batch_size=2",
            "stage1.lr=1e30", "robustness.on_nonfinite_loss=stop", "model.num_latents=3"]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "FAILED: stage stage1 (FAILED)" in out and "cancelled because of it: stage2, eval" in out
    assert "FloatingPointError" in out
    state = json.loads((tmp / "runs" / "dbg" / "launch.json").read_text())
    assert [s.get("local_state") for s in state["stages"]] == ["COMPLETED", "FAILED", "CANCELLED", "CANCELLED"]
    status = subprocess.run([sys.executable, "-m", "storms_dist.launchers.cli", "--status", str(tmp / "runs" / "dbg"),
                             "--json"], capture_output=True, text=True, check=False)
    assert status.returncode == 1 and json.loads(status.stdout)["state"] == "FAILED"


def test_sweep_dry_run_one_pipeline_per_point(tmp_path, capsys):
    data = fake_data(tmp_path / "data")
    plain = plain_config(tmp_path, data)
    code, out, err = run_cli([str(plain), "--dry-run", "--sweep", "model.num_latents=2,4", "--sweep",
                              "optim.lr=1e-3,3e-4"], capsys)
    assert code == 0, err
    names = [line.split()[3].rstrip(":") for line in out.splitlines() if line.startswith("# ===== pipeline")]
    assert names == ["demo_quick-num_latents2-lr1e-3", "demo_quick-num_latents2-lr3e-4",
                     "demo_quick-num_latents4-lr1e-3", "demo_quick-num_latents4-lr3e-4"]


def test_a_run_folder_is_not_reused_for_another_config_or_while_running(tmp_path, monkeypatch):
    from storms_dist.launchers.cli import _check_run_dir
    from storms_dist.launchers.prepare import config_fingerprint

    data = fake_data(tmp_path / "data")
    cfg, _ = load_resolved_config(str(plain_config(tmp_path, data)), [])
    run_dir, state = _fake_state(tmp_path)
    state["config_fingerprint"] = "f" * 16
    monkeypatch.setattr(type(cfg), "run_dir", property(lambda self: run_dir))
    state_mod.write_state(run_dir, state)
    with pytest.raises(LaunchError, match="another config"):
        _check_run_dir(cfg, config_fingerprint({"other": 1}))
    monkeypatch.setattr(state_mod, "sacct_info", lambda ids: {})
    monkeypatch.setattr(state_mod, "squeue_info", lambda ids: {j: state_mod.JobInfo("PENDING") for j in
                                                               ("10_0", "10_1", "11", "12", "13")})
    with pytest.raises(LaunchError, match="still running"):
        _check_run_dir(cfg, "f" * 16)
    monkeypatch.setattr(state_mod, "squeue_info", lambda ids: {})
    monkeypatch.setattr(state_mod, "sacct_info", lambda ids: {j: state_mod.JobInfo("COMPLETED") for j in
                                                              ("10_0", "10_1", "11", "12", "13")})
    assert _check_run_dir(cfg, "f" * 16)["name"] == "run"  # same config, over: continue it
