"""Small-video IO on PyAV: atomic encode (VP9/WebM, H.264/MP4, MJPEG/AVI), cheap probing, sparse decoding.

Everything returns or accepts ``uint8`` RGB arrays shaped ``[T, H, W, 3]``. Any problem with a file on disk
(missing, empty, corrupt, undecodable, fewer frames than asked for) raises :class:`VideoDecodeError` with a
one-line message that names the file, so a data loader can catch one exception type and skip the sample.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np

Codec = Literal["vp9", "h264", "mjpeg"]


@dataclass(frozen=True)
class _CodecSpec:
    suffix: str  # the container the codec is written in; the path must end with it
    container_format: str
    encoder: str
    pix_fmt: str
    needs_even_dims: bool  # 4:2:0 chroma subsampling halves both dimensions
    options: dict[str, str]


# Options favour speed (the synthetic frames are tiny) and near-lossless quality, because ball colours are
# the labels of many questions. yuv420p (not 4:4:4) keeps the files decodable by hardware decoders (NVDEC).
_CODECS: dict[str, _CodecSpec] = {
    "vp9": _CodecSpec(
        suffix=".webm",
        container_format="webm",
        encoder="libvpx-vp9",
        pix_fmt="yuv420p",
        needs_even_dims=True,
        options={"deadline": "realtime", "cpu-used": "8", "crf": "10", "b": "0", "lag-in-frames": "0",
                 "threads": "1"},
    ),
    "h264": _CodecSpec(
        suffix=".mp4",
        container_format="mp4",
        encoder="libx264",
        pix_fmt="yuv420p",
        needs_even_dims=True,
        options={"preset": "ultrafast", "crf": "10", "bf": "0", "threads": "1"},
    ),
    "mjpeg": _CodecSpec(
        suffix=".avi",
        container_format="avi",
        encoder="mjpeg",
        pix_fmt="yuvj444p",
        needs_even_dims=False,
        options={"qmin": "1", "qmax": "2", "threads": "1"},
    ),
}

SUFFIX_BY_CODEC: dict[str, str] = {name: spec.suffix for name, spec in _CODECS.items()}


class VideoDecodeError(RuntimeError):
    """A video file is missing, empty, corrupt, undecodable or shorter than requested. One-line message."""


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    height: int
    width: int
    duration_s: float
    declared_num_frames: int | None = None
    """Frames the container header promises (stream frame count, else header duration x fps); None if it says
    nothing. More than ``num_frames`` (the packets actually there) means the file was cut short."""

    @property
    def num_missing_frames(self) -> int:
        """Frames promised but absent; 1 frame of slack for a header duration rounded to the container's clock."""
        if self.declared_num_frames is None or self.declared_num_frames <= self.num_frames + 1:
            return 0
        return self.declared_num_frames - self.num_frames


def encoder_available(codec: Codec) -> bool:
    """Whether PyAV's bundled ffmpeg can encode ``codec`` (libx264 is absent from some builds)."""
    try:
        av.codec.Codec(_CODECS[codec].encoder, "w")
    except (av.FFmpegError, ValueError, KeyError):
        return False
    return True


def _validate_frames(frames: np.ndarray, spec: _CodecSpec, codec: str) -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        raise ValueError(f"write_video: frames must be a uint8 numpy array, got {type(frames).__name__} "
                         f"of dtype {getattr(frames, 'dtype', None)}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"write_video: frames must be shaped [T>=1, H, W, 3] (RGB), got {list(frames.shape)}")
    height, width = frames.shape[1:3]
    if spec.needs_even_dims and (height % 2 or width % 2):
        raise ValueError(f"write_video: {codec} ({spec.pix_fmt}) needs even height and width, got {height}x{width}; "
                         "crop or pad the frames by one pixel")


def write_video(path: str | Path, frames_THWC_uint8: np.ndarray, fps: float, codec: Codec) -> None:
    """Encode ``[T, H, W, 3]`` uint8 RGB frames to ``path`` atomically (temp file in the same folder, then rename).

    The suffix must match the codec: ``.webm`` for vp9, ``.mp4`` for h264, ``.avi`` for mjpeg.
    """
    if codec not in _CODECS:
        raise ValueError(f"write_video: codec {codec!r} is not supported; choose one of {', '.join(_CODECS)}")
    spec = _CODECS[codec]
    path = Path(path)
    if path.suffix.lower() != spec.suffix:
        raise ValueError(f"write_video: {codec} is written as {spec.suffix}, but the path is {path}")
    if not fps > 0:
        raise ValueError(f"write_video: fps must be > 0, got {fps}")
    _validate_frames(frames_THWC_uint8, spec, codec)
    if not encoder_available(codec):
        raise RuntimeError(f"write_video: encoder {spec.encoder} for {codec} is not in PyAV's ffmpeg build; "
                           "use codec 'vp9' or install a PyAV wheel built with it")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.stem}.{os.getpid()}.tmp{spec.suffix}")
    rate = Fraction(fps).limit_denominator(1000)
    height, width = frames_THWC_uint8.shape[1:3]
    try:
        # bitexact: no random Matroska segment UID, so equal frames give byte-identical files (content hashes)
        with av.open(str(tmp_path), mode="w", format=spec.container_format,
                     container_options={"fflags": "+bitexact"}) as container:
            stream = container.add_stream(spec.encoder, rate=rate, options=dict(spec.options))
            stream.width, stream.height, stream.pix_fmt = width, height, spec.pix_fmt
            # Frame pts count frames in the codec's 1/fps time base. Not the stream's: the muxer rewrites
            # stream.time_base when it writes the header (mp4 uses 1/16384), which would scramble timestamps.
            frame_time_base = Fraction(1) / rate
            stream.codec_context.time_base = frame_time_base
            for index, rgb in enumerate(frames_THWC_uint8):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                frame.pts = index
                frame.time_base = frame_time_base
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))  # flush delayed packets
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise VideoDecodeError(f"{path}: video file does not exist")
    if not path.is_file():
        raise VideoDecodeError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise VideoDecodeError(f"{path}: video file is empty (0 bytes)")


def _open(path: Path) -> av.container.InputContainer:
    _check_file(path)
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoDecodeError(f"{path}: cannot open as a video container ({_one_line(e)})") from None
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"{path}: contains no video stream")
    return container


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _frame_rate(stream: av.video.stream.VideoStream) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return float(rate)
    return None


def probe_video(path: str | Path) -> VideoInfo:
    """Frame count, fps and size of a video.

    Frames are counted by demuxing packets (no decoding), because WebM headers carry no frame count; only the first
    frame is decoded, to make sure the stream is decodable at all.
    """
    path = Path(path)
    container = _open(path)
    try:  # read everything while the container is open: PyAV stream objects dangle after close()
        stream = container.streams.video[0]
        fps = _frame_rate(stream)
        declared = _declared_frames(container, stream, fps)
        num_packets = 0
        first_frame = None
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's end-of-stream flush packet
                continue
            num_packets += 1
            if first_frame is None:
                first_frame = next(iter(packet.decode()), None)
        if first_frame is None and num_packets:
            first_frame = next(iter(stream.codec_context.decode(None)), None)  # decoders with a frame delay
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoDecodeError(f"{path}: corrupt video stream ({_one_line(e)})") from None
    finally:
        container.close()
    if first_frame is None:
        raise VideoDecodeError(f"{path}: no decodable video frames")
    if fps is None:
        raise VideoDecodeError(f"{path}: video stream has no frame rate")
    return VideoInfo(num_frames=num_packets, fps=fps, height=first_frame.height, width=first_frame.width,
                     duration_s=num_packets / fps, declared_num_frames=declared)


def _declared_frames(container, stream, fps: float | None) -> int | None:
    """The header's frame count (mp4, avi), else its duration x fps (WebM/Matroska header Duration)."""
    if stream.frames:
        return int(stream.frames)
    if container.duration and fps:
        return round(container.duration / 1_000_000 * fps)  # container.duration is in microseconds
    return None


def decode_frames(path: str | Path, indices: Sequence[int]) -> np.ndarray:
    """Frames at ``indices`` (any order, duplicates allowed) as ``[len(indices), H, W, 3]`` uint8 RGB.

    Decodes sequentially from the start and stops after the largest requested index; only requested frames are
    converted to RGB.
    """
    wanted = [int(i) for i in indices]
    if any(i < 0 for i in wanted):
        raise ValueError(f"decode_frames: frame indices must be >= 0, got {min(wanted)}")
    path = Path(path)
    container = _open(path)
    decoded: dict[int, np.ndarray] = {}
    num_decoded = 0
    try:
        stream = container.streams.video[0]
        if not wanted:
            return np.zeros((0, stream.codec_context.height, stream.codec_context.width, 3), np.uint8)
        wanted_set, last_wanted = set(wanted), max(wanted)
        for frame in container.decode(stream):
            if num_decoded in wanted_set:
                decoded[num_decoded] = frame.to_ndarray(format="rgb24")
            num_decoded += 1
            if num_decoded > last_wanted:
                break
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoDecodeError(f"{path}: decoding failed after {num_decoded} frames ({_one_line(e)})") from None
    finally:
        container.close()
    if num_decoded <= last_wanted:
        raise VideoDecodeError(f"{path}: frame {last_wanted} requested but only {num_decoded} frames decode")
    shapes = {a.shape for a in decoded.values()}
    if len(shapes) > 1:
        raise VideoDecodeError(f"{path}: frame size changes mid-stream ({sorted(shapes)})")
    return np.stack([decoded[i] for i in wanted])
