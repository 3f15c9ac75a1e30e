"""PyAV video IO: round trips per codec, sparse decoding, probing, and clean errors on broken files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from storms_dist.data.video_io import (
    SUFFIX_BY_CODEC,
    VideoDecodeError,
    decode_frames,
    encoder_available,
    probe_video,
    write_video,
)

NUM_FRAMES, HEIGHT, WIDTH = 12, 48, 64
BLOCK_COLOURS = [(230, 40, 40), (40, 190, 70), (40, 90, 240)]
COLOUR_TOLERANCE = 12  # per channel, in the interior of flat 16x16 blocks (away from 4:2:0 chroma edges)

CODECS = [
    "vp9",
    pytest.param("h264", marks=pytest.mark.skipif(not encoder_available("h264"),
                                                  reason="libx264 is not in this PyAV build's ffmpeg")),
    "mjpeg",
]


def make_frames() -> np.ndarray:
    """Three flat colour blocks, plus a grey block whose level encodes the frame index (10, 30, 50, ...)."""
    frames = np.full((NUM_FRAMES, HEIGHT, WIDTH, 3), 24, dtype=np.uint8)
    for t in range(NUM_FRAMES):
        for k, colour in enumerate(BLOCK_COLOURS):
            frames[t, 8:24, 4 + 20 * k:20 + 20 * k] = colour
        frames[t, 28:44, 8:56] = 10 + 20 * t
    return frames


def frame_index_of(frame: np.ndarray) -> int:
    return round((float(frame[32:40, 16:48].mean()) - 10) / 20)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("videos")
    paths = {}
    for codec in ("vp9", "h264", "mjpeg"):
        if encoder_available(codec):
            paths[codec] = folder / f"clip{SUFFIX_BY_CODEC[codec]}"
            write_video(paths[codec], make_frames(), fps=8.0, codec=codec)
    return paths


@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_keeps_colours_and_frame_count(videos: dict[str, Path], codec: str) -> None:
    decoded = decode_frames(videos[codec], range(NUM_FRAMES))
    assert decoded.shape == (NUM_FRAMES, HEIGHT, WIDTH, 3) and decoded.dtype == np.uint8
    expected = make_frames()
    core = (slice(None), slice(12, 20), slice(None))  # rows inside the colour blocks
    for k, colour in enumerate(BLOCK_COLOURS):
        block = decoded[:, 12:20, 8 + 20 * k:16 + 20 * k].astype(int)
        assert np.abs(block - np.array(colour)).max() <= COLOUR_TOLERANCE, (codec, colour)
    assert np.abs(decoded[core].astype(int) - expected[core]).mean() < 4
    assert [frame_index_of(f) for f in decoded] == list(range(NUM_FRAMES))


@pytest.mark.parametrize("codec", CODECS)
def test_probe_reports_count_fps_size_duration(videos: dict[str, Path], codec: str) -> None:
    info = probe_video(videos[codec])
    assert (info.num_frames, info.height, info.width) == (NUM_FRAMES, HEIGHT, WIDTH)
    assert info.fps == pytest.approx(8.0)
    assert info.duration_s == pytest.approx(NUM_FRAMES / 8.0)


def test_decode_frames_returns_requested_order_with_duplicates(videos: dict[str, Path]) -> None:
    indices = [7, 0, 7, 11, 3, 0]
    decoded = decode_frames(videos["vp9"], indices)
    assert decoded.shape == (len(indices), HEIGHT, WIDTH, 3)
    assert [frame_index_of(f) for f in decoded] == indices
    np.testing.assert_array_equal(decoded[0], decoded[2])


def test_decode_frames_empty_and_negative_indices(videos: dict[str, Path]) -> None:
    assert decode_frames(videos["vp9"], []).shape == (0, HEIGHT, WIDTH, 3)
    with pytest.raises(ValueError, match=">= 0"):
        decode_frames(videos["vp9"], [0, -1])


def test_decode_frames_past_the_end_names_the_file(videos: dict[str, Path]) -> None:
    with pytest.raises(VideoDecodeError, match=rf"clip\.webm: frame {NUM_FRAMES} requested but only {NUM_FRAMES}"):
        decode_frames(videos["vp9"], [0, NUM_FRAMES])


def test_truncated_webm_decodes_its_head_and_fails_cleanly_on_its_tail(videos: dict[str, Path], tmp_path: Path) -> None:
    """decode_frames stops after the largest index: the intact head of a truncated file still decodes."""
    data = videos["vp9"].read_bytes()
    truncated = tmp_path / "truncated.webm"
    truncated.write_bytes(data[: len(data) // 2])
    num_left = probe_video(truncated).num_frames
    assert 0 < num_left < NUM_FRAMES
    assert [frame_index_of(f) for f in decode_frames(truncated, [1, 0])] == [1, 0]
    with pytest.raises(VideoDecodeError, match="truncated.webm"):
        decode_frames(truncated, [NUM_FRAMES - 1])


@pytest.mark.parametrize("codec", ["vp9", "mjpeg"])  # WebM: header duration; AVI: header frame count
def test_probe_sees_a_file_cut_short(videos: dict[str, Path], codec: str, tmp_path: Path) -> None:
    full = probe_video(videos[codec])
    assert full.declared_num_frames == NUM_FRAMES and full.num_missing_frames == 0
    data = videos[codec].read_bytes()
    cut = tmp_path / f"half{SUFFIX_BY_CODEC[codec]}"
    cut.write_bytes(data[: len(data) // 2])
    info = probe_video(cut)
    assert info.declared_num_frames == NUM_FRAMES and 0 < info.num_frames < NUM_FRAMES
    assert info.num_missing_frames == NUM_FRAMES - info.num_frames


def test_a_truncated_video_warns_once_per_file_and_carries_its_missing_frames(videos, tmp_path: Path) -> None:
    import warnings

    from storms_dist.data.dataset import DataConfig, load_video_inputs
    from storms_dist.data.preprocess import VisionSpec

    data = videos["vp9"].read_bytes()
    cut = tmp_path / "half.webm"
    cut.write_bytes(data[: len(data) // 2])
    from storms_dist.data.sampling import FrameSamplingConfig

    spec = VisionSpec.default("qwen2_5_vl")
    cfg = DataConfig(root=str(tmp_path), frames=FrameSamplingConfig(fps=None, num_frames=4, min_frames=4),
                     max_pixels=56 * 56, cache_decoded=False, decoder="pyav")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = load_video_inputs(cut, spec, cfg)
        again = load_video_inputs(cut, spec, cfg)
        whole = load_video_inputs(videos["vp9"], spec, cfg)
    messages = [str(w.message) for w in caught if "truncated video" in str(w.message)]
    assert len(messages) == 1 and messages[0].startswith(f"{cut}: truncated video: ")
    assert first.num_missing_frames == again.num_missing_frames == NUM_FRAMES - probe_video(cut).num_frames > 0
    assert whole.num_missing_frames == 0


def _broken_files(folder: Path, valid: Path) -> dict[str, Path]:
    files = {
        "missing": folder / "missing.webm",
        "empty": folder / "empty.webm",
        "garbage": folder / "garbage.webm",
        "header_only": folder / "header_only.webm",
        "garbage_mp4": folder / "garbage.mp4",
    }
    files["empty"].write_bytes(b"")
    files["garbage"].write_bytes(np.random.default_rng(0).bytes(4000))
    files["header_only"].write_bytes(valid.read_bytes()[:100])
    files["garbage_mp4"].write_bytes(b"\x00\x00\x00\x18ftypisom" + np.random.default_rng(1).bytes(2000))
    return files


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind, message", [
    ("missing", "does not exist"),
    ("empty", "is empty"),
    ("garbage", "cannot open"),
    ("header_only", "cannot open"),
    ("garbage_mp4", "cannot open|no video stream|no decodable"),
])
def test_broken_files_raise_one_line_video_decode_error(videos: dict[str, Path], tmp_path: Path,
                                                        kind: str, message: str) -> None:
    path = _broken_files(tmp_path, videos["vp9"])[kind]
    for read in (probe_video, lambda p: decode_frames(p, [0])):
        with pytest.raises(VideoDecodeError, match=message) as caught:
            read(path)
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_write_rejects_bad_inputs(tmp_path: Path) -> None:
    frames = make_frames()
    with pytest.raises(ValueError, match="even height and width"):
        write_video(tmp_path / "odd.webm", frames[:, :47], 8.0, "vp9")
    with pytest.raises(ValueError, match=r"\.webm"):
        write_video(tmp_path / "clip.mp4", frames, 8.0, "vp9")
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "clip.webm", frames.astype(np.float32), 8.0, "vp9")
    with pytest.raises(ValueError, match=r"\[T>=1, H, W, 3\]"):
        write_video(tmp_path / "clip.webm", frames[..., :2], 8.0, "vp9")
    with pytest.raises(ValueError, match="codec"):
        write_video(tmp_path / "clip.webm", frames, 8.0, "av1")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_mjpeg_accepts_odd_sizes(tmp_path: Path) -> None:
    frames = np.full((3, 33, 35, 3), 120, dtype=np.uint8)
    write_video(tmp_path / "odd.avi", frames, 8.0, "mjpeg")
    assert decode_frames(tmp_path / "odd.avi", [2]).shape == (1, 33, 35, 3)


class _FramesFailingMidway(np.ndarray):
    """Frames whose iteration fails at the third frame, i.e. in the middle of encoding."""

    def __iter__(self):
        for index in range(len(self)):
            if index == 2:
                raise RuntimeError("simulated failure mid-encode")
            yield np.asarray(self[index])


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "clip.webm"
    write_video(path, make_frames(), 8.0, "vp9")
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="mid-encode"):
        write_video(path, make_frames()[::-1].copy().view(_FramesFailingMidway), 8.0, "vp9")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["clip.webm"]


def test_same_frames_give_identical_bytes(tmp_path: Path) -> None:
    """Byte-identical output (no random container ids) is what makes synth content hashes reproducible."""
    write_video(tmp_path / "a.webm", make_frames(), 8.0, "vp9")
    write_video(tmp_path / "b.webm", make_frames(), 8.0, "vp9")
    assert (tmp_path / "a.webm").read_bytes() == (tmp_path / "b.webm").read_bytes()
