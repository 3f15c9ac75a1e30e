"""Attention for the rollout's latent passes: queries over a prefix K/V stored once plus a small tail, LSE-merged.

The rollout prefills P prefix columns, then runs K one-column passes and one suffix pass. With HF's ``DynamicCache``
every pass ``torch.cat``s the whole cache, and autograd keeps each pass's copy of the prefix K/V for backward: K
growing copies. Here the prefix K/V is one tensor that every pass reads; only the tail (latent columns, then the
suffix) grows. Per query row the two segments are combined by log-sum-exp:

    out = exp(s_p - lse) @ V_p + exp(s_t - lse) @ V_t,    lse = logaddexp(logsumexp(s_p), logsumexp(s_t))

Masking: the prefix is fully visible (it precedes every query) except where ``key_mask`` is 0; the tail is causal,
bottom-right aligned (query t of T sees tail column j iff j <= N - T + t, HF's cache convention), and also obeys
``key_mask``. GQA: query head h reads K/V head h // (H / G), the order ``repeat_kv`` uses.

Implementations: ``latent_attention_reference`` (plain torch, differentiable through autograd; the CPU path) and a
Triton forward + backward (``_LatentAttention``, an autograd Function). With one query column per pass a program per
K/V head would leave a GPU nearly idle, so the forward and dQ kernels also split the prefix keys across programs
(flash-decoding style) and merge the partial results by log-sum-exp; dK/dV run one program per key block.
``latent_attention`` dispatches on ``backend`` (``auto`` = Triton on CUDA, the reference elsewhere).

Tensor-name legend: B batch, H query heads, G K/V heads, R = H / G, T query columns, P prefix columns, N tail
columns, S = P + N, D head dim, M = R * T query rows of one K/V head.
"""

from __future__ import annotations

import math

import torch

from storms_dist.kernels._backend import Backend, resolve_backend, triton_available


def _check_inputs(q_BHTD, k_prefix_BGPD, v_prefix_BGPD, k_tail_BGND, v_tail_BGND, key_mask_BS) -> None:
    if q_BHTD.ndim != 4 or k_prefix_BGPD.ndim != 4 or k_tail_BGND.ndim != 4:
        raise ValueError(f"latent_attention: expected 4-D q [B,H,T,D], k/v [B,G,len,D]; got q {list(q_BHTD.shape)}, "
                         f"k_prefix {list(k_prefix_BGPD.shape)}, k_tail {list(k_tail_BGND.shape)}")
    B, H, T, D = q_BHTD.shape
    _, G, P, _ = k_prefix_BGPD.shape
    N = k_tail_BGND.shape[2]
    for name, t, want in (("k_prefix", k_prefix_BGPD, (B, G, P, D)), ("v_prefix", v_prefix_BGPD, (B, G, P, D)),
                          ("k_tail", k_tail_BGND, (B, G, N, D)), ("v_tail", v_tail_BGND, (B, G, N, D))):
        if tuple(t.shape) != want:
            raise ValueError(f"latent_attention: {name} has shape {list(t.shape)}, expected {list(want)}")
        if t.dtype != q_BHTD.dtype or t.device != q_BHTD.device:
            raise ValueError(f"latent_attention: {name} is {t.dtype} on {t.device}, q is {q_BHTD.dtype} on "
                             f"{q_BHTD.device}")
    if H % G:
        raise ValueError(f"latent_attention: {H} query heads are not a multiple of {G} K/V heads")
    if N < T:
        raise ValueError(f"latent_attention: the tail ({N} columns) must include the {T} query columns")
    if key_mask_BS is not None and tuple(key_mask_BS.shape) != (B, P + N):
        raise ValueError(f"latent_attention: key_mask has shape {list(key_mask_BS.shape)}, expected [{B}, {P + N}]")


def latent_attention_reference(
    q_BHTD: torch.Tensor,
    k_prefix_BGPD: torch.Tensor,
    v_prefix_BGPD: torch.Tensor,
    k_tail_BGND: torch.Tensor,
    v_tail_BGND: torch.Tensor,
    key_mask_BS: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain torch; never copies or repeats the prefix K/V (GQA by grouping the query rows), so autograd keeps a
    reference to the one prefix tensor. Scores and softmax in float32 (float64 for float64 inputs).
    Returns ``out [B,H,T,D]`` (and ``lse [B,H,T]``)."""
    _check_inputs(q_BHTD, k_prefix_BGPD, v_prefix_BGPD, k_tail_BGND, v_tail_BGND, key_mask_BS)
    B, H, T, D = q_BHTD.shape
    G, P, N = k_prefix_BGPD.shape[1], k_prefix_BGPD.shape[2], k_tail_BGND.shape[2]
    scale = D**-0.5 if scale is None else scale
    M = (H // G) * T
    q_BGMD = q_BHTD.reshape(B, G, M, D)  # heads g*R .. g*R+R-1 share K/V head g: rows (r, t)
    t_M = torch.arange(M, device=q_BHTD.device) % T
    tail_ok_MN = torch.arange(N, device=q_BHTD.device)[None, :] <= (N - T) + t_M[:, None]
    prefix_ok = None
    tail_ok = tail_ok_MN
    if key_mask_BS is not None:
        key_mask_BS = key_mask_BS.bool()
        prefix_ok = key_mask_BS[:, None, None, :P]
        tail_ok = tail_ok_MN & key_mask_BS[:, None, None, P:]
    acc = torch.promote_types(q_BHTD.dtype, torch.float32)  # fp16/bf16 scores and softmax in fp32; fp64 stays
    s_prefix = (q_BGMD @ k_prefix_BGPD.transpose(-1, -2)).to(acc) * scale
    s_tail = (q_BGMD @ k_tail_BGND.transpose(-1, -2)).to(acc) * scale
    if prefix_ok is not None:
        s_prefix = s_prefix.masked_fill(~prefix_ok, float("-inf"))
    s_tail = s_tail.masked_fill(~tail_ok, float("-inf"))
    lse_BGM = torch.logaddexp(torch.logsumexp(s_prefix, -1), torch.logsumexp(s_tail, -1))
    lse_BGM1 = lse_BGM.unsqueeze(-1)
    out = (torch.exp(s_prefix - lse_BGM1).to(v_prefix_BGPD.dtype) @ v_prefix_BGPD).to(acc)
    out = out + (torch.exp(s_tail - lse_BGM1).to(v_tail_BGND.dtype) @ v_tail_BGND).to(acc)
    out_BHTD = out.to(q_BHTD.dtype).reshape(B, H, T, D)
    if return_lse:
        return out_BHTD, lse_BGM.reshape(B, H, T)
    return out_BHTD


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        # fp32 inputs: full-precision products (the default tf32 would miss the 1e-5 parity with the reference)
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _fwd_segment(acc, m_i, l_i, q, K, V, MASK, b, g, lo, hi, mask_offset, causal_base, t_M,
                     stride_kb, stride_kg, stride_kn, stride_vb, stride_vg, stride_vn, stride_mb, sm_scale,
                     D, IS_TAIL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
        """Online softmax over one segment's keys (flash-attention style), continuing ``(acc, m_i, l_i)``."""
        offs_d = tl.arange(0, BLOCK_D)
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < hi
            kv_ok = n_ok[:, None] & (offs_d[None, :] < D)
            k = tl.load(K + b * stride_kb + g * stride_kg + offs_n[:, None] * stride_kn + offs_d[None, :],
                        mask=kv_ok, other=0.0)
            s = _dot(q, tl.trans(k), IEEE) * sm_scale
            ok = n_ok[None, :]
            if HAS_MASK:
                km = tl.load(MASK + b * stride_mb + mask_offset + offs_n, mask=n_ok, other=0)
                ok = ok & (km != 0)[None, :]
            if IS_TAIL:
                ok = ok & (offs_n[None, :] <= causal_base + t_M[:, None])
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible key yet stays at 0
            alpha = tl.exp(m_i - m_use)
            p = tl.exp(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + b * stride_vb + g * stride_vg + offs_n[:, None] * stride_vn + offs_d[None, :],
                        mask=kv_ok, other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _fwd_kernel(Q, KP, VP, KT, VT, MASK, O, LSE, sm_scale, H, G, T, M, P, N, D, SPLIT_LEN, NUM_SPLITS, BHT,
                    stride_qb, stride_qh, stride_qt,
                    stride_kpb, stride_kpg, stride_kpn, stride_vpb, stride_vpg, stride_vpn,
                    stride_ktb, stride_ktg, stride_ktn, stride_vtb, stride_vtg, stride_vtn, stride_mb,
                    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    IEEE: tl.constexpr):
        pid_m, pid_bg, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, g = pid_bg // G, pid_bg % G
        # split-KV (flash-decoding): this program takes prefix keys [lo, hi); the last split also takes the tail
        lo = pid_s * SPLIT_LEN
        hi = tl.minimum(lo + SPLIT_LEN, P)
        tail_hi = tl.where(pid_s == NUM_SPLITS - 1, N, 0)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < M
        h_M, t_M = g * (H // G) + offs_m // T, offs_m % T
        q = tl.load(Q + b * stride_qb + h_M[:, None] * stride_qh + t_M[:, None] * stride_qt + offs_d[None, :],
                    mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, KP, VP, MASK, b, g, lo, hi, 0, 0, t_M, stride_kpb, stride_kpg,
                                     stride_kpn, stride_vpb, stride_vpg, stride_vpn, stride_mb, sm_scale, D,
                                     False, HAS_MASK, BLOCK_N, BLOCK_D, IEEE)
        acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, KT, VT, MASK, b, g, 0, tail_hi, P, N - T, t_M, stride_ktb,
                                     stride_ktg,
                                     stride_ktn, stride_vtb, stride_vtg, stride_vtn, stride_mb, sm_scale, D,
                                     True, HAS_MASK, BLOCK_N, BLOCK_D, IEEE)
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(l_safe))
        row = pid_s * BHT + (b * H + h_M) * T + t_M  # O, LSE: per-split partials [NUM_SPLITS, B, H, T, (D)]
        tl.store(O + row[:, None] * D + offs_d[None, :], out,
                 mask=row_ok[:, None] & (offs_d[None, :] < D))
        tl.store(LSE + row, lse, mask=row_ok)

    @triton.jit
    def _bwd_dq_segment(dq, q, do, lse, delta, K, V, MASK, b, g, lo, hi, mask_offset, causal_base, t_M,
                        stride_kb, stride_kg, stride_kn, stride_vb, stride_vg, stride_vn, stride_mb, sm_scale, D,
                        IS_TAIL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
        offs_d = tl.arange(0, BLOCK_D)
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < hi
            kv_ok = n_ok[:, None] & (offs_d[None, :] < D)
            k = tl.load(K + b * stride_kb + g * stride_kg + offs_n[:, None] * stride_kn + offs_d[None, :],
                        mask=kv_ok, other=0.0)
            v = tl.load(V + b * stride_vb + g * stride_vg + offs_n[:, None] * stride_vn + offs_d[None, :],
                        mask=kv_ok, other=0.0)
            s = _dot(q, tl.trans(k), IEEE) * sm_scale
            ok = n_ok[None, :]
            if HAS_MASK:
                km = tl.load(MASK + b * stride_mb + mask_offset + offs_n, mask=n_ok, other=0)
                ok = ok & (km != 0)[None, :]
            if IS_TAIL:
                ok = ok & (offs_n[None, :] <= causal_base + t_M[:, None])
            p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
            dp = _dot(do, tl.trans(v), IEEE)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, IEEE)
        return dq

    @triton.jit
    def _bwd_dq_kernel(Q, DO, LSE, DELTA, KP, VP, KT, VT, MASK, DQ, sm_scale, H, G, T, M, P, N, D, SPLIT_LEN,
                       NUM_SPLITS, BHT,
                       stride_qb, stride_qh, stride_qt,
                       stride_kpb, stride_kpg, stride_kpn, stride_vpb, stride_vpg, stride_vpn,
                       stride_ktb, stride_ktg, stride_ktn, stride_vtb, stride_vtg, stride_vtn, stride_mb,
                       HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
        pid_m, pid_bg, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, g = pid_bg // G, pid_bg % G
        lo = pid_s * SPLIT_LEN  # the forward's key splits; partial dQs are summed outside
        hi = tl.minimum(lo + SPLIT_LEN, P)
        tail_hi = tl.where(pid_s == NUM_SPLITS - 1, N, 0)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < M
        h_M, t_M = g * (H // G) + offs_m // T, offs_m % T
        rd_ok = row_ok[:, None] & (offs_d[None, :] < D)
        q = tl.load(Q + b * stride_qb + h_M[:, None] * stride_qh + t_M[:, None] * stride_qt + offs_d[None, :],
                    mask=rd_ok, other=0.0)
        row = (b * H + h_M) * T + t_M  # DO, LSE, DELTA, DQ are contiguous [B, H, T, (D)]
        do = tl.load(DO + row[:, None] * D + offs_d[None, :], mask=rd_ok, other=0.0)
        lse = tl.load(LSE + row, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + row, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        dq = _bwd_dq_segment(dq, q, do, lse, delta, KP, VP, MASK, b, g, lo, hi, 0, 0, t_M, stride_kpb, stride_kpg,
                             stride_kpn, stride_vpb, stride_vpg, stride_vpn, stride_mb, sm_scale, D,
                             False, HAS_MASK, BLOCK_N, BLOCK_D, IEEE)
        dq = _bwd_dq_segment(dq, q, do, lse, delta, KT, VT, MASK, b, g, 0, tail_hi, P, N - T, t_M, stride_ktb,
                             stride_ktg,
                             stride_ktn, stride_vtb, stride_vtg, stride_vtn, stride_mb, sm_scale, D,
                             True, HAS_MASK, BLOCK_N, BLOCK_D, IEEE)
        tl.store(DQ + (pid_s * BHT + row)[:, None] * D + offs_d[None, :], dq * sm_scale, mask=rd_ok)

    @triton.jit
    def _bwd_dkdv_kernel(Q, DO, LSE, DELTA, K, V, MASK, DK, DV, sm_scale, H, G, T, M, seg_len, mask_offset,
                         causal_base, D, stride_qb, stride_qh, stride_qt, stride_kb, stride_kg, stride_kn,
                         stride_vb, stride_vg, stride_vn, stride_mb,
                         IS_TAIL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
        """dK, dV of one block of one segment's keys: every query row of its K/V head (M = R*T rows, few)."""
        pid_n, pid_bg = tl.program_id(0), tl.program_id(1)
        b, g = pid_bg // G, pid_bg % G
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        n_ok = offs_n < seg_len
        kv_ok = n_ok[:, None] & (offs_d[None, :] < D)
        k = tl.load(K + b * stride_kb + g * stride_kg + offs_n[:, None] * stride_kn + offs_d[None, :],
                    mask=kv_ok, other=0.0)
        v = tl.load(V + b * stride_vb + g * stride_vg + offs_n[:, None] * stride_vn + offs_d[None, :],
                    mask=kv_ok, other=0.0)
        key_ok = n_ok
        if HAS_MASK:
            km = tl.load(MASK + b * stride_mb + mask_offset + offs_n, mask=n_ok, other=0)
            key_ok = key_ok & (km != 0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for start in range(0, M, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            row_ok = offs_m < M
            h_M, t_M = g * (H // G) + offs_m // T, offs_m % T
            rd_ok = row_ok[:, None] & (offs_d[None, :] < D)
            q = tl.load(Q + b * stride_qb + h_M[:, None] * stride_qh + t_M[:, None] * stride_qt + offs_d[None, :],
                        mask=rd_ok, other=0.0)
            row = (b * H + h_M) * T + t_M
            do = tl.load(DO + row[:, None] * D + offs_d[None, :], mask=rd_ok, other=0.0)
            lse = tl.load(LSE + row, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + row, mask=row_ok, other=0.0)
            s = _dot(q, tl.trans(k), IEEE) * sm_scale
            ok = row_ok[:, None] & key_ok[None, :]
            if IS_TAIL:
                ok = ok & (offs_n[None, :] <= causal_base + t_M[:, None])
            p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
            dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)
            dp = _dot(do, tl.trans(v), IEEE)
            ds = p * (dp - delta[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
        out = ((b * G + g) * seg_len + offs_n)[:, None] * D + offs_d[None, :]  # DK, DV contiguous [B, G, L, D]
        tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_ok)
        tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_ok)


def _blocks(M: int, D: int) -> tuple[int, int, int]:
    # tl.dot needs every block side >= 16; M (query rows per K/V head) is tiny in the latent passes
    block_m = max(16, min(64, triton.next_power_of_2(M)))
    return block_m, 64, max(16, triton.next_power_of_2(D))


def _splits(P: int, num_heads_kv: int, block_n: int) -> tuple[int, int]:
    """(split_len, num_splits) over the prefix keys: one K/V head per program would leave most SMs idle on a long
    prefix (B * G programs), so the keys are split until there are ~256 programs (fewer for short prefixes)."""
    want = max(1, min(256 // max(1, num_heads_kv), triton.cdiv(max(P, 1), block_n)))
    split_len = triton.cdiv(triton.cdiv(max(P, 1), want), block_n) * block_n
    return split_len, triton.cdiv(max(P, 1), split_len)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _mask_arg(key_mask_BS: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if key_mask_BS is None:
        return like, False  # any pointer: HAS_MASK=False never reads it
    return key_mask_BS.to(torch.int8).contiguous(), True


def _triton_forward(q, kp, vp, kt, vt, mask, has_mask, scale):
    B, H, T, D = q.shape
    G, P, N = kp.shape[1], kp.shape[2], kt.shape[2]
    M = (H // G) * T
    block_m, block_n, block_d = _blocks(M, D)
    split_len, num_splits = _splits(P, B * G, block_n)
    out_parts = torch.empty((num_splits, B, H, T, D), dtype=torch.float32, device=q.device)
    lse_parts = torch.empty((num_splits, B, H, T), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(M, block_m), B * G, num_splits)
    _fwd_kernel[grid](q, kp, vp, kt, vt, mask, out_parts, lse_parts, scale, H, G, T, M, P, N, D, split_len,
                      num_splits, B * H * T,
                      q.stride(0), q.stride(1), q.stride(2),
                      kp.stride(0), kp.stride(1), kp.stride(2), vp.stride(0), vp.stride(1), vp.stride(2),
                      kt.stride(0), kt.stride(1), kt.stride(2), vt.stride(0), vt.stride(1), vt.stride(2),
                      mask.stride(0) if has_mask else 0,
                      HAS_MASK=has_mask, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                      IEEE=q.dtype == torch.float32)
    if num_splits == 1:
        return out_parts[0].to(q.dtype), lse_parts[0]
    # the splits' partial softmaxes, merged by log-sum-exp (a split whose keys are all masked has lse = -inf)
    lse = torch.logsumexp(lse_parts, dim=0)
    weights = torch.exp(lse_parts - lse.unsqueeze(0)).nan_to_num_(0.0)
    return (weights.unsqueeze(-1) * out_parts).sum(0).to(q.dtype), lse


class _LatentAttention(torch.autograd.Function):
    """Triton forward and backward. Saves the inputs by reference (the prefix K/V is not copied) plus out and lse."""

    @staticmethod
    def forward(ctx, q, kp, vp, kt, vt, key_mask_BS, scale):
        q, kp, vp, kt, vt = (_last_dim_contiguous(t) for t in (q, kp, vp, kt, vt))
        mask, has_mask = _mask_arg(key_mask_BS, q)
        out, lse = _triton_forward(q, kp, vp, kt, vt, mask, has_mask, scale)
        ctx.save_for_backward(q, kp, vp, kt, vt, mask, out, lse)
        ctx.has_mask, ctx.scale = has_mask, scale
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, kp, vp, kt, vt, mask, out, lse = ctx.saved_tensors
        has_mask, scale = ctx.has_mask, ctx.scale
        B, H, T, D = q.shape
        G, P, N = kp.shape[1], kp.shape[2], kt.shape[2]
        M = (H // G) * T
        block_m, block_n, block_d = _blocks(M, D)
        d_out = d_out.contiguous()
        delta = (d_out.float() * out.float()).sum(-1).contiguous()  # rowsum(dO * O) [B, H, T]
        ieee = q.dtype == torch.float32
        mask_stride = mask.stride(0) if has_mask else 0
        split_len, num_splits = _splits(P, B * G, block_n)
        dq_parts = torch.empty((num_splits, B, H, T, D), dtype=torch.float32, device=q.device)
        _bwd_dq_kernel[(triton.cdiv(M, block_m), B * G, num_splits)](
            q, d_out, lse, delta, kp, vp, kt, vt, mask, dq_parts, scale, H, G, T, M, P, N, D, split_len, num_splits,
            B * H * T,
            q.stride(0), q.stride(1), q.stride(2),
            kp.stride(0), kp.stride(1), kp.stride(2), vp.stride(0), vp.stride(1), vp.stride(2),
            kt.stride(0), kt.stride(1), kt.stride(2), vt.stride(0), vt.stride(1), vt.stride(2), mask_stride,
            HAS_MASK=has_mask, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, IEEE=ieee)
        grads = [dq_parts.sum(0).to(q.dtype)]
        for k, v, seg_len, offset, is_tail in ((kp, vp, P, 0, False), (kt, vt, N, P, True)):
            dk = torch.empty((B, G, seg_len, D), dtype=k.dtype, device=k.device)
            dv = torch.empty((B, G, seg_len, D), dtype=v.dtype, device=v.device)
            if seg_len:
                _bwd_dkdv_kernel[(triton.cdiv(seg_len, block_n), B * G)](
                    q, d_out, lse, delta, k, v, mask, dk, dv, scale, H, G, T, M, seg_len, offset, N - T, D,
                    q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                    v.stride(0), v.stride(1), v.stride(2), mask_stride,
                    IS_TAIL=is_tail, HAS_MASK=has_mask, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                    IEEE=ieee)
            grads += [dk, dv]
        return grads[0], grads[1], grads[2], grads[3], grads[4], None, None


def latent_attention(
    q_BHTD: torch.Tensor,
    k_prefix_BGPD: torch.Tensor,
    v_prefix_BGPD: torch.Tensor,
    k_tail_BGND: torch.Tensor,
    v_tail_BGND: torch.Tensor,
    key_mask_BS: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Attention of ``q`` over ``[prefix | tail]`` without concatenating them; returns ``out [B, H, T, D]``.

    ``key_mask_BS`` (bool or 0/1, ``[B, P + N]``): 0 hides a key column from every query. ``scale`` defaults to
    ``D ** -0.5``.
    """
    _check_inputs(q_BHTD, k_prefix_BGPD, v_prefix_BGPD, k_tail_BGND, v_tail_BGND, key_mask_BS)
    scale = q_BHTD.shape[-1] ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"latent_attention: scale must be finite, got {scale}")
    if resolve_backend(backend, q_BHTD.device, kernel="latent_attention") == "torch":
        return latent_attention_reference(q_BHTD, k_prefix_BGPD, v_prefix_BGPD, k_tail_BGND, v_tail_BGND,
                                          key_mask_BS, scale=scale)
    return _LatentAttention.apply(q_BHTD, k_prefix_BGPD, v_prefix_BGPD, k_tail_BGND, v_tail_BGND, key_mask_BS, scale)
