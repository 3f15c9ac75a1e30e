"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL video preprocessing in plain torch (transformers' processors need torchvision).

Reproduces ``Qwen2VLVideoProcessor`` (also used by Qwen2.5-VL) and ``Qwen3VLVideoProcessor`` of transformers 5.23
for already-sampled frames (``do_sample_frames`` is ours: storms_dist.data.sampling):

    smart_resize -> bicubic antialiased resize (uint8 in, uint8 out, as torchvision) -> fused rescale+normalise
    -> pad the frame count to a multiple of temporal_patch_size with the last frame -> patchify view/permute

Sources (transformers 5.23, under transformers/models/):
  qwen2_vl/video_processing_qwen2_vl.py   smart_resize (per-frame budget), patchify, CLIP mean/std, BICUBIC
  qwen3_vl/video_processing_qwen3_vl.py   smart_resize(num_frames, ...) (whole-video budget), 0.5 mean/std
  ../image_processing_backends.py         resize (-> tvF.resize antialias=True), fused rescale_and_normalize
  ../image_utils.py                       OPENAI_CLIP_MEAN/STD, IMAGENET_STANDARD_MEAN/STD
  ../video_processing_utils.py            rescale_factor = 1 / 255

Tensor-name legend: T frames, C=3 channels, H/W pixels, N = grid_t * grid_h * grid_w patches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F

Family = Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
FAMILIES: tuple[str, ...] = get_args(Family)

# transformers/image_utils.py OPENAI_CLIP_MEAN / OPENAI_CLIP_STD: Qwen2VLVideoProcessor.image_mean / image_std
# (qwen2_vl/video_processing_qwen2_vl.py), used by Qwen2-VL and Qwen2.5-VL.
OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
# transformers/image_utils.py IMAGENET_STANDARD_MEAN / _STD: Qwen3VLVideoProcessor.image_mean / image_std
# (qwen3_vl/video_processing_qwen3_vl.py).
IMAGENET_STANDARD_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
# transformers/video_processing_utils.py BaseVideoProcessor.rescale_factor.
RESCALE_FACTOR: float = 1 / 255
# Class defaults of the two video processors (patch_size, temporal_patch_size, merge_size); the real checkpoints'
# vision configs agree (Qwen2VLConfig / Qwen2_5_VLConfig: 14, 2, 2; Qwen3VLConfig: 16, 2, 2).
_DEFAULT_GEOMETRY: dict[str, tuple[int, int, int]] = {
    "qwen2_vl": (14, 2, 2), "qwen2_5_vl": (14, 2, 2), "qwen3_vl": (16, 2, 2),
}
# HF config.model_type -> family (the MoE Qwen3-VL shares the dense model's processors).
_MODEL_TYPE_TO_FAMILY: dict[str, str] = {
    "qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl", "qwen3_vl_moe": "qwen3_vl",
}


def _mean_std(family: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    if family == "qwen3_vl":
        return IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD
    return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


@dataclass(frozen=True, kw_only=True)
class VisionSpec:
    """Geometry and pixel statistics of one backbone's vision tower / video processor."""

    family: Family
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family: expected one of {', '.join(FAMILIES)}, got {self.family!r}")
        for name in ("patch_size", "temporal_patch_size", "merge_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if len(value) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value):
                raise ValueError(f"{name}: expected 3 finite floats (R, G, B), got {value!r}")
        if any(v <= 0 for v in self.image_std):
            raise ValueError(f"image_std: expected 3 floats > 0, got {self.image_std!r}")
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merged patch is ``patch_size * merge_size`` pixels wide."""
        return self.patch_size * self.merge_size

    @classmethod
    def default(cls, family: Family) -> VisionSpec:
        """The transformers video processor defaults of ``family`` (what the released checkpoints use)."""
        if family not in _DEFAULT_GEOMETRY:
            raise ValueError(f"family: expected one of {', '.join(FAMILIES)}, got {family!r}")
        patch_size, temporal_patch_size, merge_size = _DEFAULT_GEOMETRY[family]
        mean, std = _mean_std(family)
        return cls(family=family, patch_size=patch_size, temporal_patch_size=temporal_patch_size,
                   merge_size=merge_size, image_mean=mean, image_std=std)

    @classmethod
    def from_hf_config(cls, config: Any) -> VisionSpec:
        """From a transformers ``Qwen2VLConfig`` / ``Qwen2_5_VLConfig`` / ``Qwen3VLConfig`` (or Qwen3-VL-MoE).

        Geometry comes from ``config.vision_config`` (``patch_size``, ``temporal_patch_size``,
        ``spatial_merge_size``); mean/std are processor constants, not config fields (see module docstring).
        """
        model_type = getattr(config, "model_type", None)
        if model_type not in _MODEL_TYPE_TO_FAMILY:
            raise ValueError(
                f"config.model_type: expected one of {', '.join(_MODEL_TYPE_TO_FAMILY)}, got {model_type!r}")
        family = _MODEL_TYPE_TO_FAMILY[model_type]
        vision = config.vision_config
        mean, std = _mean_std(family)
        return cls(family=family, patch_size=int(vision.patch_size),
                   temporal_patch_size=int(vision.temporal_patch_size), merge_size=int(vision.spatial_merge_size),
                   image_mean=mean, image_std=std)


@dataclass(kw_only=True)
class ResizeConfig:
    """Pixel budget of the resize (transformers' ``size={"shortest_edge": min_pixels, "longest_edge": max_pixels}``).

    Qwen2-VL / Qwen2.5-VL: per frame (``h * w``). Qwen3-VL: per video, ``round(T / tps) * tps * h * w``
    (qwen3_vl/video_processing_qwen3_vl.py smart_resize), so the same numbers give far smaller frames there.
    """

    min_pixels: int
    """Lower bound of the budget (transformers ``size["shortest_edge"]``)."""
    max_pixels: int
    """Upper bound of the budget (transformers ``size["longest_edge"]``)."""

    def __post_init__(self) -> None:
        if isinstance(self.min_pixels, bool) or not isinstance(self.min_pixels, int) or self.min_pixels < 1:
            raise ValueError(f"min_pixels: expected an int >= 1, got {self.min_pixels!r}")
        max_pixels = self.max_pixels
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < self.min_pixels:
            raise ValueError(f"max_pixels: expected an int >= min_pixels={self.min_pixels}, got {self.max_pixels!r}")


@dataclass(frozen=True)
class ProcessedVideo:
    """What the model's ``pixel_values_videos`` / ``video_grid_thw`` inputs take for one video."""

    pixel_values_videos: torch.Tensor
    """float32 [N, C * temporal_patch_size * patch_size**2], N = grid_t * grid_h * grid_w."""
    video_grid_thw: torch.Tensor
    """int64 [3]: (grid_t, grid_h, grid_w) in patches; stack these to [num_videos, 3] for a batch."""


def smart_resize(height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL / Qwen2.5-VL per-frame target size: sides multiples of ``factor``, ``h * w`` within the budget.

    Transcribed from qwen2_vl/video_processing_qwen2_vl.py ``smart_resize`` (a copy of the image processor's).
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"frames: expected an aspect ratio < 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize_qwen3_video(
    num_frames: int, height: int, width: int, *, temporal_factor: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Qwen3-VL target frame size: the budget covers all ``round(num_frames / temporal_factor) * temporal_factor``
    frames, and sides shorter than ``factor`` are first scaled up.

    Transcribed from qwen3_vl/video_processing_qwen3_vl.py ``smart_resize``.
    """
    if num_frames < temporal_factor:
        raise ValueError(f"num_frames: expected >= temporal_factor={temporal_factor}, got {num_frames}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height = int(height * scale)
        width = int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"frames: expected an aspect ratio < 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resized_hw(num_frames: int, height: int, width: int, spec: VisionSpec, resize: ResizeConfig) -> tuple[int, int]:
    """Target (height, width) of every frame of a ``num_frames``-frame video for ``spec.family``."""
    if spec.family == "qwen3_vl":
        # NOTE: transformers raises for fewer frames than one temporal patch; we budget the padded count instead.
        return smart_resize_qwen3_video(
            max(num_frames, spec.temporal_patch_size), height, width, temporal_factor=spec.temporal_patch_size,
            factor=spec.factor, min_pixels=resize.min_pixels, max_pixels=resize.max_pixels)
    return smart_resize(height, width, factor=spec.factor, min_pixels=resize.min_pixels, max_pixels=resize.max_pixels)


def resize_frames(video_TCHW_uint8: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic antialiased resize, uint8 in and out, as torchvision's ``resize_image`` does it.

    torchvision (v2 functional, antialias=True, the transformers default) returns the input untouched when the
    size does not change; on CPU it runs ``interpolate`` on uint8 directly (torch's separable fixed-point kernel,
    within 2 of PIL); elsewhere it interpolates in float32, clamps to [0, 255] and rounds. Both paths are here.
    """
    if tuple(video_TCHW_uint8.shape[-2:]) == (height, width):
        return video_TCHW_uint8
    kwargs = dict(size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    if video_TCHW_uint8.device.type == "cpu":
        return F.interpolate(video_TCHW_uint8, **kwargs)
    resized_TCHW = F.interpolate(video_TCHW_uint8.float(), **kwargs)
    return resized_TCHW.clamp_(0, 255).round_().to(torch.uint8)


def normalize_frames(video_TCHW_uint8: torch.Tensor, spec: VisionSpec) -> torch.Tensor:
    """float32 ``(x - 255 * mean) / (255 * std)``: transformers' fused rescale + normalise, op for op."""
    # image_processing_backends.py _fuse_mean_std_and_rescale_factor: torch.tensor(mean) * (1.0 / rescale_factor)
    device = video_TCHW_uint8.device
    mean_C = torch.tensor(spec.image_mean, dtype=torch.float32, device=device) * (1.0 / RESCALE_FACTOR)
    std_C = torch.tensor(spec.image_std, dtype=torch.float32, device=device) * (1.0 / RESCALE_FACTOR)
    video_TCHW = video_TCHW_uint8.to(torch.float32)
    return (video_TCHW - mean_C.view(1, -1, 1, 1)) / std_C.view(1, -1, 1, 1)  # tvF.normalize: sub_ then div_


def patchify(video_TCHW: torch.Tensor, spec: VisionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad T to a multiple of ``temporal_patch_size`` with the last frame, then the processors' view/permute.

    Row order is (grid_t, grid_h / m, grid_w / m, m, m), i.e. the 2x2 patches of one merged token are consecutive;
    each row is (C, temporal_patch_size, patch_size, patch_size) flattened. Returns ``(pixel_values, grid_thw)``.
    """
    num_frames, num_channels, height, width = video_TCHW.shape
    tps, patch, merge = spec.temporal_patch_size, spec.patch_size, spec.merge_size
    if height % spec.factor or width % spec.factor:
        raise ValueError(
            f"frames: expected sides divisible by patch_size*merge_size={spec.factor}, got {height}x{width}")
    if pad := -num_frames % tps:
        video_TCHW = torch.cat((video_TCHW, video_TCHW[-1:].expand(pad, -1, -1, -1)), dim=0)
        num_frames += pad
    grid_t, grid_h, grid_w = num_frames // tps, height // patch, width // patch
    patches = video_TCHW.contiguous().view(
        grid_t, tps, num_channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    # transformers' permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9) without its leading batch axis
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values_NP = patches.reshape(grid_t * grid_h * grid_w, num_channels * tps * patch * patch)
    return pixel_values_NP, torch.tensor([grid_t, grid_h, grid_w], dtype=torch.long)


def _as_frames_tensor(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if not isinstance(frames, torch.Tensor):
        raise ValueError(f"frames: expected a numpy array or torch tensor, got {type(frames).__name__}")
    if frames.dtype != torch.uint8:
        raise ValueError(f"frames: expected dtype uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or min(frames.shape) < 1:
        raise ValueError(f"frames: expected shape [T, H, W, 3] with T, H, W >= 1, got {list(frames.shape)}")
    return frames


def preprocess_video(frames: np.ndarray | torch.Tensor, spec: VisionSpec, resize: ResizeConfig, *,
                     patches_backend: str = "auto") -> ProcessedVideo:
    """Sampled RGB frames ``[T, H, W, 3]`` uint8 -> ``pixel_values_videos`` and ``video_grid_thw`` of one video.

    Same layout and (on CPU) the same values as transformers' Qwen2VLVideoProcessor / Qwen3VLVideoProcessor with
    ``do_sample_frames=False``, ``cap_pixels_per_frame=False`` and ``size`` = (min_pixels, max_pixels).
    After the resize, ``patches_backend`` picks ``storms_dist.kernels.video_to_patches``' implementation: ``auto``
    = the fused Triton kernel for CUDA frames (DALI's GPU decoder), this module's normalize_frames + patchify else.
    """
    from storms_dist.kernels.video_to_patches import video_to_patches

    frames_THWC = _as_frames_tensor(frames)
    num_frames, height, width, _ = frames_THWC.shape
    target_h, target_w = resized_hw(num_frames, height, width, spec, resize)
    video_TCHW_uint8 = resize_frames(frames_THWC.permute(0, 3, 1, 2), target_h, target_w)
    pixel_values, grid_thw = video_to_patches(video_TCHW_uint8, spec, backend=patches_backend)
    return ProcessedVideo(pixel_values_videos=pixel_values, video_grid_thw=grid_thw)
