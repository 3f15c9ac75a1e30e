"""storms_dist.kernels.latent_attention: the torch reference against dense SDPA over the concatenated cache, fp64
gradchecks of the reference, the Triton kernel (TRITON_INTERPRET=1 on CPU, set by conftest) against the reference
in fp32 / fp16, the backend switch, and the same parity on CUDA when there is one."""

from __future__ import annotations

import pytest
import torch

from storms_dist.kernels._backend import resolve_backend, triton_available
from storms_dist.kernels.latent_attention import latent_attention, latent_attention_reference

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install -e '.[triton]')")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (B, H, G, T, P, N): latent passes (T=1, the tail holds the current column and earlier latents) and a suffix pass
# (T=3 over a tail of 4 latents + 3 suffix columns); P not a multiple of the kernel's 64-key block; P=70 and P=200
# split the prefix keys over 2 and 4 programs (the first split of row 0 fully masked at P=200).
SHAPES = [(2, 4, 2, 1, 37, 3), (1, 4, 4, 1, 70, 1), (2, 6, 2, 3, 21, 7), (1, 4, 2, 1, 200, 2)]


def _inputs(B, H, G, T, P, N, D=16, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    q, kp, vp = make(B, H, T, D), make(B, G, P, D), make(B, G, P, D)
    kt, vt = make(B, G, N, D), make(B, G, N, D)
    mask = torch.ones(B, P + N, dtype=torch.bool)
    mask[0, : P // 3] = False  # left padding of the prefix
    if N > T:
        mask[-1, P] = False  # a masked latent column (a rollout step past this row's K)
    return (q, kp, vp, kt, vt), mask.to(device)


def _dense(q, kp, vp, kt, vt, mask):
    """What today's rollout computes: SDPA over torch.cat(prefix, tail), K/V repeated per query head, causal
    bottom-right aligned and the key mask."""
    B, H, T, _ = q.shape
    rep = H // kp.shape[1]
    k = torch.cat([kp, kt], dim=2).repeat_interleave(rep, dim=1)
    v = torch.cat([vp, vt], dim=2).repeat_interleave(rep, dim=1)
    S = k.shape[2]
    allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None, None] & mask[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_equals_dense_attention_over_the_concatenated_cache(shape):
    tensors, mask = _inputs(*shape, dtype=torch.float64)
    out, lse = latent_attention_reference(*tensors, mask, return_lse=True)
    torch.testing.assert_close(out, _dense(*tensors, mask), rtol=0, atol=1e-12)
    assert out.shape == tensors[0].shape and lse.shape == tensors[0].shape[:3] and torch.isfinite(lse).all()
    # without a mask: only the tail's causal rule applies
    torch.testing.assert_close(latent_attention_reference(*tensors), _dense(*tensors, torch.ones_like(mask)),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 4, 2, 1, 5, 2), (1, 2, 1, 2, 3, 3)])
def test_reference_gradcheck_fp64(shape):
    tensors, mask = _inputs(*shape, D=4, dtype=torch.float64)
    tensors = tuple(t.requires_grad_() for t in tensors)
    assert torch.autograd.gradcheck(lambda *t: latent_attention_reference(*t, mask, scale=0.7), tensors)


def test_reference_saves_the_prefix_once_not_a_copy():
    """The point of the kernel: autograd keeps the prefix K/V itself, never a concatenated or repeated copy."""
    (q, kp, vp, kt, vt), mask = _inputs(2, 4, 2, 1, 40, 3)
    kp, vp = kp.requires_grad_(), vp.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        latent_attention_reference(q.requires_grad_(), kp, vp, kt, vt, mask).sum()
    prefix_sized = [t for t in saved if t.shape[-1] == 16 and 40 in t.shape]
    assert prefix_sized, "expected the prefix K/V among the saved tensors"
    assert all(t.data_ptr() in (kp.data_ptr(), vp.data_ptr()) for t in prefix_sized)


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
def test_triton_forward_and_backward_match_the_reference(shape, dtype, atol):
    tensors, mask = _inputs(*shape, dtype=dtype)
    # HF's K/V come out of a view + transpose: [B, H, S, D] with the heads interleaved in memory
    q = tensors[0].transpose(1, 2).contiguous().transpose(1, 2)
    tensors = (q,) + tensors[1:]
    leaves = [t.clone().requires_grad_() for t in tensors]
    out = latent_attention(*leaves, mask, backend="triton")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_leaves = [t.detach().double().requires_grad_() for t in tensors]
    ref = latent_attention_reference(*ref_leaves, mask)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.double())
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=atol)
    for name, g, r in zip(("q", "k_prefix", "v_prefix", "k_tail", "v_tail"), grads, ref_grads):
        assert g.dtype == dtype and g.shape == r.shape, name
        torch.testing.assert_close(g.double(), r, rtol=0, atol=atol * 4, msg=lambda m: f"d{name}: {m}")


@needs_triton
def test_triton_without_mask_matches_the_reference():
    tensors, _ = _inputs(1, 4, 2, 2, 19, 5)
    torch.testing.assert_close(latent_attention(*tensors, backend="triton"), latent_attention_reference(*tensors),
                               rtol=0, atol=1e-5)


def test_backend_switch(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, kernel="k") == "torch"
    assert resolve_backend("torch", cpu, kernel="k") == "torch"
    with pytest.raises(ValueError, match="valid choices: 'auto', 'triton', 'torch'"):
        resolve_backend("cuda", cpu, kernel="k")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA or TRITON_INTERPRET=1|needs the triton package"):
        resolve_backend("triton", cpu, kernel="k")


def test_input_errors_are_one_line():
    (q, kp, vp, kt, vt), mask = _inputs(1, 4, 2, 3, 8, 2 + 1)
    with pytest.raises(ValueError, match="tail .* must include the 3 query columns"):
        latent_attention(q, kp, vp, kt[:, :, :2], vt[:, :, :2])
    with pytest.raises(ValueError, match="not a multiple of 3 K/V heads"):
        latent_attention(q, kp[:, :1].expand(1, 3, 8, 16), vp[:, :1].expand(1, 3, 8, 16),
                         kt[:, :1].expand(1, 3, 3, 16), vt[:, :1].expand(1, 3, 3, 16))
    with pytest.raises(ValueError, match=r"key_mask has shape \[1, 10\], expected \[1, 11\]"):
        latent_attention(q, kp, vp, kt, vt, mask[:, :10])


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cuda_kernel_matches_the_reference(dtype, atol):
    tensors, mask = _inputs(2, 16, 2, 1, 4096, 9, D=128, dtype=dtype, device="cuda")
    leaves = [t.clone().requires_grad_() for t in tensors]
    out = latent_attention(*leaves, mask)  # auto: the kernel on CUDA
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    ref_leaves = [t.detach().double().requires_grad_() for t in tensors]
    ref = latent_attention_reference(*ref_leaves, mask)
    ref_grads = torch.autograd.grad(ref, ref_leaves, torch.ones_like(ref))
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=atol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=atol, atol=atol * 4)
