"""The stage jobs a launch submits: picklable, checkpointable callables, the same under Slurm, local and debug.

Each job holds a plain-data spec (the resolved run config as a dict, the serialized ``TrainJob``, paths) and
nothing else, so it pickles small and a requeued job starts from a fresh object: all state is on disk (the
trainer resumes from ``<job>/checkpoints/latest``; the targets keep one file per array task).

Preemption and time limits (see ``docs/slurm.md``):

- Slurm sends ``SIGUSR2`` (``--signal=USR2@<delay>``, submitit's preemption/timeout signal) to every task of a
  job before its time limit, and ``SIGTERM`` to every task when it preempts, requeues (``scontrol requeue``) or
  cancels a job.
- While ``Trainer.train()`` runs, the trainer's own handlers take both signals: every rank finishes the step,
  they agree, save one checkpoint together and raise ``Preempted`` (exit 75). Saving from inside a signal handler
  (what submitit's handler would do on rank 0 only) could fire mid-collective, so submitit's handler is not used
  there.
- After ``Preempted``: if ``SIGUSR2`` was among the signals, global rank 0 hands the signal to submitit's
  handler, which calls :meth:`StageJob.checkpoint` (a fresh callable, same spec), dumps it and requeues the job
  (``scontrol requeue``; exit 144 under the local executor). Only rank 0 gets ``checkpoint()`` (submitit#9);
  the other ranks just exit. On ``SIGTERM`` alone nobody requeues: Slurm is already requeueing (preemption,
  ``scontrol requeue``) or cancelling (``scancel``) the job, and a requeue from inside would undo a cancel.
- Outside ``train()`` (loading, targets, eval) submitit's handler is in place and requeues right away.

Which signals arrived is recorded with ``signal.set_wakeup_fd``, which sees every signal that has a Python
handler no matter whose handler it is, so neither the trainer's nor submitit's handling is changed.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import signal
import socket
import time
import zlib
from pathlib import Path
from typing import Any

import submitit

TRAIN_STAGES = ("stage0", "stage1", "stage2")
EVAL_SUMMARY = "summary.json"
"""Written last by the eval job (after metrics.json and the MLflow runs): the eval stage's done marker."""


# ---- done markers: a finished stage is never repeated ----
def training_done(out_dir: str | Path) -> bool:
    out_dir = Path(out_dir)
    return (out_dir / "summary.json").is_file() and (out_dir / "export").is_dir()


def eval_done(out_dir: str | Path) -> bool:
    return (Path(out_dir) / EVAL_SUMMARY).is_file()


def synth_done(cfg) -> bool:
    from storms_dist.data.synth import is_complete

    return is_complete(Path(cfg.data.root), cfg.synth)


# ---- the torch.distributed environment inside a job ----
MASTER_PORT_RANGE = (20000, 32768)  # below Linux's default ephemeral range (32768-60999)


def master_port(job_id: str, restart_count: str | int = 0) -> int:
    """The same port on every task of a job (seeded by job id and restart).

    A requeued job gets another port, so a socket of the previous run in TIME_WAIT cannot get in the way. The range
    stays below the kernel's ephemeral ports: those go to every outgoing connection and every ``bind(0)`` (a
    torchrun's store, a test's free port), one of which held 37710 when a local job wanted it (EADDRINUSE)."""
    low, high = MASTER_PORT_RANGE
    return low + zlib.crc32(f"{job_id}:{restart_count}".encode()) % (high - low)


NCCL_DEFAULTS = {
    "NCCL_DEBUG": "WARN",
    # a rank that dies or hangs in a collective surfaces as an error on the others instead of a silent hang
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "NCCL_ASYNC_ERROR_HANDLING": "1",  # its name before torch 2.2
}


def export_distributed_env() -> dict[str, str] | None:
    """One Slurm (or local-executor) task = one rank: export MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK and
    LOCAL_WORLD_SIZE with submitit's ``TorchDistributedEnvironment`` (no torchrun inside the job).

    Values inherited from the submitting shell (sbatch exports the environment) are overwritten: inside a job the
    job is the authority. ``CUDA_VISIBLE_DEVICES`` is left as Slurm set it (all of the job's GPUs on the node):
    the trainer selects ``cuda:LOCAL_RANK`` itself, which masking to one device per task would break. NCCL/OpenMP
    defaults are set only where the user did not set them. Returns None outside a submitit job, and in the debug
    executor (in-process, one rank).
    """
    try:
        job_env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job (a direct call)
        return None
    if job_env.cluster == "debug":
        return None
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    os.environ["MASTER_PORT"] = str(master_port(job_env.job_id, restart))
    dist = submitit.helpers.TorchDistributedEnvironment()
    dist.export(set_cuda_visible_devices=False, overwrite=True)
    for key, value in NCCL_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
    keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    exported = {k: os.environ[k] for k in keys}
    print(f"[storms launch] {job_env}: {' '.join(f'{k}={v}' for k, v in exported.items())} "
          f"restart={restart} host={socket.gethostname()}", flush=True)
    return exported


# ---- signals ----
class SignalRecorder:
    """Records which signals reached this process while it is open, without touching any handler
    (``signal.set_wakeup_fd``: Python writes each handled signal's number to a socket)."""

    def __init__(self):
        self._reader = self._writer = None
        self._previous_fd = -1
        try:
            self._reader, self._writer = socket.socketpair()
            self._reader.setblocking(False)
            self._writer.setblocking(False)
            self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        except ValueError:  # not the main thread: cannot record (treated as "no USR2")
            self.close()

    def received(self) -> set[signal.Signals]:
        if self._reader is None:
            return set()
        data = b""
        try:
            while chunk := self._reader.recv(4096):
                data += chunk
        except BlockingIOError:
            pass
        return {signal.Signals(b) for b in data if b in signal.Signals._value2member_map_}

    def close(self) -> None:
        if self._writer is not None:
            try:
                signal.set_wakeup_fd(self._previous_fd)
            except ValueError:
                pass
        for sock in (self._reader, self._writer):
            if sock is not None:
                sock.close()
        self._reader = self._writer = None


def preemption_signal() -> signal.Signals:
    from submitit.core.job_environment import JobEnvironment

    return JobEnvironment._usr_sig()


def submitit_requeue_handler(sig: signal.Signals):
    """submitit's installed handler for ``sig`` (its checkpoint-and-requeue), or None outside a submitit job."""
    from submitit.core.job_environment import SignalHandler

    handler = signal.getsignal(sig)
    return handler if isinstance(getattr(handler, "__self__", None), SignalHandler) else None


# ---- the callable ----
class StageJob(submitit.helpers.Checkpointable):
    """One stage of a launched pipeline. ``spec["kind"]``: synth | train | targets | eval."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec

    def __repr__(self) -> str:
        return f"StageJob({self.spec['stage']!r}, run_dir={self.spec['run_dir']!r})"

    @property
    def name(self) -> str:
        return self.spec["stage"]

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on global rank 0 only, before a requeue: a fresh callable (state is on disk)."""
        print(f"[storms launch] {self.name}: requeueing; the job resumes from its latest checkpoint", flush=True)
        return submitit.helpers.DelayedSubmission(type(self)(copy.deepcopy(self.spec)), *args, **kwargs)

    def run_config(self):
        from storms_dist.config import from_dict
        from storms_dist.run_config import RunConfig

        return from_dict(RunConfig, self.spec["config"])

    def __call__(self, *args: Any) -> Any:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        kind = self.spec["kind"]
        started = time.time()
        print(f"[storms launch] {self.name} ({kind}) starting on {socket.gethostname()}", flush=True)
        result = getattr(self, f"_run_{kind}")(*args)
        print(f"[storms launch] {self.name} finished in {time.time() - started:.1f}s", flush=True)
        return result

    # ---- kinds ----
    def _run_synth(self) -> dict:
        from storms_dist.pipeline import ensure_synth

        cfg = self.run_config()
        root = ensure_synth(cfg, progress=False)
        return {"data_root": str(root)}

    def _run_targets(self, index: int, count: int) -> dict:
        import torch

        from storms_dist.config import to_dict
        from storms_dist.data.manifest import read_manifest
        from storms_dist.data.preprocess import VisionSpec
        from storms_dist.model.build import build_model, build_tokenizer
        from storms_dist.targets import build_target_part

        export_distributed_env()  # one task; only for consistent logs and env
        cfg, t = self.run_config(), self.spec["targets"]
        # exactly the model the Stage I trainer builds, so the cache stamp (vision fingerprint) matches
        torch.manual_seed(cfg.seed)
        tokenizer = build_tokenizer(t["init_from"])
        model_cfg = type(cfg.model)(**{**to_dict(cfg.model), "init_from": t["init_from"]})
        model = build_model(model_cfg, tokenizer, seed=cfg.seed)
        if torch.cuda.is_available():
            model = model.cuda()
        samples = list(read_manifest(cfg.data.manifest_path(t["split"]), on_error="skip"))
        path = build_target_part(model, samples, VisionSpec.from_hf_config(model.backbone.config), cfg.data,
                                 Path(t["parts_dir"]), index=index, count=count, num_latents=t["num_latents"],
                                 cfg=cfg.targets, cache_dir=Path(t["out_dir"]), progress=False)
        print(f"[storms launch] targets part {index}/{count}: {path or 'cache already current'}", flush=True)
        return {"part": None if path is None else str(path)}

    def _run_train(self) -> dict:
        from storms_dist.pipeline import job_from_json
        from storms_dist.train.signals import Preempted

        job = job_from_json(self.spec["job"])
        if training_done(job.out_dir):  # a requeue or resubmission after the end: never train again
            print(f"[storms launch] {self.name}: already finished ({job.out_dir / 'summary.json'})", flush=True)
            return json.loads((job.out_dir / "summary.json").read_text())
        export_distributed_env()
        cfg = self.run_config()
        rank = int(os.environ.get("RANK", "0"))
        merge = self.spec.get("merge_targets")
        if merge and rank == 0:  # the targets array wrote one part per task: gather them before the trainer
            from storms_dist.targets import merge_target_parts

            merge_target_parts(Path(merge["parts_dir"]), Path(merge["out_dir"]), count=merge["count"])
        from storms_dist.train.trainer import Trainer

        recorder = SignalRecorder()
        trainer = None
        try:
            trainer = Trainer(cfg, job)
            return trainer.train()
        except Preempted as e:
            received = recorder.received()
            usr = preemption_signal()
            names = ", ".join(sorted(s.name for s in received)) or "none recorded"
            print(f"[storms launch] {self.name} rank {rank}: checkpoint saved at step {e.step} after {names}",
                  flush=True)
            handler = submitit_requeue_handler(usr)
            if usr in received and rank == 0 and handler is not None:
                recorder.close()
                if trainer is not None:
                    trainer.close()
                    trainer = None
                handler(usr, None)  # submitit: checkpoint() -> dump -> requeue -> exit
            raise
        finally:
            recorder.close()
            if trainer is not None:
                trainer.close()
                del trainer
                gc.collect()

    def _run_throughput(self) -> dict:
        from storms_dist.scale.study import run_throughput_point  # storms study's measured point

        return run_throughput_point(self.spec)

    def _run_eval(self) -> dict:
        from storms_dist.pipeline import run_eval
        from storms_dist.tracking import Tracker

        cfg = self.run_config()
        e = self.spec["eval"]
        out_dir = Path(e["out_dir"])
        if eval_done(out_dir):
            return json.loads((out_dir / EVAL_SUMMARY).read_text())
        tracker = Tracker(cfg.tracking, Path(cfg.runs_dir), is_main_process=True)
        parent = self.spec.get("parent_run_id")
        metrics = run_eval(tracker, e["export"], cfg, out_dir, name=f"{cfg.name}/eval", parent_run_id=parent,
                           tags=dict(self.spec.get("tags", {})), progress=False)
        summary = {"export": e["export"], "split": cfg.eval.split, "accuracy": metrics["overall"]["accuracy"],
                   "by_type": {q: v["accuracy"] for q, v in metrics["by_type"].items()},
                   "latency_ms_per_item": metrics["latency_ms_per_item"], "num_latents": metrics["num_latents"]}
        if parent is not None:  # the pipeline's parent run: headline metrics, then FINISHED
            tracker.start_run(f"{cfg.name}/pipeline", run_id=parent)
            tracker.log_metrics({"accuracy": summary["accuracy"],
                                 **{f"accuracy.{q}": v for q, v in summary["by_type"].items()}}, step=0)
            tracker.end_run("FINISHED")
        (out_dir / EVAL_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary, indent=2), flush=True)
        return summary
