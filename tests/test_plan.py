"""storms plan: shapes from the published configs, DeepSpeed's estimators, the planner's monotonic behaviour, the
launch refusal, the cluster configs, and (in test_study.py) the planner against measured peak memory."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from storms_dist.model.registry import backbone_names, get_backbone
from storms_dist.scale.plan import GiB, PlanConfig, format_plan, make_plan
from storms_dist.scale.shapes import backbone_shape

ROOT = Path(__file__).resolve().parents[1]


def test_published_shapes_reproduce_the_nominal_sizes():
    # the meta-device model built from each published config.json has the checkpoint's published size
    for name in backbone_names():
        spec = get_backbone(name)
        if spec.num_params_b is None:
            continue
        total = backbone_shape(name).total / 1e9
        assert abs(total - spec.num_params_b) / spec.num_params_b < 0.02, (name, total, spec.num_params_b)


def test_model_states_are_deepspeeds_estimate():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cfg = PlanConfig(backbone="qwen2_5_vl-7b", nodes=2, gpus_per_node=8, gpu="h100")
    plan = make_plan(cfg)
    shape = backbone_shape("qwen2_5_vl-7b")
    trainable = shape.params["lm"] + shape.params["embed"]
    _, gpu, _ = estimate_zero3_model_states_mem_needs(trainable, shape.largest_layer, num_gpus_per_node=16,
                                                      num_nodes=1, cpu_offload=False, cpu_offload_params=False)
    assert plan.memory["model_states"] == gpu
    assert plan.memory["frozen_params"] == pytest.approx(2 * shape.vision_total / 16)


def test_planner_responds_to_every_knob():
    base = PlanConfig(backbone="qwen2_5_vl-32b", nodes=2, gpus_per_node=8, gpu="h200")
    p = make_plan(base)
    assert make_plan(replace(base, frames=64)).memory["activations"] > p.memory["activations"]
    assert make_plan(replace(base, k=16)).memory["kv"] > p.memory["kv"] > 0
    assert make_plan(replace(base, mode="single")).memory["kv"] == 0
    assert p.activations_no_ckpt > 5 * p.activations_ckpt
    assert make_plan(replace(base, nodes=4)).memory["model_states"] < p.memory["model_states"]
    assert make_plan(replace(base, offload="optimizer")).memory["model_states"] < p.memory["model_states"]
    assert make_plan(replace(base, micro_batch=2)).memory["peak"] > p.memory["peak"]
    # K+2 passes re-gather the decoder: more latents, more gather volume; gathering once cuts it
    assert make_plan(replace(base, k=16)).comm["allgather"] > p.comm["allgather"]
    assert make_plan(replace(base, gather_latent_passes=True)).comm["allgather"] < p.comm["allgather"]
    hpz = make_plan(replace(base, hpz=8, quantized_weights=True, quantized_gradients=True))
    assert hpz.comm["inter_node"] < p.comm["inter_node"] / 4
    assert hpz.comm["inter_node_plain"] == pytest.approx(p.comm["inter_node_plain"])
    tp = make_plan(replace(base, autotp=4))
    assert tp.memory["model_states"] > p.memory["model_states"]  # ZeRO partitions over 4x fewer ranks ...
    assert tp.activations_no_ckpt < p.activations_no_ckpt  # ... but the decoder's activations are sharded
    assert tp.comm["tp_allreduce"] > 0 == p.comm["tp_allreduce"]


def test_largest_micro_batch_is_the_boundary():
    cfg = PlanConfig(backbone="qwen2_5_vl-7b", nodes=1, gpus_per_node=8, gpu="h100", frames=64)
    best = make_plan(cfg).max_micro_batch
    assert best >= 1
    assert make_plan(replace(cfg, micro_batch=best)).fits
    assert not make_plan(replace(cfg, micro_batch=best + 1)).fits


def test_72b_does_not_fit_one_node_and_fits_four_with_zeropp():
    one = make_plan(PlanConfig(backbone="qwen2_5_vl-72b", nodes=1, gpus_per_node=8, gpu="h100"))
    four = make_plan(PlanConfig(backbone="qwen2_5_vl-72b", nodes=4, gpus_per_node=8, gpu="h200", hpz=8))
    assert not one.fits and one.max_micro_batch == 0
    assert four.fits
    text = format_plan(four)
    for needle in ("params+grads+optimizer", "with checkpointing", "K/V", "all-gather", "inter-node",
                   "time lower bound", "largest micro-batch", "validated"):
        assert needle in text


def test_bad_plan_input_is_one_line_naming_the_key():
    for kwargs, key in (({"backbone": "nope"}, "backbone"), ({"backbone": "qwen2_5_vl-3b", "autotp": 3}, "autotp"),
                        ({"backbone": "qwen2_5_vl-3b", "gpu": "tpu"}, "gpu"),
                        ({"backbone": "qwen2_5_vl-3b", "hpz": 3}, "hpz")):
        with pytest.raises(ValueError, match=rf"^{key}: ") as info:
            PlanConfig(**kwargs)
        assert "\n" not in str(info.value)


def test_storms_plan_prints_every_registry_backbone(capsys):
    from storms_dist.cli import main

    assert main(["plan", "--nodes", "2", "--gpus-per-node", "8", "--gpu", "h200"]) == 0
    out = capsys.readouterr().out
    for name in backbone_names():
        assert f"| {name} |" in out
    assert main(["plan", "--backbone", "qwen3_vl-8b", "--autotp", "3"]) == 2
    assert "storms plan: error: autotp:" in capsys.readouterr().err


# ---- the cluster configs: loadable, validated, and their comment's numbers are the plan's ----
CLUSTER = sorted((ROOT / "configs" / "cluster").glob("*.yaml"))


@pytest.mark.parametrize("path", CLUSTER, ids=[p.stem for p in CLUSTER])
def test_cluster_config_loads_and_its_plan_comment_is_current(path):
    from storms_dist.config import load_config
    from storms_dist.run_config import RunConfig
    from storms_dist.scale.plan import plan_config_for_run

    text = path.read_text()
    launch = re.search(r"# launch: .*--nodes (\d+) --gpus-per-node (\d+) --gpu (\w+)", text)
    planned = re.search(r"# plan: peak ([\d.]+) GiB per GPU .*largest micro-batch (\d+)", text)
    assert launch and planned, f"{path.name}: needs '# launch: ...' and '# plan: ...' comment lines"
    cfg = load_config(RunConfig, str(path), [])
    assert cfg.model.backbone == path.stem
    plan = make_plan(plan_config_for_run(cfg, nodes=int(launch[1]), gpus_per_node=int(launch[2]), gpu=launch[3]))
    assert plan.fits
    assert f"{plan.memory['peak'] / GiB:.1f}" == planned[1]
    assert plan.max_micro_batch == int(planned[2])


def test_cluster_configs_cover_every_published_qwen2_5_size():
    assert {p.stem for p in CLUSTER} >= {"qwen2_5_vl-3b", "qwen2_5_vl-7b", "qwen2_5_vl-32b", "qwen2_5_vl-72b"}


def test_launch_refuses_a_job_that_cannot_fit_in_one_line(capsys):
    from storms_dist.cli import main

    config = str(ROOT / "configs/cluster/qwen2_5_vl-72b.yaml")
    assert main(["launch", config, "--nodes", "1", "--gpus-per-node", "8", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("storms launch: error: stage1 cannot fit: storms plan puts its peak at ")
    assert "largest micro-batch that fits: 0" in err and err.count("\n") == 1
    # the same job on its planned 4 nodes passes the memory check (and stops later, at the placeholder data.root)
    assert main(["launch", config, "--nodes", "4", "--gpus-per-node", "8", "--gpu", "h200", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "cannot fit" not in err and "data.root" in err
    assert main(["launch", config, "--nodes", "1", "--gpus-per-node", "8", "--no-plan-check", "--dry-run"]) == 2
    assert "cannot fit" not in capsys.readouterr().err
