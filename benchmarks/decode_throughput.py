"""Decode throughput (frames/s): PyAV vs DALI's CPU decoder vs DALI's GPU ("mixed", NVDEC) decoder, same files.

Writes its own clips with ``storms_dist.data.video_io.write_video`` (VP9 always; H.264 too when PyAV has libx264:
DALI's CPU decoder lacks H.264, so H.264 rows are PyAV vs DALI GPU only), then decodes every clip with every backend
that can decode it, in two modes:

* ``sampled``: the frames ``sample_frame_indices`` picks (``--sampled`` frames spread over the clip), what training
  decodes;
* ``all``: every frame of the clip.

Backends: ``pyav`` (``decode_frames``, one file at a time), ``dali-cpu`` / ``dali-gpu`` (``decode_frames_dali``, one
file at a time through the cached single-video pipeline, given the ``probe_video`` result as training does), ``dali-cpu-loader`` / ``dali-gpu-loader``
(``DaliVideoLoader``: ``--batch-size`` files per pipeline run, prefetching; one pass is one epoch of the same loader,
which probes every file with PyAV for its frame count and rewinds its pipeline, as a real epoch does). GPU rows run only when CUDA and DALI are
present; the GPU timings include ``torch.cuda.synchronize()``; frames stay on the GPU (no host copy).

frames/s = frames returned / wall time of one pass over all clips; the median of ``--repeats`` passes after one
warm-up pass (which builds the pipelines) is reported, with min..max.

    python benchmarks/decode_throughput.py                          # defaults: 8 clips x 64 frames, 224x224 + 640x360
    python benchmarks/decode_throughput.py --json runs/decode.json  # also write the numbers as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np
import torch

from storms_dist.data.dali import (
    DaliVideoLoader,
    dali_available,
    dali_can_decode,
    decode_frames_dali,
    gpu_decode_available,
)
from storms_dist.data.sampling import FrameSamplingConfig, sample_frame_indices
from storms_dist.data.video_io import (
    SUFFIX_BY_CODEC,
    decode_frames,
    encoder_available,
    probe_video,
    write_video,
)


def make_frames(num_frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """Smooth colour gradients, a moving square and mild noise (so the encoder has real work)."""
    rng = np.random.default_rng(seed)
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    frames[..., 0] = (np.arange(width) * 255 // (width - 1))[None, None, :]
    frames[..., 2] = (np.arange(height) * 255 // (height - 1))[None, :, None]
    frames[..., 1] = (seed * 40) % 256
    side = min(height, width) // 4
    for i in range(num_frames):
        x, y = (width - side) * i // (num_frames - 1), (height - side) * i // (num_frames - 1)
        frames[i, y:y + side, x:x + side] = ((37 * i) % 256, 255 - (23 * i) % 256, 128)
    noise = rng.integers(-6, 7, size=frames.shape, dtype=np.int16)
    return np.clip(frames.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def make_clips(folder: Path, codecs: list[str], sizes: list[tuple[int, int]], num_videos: int, num_frames: int,
               fps: float) -> dict[tuple[str, str], list[Path]]:
    clips = {}
    for codec in codecs:
        for width, height in sizes:
            paths = []
            for k in range(num_videos):
                path = folder / f"{codec}_{width}x{height}_{k}{SUFFIX_BY_CODEC[codec]}"
                if not path.exists():
                    write_video(path, make_frames(num_frames, height, width, seed=k), fps, codec)
                paths.append(path)
            clips[(codec, f"{width}x{height}")] = paths
    return clips


def timed(run: Callable[[], int], repeats: int, sync: bool) -> dict:
    run()  # warm-up: builds pipelines, fills the page cache
    if sync:
        torch.cuda.synchronize()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        num_frames = run()
        if sync:
            torch.cuda.synchronize()
        rates.append(num_frames / (time.perf_counter() - start))
    return {"frames_per_s": statistics.median(rates), "min": min(rates), "max": max(rates), "frames": num_frames}


def backends(requests: list[tuple[Path, list[int]]], infos: list, batch_size: int,
             num_threads: int | None) -> dict[str, Callable]:
    def pyav() -> int:
        return sum(len(decode_frames(p, idx)) for p, idx in requests)

    def single(device: str) -> Callable[[], int]:
        # probe_video's result is passed in, as load_video_inputs does (it probes once for the sampling rule)
        return lambda: sum(len(decode_frames_dali(p, idx, device=device, info=info))
                           for (p, idx), info in zip(requests, infos))

    def loader(device: str) -> Callable[[], int]:
        videos = DaliVideoLoader(requests, decoder="dali", device=device, batch_size=batch_size,
                                 num_threads=num_threads)

        def run() -> int:  # one epoch; the pipeline is built in the warm-up pass and rewound after
            total = 0
            for video in videos:
                if video.error is not None:
                    raise video.error
                total += len(video.frames)
            return total
        return run

    out = {"pyav": pyav}
    for device in ("cpu", "gpu"):
        if all(dali_can_decode(p, device) for p, _ in requests):
            out[f"dali-{device}"] = single(device)
            out[f"dali-{device}-loader"] = loader(device)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="where the clips go (default: a temp folder)")
    parser.add_argument("--codecs", default="vp9,h264", help="comma list from vp9,h264,mjpeg")
    parser.add_argument("--sizes", default="224x224,640x360", help="comma list of WxH")
    parser.add_argument("--num-videos", type=int, default=8)
    parser.add_argument("--num-frames", type=int, default=64)
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--sampled", type=int, default=16, help="frames per clip in the 'sampled' mode")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4, help="videos per DALI pipeline run (loader rows)")
    parser.add_argument("--num-threads", type=int, default=None, help="DALI CPU threads (default min(4, cores))")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    codecs = [c for c in args.codecs.split(",") if c]
    skipped = [c for c in codecs if not encoder_available(c)]
    codecs = [c for c in codecs if c not in skipped]
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",") if s]
    gpu = gpu_decode_available()
    env = {"date": date.today().isoformat(), "python": platform.python_version(), "torch": torch.__version__,
           "cpu_cores": os.cpu_count(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "dali": None}
    if dali_available():
        import nvidia.dali

        env["dali"] = nvidia.dali.__version__
    import av

    env["pyav"] = av.__version__
    print(json.dumps(env))
    if skipped:
        print(f"skipping codecs PyAV cannot encode here: {', '.join(skipped)}")
    if not gpu:
        print("no CUDA device or no DALI: GPU rows are not measured")

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        clips = make_clips(folder, codecs, sizes, args.num_videos, args.num_frames, args.fps)
        sampling = FrameSamplingConfig(fps=None, num_frames=args.sampled, min_frames=2, max_frames=args.sampled)
        results = []
        for (codec, size), paths in clips.items():
            infos = [probe_video(p) for p in paths]
            modes = {"sampled": [(p, sample_frame_indices(i.num_frames, i.fps, sampling)) for p, i in zip(paths, infos)],
                     "all": [(p, list(range(i.num_frames))) for p, i in zip(paths, infos)]}
            for mode, requests in modes.items():
                for name, run in backends(requests, infos, args.batch_size, args.num_threads).items():
                    row = {"codec": codec, "size": size, "mode": mode, "backend": name, "videos": len(paths),
                           **timed(run, args.repeats, sync=name.startswith("dali-gpu"))}
                    results.append(row)
                    print(f"{codec:5s} {size:8s} {mode:7s} {name:16s} {row['frames_per_s']:9.0f} frames/s "
                          f"({row['min']:.0f}..{row['max']:.0f})", flush=True)

    print("\n| codec | size | mode | backend | frames/s (median) | min..max |\n|---|---|---|---|---:|---|")
    for r in results:
        print(f"| {r['codec']} | {r['size']} | {r['mode']} | {r['backend']} | {r['frames_per_s']:.0f} | "
              f"{r['min']:.0f}..{r['max']:.0f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"env": env, "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
