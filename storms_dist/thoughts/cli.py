"""``storms thoughts`` and ``storms data convert``: argparse wiring.

    storms thoughts --manifest M.jsonl --out DIR --backend {procedural,diffusers,files} [options]
    storms thoughts --manifest M.jsonl --out DIR --merge [--num-shards N] [--drop-failed]
    storms data convert --format {llava_video,video_r1} IN.json --out OUT.jsonl [--video-root DIR] [--split S]

The host CLI adds them with ``add_thoughts_parser(sub)`` (a top-level command) and ``add_convert_parser(actions)``
(an action of ``storms data``); each parser sets ``handler``. Handlers print one-line errors
(``storms thoughts: error: ...``) to stderr and return 2; ``thoughts`` returns 1 when some samples failed
(``--on-error skip``) or the merge could not be done.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from storms_dist.data.convert import FORMATS
from storms_dist.data.manifest import SPLITS
from storms_dist.thoughts.constants import (
    BACKENDS,
    CODECS,
    CONDITIONS,
    DEFAULT_TEMPLATE,
    DTYPES,
    KEYFRAME_METHODS,
    PROMPT_SOURCES,
    TEMPLATE_FIELDS,
)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def add_thoughts_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "thoughts", help="generate thought videos for a training manifest (sharded, resumable)",
        description="For every sample of --manifest: pick keyframes of its clip, make a prompt (template or teacher "
                    "LLM), generate a thought video with the backend, and write OUT/thoughts/... plus "
                    "OUT/<manifest name> with thought_video set (the manifest `storms targets` reads). Shard with "
                    "--shard-index/--num-shards (defaults: Slurm array or torchrun env); finished samples are "
                    "skipped on re-runs; the last shard merges the parts (or run --merge). See docs/thoughts.md.")
    p.add_argument("--manifest", required=True, help="input manifest (JSONL)")
    p.add_argument("--out", required=True, help="output folder (not the manifest's own folder)")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="procedural: re-render synthetic samples from meta.scene; diffusers: image-to-video from "
                        "local weights (--model-dir); files: user-supplied videos (--files-dir)")
    p.add_argument("--merge", action="store_true", help="only merge the finished parts into OUT/<manifest name>")
    p.add_argument("--drop-failed", action="store_true",
                   help="merge even when samples failed; they are left out of the merged manifest")
    g = p.add_argument_group("sharding and resuming")
    g.add_argument("--shard-index", type=int, default=None,
                   help="this shard (default: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, else RANK, else 0)")
    g.add_argument("--num-shards", type=int, default=None,
                   help="number of shards (default: SLURM_ARRAY_TASK_COUNT, else WORLD_SIZE, else 1)")
    g.add_argument("--no-auto-merge", action="store_true", help="do not merge even when every part is there")
    g.add_argument("--overwrite", action="store_true",
                   help="clear OUT's generated files and start over (one process, not from an array)")
    g.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="skip: record a failing sample and go on (retried on the next run); default: raise")
    g.add_argument("--splits", nargs="+", choices=SPLITS, default=None,
                   help="only samples of these splits get thought videos; others pass through (default: all)")
    g = p.add_argument_group("keyframes and prompts")
    g.add_argument("--keyframes", choices=KEYFRAME_METHODS, default="uniform", help="keyframe selection")
    g.add_argument("--num-keyframes", type=int, default=4)
    g.add_argument("--condition", choices=CONDITIONS, default="auto",
                   help="keyframe image-to-video starts from (auto: the teacher's pick, else the first)")
    g.add_argument("--prompt", choices=PROMPT_SOURCES, default="template", help="prompt source")
    g.add_argument("--template", default=DEFAULT_TEMPLATE,
                   help=f"prompt template; fields: {', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}")
    g.add_argument("--teacher-url", default=None, help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    g.add_argument("--teacher-model", default=None, help="teacher model name, e.g. gpt-4o-2024-11-20")
    g.add_argument("--teacher-api-key-env", default="OPENAI_API_KEY",
                   help="environment variable with the teacher API key (unset: no key is sent)")
    g.add_argument("--teacher-no-images", action="store_true", help="send the question only, not the keyframes")
    g.add_argument("--teacher-no-answer", action="store_true", help="do not tell the teacher the correct answer")
    g = p.add_argument_group("diffusers backend")
    g.add_argument("--model-dir", default=None, help="local diffusers image-to-video pipeline folder")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    g.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="weights' dtype on GPU (CPU: float32)")
    g.add_argument("--num-frames", type=int, default=81, help="frames to generate (Wan: 4n+1)")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--max-area", type=int, default=480 * 832,
                   help="pixels when --height/--width are unset (keeps the keyframe's aspect ratio)")
    g.add_argument("--steps", type=int, default=40, help="inference steps")
    g.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--last-image", action="store_true",
                   help="also condition on the last keyframe (pipelines with last_image, e.g. Wan FLF2V)")
    g.add_argument("--cpu-offload", action="store_true", help="enable_model_cpu_offload() (large models, 1 GPU)")
    g = p.add_argument_group("files backend")
    g.add_argument("--files-dir", default=None, help="folder with <uid>.<mp4|webm|avi|mkv|mov>")
    g = p.add_argument_group("output")
    g.add_argument("--codec", choices=CODECS, default=None,
                   help="video codec (default: procedural keeps the synthetic set's, others vp9)")
    g.add_argument("--fps", type=float, default=None, help="frame rate written (default: the generator's)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=cmd_thoughts)
    return p


def build_generator(args: argparse.Namespace):
    from storms_dist.thoughts.generators import DiffusersConfig, DiffusersGenerator, FilesGenerator, ProceduralGenerator

    if args.backend is None:
        raise ValueError("--backend: expected procedural, diffusers or files (or --merge)")
    if args.backend == "procedural":
        return ProceduralGenerator()
    if args.backend == "files":
        if not args.files_dir:
            raise ValueError("--files-dir: required by the files backend")
        return FilesGenerator(args.files_dir)
    if not args.model_dir:
        raise ValueError("--model-dir: required by the diffusers backend (a local pipeline folder; no hub access)")
    return DiffusersGenerator(DiffusersConfig(
        model_dir=args.model_dir, device=args.device, dtype=args.dtype, num_frames=args.num_frames,
        height=args.height, width=args.width, max_area=args.max_area, num_inference_steps=args.steps,
        guidance_scale=args.guidance, negative_prompt=args.negative_prompt, use_last_image=args.last_image,
        cpu_offload=args.cpu_offload, **({"fps": args.fps} if args.fps else {})))


def build_prompt_source(args: argparse.Namespace):
    from storms_dist.eval.benchmarks.judge import OpenAIJudge
    from storms_dist.thoughts.prompts import TeacherPrompt, TemplatePrompt

    if args.prompt == "template":
        return TemplatePrompt(args.template)
    if not args.teacher_url or not args.teacher_model:
        raise ValueError("--teacher-url and --teacher-model: required by --prompt teacher")
    judge = OpenAIJudge(base_url=args.teacher_url, model=args.teacher_model, api_key_env=args.teacher_api_key_env)
    return TeacherPrompt(judge, include_answer=not args.teacher_no_answer, send_images=not args.teacher_no_images)


def cmd_thoughts(args: argparse.Namespace) -> int:
    from storms_dist.data.manifest import ManifestError
    from storms_dist.data.video_io import VideoDecodeError
    from storms_dist.thoughts.pipeline import (
        ThoughtsError,
        ThoughtsSettings,
        merge_thoughts,
        resolve_shard,
        run_thoughts,
    )

    try:
        if args.merge:
            _, count = resolve_shard(0 if args.num_shards is not None else None, args.num_shards)
            merged = merge_thoughts(args.manifest, args.out, count, drop_failed=args.drop_failed)
            dropped = f", {len(merged.dropped)} failed samples left out" if merged.dropped else ""
            print(f"merged {count} parts -> {merged.path} ({merged.num_samples} samples{dropped})")
            return 0
        generator = build_generator(args)
        prompt_source = build_prompt_source(args) if generator.needs_prompt else None
        settings = ThoughtsSettings(keyframes=args.keyframes, num_keyframes=args.num_keyframes,
                                    condition=args.condition, codec=args.codec, fps=args.fps, seed=args.seed,
                                    splits=tuple(args.splits) if args.splits else None, on_error=args.on_error)
        report = run_thoughts(args.manifest, args.out, generator, prompt_source, settings,
                              shard_index=args.shard_index, num_shards=args.num_shards, overwrite=args.overwrite,
                              auto_merge=not args.no_auto_merge, drop_failed=args.drop_failed,
                              progress=not args.no_progress)
    except (ThoughtsError, ManifestError, VideoDecodeError, ValueError, OSError, ImportError) as e:
        print(f"storms thoughts: error: {_one_line(e)}", file=sys.stderr)
        return 2
    for failure in report.failed:
        print(f"failed: {failure}", file=sys.stderr)
    print(report.summary())
    merge_failed = report.merge_note is not None and report.merge_note.startswith("not merged:")
    return 1 if report.failed or merge_failed else 0


# ---------------------------------------------------------------------------------------------------- data convert


def add_convert_parser(actions: Any) -> argparse.ArgumentParser:
    """Add ``convert`` to the actions of ``storms data`` (the subparsers object of the ``data`` parser)."""
    p = actions.add_parser(
        "convert", help="convert a public video-QA training set (LLaVA-Video, Video-R1 json) to a manifest",
        description="Read IN (JSON array or JSONL) in --format and write the multiple-choice questions as a "
                    "manifest (docs/data.md). Non-multiple-choice items are skipped and counted; a malformed item "
                    "stops the conversion with FILE:ITEM: field: expected (or is counted with --on-error skip).")
    p.add_argument("input", metavar="IN.json", help="the dataset's annotation file")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="manifest to write (JSONL)")
    p.add_argument("--video-root", default=None,
                   help="folder the items' video paths are relative to (default: IN's folder)")
    p.add_argument("--split", choices=SPLITS, default="train")
    p.add_argument("--qtype", default=None, help="qtype of every sample (default: the format name)")
    p.add_argument("--uid-prefix", default=None, help="prefix of every uid (default: '<format>-')")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    p.add_argument("--report", default=None, help="also write the counts and errors as JSON here")
    p.set_defaults(handler=cmd_convert)
    return p


def cmd_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from storms_dist.data.convert import ConvertError, convert_file
    from storms_dist.data.manifest import ManifestError

    try:
        report = convert_file(args.input, args.format, args.out, video_root=args.video_root, split=args.split,
                              qtype=args.qtype, uid_prefix=args.uid_prefix, on_error=args.on_error)
        if args.report:
            out = Path(args.report)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"source": report.source, "format": report.format,
                                       "num_items": report.num_items, "num_samples": report.num_samples,
                                       "skipped": dict(report.skipped), "errors": report.errors, "out": args.out},
                                      indent=2) + "\n", encoding="utf-8")
    except (ConvertError, ManifestError, ValueError, OSError) as e:
        print(f"storms data convert: error: {_one_line(e)}", file=sys.stderr)
        return 2
    for message in report.errors[:20]:
        print(f"skipped: {message}", file=sys.stderr)
    if len(report.errors) > 20:
        print(f"skipped: ... {len(report.errors) - 20} more", file=sys.stderr)
    print(report.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m storms_dist.thoughts.cli thoughts ...`` / ``... data convert ...``)."""
    parser = argparse.ArgumentParser(prog="storms")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_thoughts_parser(sub)
    data = sub.add_parser("data", help="data utilities")
    add_convert_parser(data.add_subparsers(dest="data_command", required=True, metavar="ACTION"))
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
