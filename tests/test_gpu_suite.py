"""benchmarks/gpu_suite.py --smoke: the GPU suite's CPU-only parts run end to end (so the suite cannot rot), record
every section, and its kernel-parity figures hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO


def test_gpu_suite_smoke_runs_every_section(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--smoke", "--no-install",
                           "--out-dir", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((tmp_path / "gpu_suite.json").read_text())
    rows = {(r["section"], r["name"]): r for r in data["rows"]}
    assert data["meta"]["mode"] == "smoke (CPU parts)"
    assert not [key for key in rows if key[1] == "error"]
    assert {section for section, _ in rows} == {"environment", "kernel parity", "kernel speed", "decode + preprocess",
                                                "training", "inference", "hf trainer"}
    # parity figures are measured, not copied: fp32 kernels match the reference
    assert rows[("kernel parity", "latent_attention triton vs fp64 reference, float32")]["value"] < 1e-5
    assert rows[("kernel parity", "video_to_patches triton vs preprocess.py, float32")]["value"] == 0
    for label in ("K=0", "K=8 off", "K=8 auto"):
        assert rows[("training", f"{label} tokens/s")]["value"] > 0
    ratio = rows[("training", "K=8 auto / K=0 step")]
    assert ratio["target"] == "<= 1.15" and isinstance(ratio["met"], bool)
    assert rows[("inference", "K=8 latent rollout + answer latency")]["value"] > 0
    markdown = (tmp_path / "gpu_suite.md").read_text()
    assert "| section | figure | value | unit | target | note |" in markdown and "K=8 auto / K=0 step" in markdown
    assert "[training] K=0 step = " in proc.stdout  # figures are printed as they are measured
