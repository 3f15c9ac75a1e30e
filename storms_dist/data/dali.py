"""NVIDIA DALI decoding backend, the per-file backend choice, and a prefetching, rank-sharded DALI-fed loader.

Backends (``DataConfig.decoder``):

* ``"auto"`` (default): DALI's GPU ("mixed", NVDEC) decoder when CUDA and DALI are present (H.264, HEVC, VP8, VP9,
  AV1, MPEG-4, MJPEG); otherwise DALI's CPU decoder for the codecs it has (VP8, VP9, MJPEG: DALI's bundled FFmpeg
  leaves out H.264/HEVC/MPEG-4/AV1 for licensing reasons); PyAV for everything else and whenever DALI is not
  installed. A file DALI fails on is retried with PyAV (which raises the real error if the file is broken).
* ``"dali"``: DALI only (GPU when CUDA is present, else CPU); a codec DALI cannot decode on that device is a
  :class:`VideoDecodeError` for that file; DALI not installed is a RuntimeError.
* ``"pyav"``: PyAV only (``storms_dist.data.video_io.decode_frames``).

Every backend decodes exactly the indices of the one sampling rule (``storms_dist.data.sampling``): DALI is given the
sorted unique indices through its ``frames`` argument (each frame decoded once) and the requested order, duplicates
included, is gathered afterwards. Frame identity is exact (DALI frame ``i`` is PyAV frame ``i``).

Pixels are not bit-identical to PyAV for 4:2:0 streams (VP9, H.264): DALI converts YUV to RGB with BT.601
limited range and bilinear (centred) chroma upsampling, while PyAV's swscale ``rgb24`` path replicates chroma.
Decoding itself is identical: DALI equals a BT.601 + bilinear-chroma conversion of PyAV's own YUV planes within
+-1. Against PyAV's RGB the difference sits on colour edges (max up to ~80, 99th percentile ~15) and the
per-frame mean absolute difference is <= :data:`DALI_PYAV_MEAN_ABS_TOLERANCE` (measured 0.6-1.3 on synthetic
clips). 4:4:4 full-range MJPEG (``write_video(..., "mjpeg")``) decodes bit-identically. (Measured for DALI's CPU
decoder; the GPU decoder's colour conversion is documented as the same BT.601 but was not measured here.)

On the GPU path decoded frames are CUDA ``torch.Tensor`` s (device-to-device copies out of DALI's buffers, no host
round trip), and ``preprocess_video`` keeps them on the GPU.

DALI is imported lazily (about 0.45 s); nothing here needs it unless a DALI backend is selected.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import av
import numpy as np
import torch

from storms_dist.data.sampling import FrameSamplingConfig, sample_frame_indices
from storms_dist.data.video_io import (
    VideoDecodeError,
    VideoInfo,
    _check_file,
    _one_line,
    decode_frames,
    probe_video,
)

Decoder = Literal["auto", "pyav", "dali"]
DECODERS: tuple[str, ...] = ("auto", "pyav", "dali")
Backend = Literal["pyav", "dali-cpu", "dali-gpu"]
Device = Literal["cpu", "gpu"]

# fn.decoders.video docstring (DALI 2.4): "supported by both CPU and Mixed backends: VP8, VP9, MJPEG"; "Mixed backend
# only: AV1, MPEG-4, H.264/AVC, H.265/HEVC". What NVDEC really decodes also depends on the GPU generation (AV1 needs
# Ampere or newer); "auto" falls back to PyAV when DALI fails on a file.
DALI_CPU_CODECS: frozenset[str] = frozenset({"vp8", "vp9", "mjpeg"})
DALI_GPU_CODECS: frozenset[str] = DALI_CPU_CODECS | {"h264", "hevc", "av1", "mpeg4"}

DALI_PYAV_MEAN_ABS_TOLERANCE: float = 2.0
"""Per-frame mean |DALI - PyAV| (uint8 RGB) allowed for 4:2:0 streams: BT.601 + bilinear chroma vs swscale."""

DALI_INSTALL_HINT = "pip install -e '.[dali]' (nvidia-dali-cuda130)"

# ffmpeg decoder names that are not the codec's own name (PyAV reports the decoder it picked)
_CODEC_ALIASES = {"libdav1d": "av1", "libaom-av1": "av1", "av1_cuvid": "av1", "libvpx": "vp8", "libvpx-vp9": "vp9",
                  "h265": "hevc", "h264_cuvid": "h264", "hevc_cuvid": "hevc", "mpeg4_cuvid": "mpeg4"}


# ------------------------------------------------------------------------------------------------ availability


@functools.cache
def dali_available() -> bool:
    """Whether NVIDIA DALI can be imported (the ``dali`` extra). Cached; imports DALI the first time it is True."""
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        return False
    try:
        import nvidia.dali
        import nvidia.dali.fn  # noqa: F401
    except (ImportError, OSError, RuntimeError):  # a broken install (missing CUDA libs, wrong Python) counts as absent
        return False
    return True


def gpu_decode_available() -> bool:
    """DALI installed, a CUDA device visible, and a GPU ("mixed") decoding pipeline builds on it (checked once per
    device: a driver too old for DALI's CUDA 13 build makes "auto" fall back to the CPU paths with a warning)."""
    return torch.cuda.is_available() and dali_available() and _gpu_pipeline_builds(torch.cuda.current_device())


@functools.cache
def _gpu_pipeline_builds(device_index: int) -> bool:
    try:
        with _PIPELINES_LOCK:
            _single_pipeline("gpu")
    except RuntimeError as e:
        warnings.warn(f"DALI's GPU decoder is unusable on cuda:{device_index} ({_dali_error(e)}); "
                      "decoding on the CPU instead", stacklevel=3)
        return False
    return True


def _require_dali() -> None:
    if not dali_available():
        raise RuntimeError(f"NVIDIA DALI is not installed (or fails to import); install it with {DALI_INSTALL_HINT}, "
                           "or set data.decoder to 'pyav' or 'auto'")


@functools.lru_cache(maxsize=4096)
def _codec_of(path: str, size: int, mtime_ns: int) -> str:
    try:
        with av.open(path, mode="r") as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{path}: contains no video stream")
            name = container.streams.video[0].codec_context.name
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoDecodeError(f"{path}: cannot open as a video container ({_one_line(e)})") from None
    return _CODEC_ALIASES.get(name, name)


def video_codec(path: str | Path) -> str:
    """Codec of the first video stream (``vp9``, ``h264``, ``mjpeg``, ``hevc``, ``av1``...): container header only."""
    path = Path(path)
    _check_file(path)
    stat = path.stat()
    return _codec_of(str(path), stat.st_size, stat.st_mtime_ns)


def _check_device(device: str) -> Device:
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device: expected 'cpu' or 'gpu', got {device!r}")
    return device


def _supported_codecs(device: Device) -> frozenset[str]:
    return DALI_GPU_CODECS if _check_device(device) == "gpu" else DALI_CPU_CODECS


def dali_can_decode(path: str | Path, device: Device = "cpu") -> bool:
    """Whether DALI is usable on ``device`` here and supports the codec of ``path`` there. False for unreadable files."""
    codecs = _supported_codecs(device)
    if not dali_available() or (device == "gpu" and not torch.cuda.is_available()):
        return False
    try:
        return video_codec(path) in codecs
    except VideoDecodeError:
        return False


def decode_device(decoder: Decoder) -> Device:
    """Where frames decoded under ``decoder`` live: ``gpu`` when it can use DALI's GPU decoder here, else ``cpu``."""
    _check_decoder(decoder)
    return "gpu" if decoder != "pyav" and gpu_decode_available() else "cpu"


def _check_decoder(decoder: str) -> None:
    if decoder not in DECODERS:
        raise ValueError(f"decoder: expected one of {', '.join(DECODERS)}, got {decoder!r}")


def select_backend(path: str | Path, decoder: Decoder = "auto", *, device: Device | None = None) -> Backend:
    """The backend that decodes ``path`` under ``decoder`` (see the module docstring): the one place that decides.

    ``device`` forces DALI's CPU or GPU decoder (default: :func:`decode_device`). ``"dali"`` with a codec DALI cannot
    decode there raises :class:`VideoDecodeError` naming the file; ``"dali"`` without DALI installed raises
    RuntimeError. ``"auto"`` never raises for a broken file (PyAV will).
    """
    _check_decoder(decoder)
    if decoder == "pyav":
        return "pyav"
    if decoder == "dali":
        _require_dali()
    elif not dali_available():
        return "pyav"
    device = decode_device(decoder) if device is None else device
    codecs = _supported_codecs(device)
    try:
        codec = video_codec(path)
    except VideoDecodeError:
        if decoder == "auto":
            return "pyav"
        raise
    if codec in codecs:
        return "dali-gpu" if device == "gpu" else "dali-cpu"
    if decoder == "auto":
        return "pyav"
    raise VideoDecodeError(f"{path}: codec {codec} is not decodable by DALI's {device.upper()} decoder "
                           f"(it has {', '.join(sorted(codecs))}); use data.decoder 'auto' or 'pyav'")


# ------------------------------------------------------------------------------------------------ pipelines


def _num_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _build_pipeline(device: Device, *, batch_size: int, prefetch_queue_depth: int, source: Any = None,
                    num_threads: int | None = None):
    """``encoded bytes + frame indices -> fn.decoders.video`` (cpu or mixed). Fed by name, or by ``source``."""
    from nvidia.dali import fn, pipeline_def, types

    device_id = torch.cuda.current_device() if device == "gpu" else None

    @pipeline_def(batch_size=batch_size, num_threads=num_threads or _num_threads(), device_id=device_id,
                  prefetch_queue_depth=prefetch_queue_depth)
    def video_pipeline():
        if source is None:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        else:
            encoded, frames = fn.external_source(source=source, num_outputs=2, batch=True,
                                                 dtype=[types.UINT8, types.INT32], ndim=[1, 1])
        return fn.decoders.video(encoded, device="mixed" if device == "gpu" else "cpu", frames=frames)

    pipe = video_pipeline()
    pipe.build()
    return pipe


_PIPELINES: dict[tuple, Any] = {}
_PIPELINES_LOCK = threading.Lock()


def _single_pipeline(device: Device):
    """One cached single-video pipeline per (process, device, CUDA device): building one costs ~50 ms."""
    key = (os.getpid(), device, torch.cuda.current_device() if device == "gpu" else None)
    if key not in _PIPELINES:
        _PIPELINES[key] = _build_pipeline(device, batch_size=1, prefetch_queue_depth=1)
    return key, _PIPELINES[key]


def _dali_error(error: BaseException) -> str:
    """DALI's multi-line pipeline error -> the informative part, one line."""
    text = _one_line(error)
    for marker in ("encountered:", "Error in"):
        if marker in text:
            text = text.split(marker, 1)[1].strip()
            break
    return text.split(" C++ context:")[0][:300]


def _to_host(sample) -> np.ndarray:
    return np.array(sample, copy=True)  # DALI reuses its output buffers on the next run


def _to_cuda(samples: list) -> list[torch.Tensor]:
    """Device-to-device copies of DALI GPU samples into new torch tensors, on torch's current stream (so the
    allocator's stream ordering holds); waits for them before DALI may reuse its buffers in its next run."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    stream = torch.cuda.current_stream()
    outs = []
    for sample in samples:
        out = torch.empty(sample.shape(), dtype=torch.uint8, device=torch.device("cuda", torch.cuda.current_device()))
        outs.append(feed_ndarray(sample, out, cuda_stream=stream))
    stream.synchronize()
    return outs


def _gather(frames: np.ndarray | torch.Tensor, inverse: np.ndarray) -> np.ndarray | torch.Tensor:
    if len(inverse) == len(frames) and (inverse == np.arange(len(inverse))).all():  # sorted, no repeats: as is
        return frames
    if isinstance(frames, torch.Tensor):
        return frames[torch.as_tensor(inverse, device=frames.device)]
    return frames[inverse]


# ------------------------------------------------------------------------------------------------ one video


@dataclass
class _Prepared:
    """A request checked and ready for DALI: bytes, sorted unique indices, and how to restore the requested order."""

    path: Path
    indices: list[int]
    info: VideoInfo
    encoded: np.ndarray
    unique: np.ndarray
    inverse: np.ndarray


def _prepare(path: str | Path, indices: Sequence[int] | None, device: Device, *,
             frames_cfg: FrameSamplingConfig | None = None, info: VideoInfo | None = None) -> _Prepared:
    path = Path(path)
    if indices is not None:
        indices = [int(i) for i in indices]
        if any(i < 0 for i in indices):
            raise ValueError(f"decode_frames_dali: frame indices must be >= 0, got {min(indices)}")
    codec = video_codec(path)  # checks the file exists, is regular and non-empty
    if codec not in _supported_codecs(device):
        raise VideoDecodeError(f"{path}: codec {codec} is not decodable by DALI's {device.upper()} decoder "
                               f"(it has {', '.join(sorted(_supported_codecs(device)))})")
    # The frame count comes from PyAV's packet count: DALI pads indices past the end with black frames silently.
    info = info or probe_video(path)
    if indices is None:
        if frames_cfg is None:
            raise ValueError("a request without indices needs a FrameSamplingConfig to sample them")
        indices = sample_frame_indices(info.num_frames, info.fps, frames_cfg)
    if indices and max(indices) >= info.num_frames:
        raise VideoDecodeError(f"{path}: frame {max(indices)} requested but only {info.num_frames} frames decode")
    try:
        encoded = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise VideoDecodeError(f"{path}: cannot read ({_one_line(e)})") from None
    unique, inverse = np.unique(np.asarray(indices, dtype=np.int64), return_inverse=True)
    return _Prepared(path, indices, info, encoded, unique.astype(np.int32), inverse.reshape(-1))


def _check_output(prep: _Prepared, shape: Sequence[int]) -> None:
    expected = (len(prep.unique), prep.info.height, prep.info.width, 3)
    if tuple(shape) != expected:
        raise VideoDecodeError(f"{prep.path}: DALI returned frames shaped {list(shape)}, expected {list(expected)}")


def decode_frames_dali(path: str | Path, indices: Sequence[int], *, device: Device = "cpu",
                       info: VideoInfo | None = None) -> np.ndarray | torch.Tensor:
    """Frames at ``indices`` (any order, duplicates allowed) as ``[len(indices), H, W, 3]`` uint8 RGB, decoded by DALI.

    ``device="cpu"``: DALI's CPU decoder (VP8, VP9, MJPEG), a numpy array. ``device="gpu"``: the mixed (NVDEC)
    decoder, a CUDA tensor on the current device. ``info`` (from ``probe_video``) skips a second probe. Any problem with
    the file raises :class:`VideoDecodeError` with a one-line message naming it.
    """
    _require_dali()
    if device == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("decode_frames_dali(device='gpu') needs a CUDA device; none is visible")
    prep = _prepare(path, indices, device, info=info)
    if not prep.indices:
        empty = np.zeros((0, prep.info.height, prep.info.width, 3), np.uint8)
        return torch.from_numpy(empty).cuda() if device == "gpu" else empty
    with _PIPELINES_LOCK:
        key, pipe = _single_pipeline(device)
        try:
            pipe.feed_input("encoded", [prep.encoded])
            pipe.feed_input("frames", [prep.unique])
            (out,) = pipe.run()
            _check_output(prep, out[0].shape())
            frames = _to_cuda([out[0]])[0] if device == "gpu" else _to_host(out[0])
        except VideoDecodeError:
            raise
        except RuntimeError as e:  # DALI's errors; the pipeline may be unusable afterwards: rebuild it next time
            _PIPELINES.pop(key, None)
            raise VideoDecodeError(f"{prep.path}: DALI {device} decoder failed ({_dali_error(e)})") from None
    return _gather(frames, prep.inverse)


# ------------------------------------------------------------------------------------------------ any backend

_warned_fallback: set[str] = set()


def decode_video_frames(path: str | Path, indices: Sequence[int], decoder: Decoder = "auto", *,
                        info: VideoInfo | None = None) -> np.ndarray | torch.Tensor:
    """Frames at ``indices`` of ``path`` from the backend :func:`select_backend` picks for ``decoder``.

    Frames of one decoder setting always land on one device: when ``decoder`` resolves to the GPU, files decoded by
    PyAV (codecs NVDEC lacks, or an "auto" fallback) are moved to the GPU too.
    """
    backend = select_backend(path, decoder)
    if backend != "pyav":
        device: Device = "gpu" if backend == "dali-gpu" else "cpu"
        try:
            return decode_frames_dali(path, indices, device=device, info=info)
        except VideoDecodeError as e:
            if decoder != "auto":
                raise
            if backend not in _warned_fallback:
                _warned_fallback.add(backend)
                warnings.warn(f"DALI ({backend}) failed, decoding with PyAV instead (warned once): {e}", stacklevel=2)
    frames = decode_frames(path, indices)
    return _pyav_on_device(frames, decode_device(decoder))


def _pyav_on_device(frames: np.ndarray, device: Device) -> np.ndarray | torch.Tensor:
    if device == "gpu":
        return torch.from_numpy(frames).to(torch.device("cuda", torch.cuda.current_device()), non_blocking=False)
    return frames


# ------------------------------------------------------------------------------------------------ loader


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """Rank ``rank``'s share of ``items``: every ``world_size``-th from ``rank`` (disjoint, together complete)."""
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank/world_size: expected 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(items)[rank::world_size]


@dataclass
class DecodedVideo:
    """One result of :class:`DaliVideoLoader`: frames (``[T, H, W, 3]`` uint8) or the error that replaced them."""

    path: Path
    indices: list[int] | None
    frames: np.ndarray | torch.Tensor | None
    info: VideoInfo | None
    backend: Backend | None
    error: VideoDecodeError | None = None


@dataclass
class _Slot:
    """A request's place in a fed batch: decoded by DALI (``prep``), or already finished (``result``)."""

    position: int
    prep: _Prepared | None = None
    result: DecodedVideo | None = None


class _Feeder:
    """``external_source`` callback: the next batch of DALI-decodable requests from ``start`` on.

    Requests DALI will not decode (PyAV backend, broken files) are finished here, in the slot list of the batch they
    fall in, so results come out in request order. DALI calls this ``prefetch_queue_depth`` batches ahead.
    """

    def __init__(self, loader: DaliVideoLoader, start: int):
        self.loader = loader
        self.rewind(start)

    def rewind(self, start: int) -> None:
        self.next_position = start
        self.fed: deque[list[_Slot]] = deque()
        self.trailing: list[_Slot] = []

    def __call__(self):
        loader = self.loader
        slots: list[_Slot] = []
        num_dali = 0
        while self.next_position < len(loader.requests) and num_dali < loader.batch_size:
            slot = loader._resolve(self.next_position)
            self.next_position += 1
            slots.append(slot)
            num_dali += slot.prep is not None
        if num_dali == 0:
            self.trailing = slots
            raise StopIteration
        self.fed.append(slots)
        loader.num_batches_fed += 1
        preps = [s.prep for s in slots if s.prep is not None]
        return [p.encoded for p in preps], [p.unique for p in preps]


class DaliVideoLoader:
    """Prefetching, rank-sharded decoding of many videos with a DALI pipeline; yields :class:`DecodedVideo` in order.

    ``requests`` are ``(path, indices)``; ``indices`` may be None, then the one sampling rule picks them from
    ``frames`` (a :class:`FrameSamplingConfig`) and the probed frame count and fps. This rank gets
    ``shard(requests, rank, world_size)``. Files that :func:`select_backend` sends to DALI go through one background
    pipeline (``batch_size`` videos per run, ``prefetch`` runs ahead); the others are decoded by PyAV in order. A
    broken file gives a result with ``error`` set (it is not raised), so one bad sample does not stop an epoch.

    On the GPU path (``decoder`` resolves to the GPU) every ``frames`` is a CUDA tensor.
    """

    def __init__(self, requests: Sequence[tuple[str | Path, Sequence[int] | None]], *, decoder: Decoder = "auto",
                 frames: FrameSamplingConfig | None = None, rank: int = 0, world_size: int = 1, batch_size: int = 4,
                 prefetch: int = 2, num_threads: int | None = None, device: Device | None = None):
        _check_decoder(decoder)
        if device == "gpu" and not gpu_decode_available():
            raise RuntimeError("DaliVideoLoader(device='gpu') needs DALI and a visible CUDA device")
        if batch_size < 1 or prefetch < 1:
            raise ValueError(f"batch_size and prefetch: expected >= 1, got {batch_size} and {prefetch}")
        normalized = [(Path(p), None if idx is None else [int(i) for i in idx]) for p, idx in requests]
        if frames is None and any(idx is None for _, idx in normalized):
            raise ValueError("requests without indices need frames=FrameSamplingConfig(...)")
        self.requests = shard(normalized, rank, world_size)
        self.decoder, self.frames_cfg = decoder, frames
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.prefetch, self.num_threads = batch_size, prefetch, num_threads
        self.device: Device = decode_device(decoder) if device is None else _check_device(device)
        self.num_batches_fed = 0
        """Batches handed to DALI so far (ahead of what was yielded: the prefetch)."""
        self.num_pipelines_built = 0
        self._pipe = self._feeder = None

    def __len__(self) -> int:
        return len(self.requests)

    def _resolve(self, position: int) -> _Slot:
        path, indices = self.requests[position]
        try:
            backend = select_backend(path, self.decoder, device=self.device)
            if backend == "pyav":
                info = probe_video(path)
                if indices is None:
                    indices = sample_frame_indices(info.num_frames, info.fps, self.frames_cfg)
                frames = _pyav_on_device(decode_frames(path, indices), self.device)
                return _Slot(position, result=DecodedVideo(path, indices, frames, info, "pyav"))
            return _Slot(position, prep=_prepare(path, indices, self.device, frames_cfg=self.frames_cfg))
        except (VideoDecodeError, ValueError) as e:
            error = e if isinstance(e, VideoDecodeError) else VideoDecodeError(f"{path}: {_one_line(e)}")
            return _Slot(position, result=DecodedVideo(path, indices, None, None, None, error))

    def _finish(self, slot: _Slot, frames=None) -> DecodedVideo:
        if slot.result is not None:
            return slot.result
        prep = slot.prep
        return DecodedVideo(prep.path, prep.indices, _gather(frames, prep.inverse), prep.info,
                            "dali-gpu" if self.device == "gpu" else "dali-cpu")

    def _one_by_one(self, slots: list[_Slot]) -> Iterator[DecodedVideo]:
        """After a failed batch: decode its videos singly, so only the broken one becomes an error."""
        for slot in slots:
            if slot.prep is None:
                yield slot.result
                continue
            prep = slot.prep
            try:
                frames = decode_frames_dali(prep.path, prep.indices, device=self.device, info=prep.info)
            except VideoDecodeError as dali_error:
                error = dali_error
            else:
                yield DecodedVideo(prep.path, prep.indices, frames, prep.info,
                                   "dali-gpu" if self.device == "gpu" else "dali-cpu")
                continue
            if self.decoder == "auto":  # same policy as decode_video_frames: PyAV gets a second chance
                try:
                    frames = _pyav_on_device(decode_frames(prep.path, prep.indices), self.device)
                    yield DecodedVideo(prep.path, prep.indices, frames, prep.info, "pyav")
                    continue
                except VideoDecodeError as pyav_error:
                    error = pyav_error
            yield DecodedVideo(prep.path, prep.indices, None, prep.info, None, error)

    def __iter__(self) -> Iterator[DecodedVideo]:
        """One pass (epoch) over this rank's requests. The pipeline is kept for the next pass (``pipe.reset()``)
        and rebuilt only after a decoding error or a pass that was not run to the end."""
        position = 0
        while position < len(self.requests):
            if not any(self._may_use_dali(p) for p in self.requests[position:]):  # nothing for DALI: no pipeline
                for i in range(position, len(self.requests)):
                    yield self._finish(self._resolve(i))
                return
            pipe, feeder = self._pipeline(position)
            failed, finished = False, False
            try:
                while True:
                    try:
                        (out,) = pipe.run()
                    except StopIteration:
                        finished = True
                        for slot in feeder.trailing:
                            yield self._finish(slot)
                        position = len(self.requests)
                        break
                    except RuntimeError:  # a file DALI could not decode: redo that batch singly, restart after it
                        if not feeder.fed:  # not a decoding error (nothing was in flight)
                            raise
                        slots = feeder.fed.popleft()
                        failed = True
                        break
                    slots = feeder.fed.popleft()
                    samples = [out[j] for j in range(len(out))]
                    batch = _to_cuda(samples) if self.device == "gpu" else [_to_host(x) for x in samples]
                    yield from self._batch_results(slots, batch)
            finally:
                if not finished:  # error, or the consumer stopped early: batches are still in flight
                    self._pipe = self._feeder = None
            if failed:
                yield from self._one_by_one(slots)
                position = slots[-1].position + 1

    def _pipeline(self, position: int):
        if self._pipe is not None and position == 0:  # a clean pipeline from the previous pass: rewind it
            self._feeder.rewind(0)
            self._pipe.reset()
        else:
            self._pipe = self._feeder = None  # free the old pipeline's buffers before building a new one
            self._feeder = _Feeder(self, position)
            self._pipe = _build_pipeline(self.device, batch_size=self.batch_size, prefetch_queue_depth=self.prefetch,
                                         source=self._feeder, num_threads=self.num_threads)
            self.num_pipelines_built += 1
        return self._pipe, self._feeder

    def _batch_results(self, slots: list[_Slot], batch: list) -> Iterator[DecodedVideo]:
        j = 0
        for slot in slots:
            frames = None
            if slot.prep is not None:
                frames = batch[j]
                j += 1
                try:
                    _check_output(slot.prep, frames.shape)
                except VideoDecodeError as e:
                    yield DecodedVideo(slot.prep.path, slot.prep.indices, None, slot.prep.info, None, e)
                    continue
            yield self._finish(slot, frames)

    def _may_use_dali(self, request: tuple[Path, list[int] | None]) -> bool:
        if self.decoder == "pyav" or not dali_available():
            return False
        try:
            return select_backend(request[0], self.decoder, device=self.device) != "pyav"
        except VideoDecodeError:
            return False
