"""Evaluate an export on a manifest split: latent rollout + greedy answer, letter extraction, accuracy and latency."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from storms_dist.config import replace
from storms_dist.data.dataset import DataConfig, LatentCollator, VideoQADataset, predicted_letter
from storms_dist.data.manifest import read_manifest
from storms_dist.data.preprocess import VisionSpec
from storms_dist.eval.metrics import accuracy_by_type
from storms_dist.model.build import latent_token_ids, load_exported, read_latent_settings


@dataclass(kw_only=True)
class EvalConfig:
    split: str = "test"
    batch_size: int = 16
    num_latents: int | None = None
    """K at inference; None = the K the export was trained with. Bounded by model max_latents."""
    max_new_tokens: int = 8
    num_latency_items: int = 32
    """Items timed one at a time (batch size 1) for the per-item latency; 0 skips the latency pass."""
    limit: int | None = None
    """Evaluate only the first N items (smoke runs)."""
    benchmark_num_frames: int = 32
    benchmark_min_pixels: int = 200704
    benchmark_max_pixels: int = 602112
    """Public benchmarks: 32 uniform frames and Qwen2.5-VL's per-frame pixel budget (lmms-eval's qwen2_5_vl
    defaults: min 256*28*28, effective max 768*28*28; see docs/benchmarks_eval.md)."""
    benchmark_max_new_tokens: int = 16

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {self.batch_size}")
        if self.num_latents is not None and self.num_latents < 0:
            raise ValueError(f"num_latents: expected >= 0 or null, got {self.num_latents}")


def evaluate(export_dir: str | Path, data_cfg: DataConfig, cfg: EvalConfig, out_dir: str | Path,
             *, progress: bool = False) -> dict:
    """Writes ``predictions.jsonl`` (uid, qtype, prediction, answer, raw, latency_ms) and ``metrics.json``."""
    out_dir = Path(out_dir)
    model, tokenizer, settings = load_exported(export_dir)
    samples = read_manifest(data_cfg.manifest_path(cfg.split))
    records, num_latents, latency_ms = generate_answers(model, tokenizer, settings, samples, data_cfg, cfg,
                                                        desc=f"eval {cfg.split}", progress=progress)
    metrics = accuracy_by_type(records)
    metrics.update(split=cfg.split, num_latents=num_latents, export=str(export_dir),
                   latency_ms_per_item=latency_ms,
                   throughput_items_per_s=1000 * len(records) / sum(r["latency_ms"] for r in records))
    write_outputs(out_dir, records, metrics)
    return metrics


def evaluate_benchmark(export_dir: str | Path, benchmark: str, data_root: str | Path, data_cfg: DataConfig,
                       cfg: EvalConfig, out_dir: str | Path, *, progress: bool = False) -> dict:
    """A public benchmark (Video-MME, MVBench, TempCompass, MMVU) with lmms-eval's prompts and scoring and the
    paper's frame / pixel settings (``eval.benchmark_*``). Predictions are written in ``storms score`` format."""
    from storms_dist.data.sampling import FrameSamplingConfig
    from storms_dist.data.video_io import VideoDecodeError, probe_video
    from storms_dist.eval.benchmarks import get_benchmark

    bench = get_benchmark(benchmark)
    items = bench.load(data_root)
    samples = bench.to_samples(items)
    if cfg.limit is not None:
        samples = samples[: cfg.limit]
    unreadable = []
    for sample in samples:  # an unreadable video is a question without a prediction: scored wrong, listed
        try:
            probe_video(sample.video_path)
        except VideoDecodeError as e:
            unreadable.append(str(e))
    samples = [s for s in samples if not any(str(s.video_path) in u for u in unreadable)]
    bench_data_cfg = replace(data_cfg, frames=FrameSamplingConfig(
        fps=None, num_frames=cfg.benchmark_num_frames, min_frames=4, max_frames=cfg.benchmark_num_frames),
        min_pixels=cfg.benchmark_min_pixels, max_pixels=cfg.benchmark_max_pixels, answer_format="letter",
        prompt="verbatim", cache_decoded=False)
    bench_cfg = replace(cfg, max_new_tokens=cfg.benchmark_max_new_tokens)
    model, tokenizer, settings = load_exported(export_dir)
    records, num_latents, latency_ms = generate_answers(model, tokenizer, settings, samples, bench_data_cfg,
                                                        bench_cfg, desc=f"eval {benchmark}", progress=progress)
    predictions = {r["uid"]: r["raw"] for r in records}
    scored = [item for item in items if item.uid in predictions] if cfg.limit is not None else items
    metrics = bench.score(scored, predictions)
    metrics.update(num_latents=num_latents, export=str(export_dir), latency_ms_per_item=latency_ms,
                   unreadable_videos=unreadable, settings={"num_frames": cfg.benchmark_num_frames, "min_pixels": cfg.benchmark_min_pixels,
                             "max_pixels": cfg.benchmark_max_pixels, "max_new_tokens": cfg.benchmark_max_new_tokens})
    write_outputs(Path(out_dir), [{"uid": r["uid"], "prediction": r["raw"], "latency_ms": r["latency_ms"]}
                                  for r in records], metrics)
    return metrics


def write_outputs(out_dir: Path, records: list[dict], metrics: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "predictions.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


@torch.no_grad()
def generate_answers(model, tokenizer, settings: dict, samples, data_cfg: DataConfig, cfg: EvalConfig, *,
                     desc: str, progress: bool) -> tuple[list[dict], int, float | None]:
    """Latent rollout + greedy answer for every sample: (records, K used, median per-item latency in ms)."""
    from tqdm import tqdm

    model.eval()
    num_latents = settings["num_latents"] if cfg.num_latents is None else cfg.num_latents
    if num_latents > settings["max_latents"]:
        raise ValueError(f"eval.num_latents: {num_latents} exceeds the model's max_latents ({settings['max_latents']})")
    if cfg.limit is not None:
        samples = samples[: cfg.limit]
    spec = VisionSpec.from_hf_config(model.backbone.config)
    dataset = VideoQADataset(samples, tokenizer, spec, data_cfg)
    collate = LatentCollator(latent_token_ids(tokenizer), tokenizer.pad_token_id, num_latents, with_answers=False)
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def answer(items):
        batch, _ = collate(items)
        batch.pop("uids")
        start = time.perf_counter()
        new_ids = model.generate(batch, num_latents=num_latents, eos_token_id=eos_id,
                                 max_new_tokens=cfg.max_new_tokens)
        return new_ids, (time.perf_counter() - start) * 1000

    records = []
    for start in tqdm(range(0, len(dataset), cfg.batch_size), desc=desc, disable=not progress):
        items = [dataset[i] for i in range(start, min(start + cfg.batch_size, len(dataset)))]
        new_ids, batch_ms = answer(items)
        for item, ids in zip(items, new_ids):
            raw = tokenizer.decode(ids, skip_special_tokens=True)
            records.append({"uid": item.sample.uid, "qtype": item.sample.qtype,
                            "prediction": predicted_letter(raw, item.sample.options, data_cfg),
                            "answer": item.sample.answer, "raw": raw, "latency_ms": batch_ms / len(items)})
    latencies = []
    for i in range(min(cfg.num_latency_items, len(dataset))):  # one item at a time: per-item latency
        latencies.append(answer([dataset[i]])[1])
        records[i]["latency_ms"] = latencies[-1]
    return records, num_latents, statistics.median(latencies) if latencies else None


@torch.no_grad()
def answer_one(export_dir: str | Path, video: str | Path, question: str, options: list[str], *,
               data_cfg: DataConfig, num_latents: int | None = None, warm_runs: int = 3) -> dict:
    """``storms infer``: one video + question -> letter, raw text and latency.

    The inputs (export settings, question and options, the video) are checked before the weights load, so a typo
    costs no model load. Latency: ``cold_latency_ms`` is the first ``generate`` call (one-time allocation and
    kernel warm-up included); ``warm_latency_ms`` is the median of ``warm_runs`` more calls on the same input, the
    quantity ``storms eval`` reports as ``latency_ms_per_item``.
    """
    from storms_dist.data.manifest import Sample, letter
    from storms_dist.data.video_io import probe_video

    if warm_runs < 0:
        raise ValueError(f"warm_runs: expected >= 0, got {warm_runs}")
    settings = read_latent_settings(export_dir)
    sample = Sample(uid="infer", video=str(Path(video).resolve()), question=question, options=list(options),
                    answer=letter(0), qtype="infer", thought_video=None, split="test", root=Path("/"))
    probe_video(sample.video_path)  # a missing or unreadable video is a one-line error before the model loads
    model, tokenizer, settings = load_exported(export_dir)
    model.eval()
    k = settings["num_latents"] if num_latents is None else num_latents
    spec = VisionSpec.from_hf_config(model.backbone.config)
    dataset = VideoQADataset([sample], tokenizer, spec, data_cfg)
    collate = LatentCollator(latent_token_ids(tokenizer), tokenizer.pad_token_id, k, with_answers=False)
    batch, _ = collate([dataset[0]])
    batch.pop("uids")
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    latencies = []
    for _ in range(1 + warm_runs):
        start = time.perf_counter()
        new_ids = model.generate(batch, num_latents=k, eos_token_id=eos)
        latencies.append((time.perf_counter() - start) * 1000)
    raw = tokenizer.decode(new_ids[0], skip_special_tokens=True)
    return {"answer": predicted_letter(raw, options, data_cfg), "raw": raw, "num_latents": k,
            "cold_latency_ms": latencies[0],
            "warm_latency_ms": statistics.median(latencies[1:]) if warm_runs else None, "warm_runs": warm_runs}


def format_answer(result: dict) -> str:
    """``storms infer``'s output line."""
    if result["answer"] is None:
        answer = f"none (the model emitted no option letter; raw {result['raw']!r})"
    else:
        answer = f"{result['answer']}  (raw {result['raw']!r})"
    warm = ("" if result["warm_latency_ms"] is None
            else f", warm {result['warm_latency_ms']:.1f} ms (median of {result['warm_runs']})")
    return f"answer: {answer}\nK={result['num_latents']}, latency: cold {result['cold_latency_ms']:.1f} ms " \
           f"(first call){warm}"
