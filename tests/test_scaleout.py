"""Scale-out settings: ZeRO++ presets and AutoTP reach the DeepSpeed JSON the trainer hands to deepspeed.initialize,
and bad combinations are one-line errors naming the key."""

from __future__ import annotations

import pytest

from storms_dist.train.deepspeed_config import DeepSpeedConfig, build_ds_config
from storms_dist.train.optim import OptimConfig


def _json(cfg: DeepSpeedConfig, world: int = 16) -> dict:
    return build_ds_config(cfg, OptimConfig(), micro_batch_size=1, grad_accum=2, world_size=world, bf16=True)


@pytest.mark.parametrize("preset, hpz, qw, qg", [("hpz", 8, False, False), ("hpz_qwz", 8, True, False),
                                                 ("zeropp", 8, True, True)])
def test_zeropp_presets_span_the_node(monkeypatch, preset, hpz, qw, qg):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun / submitit export it on every rank
    zero = _json(DeepSpeedConfig(zeropp_preset=preset))["zero_optimization"]
    assert zero["zero_hpz_partition_size"] == hpz
    assert zero.get("zero_quantized_weights", False) is qw
    assert zero.get("zero_quantized_gradients", False) is qg


def test_no_preset_leaves_zeropp_off(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    zero = _json(DeepSpeedConfig())["zero_optimization"]
    assert not {"zero_hpz_partition_size", "zero_quantized_weights", "zero_quantized_gradients"} & set(zero)


def test_autotp_reaches_deepspeed_and_batch_size_is_left_to_it():
    ds = _json(DeepSpeedConfig(autotp_size=4))
    assert ds["tensor_parallel"] == {"autotp_size": 4}
    # DeepSpeed 0.19.8 checks train_batch_size against all ranks, then against the data-parallel ranks
    assert "train_batch_size" not in ds and ds["train_micro_batch_size_per_gpu"] == 1
    assert "tensor_parallel" not in _json(DeepSpeedConfig()) and _json(DeepSpeedConfig())["train_batch_size"] == 32


def test_deepspeed_accepts_the_generated_scaleout_config():
    from deepspeed.runtime.config import DeepSpeedConfig as DSConfig

    # DeepSpeed's own config parser on the generated JSON (world of 1 on this machine)
    parsed = DSConfig(_json(DeepSpeedConfig(zeropp_preset="zeropp", autotp_size=2), world=1))
    assert parsed.zero_config.zero_quantized_weights and parsed.zero_config.zero_quantized_gradients
    assert parsed.tensor_parallel_config.autotp_size == 2


@pytest.mark.parametrize("kwargs, key", [({"zeropp_preset": "hpz", "zero_stage": 2}, "zeropp_preset"),
                                         ({"zeropp_preset": "hpz", "zeropp_hpz_partition_size": 4}, "zeropp_preset"),
                                         ({"autotp_size": 0}, "autotp_size")])
def test_bad_scaleout_settings_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=rf"^{key}: ") as info:
        DeepSpeedConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_bad_preset_name_is_a_config_error():
    from storms_dist.config import ConfigError, load_config
    from storms_dist.run_config import RunConfig

    with pytest.raises(ConfigError, match="deepspeed.zeropp_preset"):
        load_config(RunConfig, None, ["deepspeed.zeropp_preset=fast"])
