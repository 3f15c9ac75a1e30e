"""storms_dist.kernels.video_to_patches: the Triton kernel (TRITON_INTERPRET=1 on CPU, set by conftest) equals
data/preprocess.py's normalise + pad + patchify after its resize, for both families' geometry, odd frame counts and
THWC-strided input; on CUDA (when present) it runs on the device in fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

from storms_dist.data.preprocess import ResizeConfig, VisionSpec, preprocess_video, resize_frames, resized_hw
from storms_dist.kernels._backend import triton_available
from storms_dist.kernels.video_to_patches import video_to_patches, video_to_patches_reference

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install -e '.[triton]')")


def _frames(num_frames, height, width, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (num_frames, height, width, 3), dtype=torch.uint8, generator=gen).to(device)


@needs_triton
@pytest.mark.parametrize("family,num_frames,height,width", [
    ("qwen2_5_vl", 3, 56, 84),  # odd T: the last frame pads the second temporal patch
    ("qwen3_vl", 4, 64, 32),
])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_kernel_equals_preprocess_after_its_resize(family, num_frames, height, width, out_dtype):
    spec = VisionSpec.default(family)
    frames_THWC = _frames(num_frames, height, width)
    frames_TCHW = frames_THWC.permute(0, 3, 1, 2)  # DALI's THWC memory, read through strides: no copy
    got, grid = video_to_patches(frames_TCHW, spec, out_dtype=out_dtype, backend="triton")
    ref, ref_grid = video_to_patches_reference(frames_TCHW.contiguous(), spec)
    assert got.dtype == out_dtype and got.shape == ref.shape and torch.equal(grid, ref_grid)
    # fp32: the same fp32 constants and IEEE sub + div as normalize_frames, so bit-equal; fp16: the rounded fp32
    torch.testing.assert_close(got, ref.to(out_dtype), rtol=0, atol=0)


@needs_triton
def test_preprocess_video_with_the_kernel_equals_the_default_path():
    spec, resize = VisionSpec.default("qwen2_5_vl"), ResizeConfig(min_pixels=28 * 28, max_pixels=56 * 84)
    frames = _frames(5, 61, 90, seed=3)  # resized to 56x84 by smart_resize
    assert resized_hw(5, 61, 90, spec, resize) == (56, 84)
    ref = preprocess_video(frames, spec, resize)
    got = preprocess_video(frames, spec, resize, patches_backend="triton")
    assert torch.equal(got.video_grid_thw, ref.video_grid_thw) and got.video_grid_thw.tolist() == [3, 4, 6]
    assert torch.equal(got.pixel_values_videos, ref.pixel_values_videos)
    resized = resize_frames(frames.permute(0, 3, 1, 2), 56, 84)
    assert torch.equal(video_to_patches(resized, spec, backend="torch")[0], ref.pixel_values_videos)


def test_input_errors_name_the_fix():
    spec = VisionSpec.default("qwen2_5_vl")
    with pytest.raises(ValueError, match=r"expected uint8 frames \[T, 3, H, W\]"):
        video_to_patches(torch.zeros(2, 3, 28, 28), spec)
    with pytest.raises(ValueError, match="divisible by patch_size\\*merge_size=28, got 28x30 \\(resize first"):
        video_to_patches(torch.zeros(2, 3, 28, 30, dtype=torch.uint8), spec)
    with pytest.raises(ValueError, match="out_dtype torch.int32"):
        video_to_patches(torch.zeros(2, 3, 28, 28, dtype=torch.uint8), spec, out_dtype=torch.int32)


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_stays_on_the_device_and_matches(out_dtype):
    spec = VisionSpec.default("qwen2_5_vl")
    frames_TCHW = _frames(9, 224, 336, device="cuda").permute(0, 3, 1, 2)
    got, grid = video_to_patches(frames_TCHW, spec, out_dtype=out_dtype)  # auto: the kernel on CUDA
    ref, _ = video_to_patches_reference(frames_TCHW, spec)
    assert got.is_cuda and got.dtype == out_dtype and grid.tolist() == [5, 16, 24]
    torch.testing.assert_close(got, ref.to(out_dtype), rtol=0, atol=0)
