"""The config loader: YAML + dotted overrides -> RunConfig, with one-line errors that name the key and the choices."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from storms_dist.config import ConfigError, dump, from_dict, load_config, parse_override, to_dict
from storms_dist.run_config import RunConfig
from storms_dist.train.trainer import StageConfig

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").rglob("*.yaml"))


def load(*overrides: str, path=None) -> RunConfig:
    return load_config(RunConfig, path, list(overrides))


def config_error(*overrides: str, path=None) -> str:
    """Load and return the ConfigError message; it must be one line."""
    with pytest.raises(ConfigError) as info:
        load(*overrides, path=path)
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


# ---- unknown keys ----
def test_unknown_top_level_key_lists_valid_top_level_keys():
    message = config_error("foo=1")
    assert "'foo'" in message
    for key in ("name", "runs_dir", "seed", "model", "optim", "stage0", "stage2", "demo"):
        assert key in message
    with pytest.raises(ConfigError, match=r"unknown key 'bogus'"):
        from_dict(RunConfig, {"bogus": {"a": 1}})


def test_unknown_nested_key_lists_that_sections_keys():
    message = config_error("model.foo=1")
    assert "'model.foo'" in message and "valid keys in model" in message
    valid = message.split("valid keys in model:")[1]
    assert [k.strip() for k in valid.split(",")] == [
        "backbone", "init_from", "num_latents", "max_latents", "align_loss", "align_weight",
        "attn_implementation", "latent_attention", "activation_checkpointing", "dtype"]
    # two levels deep: the prefix is the full dotted path and the listed keys are TrainableConfig's
    message = config_error("stage0.trainable.foo=1")
    assert "'stage0.trainable.foo'" in message and "valid keys in stage0.trainable" in message
    assert "vision_lr_scale" in message and "num_steps" not in message


# ---- types ----
@pytest.mark.parametrize("override, key, expected", [
    ("seed=abc", "seed", "expected int"),
    ("seed=1.5", "seed", "expected int"),
    ("seed=true", "seed", "expected int"),  # a bool is not an int
    ("optim.lr=abc", "optim.lr", "expected float"),
    ("name=true", "name", "expected str"),
    ("model.activation_checkpointing=maybe", "model.activation_checkpointing", "expected bool"),
    ("model.activation_checkpointing=1", "model.activation_checkpointing", "expected bool"),
    ("model=3", "model", "expected a mapping"),
    ("demo.seeds=3", "demo.seeds", "expected a list"),
    ("demo.seeds=[0,x]", "demo.seeds[1]", "expected int"),
    ("eval.limit=abc", "eval.limit", "expected int"),
])
def test_wrong_type_names_key_and_expected_type(override, key, expected):
    message = config_error(override)
    assert message.startswith(f"{key}:"), message
    assert expected in message


def test_yaml_booleans_and_quoted_strings():
    # YAML 1.1 (PyYAML): unquoted yes/no/on/off are booleans, so these are accepted ...
    assert load("model.activation_checkpointing=yes").model.activation_checkpointing is True
    assert load("model.activation_checkpointing=off").model.activation_checkpointing is False
    assert load("tracking.enabled=false").tracking.enabled is False
    # ... but a quoted string is a string, never coerced to a bool
    with pytest.raises(ConfigError, match=r"^model\.activation_checkpointing: expected bool .*'yes'"):
        from_dict(RunConfig, {"model": {"activation_checkpointing": "yes"}})
    # integral floats are accepted for ints and become ints
    seed = load("seed=3.0").seed
    assert seed == 3 and type(seed) is int


def test_invalid_literal_lists_choices():
    message = config_error("model.align_loss=l1")
    assert message.startswith("model.align_loss:") and "'l1'" in message
    assert "'mse'" in message and "'cosine'" in message
    message = config_error("deepspeed.zero_stage=4")
    assert message.startswith("deepspeed.zero_stage:") and "0, 1, 2, 3" in message
    message = config_error("launcher=slurm")
    assert "'inprocess'" in message and "'torchrun'" in message


def test_literal_int_choice_rejects_bool_and_float():
    """An equality check would let True == 1 and 1.0 == 1 through as ``zero_stage`` (written as-is into the
    DeepSpeed JSON); the choice must match in type too."""
    for text in ("true", "1.0"):
        with pytest.raises(ConfigError, match="deepspeed.zero_stage.*valid choices"):
            load(f"deepspeed.zero_stage={text}")
    stage = load("deepspeed.zero_stage=1").deepspeed.zero_stage
    assert stage == 1 and type(stage) is int


def test_fixed_length_tuple_is_enforced():
    """``tuple[float, float]`` is fixed-length: ``optim.betas=[0.8]`` must fail at load time, not inside AdamW."""
    assert load("optim.betas=[0.8, 0.95]").optim.betas == (0.8, 0.95)
    with pytest.raises(ConfigError, match="optim.betas"):
        load("optim.betas=[0.8]")
    with pytest.raises(ConfigError, match="optim.betas"):
        load("optim.betas=[0.8, 0.9, 0.99]")


# ---- files ----
def test_missing_config_file_names_path(tmp_path):
    path = tmp_path / "nope" / "missing.yaml"
    message = config_error(path=path)
    assert str(path) in message and "does not exist" in message


def test_malformed_yaml_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodel:\n  num_latents: 3\n  backbone: [unclosed\n  dtype: auto\n")
    message = config_error(path=path)
    assert str(path) in message and "line 5" in message and "not valid YAML" in message
    path.write_text("name: x\n  seed: 3\n")
    assert "line 2" in config_error(path=path)


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    assert "expected a mapping" in config_error(path=path)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert load(path=empty) == RunConfig()


# ---- overrides ----
@pytest.mark.parametrize("text", ["model.num_latents", "seed", ""])
def test_override_without_equals(text):
    with pytest.raises(ConfigError, match="expected KEY=VALUE") as info:
        parse_override(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("text", ["=3", ".a=3", "model..num_latents=3", "model.=3"])
def test_override_malformed_key(text):
    with pytest.raises(ConfigError, match="malformed key"):
        parse_override(text)


def test_override_values_are_yaml():
    assert parse_override("demo.seeds=[0,1]") == (["demo", "seeds"], [0, 1])
    assert parse_override("model.num_latents=4") == (["model", "num_latents"], 4)
    assert parse_override("stage1.lr=null") == (["stage1", "lr"], None)
    assert parse_override("name=a=b") == (["name"], "a=b")  # only the first '=' splits
    assert parse_override("name=") == (["name"], "")
    cfg = load("optim.lr=3e-4", "stage1.lr=2.5e-3", "demo.seeds=[0,1]", "model.num_latents=4",
               "data.frames.fps=null", "data.frames.num_frames=8", "synth.task=balls", "synth.qtypes=[count, order]")
    assert cfg.optim.lr == pytest.approx(3e-4) and type(cfg.optim.lr) is float
    assert cfg.stage1.lr == pytest.approx(2.5e-3) and type(cfg.stage1.lr) is float
    assert cfg.demo.seeds == (0, 1)
    assert cfg.model.num_latents == 4
    assert cfg.data.frames.fps is None and cfg.data.frames.num_frames == 8
    assert cfg.synth.qtypes == ("count", "order")


def test_overrides_apply_on_top_of_file_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\nmodel: {num_latents: 2, max_latents: 4}\n")
    cfg = load("seed=5", "model.num_latents=3", "seed=7", path=path)
    assert cfg.seed == 7 and cfg.model.num_latents == 3 and cfg.model.max_latents == 4


def test_override_into_scalar_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {num_latents: 2}\n")
    message = config_error("model.num_latents.x=3", path=path)
    assert "model.num_latents" in message


# ---- __post_init__ validation ----
@pytest.mark.parametrize("overrides, section, field, words", [
    (["stage1.num_steps=0"], "stage1", "num_steps", "got 0"),
    (["stage2.mode=joint"], "stage2", "mode", "align: true"),
    (["stage1.rollout_weight=-1"], "stage1", "rollout_weight", ">= 0"),
    (["stage1.teacher_noise=-1"], "stage1", "teacher_noise", ">= 0"),
    (["stage1.detach_chain=true"], "stage1", "detach_chain", "mode 'rollout'"),
    (["stage2.answer_pass=rollout"], "stage2", "answer_pass", "mode 'joint'"),
    (["stage2.chain_grad=true"], "stage2", "chain_grad", "mode 'joint'"),
    (["stage2.mode=single", "stage2.answer_grad=latents"], "stage2", "answer_grad", "mode 'rollout'"),
    (["stage2.num_latents=0", "stage2.answer_grad=latents"], "stage2", "answer_grad", "num_latents is 0"),
    (["stage2.teacher_noise=0.5"], "stage2", "teacher_noise", "align: true"),
    (["model.num_latents=17"], "model", "num_latents", "max_latents (16)"),
    (["model.max_latents=4", "model.num_latents=5"], "model", "num_latents", "max_latents (4)"),
    (["optim.lr=0"], "optim", "lr", "> 0"),
    (["demo.methods=[foo]"], "demo", "methods", "valid choices: sft_k0"),
    (["synth.size=100"], "synth", "size", "multiple of 28"),
    (["data.min_pixels=99999"], "data", "min_pixels", "max_pixels"),
    (["data.frames.min_frames=3"], "data.frames", "min_frames", "multiple of temporal_patch_size"),
    (["stage2.trainable.vision=false", "stage2.trainable.merger=false", "stage2.trainable.embed=false",
      "stage2.trainable.lm=false"], "stage2.trainable", "vision / merger / embed / lm", "at least one"),
])
def test_post_init_errors_carry_section_prefix(overrides, section, field, words):
    """A section's ``__post_init__`` ValueError surfaces as a ConfigError that starts with the section's dotted path
    (``model.num_latents: ...`` or ``data: min_pixels ...``) and names the field."""
    message = config_error(*overrides)
    assert message.startswith((f"{section}.{field}:", f"{section}: ")), message
    assert field in message and words in message


def test_top_level_post_init_error_has_no_prefix():
    assert config_error("nproc=0").startswith("nproc: expected >= 1")
    assert config_error("name=a/b").startswith("name: ")


def test_valid_nested_post_init_passes():
    cfg = load("model.max_latents=4", "model.num_latents=4")
    assert (cfg.model.num_latents, cfg.model.max_latents) == (4, 4)


# ---- partial sections merge onto the owner's default ----
def test_partial_section_keeps_owner_defaults():
    plain = StageConfig()
    assert plain.split == "train" and plain.trainable.vision is False  # the class defaults differ from stage0's
    cfg = from_dict(RunConfig, {"stage0": {"num_steps": 5}})
    assert cfg.stage0.num_steps == 5
    assert cfg.stage0.split == "perception" and cfg.stage0.trainable.vision is True
    assert cfg.stage0.num_latents == 0 and cfg.stage0.lr == pytest.approx(1e-3) and cfg.stage0.mode == "single"
    # nested-nested partial: only embed changes, vision stays stage0's True
    cfg = from_dict(RunConfig, {"stage0": {"trainable": {"embed": False}}})
    assert cfg.stage0.trainable.embed is False and cfg.stage0.trainable.vision is True
    assert cfg.stage0.trainable.vision_lr_scale == 1.0 and cfg.stage0.split == "perception"
    # stage1's owner default has align=True; a partial stage1 keeps it
    assert load("stage1.num_steps=3").stage1.align is True
    # DataConfig's frames default has fps=None (FrameSamplingConfig's class default is 2.0)
    frames = load("data.frames.num_frames=8").data.frames
    assert frames.fps is None and frames.num_frames == 8 and frames.max_frames == 16
    assert load().stage0 == RunConfig().stage0


# ---- round trip and shipped files ----
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_dump_load_round_trip(tmp_path, suffix):
    cfg = load("demo.seeds=[0,3]", "optim.betas=[0.8, 0.95]", "model.num_latents=3", "stage1.lr=2e-4",
               "data.frames.max_frames=8", "tracking.tracking_uri=file:///tmp/x", "model.init_from=/some/export",
               path=REPO / "configs/demo/synth_quick.yaml")
    out = tmp_path / f"sub/config{suffix}"
    dump(cfg, out)
    again = load_config(RunConfig, out)
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)
    assert again != RunConfig()


def test_shipped_configs_exist():
    names = {p.relative_to(REPO / "configs").as_posix() for p in SHIPPED}
    assert {"demo/synth_panel.yaml", "demo/synth_tiny.yaml", "demo/synth_quick.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.relative_to(REPO).as_posix() for p in SHIPPED])
def test_shipped_configs_load(path):
    cfg = load_config(RunConfig, path)
    assert isinstance(cfg, RunConfig)
    # the file's values actually land (the file is not ignored)
    import yaml

    raw = yaml.safe_load(path.read_text())
    assert cfg.name == raw["name"]
    if "model" in raw:
        assert cfg.model.backbone == raw["model"].get("backbone", cfg.model.backbone)
        assert cfg.model.num_latents == raw["model"].get("num_latents", cfg.model.num_latents)


def test_quick_config_values():
    cfg = load_config(RunConfig, REPO / "configs/demo/synth_quick.yaml")
    assert cfg.name == "demo_quick" and cfg.model.backbone == "qwen2_5_vl-micro" and cfg.model.num_latents == 4
    assert cfg.data.frames.fps == 8.0 and cfg.data.frames.num_frames is None  # every frame of the grid clips
    assert cfg.synth.task == "grid" and cfg.data.max_pixels == 784 and cfg.demo.dynamics_qtypes == ("future_cell",)
    assert cfg.stage0.num_steps == 4 and cfg.stage0.split == "perception" and cfg.stage0.trainable.vision is True
    assert cfg.stage1.align is True and cfg.stage2.mode == "rollout"
    assert cfg.optim.lr == pytest.approx(1e-3)


# ---- CLI ----
def test_cli_config_error_is_one_stderr_line_exit_2():
    result = subprocess.run(
        [sys.executable, "-m", "storms_dist", "train", "configs/demo/synth_quick.yaml", "--stage", "0", "model.foo=1"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "model.foo" in lines[0] and "valid keys in model" in lines[0]
    assert result.stdout == ""


def test_a_stage2_alignment_anchor_reaches_storms_only_on_stage1_cache(tmp_path):
    from storms_dist.pipeline import method_jobs

    cfg = load_config(RunConfig, REPO / "configs/demo/synth_panel.yaml", ["stage2.align=true"])
    jobs = {m: method_jobs(cfg, m, seed_dir=tmp_path, stage0_export="s0", targets_dir=tmp_path / "t",
                           parent_run_id=None) for m in ("sft_k0", "stage1_only", "stage2_only", "storms")}
    stage1, stage2 = jobs["storms"]
    assert stage2.stage_cfg.align and stage2.targets_dir == stage1.targets_dir == tmp_path / "t"
    assert stage2.init_from == str(stage1.out_dir / "export")
    for method in ("sft_k0", "stage2_only"):  # the baselines without thought videos stay answer-only
        (job,) = jobs[method]
        assert not job.stage_cfg.align and job.targets_dir is None, method


def test_one_stage_baselines_train_at_stage1_lr_and_storms_stage2_keeps_its_own(tmp_path):
    from storms_dist.pipeline import method_jobs

    cfg = load_config(RunConfig, REPO / "configs/demo/synth_panel.yaml",
                      ["optim.lr=2e-3", "stage1.lr=1e-3", "stage2.lr=2e-4", "stage1.num_steps=30",
                       "stage2.num_steps=10", "demo.share_stage1=false"])
    assert cfg.targets.regions == 2 and cfg.targets.normalize == "region_pca" and cfg.targets.pixels == 1568
    jobs = {m: method_jobs(cfg, m, seed_dir=tmp_path, stage0_export="s0", targets_dir=tmp_path / "t",
                           parent_run_id=None) for m in ("sft_k0", "stage1_only", "stage2_only", "storms")}
    for method in ("sft_k0", "stage1_only", "stage2_only"):
        (job,) = jobs[method]
        assert job.stage_cfg.num_steps == 40 and job.stage_cfg.lr == 1e-3, method
    stage1, stage2 = jobs["storms"]
    assert (stage1.stage_cfg.num_steps, stage2.stage_cfg.num_steps) == (30, 10)
    assert stage1.stage_cfg.lr == 1e-3 and stage2.stage_cfg.lr == 2e-4
    assert stage1.stage_cfg.mode == "joint" and stage1.stage_cfg.align
    # the panel default anchors STORMS's Stage II to Stage I's cache
    assert stage2.stage_cfg.align and stage2.targets_dir == stage1.targets_dir


def test_stage1_only_shares_storms_stage1_and_continues_it_on_stage2_schedule(tmp_path):
    from storms_dist.pipeline import STEP_COST, job_order, method_jobs

    cfg = load_config(RunConfig, REPO / "configs/demo/synth_panel.yaml",
                      ["stage1.lr=1e-3", "stage2.lr=2e-4", "stage1.num_steps=30", "stage2.num_steps=10"])
    assert cfg.demo.share_stage1
    chains = {m: method_jobs(cfg, m, seed_dir=tmp_path, stage0_export="s0", targets_dir=tmp_path / "t",
                             parent_run_id=None) for m in ("sft_k0", "stage1_only", "stage2_only", "storms")}
    shared, continued = chains["stage1_only"]
    assert shared.out_dir == chains["storms"][0].out_dir == tmp_path / "storms" / "stage1"
    assert shared.init_from == "s0" and shared.stage_cfg.num_steps == 30 and not shared.reuse_targets
    # the continuation: Stage I's objective on Stage II's steps and lr, aligned to the cache Stage I aligned to
    assert continued.stage == 1 and continued.init_from == str(shared.out_dir / "export")
    assert (continued.stage_cfg.num_steps, continued.stage_cfg.lr) == (10, 2e-4)
    assert continued.stage_cfg.mode == "joint" and continued.stage_cfg.align and continued.stage_cfg.teacher_noise
    assert continued.reuse_targets and continued.targets_dir == tmp_path / "t"
    for method in ("sft_k0", "stage2_only"):  # the baselines without thought videos keep the whole budget
        (job,) = chains[method]
        assert job.stage_cfg.num_steps == 40 and job.stage_cfg.lr == 1e-3, method

    jobs, after, priority = job_order(chains)
    assert len(jobs) == 5  # the shared Stage I once
    assert after[continued.out_dir] == after[chains["storms"][1].out_dir] == shared.out_dir
    assert after[shared.out_dir] is None
    # critical path: the shared Stage I heads its own 30 joint steps plus the longest continuation after it
    assert priority[shared.out_dir] == (30 + 10) * STEP_COST["joint"]
    assert priority[chains["sft_k0"][0].out_dir] == 40 * STEP_COST["single"]
    assert max(priority, key=priority.get) == shared.out_dir


def test_a_job_shared_by_two_chains_must_have_the_same_start(tmp_path):
    from storms_dist.pipeline import job_order, method_jobs

    cfg = load_config(RunConfig, REPO / "configs/demo/synth_panel.yaml")
    storms = method_jobs(cfg, "storms", seed_dir=tmp_path, stage0_export="s0", targets_dir=tmp_path / "t",
                         parent_run_id=None)
    with pytest.raises(ValueError, match="shared by two chains"):
        job_order({"storms": storms, "odd": [storms[1]]})