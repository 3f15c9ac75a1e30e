"""``storms score`` and ``storms data check``: argparse wiring for the benchmark data plane.

    storms score --benchmark {videomme,mvbench,tempcompass,mmvu} --data-root DIR --predictions PRED.jsonl
                 [--out FILE] [--details FILE] [--judge-url URL --judge-model NAME [--judge-api-key-env VAR]]
    storms data check --benchmark NAME --data-root DIR [--workers N] [--out FILE]
    storms data convert --format {llava_video,video_r1} IN.json --out OUT.jsonl   (storms_dist/thoughts/cli.py)

The host CLI adds them with ``add_score_parser(sub)`` / ``add_data_parser(sub)`` and dispatches to ``cmd_score`` /
``cmd_data`` (each parser also sets ``handler``). Handlers print one-line errors (``storms score: error: ...``) to
stderr and return 2; ``data check`` returns 1 when videos are missing or unreadable.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from storms_dist.eval.benchmarks import BENCHMARKS
from storms_dist.eval.benchmarks.common import BenchmarkDataError
from storms_dist.eval.benchmarks.judge import Judge, JudgeError, OpenAIJudge


def add_score_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "score", help="score raw model outputs on Video-MME / MVBench / TempCompass / MMVU",
        description="Read PRED.jsonl ({\"uid\": ..., \"prediction\": \"<raw model text>\"} per line), apply the "
                    "benchmark's lmms-eval answer extraction, and print JSON with benchmark, num_questions, accuracy "
                    "(%; a question without a prediction counts as wrong) and breakdown. Judge-only parts "
                    "(TempCompass captioning, MMVU open-ended) need --judge-url/--judge-model; without them they "
                    "are reported under judge_required.")
    p.add_argument("--benchmark", required=True, choices=list(BENCHMARKS))
    p.add_argument("--data-root", required=True, help="the benchmark's public-release folder (see docs)")
    p.add_argument("--predictions", required=True, help="JSONL with uid and prediction per line")
    p.add_argument("--out", default=None, help="also write the summary JSON here")
    p.add_argument("--details", default=None, help="write one JSON line per question (uid, correct, method, "
                                                   "extracted) here")
    p.add_argument("--judge-url", default=None,
                   help="OpenAI-compatible base URL, e.g. https://api.openai.com/v1 or http://localhost:8000/v1")
    p.add_argument("--judge-model", default=None, help="judge model name, e.g. gpt-4o-2024-11-20")
    p.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the judge API key (default: OPENAI_API_KEY; unset: no key)")
    p.add_argument("--judge-workers", type=int, default=8, help="concurrent judge requests (default: 8)")
    p.set_defaults(handler=cmd_score)
    return p


def add_data_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("data", help="benchmark data utilities (check)",
                              description="Utilities for the public benchmark data roots.")
    actions = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check", help="validate a benchmark data root and list missing or unreadable videos",
        description="Load the annotations (every malformed field is a one-line error), then probe every distinct "
                    "video: one line per missing or undecodable file. Exit status 1 when any video is missing or "
                    "unreadable.")
    check.add_argument("--benchmark", required=True, choices=list(BENCHMARKS))
    check.add_argument("--data-root", required=True)
    check.add_argument("--workers", type=int, default=8, help="parallel video probes (default: 8)")
    check.add_argument("--out", default=None, help="also write the report as JSON here")
    p.set_defaults(handler=cmd_data)
    from storms_dist.thoughts.cli import add_convert_parser  # storms data convert (training-set converters)

    add_convert_parser(actions)  # sets its own handler; cmd_data dispatches to it too
    return p


def build_judge(args: argparse.Namespace) -> Judge | None:
    if args.judge_url is None and args.judge_model is None:
        return None
    if args.judge_url is None or args.judge_model is None:
        raise ValueError("--judge-url and --judge-model: expected both or neither")
    return OpenAIJudge(base_url=args.judge_url, model=args.judge_model, api_key_env=args.judge_api_key_env)


def _write_json(path: str, data: Any) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def cmd_score(args: argparse.Namespace) -> int:
    from storms_dist.eval.benchmarks.common import read_predictions

    try:
        benchmark = BENCHMARKS[args.benchmark]
        if args.judge_workers < 1:
            raise ValueError(f"--judge-workers: expected >= 1, got {args.judge_workers}")
        judge = build_judge(args)
        items = benchmark.load(args.data_root)
        predictions = read_predictions(args.predictions)
        summary, scores = benchmark.score_with_details(items, predictions, judge, judge_workers=args.judge_workers)
        if args.out:
            _write_json(args.out, summary)
        if args.details:
            details = Path(args.details)
            details.parent.mkdir(parents=True, exist_ok=True)
            details.write_text("".join(json.dumps(s.to_json_dict(), ensure_ascii=False) + "\n" for s in scores),
                               encoding="utf-8")
    except (BenchmarkDataError, JudgeError, ImportError, OSError, ValueError) as e:
        print(f"storms score: error: {_one_line(e)}", file=sys.stderr)
        return 2
    if summary["unknown_prediction_uids"]:
        print(f"storms score: warning: {summary['unknown_prediction_uids']} prediction uids are not "
              f"{args.benchmark} questions under {args.data_root}", file=sys.stderr)
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "convert":
        from storms_dist.thoughts.cli import cmd_convert

        return cmd_convert(args)
    if args.data_command != "check":  # argparse enforces the choice
        raise SystemExit(f"storms data: unknown action {args.data_command!r}")
    try:
        report = BENCHMARKS[args.benchmark].check(args.data_root, workers=max(1, args.workers))
        if args.out:
            _write_json(args.out, report.to_json_dict())
    except (BenchmarkDataError, ImportError, OSError, ValueError) as e:
        print(f"storms data check: error: {_one_line(e)}", file=sys.stderr)
        return 2
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m storms_dist.eval.benchmarks.cli score ...``) until the host CLI wires these in."""
    parser = argparse.ArgumentParser(prog="storms")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_score_parser(sub)
    add_data_parser(sub)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
