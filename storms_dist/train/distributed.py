"""Process-group set-up from the torch.distributed environment (torchrun, deepspeed launcher or submitit)."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SINGLE_PROCESS_MARK = "STORMS_SINGLE_PROCESS_ENV"  # "pid:port" of the process that set the one-rank env up


def ensure_single_process_env() -> None:
    """Without a launcher, act as rank 0 of 1 (DeepSpeed would otherwise try MPI discovery).

    A child process (a CLI or torchrun call from a process that trained in-process, e.g. a test session) inherits
    that one-rank env, whose MASTER_PORT its parent still listens on: it gets its own instead. A launcher's env
    (torchrun, submitit) has another port than the mark and is kept."""
    mark = os.environ.get(_SINGLE_PROCESS_MARK, "")
    pid, _, port = mark.partition(":")
    if mark and int(pid) != os.getpid() and os.environ.get("MASTER_PORT") == port:
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
            os.environ.pop(key, None)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ[_SINGLE_PROCESS_MARK] = f"{os.getpid()}:{os.environ['MASTER_PORT']}"


def init_distributed(timeout_s: float = 1800.0) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed: NCCL on GPU, gloo on CPU. Idempotent."""
    ensure_single_process_env()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not torch.distributed.is_initialized():
        import deepspeed

        with _no_shm_op_build() if world_size == 1 and device.type == "cpu" else nullcontext():
            deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank, local_rank, world_size, device)


@contextmanager
def _no_shm_op_build():
    """DeepSpeed's CPU backend JIT-compiles its shared-memory all-reduce op even for one process, which has nothing
    to reduce: ~26 s on 2 cores the first time (a fresh clone's `make demo`). One rank skips it."""
    import importlib

    # importlib: `import deepspeed.comm.torch as m` binds deepspeed.comm's attribute `torch`, which is torch itself
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    build = ds_torch.build_shm_op
    ds_torch.build_shm_op = lambda: None
    try:
        yield
    finally:
        ds_torch.build_shm_op = build


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_max(values: list[float]) -> list[float]:
    """Element-wise max over ranks (identity in one process). Used to agree on flags and pass counts."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor.tolist()
