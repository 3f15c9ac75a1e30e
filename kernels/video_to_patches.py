"""uint8 video frames -> Qwen2.5-VL / Qwen3-VL ``pixel_values_videos`` in one pass.

Fuses what ``storms_dist.data.preprocess`` does after its resize: ``x / 255`` and mean/std normalisation (as
transformers' fused ``(x - 255 * mean) / (255 * std)``), padding the frame count to a multiple of
``temporal_patch_size`` with the last frame, and the processors' merge-order patch layout, written straight into
the output rows (fp32, bf16 or fp16). On a GPU the frames DALI decodes go through it without leaving the device.

Layout (the 10-D view/permute of transformers' video processors): row n = (grid_t, grid_h / m, grid_w / m, m, m),
so the m x m patches of one merged token are consecutive; column j = (C, temporal_patch_size, patch, patch).

The torch reference is ``data/preprocess.py``'s own ``normalize_frames`` + ``patchify`` (no second copy of that
logic); ``video_to_patches`` dispatches on ``backend`` (``auto`` = the Triton kernel on CUDA, the reference
elsewhere). No backward: pixels are inputs.

Tensor-name legend: T frames, C channels, H/W pixels, N patches (rows), F = C * tps * patch**2 features.
"""

from __future__ import annotations

import torch

from storms_dist.kernels._backend import Backend, resolve_backend, triton_available

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check(frames_TCHW: torch.Tensor, spec, out_dtype: torch.dtype) -> None:
    if frames_TCHW.dtype != torch.uint8 or frames_TCHW.ndim != 4 or frames_TCHW.shape[1] != 3:
        raise ValueError(f"video_to_patches: expected uint8 frames [T, 3, H, W] (any strides; a THWC tensor's "
                         f".permute(0, 3, 1, 2)), got {frames_TCHW.dtype} {list(frames_TCHW.shape)}")
    height, width = frames_TCHW.shape[-2:]
    if height % spec.factor or width % spec.factor:
        raise ValueError(f"video_to_patches: expected sides divisible by patch_size*merge_size={spec.factor}, "
                         f"got {height}x{width} (resize first: data.preprocess.resize_frames)")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"video_to_patches: out_dtype {out_dtype}; valid choices: float32, bfloat16, float16")


def video_to_patches_reference(frames_TCHW: torch.Tensor, spec, *, out_dtype: torch.dtype = torch.float32):
    """``data/preprocess.py``: normalize_frames + patchify (fp32), then cast. Returns ``(pixel_values, grid_thw)``."""
    from storms_dist.data.preprocess import normalize_frames, patchify

    _check(frames_TCHW, spec, out_dtype)
    pixel_values_NF, grid_thw = patchify(normalize_frames(frames_TCHW, spec), spec)
    return pixel_values_NF.to(out_dtype), grid_thw


def _scaled_mean_std(spec, device) -> tuple[torch.Tensor, torch.Tensor]:
    # exactly preprocess.normalize_frames' fp32 constants, so the kernel's (x - m) / s rounds the same way
    from storms_dist.data.preprocess import RESCALE_FACTOR

    mean_C = torch.tensor(spec.image_mean, dtype=torch.float32, device=device) * (1.0 / RESCALE_FACTOR)
    std_C = torch.tensor(spec.image_std, dtype=torch.float32, device=device) * (1.0 / RESCALE_FACTOR)
    return mean_C, std_C


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _video_to_patches_kernel(X, MEAN, STD, OUT, T, num_rows, num_cols, grid_hb, grid_wb,
                                 stride_xt, stride_xc, stride_xh, stride_xw,
                                 TPS: tl.constexpr, PATCH: tl.constexpr, MERGE: tl.constexpr,
                                 BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
        """One (row block, feature block) tile of the output: gather uint8 pixels, normalise, store."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        # row -> (gt, bh, bw, mh, mw), merge order
        mw = rows % MERGE
        mh = (rows // MERGE) % MERGE
        bw = (rows // (MERGE * MERGE)) % grid_wb
        bh = (rows // (MERGE * MERGE * grid_wb)) % grid_hb
        gt = rows // (MERGE * MERGE * grid_wb * grid_hb)
        # column -> (c, tt, y, x)
        x = cols % PATCH
        y = (cols // PATCH) % PATCH
        tt = (cols // (PATCH * PATCH)) % TPS
        c = cols // (PATCH * PATCH * TPS)
        frame = tl.minimum(gt[:, None] * TPS + tt[None, :], T - 1)  # pad T with the last frame
        py = (bh * MERGE + mh)[:, None] * PATCH + y[None, :]
        px = (bw * MERGE + mw)[:, None] * PATCH + x[None, :]
        ok = (rows < num_rows)[:, None] & (cols < num_cols)[None, :]
        src = frame * stride_xt + c[None, :] * stride_xc + py * stride_xh + px * stride_xw
        pixel = tl.load(X + src, mask=ok, other=0).to(tl.float32)
        mean = tl.load(MEAN + c, mask=cols < num_cols, other=0.0)
        std = tl.load(STD + c, mask=cols < num_cols, other=1.0)
        centred = pixel - mean[None, :]
        # IEEE round-to-nearest like torch's division (Triton's default fp32 division on GPUs is approximate)
        value = tl.math.div_rn(centred, tl.broadcast_to(std[None, :], centred.shape))
        tl.store(OUT + rows[:, None] * num_cols + cols[None, :], value.to(OUT.dtype.element_ty), mask=ok)


def _triton_video_to_patches(frames_TCHW: torch.Tensor, spec, out_dtype: torch.dtype):
    num_frames, num_channels, height, width = frames_TCHW.shape
    tps, patch, merge = spec.temporal_patch_size, spec.patch_size, spec.merge_size
    grid_t = -(-num_frames // tps)
    grid_h, grid_w = height // patch, width // patch
    num_rows, num_cols = grid_t * grid_h * grid_w, num_channels * tps * patch * patch
    mean_C, std_C = _scaled_mean_std(spec, frames_TCHW.device)
    out = torch.empty((num_rows, num_cols), dtype=out_dtype, device=frames_TCHW.device)
    block_r, block_f = 16, 128
    grid = (triton.cdiv(num_rows, block_r), triton.cdiv(num_cols, block_f))
    _video_to_patches_kernel[grid](frames_TCHW, mean_C, std_C, out, num_frames, num_rows, num_cols,
                                   grid_h // merge, grid_w // merge, *frames_TCHW.stride(),
                                   TPS=tps, PATCH=patch, MERGE=merge, BLOCK_R=block_r, BLOCK_F=block_f)
    return out, torch.tensor([grid_t, grid_h, grid_w], dtype=torch.long)


def video_to_patches(frames_TCHW: torch.Tensor, spec, *, out_dtype: torch.dtype = torch.float32,
                     backend: Backend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Resized uint8 frames ``[T, 3, H, W]`` (sides multiples of ``spec.factor``, any strides) + a
    ``data.preprocess.VisionSpec`` -> ``(pixel_values [N, F] in out_dtype, grid_thw int64 [3])``."""
    _check(frames_TCHW, spec, out_dtype)
    if resolve_backend(backend, frames_TCHW.device, kernel="video_to_patches") == "torch":
        return video_to_patches_reference(frames_TCHW, spec, out_dtype=out_dtype)
    return _triton_video_to_patches(frames_TCHW, spec, out_dtype)
