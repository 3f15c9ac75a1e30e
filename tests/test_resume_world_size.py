"""Resume on another world size through DeepSpeed universal checkpointing (ZeRO-3, gloo): 2 ranks -> 1 -> 2.

A: 2 ranks, 4 steps, checkpoints at 2 and 4 (the reference curve). B: rewound to A's step 2, resumed on 1 rank
to step 4. C: B's step 4 resumed on 2 ranks to step 6. After the universal round trip B starts from A's exact
weights and optimizer state, and the sampler carries the position over in samples, so B's first step sees rank 0's
micro-batch of A's step 3: its loss (logged by rank 0) equals A's to 1e-5. Later steps use other global batches
(4 instead of 8 samples), so the curve continues but is not A's: the tolerance is stated per assertion.
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import tiny_run_config
from test_production import finish, losses, start_train

pytestmark = pytest.mark.distributed


def run(tmp_path, cfg, nproc: int) -> str:
    rc, output = finish(start_train(tmp_path, cfg, "--nproc", str(nproc)))
    assert rc == 0, output[-3000:]
    return output


def rewind(job_dir, tag: str) -> None:
    """As if the job had been preempted right after saving ``tag``."""
    for later in sorted(p for p in (job_dir / "checkpoints").glob("step*") if p.name > tag):
        shutil.rmtree(later)
    (job_dir / "checkpoints" / "latest").write_text(tag + "\n")
    for done in ("summary.json", "export"):
        shutil.rmtree(job_dir / done, ignore_errors=True) if (job_dir / done).is_dir() else \
            (job_dir / done).unlink(missing_ok=True)


def test_resume_two_ranks_onto_one_and_back(tmp_path, tiny_synth_root):
    common = {"name": "ws", "checkpoint.every_steps": "2", "tracking.enabled": "false"}
    cfg = tiny_run_config(tmp_path, tiny_synth_root, **common, **{"stage2.num_steps": "4"})
    job_dir = cfg.run_dir / "stage2"
    run(tmp_path, cfg, 2)
    reference = losses(job_dir)
    assert len(reference) == 4

    rewind(job_dir, "step000002")
    output = run(tmp_path, cfg, 1)
    assert "resumed from" in output and (job_dir / "checkpoints" / "universal" / "step000002").is_dir()
    after_b = losses(job_dir)
    assert after_b[:2] == reference[:2]  # the history before the checkpoint is kept
    assert after_b[2] == pytest.approx(reference[2], abs=1e-5)  # same weights, optimizer, rank-0 micro-batch
    assert abs(after_b[3] - reference[3]) < 0.5  # another global batch: continues, within 0.5 of A's step 4
    ds_config = json.loads((job_dir / "ds_config.json").read_text())
    assert ds_config["train_batch_size"] == 4 and ds_config["zero_optimization"]["stage"] == 3

    rewind(job_dir, "step000004")
    cfg6 = tiny_run_config(tmp_path, tiny_synth_root, **common, **{"stage2.num_steps": "6"})
    run(tmp_path, cfg6, 2)
    after_c = losses(job_dir)
    assert after_c[:4] == after_b and len(after_c) == 6
    assert (job_dir / "checkpoints" / "universal" / "step000004").is_dir()
    # continues from B's step 4 (within 0.5 per step), far below the random-init loss of step 1
    assert abs(after_c[4] - after_b[3]) < 0.5 and max(after_c[4:]) < reference[0] - 0.5
