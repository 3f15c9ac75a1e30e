"""DALI decoding backend on CPU, for real: VP9 / MJPEG clips made here, compared with PyAV on the same indices.

Tolerance (see storms_dist/data/dali.py): frame identity is exact; DALI's RGB equals a BT.601 limited-range,
bilinear-chroma conversion of PyAV's own YUV planes within +-1; against PyAV's RGB the per-frame mean |diff| is
<= DALI_PYAV_MEAN_ABS_TOLERANCE (swscale replicates chroma). 4:4:4 MJPEG is bit-identical.
"""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from storms_dist.data import dali
from storms_dist.data.dali import (
    DALI_PYAV_MEAN_ABS_TOLERANCE,
    DaliVideoLoader,
    dali_available,
    dali_can_decode,
    decode_device,
    decode_frames_dali,
    decode_video_frames,
    select_backend,
    shard,
)
from storms_dist.data.dataset import DataConfig, VideoQADataset, load_video_inputs
from storms_dist.data.manifest import Sample
from storms_dist.data.preprocess import RESCALE_FACTOR, VisionSpec
from storms_dist.data.sampling import FrameSamplingConfig, sample_frame_indices
from storms_dist.data.video_io import (
    VideoDecodeError,
    decode_frames,
    encoder_available,
    probe_video,
    write_video,
)

if os.environ.get("CI") and not dali_available():  # CI installs the dali extra: never skip the real tests there
    pytest.fail("CI=true but NVIDIA DALI does not import; `make test` installs .[dev,dali]", pytrace=False)
pytestmark = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI not installed (pip install -e '.[dali]')")

NUM_FRAMES, HEIGHT, WIDTH, FPS = 24, 64, 96, 8.0
NEEDS_H264 = pytest.mark.skipif(not encoder_available("h264"), reason="PyAV build has no libx264")


def make_frames(num_frames: int = NUM_FRAMES, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """Colour gradients plus a square that moves and changes colour every frame (so every frame is distinct)."""
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    frames[..., 0] = (np.arange(width) * 255 // (width - 1))[None, None, :]
    frames[..., 2] = (np.arange(height) * 255 // (height - 1))[None, :, None]
    side = min(height, width) // 4
    for i in range(num_frames):
        x, y = (width - side) * i // (num_frames - 1), (height - side) * i // (num_frames - 1)
        frames[i, y:y + side, x:x + side] = ((37 * i) % 256, 255 - (23 * i) % 256, 128)
    return frames


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("dali_clips")
    paths = {"vp9": folder / "clip.webm", "vp9_small": folder / "small.webm", "mjpeg": folder / "clip.avi"}
    write_video(paths["vp9"], make_frames(), FPS, "vp9")
    write_video(paths["vp9_small"], make_frames(10, 32, 48), FPS, "vp9")
    write_video(paths["mjpeg"], make_frames(), FPS, "mjpeg")
    if encoder_available("h264"):
        paths["h264"] = folder / "clip.mp4"
        write_video(paths["h264"], make_frames(), FPS, "h264")
    paths["garbage"] = folder / "garbage.webm"
    paths["garbage"].write_bytes(b"this is not a video " * 200)
    good = paths["vp9"].read_bytes()
    paths["truncated"] = folder / "truncated.webm"
    paths["truncated"].write_bytes(good[: len(good) // 2])
    paths["missing"] = folder / "missing.webm"
    return paths


def bt601_bilinear_rgb(path: Path, indices: list[int]) -> np.ndarray:
    """PyAV's decoded yuv420p planes -> RGB with BT.601 limited range and centred bilinear chroma (DALI's conversion)."""
    planes = {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in indices:
                planes[i] = frame.to_ndarray(format="yuv420p").astype(np.float64)
    out = []
    for i in indices:
        yuv = planes[i]
        h = yuv.shape[0] * 2 // 3
        w = yuv.shape[1]
        y = (yuv[:h] - 16) * 255 / 219
        chroma = yuv[h:].reshape(2, h // 2, w // 2)
        u, v = F.interpolate(torch.from_numpy(chroma)[None], size=(h, w), mode="bilinear",
                             align_corners=False)[0].numpy() - 128
        k = 255 / 224
        rgb = np.stack([y + 1.402 * k * v, y - 0.344136 * k * u - 0.714136 * k * v, y + 1.772 * k * u], axis=-1)
        out.append(np.clip(np.rint(rgb), 0, 255))
    return np.stack(out)


def assert_same_frames_within_tolerance(dali_frames: np.ndarray, path: Path, indices: list[int]) -> None:
    all_pyav = decode_frames(path, range(probe_video(path).num_frames)).astype(np.int16)
    got = np.asarray(dali_frames).astype(np.int16)
    assert got.shape == (len(indices), *all_pyav.shape[1:])
    for k, index in enumerate(indices):
        per_frame = np.abs(all_pyav - got[k]).reshape(len(all_pyav), -1).mean(1)
        assert per_frame.argmin() == index, f"DALI frame {k} looks like PyAV frame {per_frame.argmin()}, not {index}"
        assert per_frame[index] <= DALI_PYAV_MEAN_ABS_TOLERANCE, (index, per_frame[index])


INDEX_CASES = {
    "first_and_last": [0, NUM_FRAMES - 1],
    "sampling_rule": sample_frame_indices(NUM_FRAMES, FPS, FrameSamplingConfig(fps=2.0, min_frames=4, max_frames=8)),
    "repeated": [0, 0, 3, 3, 7, NUM_FRAMES - 1, NUM_FRAMES - 1],
    "unsorted": [17, 2, 9, 2],
    "short_video_repeats": sample_frame_indices(3, FPS, FrameSamplingConfig(fps=None, num_frames=6)),
}


@pytest.mark.parametrize("case", INDEX_CASES)
def test_dali_cpu_equals_pyav_on_the_same_indices(clips, case):
    indices = INDEX_CASES[case]
    frames = decode_frames_dali(clips["vp9"], indices)
    assert isinstance(frames, np.ndarray) and frames.dtype == np.uint8
    assert_same_frames_within_tolerance(frames, clips["vp9"], indices)


def test_dali_is_bt601_of_the_same_decoded_yuv(clips):
    """The difference to PyAV is colour conversion only: the decoded pictures are the same."""
    indices = [0, 5, 11, NUM_FRAMES - 1]
    diff = np.abs(decode_frames_dali(clips["vp9"], indices).astype(np.float64) - bt601_bilinear_rgb(clips["vp9"], indices))
    assert diff.max() <= 1


def test_mjpeg_444_is_bit_identical(clips):
    indices = [0, 4, 4, NUM_FRAMES - 1]
    np.testing.assert_array_equal(decode_frames_dali(clips["mjpeg"], indices), decode_frames(clips["mjpeg"], indices))


def test_backend_selection_on_cpu(clips, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CPU selection rules; on a GPU machine auto picks the mixed decoder")
    assert decode_device("auto") == "cpu" and decode_device("dali") == "cpu"
    assert select_backend(clips["vp9"], "auto") == "dali-cpu"
    assert select_backend(clips["mjpeg"], "auto") == "dali-cpu"
    assert select_backend(clips["vp9"], "pyav") == "pyav"
    assert select_backend(clips["garbage"], "auto") == "pyav"  # PyAV then reports the real error
    assert dali_can_decode(clips["vp9"], "cpu") and not dali_can_decode(clips["vp9"], "gpu")
    assert not dali_can_decode(clips["missing"], "cpu")
    if "h264" in clips:
        assert select_backend(clips["h264"], "auto") == "pyav"
        assert not dali_can_decode(clips["h264"], "cpu")
        with pytest.raises(VideoDecodeError, match=r"clip\.mp4: codec h264 is not decodable by DALI's CPU decoder"):
            select_backend(clips["h264"], "dali")
    monkeypatch.setattr(dali, "dali_available", lambda: False)  # as on a machine without the extra
    assert select_backend(clips["vp9"], "auto") == "pyav"
    with pytest.raises(RuntimeError, match="DALI is not installed"):
        select_backend(clips["vp9"], "dali")
    with pytest.raises(ValueError, match="decoder: expected one of"):
        select_backend(clips["vp9"], "torchcodec")


@NEEDS_H264
def test_auto_decodes_h264_with_pyav_on_cpu(clips):
    indices = [1, 8, 8]
    np.testing.assert_array_equal(decode_video_frames(clips["h264"], indices, "auto"),
                                  decode_frames(clips["h264"], indices))


@pytest.mark.parametrize("name, message", [
    ("missing", r"missing\.webm: video file does not exist"),
    ("garbage", r"garbage\.webm: cannot open as a video container"),
])
def test_broken_files_raise_video_decode_error_naming_the_file(clips, name, message):
    with pytest.raises(VideoDecodeError, match=message) as info:
        decode_frames_dali(clips[name], [0])
    assert "\n" not in str(info.value)


def test_indices_past_the_end_raise_instead_of_padding(clips):
    """DALI itself pads out-of-range indices with black frames; the PyAV frame count guards against that."""
    with pytest.raises(VideoDecodeError, match=rf"clip\.webm: frame {NUM_FRAMES} requested but only {NUM_FRAMES}"):
        decode_frames_dali(clips["vp9"], [0, NUM_FRAMES])
    truncated_frames = probe_video(clips["truncated"]).num_frames
    assert truncated_frames < NUM_FRAMES
    with pytest.raises(VideoDecodeError, match=r"truncated\.webm: frame 23 requested"):
        decode_frames_dali(clips["truncated"], [0, 23])
    with pytest.raises(ValueError, match="must be >= 0"):
        decode_frames_dali(clips["vp9"], [0, -1])
    assert decode_frames_dali(clips["vp9"], []).shape == (0, HEIGHT, WIDTH, 3)


@NEEDS_H264
def test_a_dali_failure_is_one_line_and_the_next_decode_works(clips, monkeypatch):
    """Force DALI's CPU decoder onto H.264 (which it lacks): a one-line error; auto falls back to PyAV."""
    monkeypatch.setattr(dali, "DALI_CPU_CODECS", dali.DALI_CPU_CODECS | {"h264"})
    monkeypatch.setattr(dali, "_warned_fallback", set())
    with pytest.raises(VideoDecodeError, match=r"clip\.mp4: DALI cpu decoder failed \(") as info:
        decode_frames_dali(clips["h264"], [0, 3])
    assert "\n" not in str(info.value)
    assert_same_frames_within_tolerance(decode_frames_dali(clips["vp9"], [2, 3]), clips["vp9"], [2, 3])
    with pytest.warns(UserWarning, match="decoding with PyAV instead"):
        frames = decode_video_frames(clips["h264"], [0, 3], "auto")
    np.testing.assert_array_equal(frames, decode_frames(clips["h264"], [0, 3]))


def requests_for(clips) -> list[tuple[Path, list[int]]]:
    return [(clips["vp9"], [0, 5, 5, 23]), (clips["vp9_small"], [9, 0]), (clips["mjpeg"], [1, 2]),
            (clips["vp9"], [12]), (clips["vp9_small"], [3, 4, 5]), (clips["vp9"], [7, 8]), (clips["mjpeg"], [23])]


def test_loader_shards_across_ranks_without_overlap_and_matches_single_decodes(clips):
    requests = requests_for(clips)
    world_size = 3
    seen = []
    for rank in range(world_size):
        loader = DaliVideoLoader(requests, decoder="dali", rank=rank, world_size=world_size, batch_size=2)
        results = list(loader)
        assert len(results) == len(loader) == len(requests[rank::world_size])
        for (path, indices), video in zip(shard(requests, rank, world_size), results):
            assert video.error is None and video.path == path and video.indices == indices
            assert video.backend == "dali-cpu"
            np.testing.assert_array_equal(video.frames, decode_frames_dali(path, indices))
            seen.append(requests.index((path, indices)))
    assert sorted(seen) == list(range(len(requests)))  # disjoint and complete


def test_loader_prefetches_ahead_of_the_consumer(clips):
    loader = DaliVideoLoader(requests_for(clips), decoder="dali", batch_size=1, prefetch=3)
    iterator = iter(loader)
    next(iterator)
    assert loader.num_batches_fed >= 3  # two more videos already handed to DALI
    assert len(list(iterator)) == len(loader) - 1
    assert loader.num_pipelines_built == 1
    second = list(loader)  # the next epoch rewinds the same pipeline
    assert loader.num_pipelines_built == 1 and len(second) == len(loader)
    np.testing.assert_array_equal(second[-1].frames, decode_frames_dali(*requests_for(clips)[-1]))
    next(iter(loader))  # a pass abandoned early leaves batches in flight: the next pass builds a fresh pipeline
    assert [v.indices for v in loader] == [idx for _, idx in requests_for(clips)]
    assert loader.num_pipelines_built == 2


def test_loader_keeps_order_through_pyav_files_and_broken_files(clips, monkeypatch):
    requests = [(clips["missing"], [0]), (clips["vp9"], [1, 2]), (clips["garbage"], [0]), (clips["vp9"], [0, 99])]
    if "h264" in clips:
        requests.append((clips["h264"], [3, 3]))
    requests.append((clips["vp9_small"], [4]))
    results = list(DaliVideoLoader(requests, decoder="auto", batch_size=2))
    assert [r.path for r in results] == [p for p, _ in requests]
    errors = [r.error is not None for r in results]
    assert errors[:4] == [True, False, True, True] and not any(errors[4:])
    assert "missing.webm" in str(results[0].error) and "frame 99 requested" in str(results[3].error)
    if "h264" in clips:
        assert results[4].backend == "pyav"
        np.testing.assert_array_equal(results[4].frames, decode_frames(clips["h264"], [3, 3]))
    # a file DALI fails on mid-batch (forced H.264): that batch is redone one video at a time, the rest still decode
    if "h264" in clips:
        monkeypatch.setattr(dali, "DALI_CPU_CODECS", dali.DALI_CPU_CODECS | {"h264"})
        requests = [(clips["vp9"], [0]), (clips["h264"], [1]), (clips["vp9_small"], [2]), (clips["vp9"], [3])]
        loader = DaliVideoLoader(requests, decoder="dali", batch_size=2)
        results = list(loader)
        assert [r.error is not None for r in results] == [False, True, False, False]
        assert "clip.mp4: DALI cpu decoder failed" in str(results[1].error)
        np.testing.assert_array_equal(results[3].frames, decode_frames_dali(clips["vp9"], [3]))
        assert loader.num_pipelines_built == 2


def test_loader_samples_indices_with_the_one_rule(clips):
    frames_cfg = FrameSamplingConfig(fps=2.0, min_frames=4, max_frames=8)
    (video,) = DaliVideoLoader([(clips["vp9"], None)], decoder="dali", frames=frames_cfg)
    assert video.indices == sample_frame_indices(NUM_FRAMES, FPS, frames_cfg)
    assert video.info.num_frames == NUM_FRAMES and video.frames.shape == (len(video.indices), HEIGHT, WIDTH, 3)


def data_config(decoder: str) -> DataConfig:
    return DataConfig(frames=FrameSamplingConfig(fps=None, num_frames=8, min_frames=4, max_frames=8),
                      min_pixels=28 * 28 * 4, max_pixels=56 * 84, decoder=decoder)


def assert_inputs_close(dali_inputs, pyav_inputs, spec: VisionSpec) -> None:
    assert torch.equal(dali_inputs.video_grid_thw, pyav_inputs.video_grid_thw)
    assert dali_inputs.timestamps_s == pyav_inputs.timestamps_s
    assert dali_inputs.second_per_grid_t == pyav_inputs.second_per_grid_t
    assert dali_inputs.pixel_values_videos.shape == pyav_inputs.pixel_values_videos.shape
    # the uint8 tolerance in normalised units (resizing only averages the differences)
    limit = DALI_PYAV_MEAN_ABS_TOLERANCE * RESCALE_FACTOR / min(spec.image_std)
    assert (dali_inputs.pixel_values_videos - pyav_inputs.pixel_values_videos).abs().mean() <= limit


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_training_item_with_dali_equals_pyav_within_tolerance(clips, family):
    spec = VisionSpec.default(family)
    assert_inputs_close(load_video_inputs(clips["vp9"], spec, data_config("dali")),
                        load_video_inputs(clips["vp9"], spec, data_config("pyav")), spec)


def test_data_config_rejects_unknown_decoder():
    with pytest.raises(ValueError, match="decoder: expected one of auto, pyav, dali"):
        data_config("opencv")


def test_dataset_preload_fills_the_cache_through_the_loader(clips):
    def sample(uid: str, path: Path) -> Sample:
        return Sample(uid=uid, video=path.name, question="q?", options=("a", "b"), answer="A", qtype="t",
                      thought_video=None, split="train", root=path.parent)

    samples = [sample("a", clips["vp9"]), sample("b", clips["vp9_small"]), sample("c", clips["vp9"]),
               sample("d", clips["missing"])]
    spec = VisionSpec.default("qwen2_5_vl")
    dataset = VideoQADataset(samples, tokenizer=None, spec=spec, cfg=data_config("dali"))
    assert dataset.preload(rank=1, world_size=2) == 1  # unique videos [clip, small, missing]: rank 1 has small
    assert dataset.preload(rank=0, world_size=2) == 1  # clip; missing is left out (raises on access as usual)
    assert dataset.preload([1], rank=0, world_size=1) == 1  # the items' videos only
    assert set(dataset._video_cache) == {clips["vp9"], clips["vp9_small"]}
    assert_inputs_close(dataset.video(clips["vp9"]),
                        load_video_inputs(clips["vp9"], spec, data_config("pyav")), spec)
    with pytest.raises(VideoDecodeError, match="missing.webm"):
        dataset.video(clips["missing"])


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (DALI's mixed decoder)")


def test_gpu_paths_refuse_cleanly_without_cuda(clips):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        decode_frames_dali(clips["vp9"], [0], device="gpu")
    with pytest.raises(RuntimeError, match="needs DALI and a visible CUDA device"):
        DaliVideoLoader([(clips["vp9"], [0])], device="gpu")


@GPU
def test_gpu_decoder_frames_stay_on_the_gpu_and_match_the_cpu_decoder(clips):
    indices = [0, 3, 3, NUM_FRAMES - 1]
    frames = decode_frames_dali(clips["vp9"], indices, device="gpu")
    assert isinstance(frames, torch.Tensor) and frames.is_cuda and frames.dtype == torch.uint8
    assert_same_frames_within_tolerance(frames.cpu().numpy(), clips["vp9"], indices)
    assert decode_device("auto") == "gpu" and select_backend(clips["vp9"], "auto") == "dali-gpu"
    videos = list(DaliVideoLoader(requests_for(clips)[:4], decoder="auto", batch_size=2))
    assert all(v.error is None and v.frames.is_cuda for v in videos)
    spec = VisionSpec.default("qwen2_5_vl")
    inputs = load_video_inputs(clips["vp9"], spec, data_config("auto"))
    assert inputs.pixel_values_videos.is_cuda  # preprocessing ran on the GPU
    assert_inputs_close(inputs.__class__(inputs.pixel_values_videos.cpu(), inputs.video_grid_thw.cpu(),
                                         inputs.timestamps_s, inputs.second_per_grid_t),
                        load_video_inputs(clips["vp9"], spec, data_config("pyav")), spec)
