"""Public video-QA benchmarks (Video-MME, MVBench, TempCompass, MMVU): loaders, lmms-eval scoring, data checks.

    from storms_dist.eval.benchmarks import BENCHMARKS, read_predictions, OpenAIJudge

    bench = BENCHMARKS["videomme"]
    items = bench.load("/data/videomme")                # list[BenchItem] (uid, video, question, options, ...)
    samples = bench.to_samples(items)                   # multiple-choice items as storms_dist Samples
    summary = bench.score(items, read_predictions("pred.jsonl"), judge=None)
    report = bench.check("/data/videomme")              # missing / unreadable videos

See docs/benchmarks_eval.md for the layouts, prompts and scoring rules.
"""

from __future__ import annotations

from typing import Final

from storms_dist.eval.benchmarks import mmvu, mvbench, tempcompass, videomme
from storms_dist.eval.benchmarks.common import (
    BenchItem,
    Benchmark,
    BenchmarkDataError,
    CheckReport,
    ItemScore,
    extract_mcq_letter,
    read_predictions,
    strip_reasoning,
    to_samples,
)
from storms_dist.eval.benchmarks.judge import Judge, JudgeError, OpenAIJudge

BENCHMARKS: Final[dict[str, Benchmark]] = {
    "videomme": videomme.BENCHMARK,
    "mvbench": mvbench.BENCHMARK,
    "tempcompass": tempcompass.BENCHMARK,
    "mmvu": mmvu.BENCHMARK,
    # the lmms-eval `videomme_w_subtitle` prompt (subtitles near 32 sampled frames); scoring is Video-MME's
    "videomme_w_subtitle": videomme.BENCHMARK_WITH_SUBTITLES,
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise KeyError(f"benchmark: expected one of {', '.join(BENCHMARKS)}, got {name!r}")
    return BENCHMARKS[name]


__all__ = [
    "BENCHMARKS",
    "BenchItem",
    "Benchmark",
    "BenchmarkDataError",
    "CheckReport",
    "ItemScore",
    "Judge",
    "JudgeError",
    "OpenAIJudge",
    "extract_mcq_letter",
    "get_benchmark",
    "read_predictions",
    "strip_reasoning",
    "to_samples",
]
