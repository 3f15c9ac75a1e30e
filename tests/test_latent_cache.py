"""model.latent_attention: the rollout on PrefixTailCache + storms_dist.kernels.latent_attention equals today's
DynamicCache rollout (loss and every gradient, fp32, 1e-5) on both backbone families, for the torch reference and
the Triton kernel (TRITON_INTERPRET=1 on CPU), and keeps one prefix K/V instead of one copy per pass."""

from __future__ import annotations

import pytest
import torch
from test_model import BACKBONES, grads, make_batch

from storms_dist.kernels._backend import triton_available
from storms_dist.model.build import ModelConfig, build_model
from storms_dist.model.latent_cache import PrefixTailCache, latent_passes


@pytest.fixture(scope="module", params=BACKBONES)
def model(request, tokenizer):
    return build_model(ModelConfig(backbone=request.param, dtype="float32", attn_implementation="sdpa"),
                       tokenizer, seed=0).train()


def _rollout(model, batch, layout, backend, *, num_steps=None, targets=None):
    model.latent_attention = backend
    try:
        model.zero_grad()
        visual = model.encode_video(batch["pixel_values_videos"], batch["video_grid_thw"])
        embeds = model.input_embeddings(batch["input_ids"], visual)
        out = model._forward_mode("rollout", batch, layout, targets, embeds, model.rope_positions(batch), visual,
                                  batch["input_ids"] == model.video_token_id,
                                  layout.num_latents if num_steps is None else num_steps)
        out.loss.backward()
        return out, grads(model)
    finally:
        model.latent_attention = "off"


def _assert_same(out, got, ref_out, ref):
    assert abs(out.loss.item() - ref_out.loss.item()) <= 1e-5
    torch.testing.assert_close(out.latents_BKD, ref_out.latents_BKD, rtol=0, atol=1e-5)
    assert got.keys() == ref.keys() and len(got) == sum(1 for _ in got)
    for name, grad in ref.items():
        scale = max(1.0, grad.abs().max().item())
        assert (got[name] - grad).abs().max().item() <= 1e-5 * scale, name


BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not triton_available(),
                                                                     reason="triton is not installed"))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_rollout_with_latent_attention_equals_dynamic_cache_rollout(model, tokenizer, backend):
    batch, layout = make_batch(model, tokenizer, num_latents=3)
    ref_out, ref = _rollout(model, batch, layout, "off")
    out, got = _rollout(model, batch, layout, backend)
    assert len(ref) == sum(1 for _ in model.parameters())  # every parameter, the vision tower included
    _assert_same(out, got, ref_out, ref)


def test_masked_extra_steps_and_alignment_targets_match_too(model, tokenizer):
    """Steps past K (ZeRO-3 rank sync) leave masked tail columns; Stage I adds the alignment loss on the latents."""
    batch, layout = make_batch(model, tokenizer, num_latents=2, seed=1)
    targets = torch.randn(batch["input_ids"].shape[0], 2, model.text_config.hidden_size,
                          generator=torch.Generator().manual_seed(2))
    ref_out, ref = _rollout(model, batch, layout, "off", num_steps=4, targets=targets)
    out, got = _rollout(model, batch, layout, "torch", num_steps=4, targets=targets)
    assert out.align is not None
    _assert_same(out, got, ref_out, ref)


def _prefix_kv_storages(model, tokenizer, backend, num_latents):
    """Distinct storages autograd keeps for backward that hold at least the prefix's K/V columns."""
    batch, layout = make_batch(model, tokenizer, num_latents=num_latents)
    head_dim = model.text_config.hidden_size // model.text_config.num_attention_heads
    storages = set()

    def pack(t):
        if t.ndim == 4 and t.shape[-1] == head_dim and t.shape[-2] >= layout.prefix_len:
            storages.add(t.untyped_storage().data_ptr())
        return t

    model.latent_attention = backend
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(batch, layout, mode="rollout")
    finally:
        model.latent_attention = "off"
    return len(storages)


def test_latent_attention_keeps_one_prefix_kv_not_one_per_pass(model, tokenizer):
    off = [_prefix_kv_storages(model, tokenizer, "off", k) for k in (2, 4)]
    ours = [_prefix_kv_storages(model, tokenizer, "torch", k) for k in (2, 4)]
    num_layers = model.text_config.num_hidden_layers
    assert off[1] - off[0] >= 2 * 2 * num_layers  # DynamicCache: K and V copied again in each extra pass
    assert ours[0] == ours[1] and ours[0] < off[0]  # ours: the prefill's tensors only, whatever K is


def test_prefix_tail_cache_refuses_passes_outside_latent_passes(model):
    cache = PrefixTailCache(1)
    kv = torch.zeros(1, 2, 3, 4)
    cache.update(kv, kv, 0)
    with pytest.raises(RuntimeError, match="must run inside latent_passes"):
        cache.update(kv[:, :, :1], kv[:, :, :1], 0)
    with latent_passes(model.text_config, cache, "torch"):
        assert model.text_config._attn_implementation == "storms_latent"
        cache.update(kv[:, :, :1], kv[:, :, :1], 0)
    assert model.text_config._attn_implementation == "sdpa" and cache.get_seq_length() == 4


def test_config_choice_error():
    with pytest.raises(ValueError, match="latent_attention: 'cuda' is not a valid choice; valid choices: 'off'"):
        ModelConfig(latent_attention="cuda")


def test_start_up_line_names_each_modules_attention(model, capsys):
    from storms_dist.model.build import describe_attention

    assert describe_attention(model) == ("vision tower sdpa; text decoder sdpa; rollout passes after the prefill: "
                                         "DynamicCache + sdpa")
    model.latent_attention = "torch"
    try:
        assert describe_attention(model).endswith("storms_latent (prefix K/V once) -> latent_attention torch")
    finally:
        model.latent_attention = "off"


def test_flash_attention_2_without_cuda_or_flash_attn_is_a_config_error():
    from storms_dist.model.build import resolve_attn_implementation

    if torch.cuda.is_available():
        pytest.skip("CUDA present: flash_attention_2 may be valid here")
    with pytest.raises(ValueError, match="flash_attention_2 needs a CUDA GPU and the flash-attn package"):
        resolve_attn_implementation("flash_attention_2")
    assert resolve_attn_implementation("auto") == "sdpa"


@pytest.mark.distributed
def test_latent_attention_under_zero3_trains_like_the_dynamic_cache():
    """2 ranks, ZeRO-3 with every parameter partitioned: two optimizer steps with latent_attention=torch give the
    losses and the updated weights of latent_attention=off."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    from storms_dist.train.distributed import free_port

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(REPO / "tests" / "dist_scripts" / "latent_attention_zero3.py")]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    out = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    for ref, got in zip(out["off"]["losses"], out["torch"]["losses"]):
        assert abs(ref - got) <= 1e-5
    assert abs(out["off"]["checksum"] - out["torch"]["checksum"]) <= 1e-5 * max(1.0, abs(out["off"]["checksum"]))
    assert out["off"]["losses"][0] != out["off"]["losses"][1]  # the step trained something
