"""Process-group set-up: one CPU rank does not JIT-build DeepSpeed's shared-memory comm op (nothing to reduce)."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

ONE_RANK_INIT = """
import importlib
import deepspeed.comm as dist
ds_torch = importlib.import_module("deepspeed.comm.torch")
from storms_dist.train.distributed import init_distributed
build = ds_torch.build_shm_op
info = init_distributed()
assert info.world_size == 1, info
assert importlib.import_module("deepspeed.comm.comm").cdb.shm_comm_op is None, "the one-rank backend loaded the shm op"
assert ds_torch.build_shm_op is build, "build_shm_op was not restored"
import torch
t = torch.ones(3)
dist.all_reduce(t)
assert t.tolist() == [1.0, 1.0, 1.0], t
print("ok")
"""


def test_one_cpu_rank_skips_the_shm_op_build(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "extensions")
    result = subprocess.run([sys.executable, "-c", ONE_RANK_INIT], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
    built = list((tmp_path / "extensions").rglob("*")) if (tmp_path / "extensions").exists() else []
    assert not built, f"an op was built for one rank: {built[:5]}"
