"""``storms``: the command line. Thin: parse, load the config, call the pipeline.

    storms demo [CONFIG] [--quick] [KEY=VALUE ...]
    storms synth CONFIG [KEY=VALUE ...]
    storms targets CONFIG --init-from EXPORT [--out DIR]
    storms train CONFIG --stage {0,1,2} [--init-from EXPORT] [--nproc N] [KEY=VALUE ...]
    storms eval CONFIG --model EXPORT [--split test] [--out DIR]
    storms export CHECKPOINT --out DIR
    storms infer --model EXPORT --video FILE --question TEXT --options A B C D
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_CONFIG = "configs/demo/synth_panel.yaml"
QUICK_CONFIG = "configs/demo/synth_quick.yaml"


def _config_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument("config", nargs=None if required else "?", default=None if required else DEFAULT_CONFIG,
                        help=f"YAML run config{'' if required else f' (default: {DEFAULT_CONFIG})'}")
    # overrides are collected from the leftover arguments (they may follow options): see main()
    parser.epilog = "Any KEY=VALUE argument is a dotted config override, e.g. optim.lr=3e-4 model.num_latents=4."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="storms",
        description="STORMS: video LVLMs that reason in a bounded continuous latent trajectory "
                    "(thought-video targets -> Stage I -> Stage II -> eval), trained with DeepSpeed.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="run the whole pipeline on the embedded synthetic default and print the report",
                       description="synth -> stage 0 -> targets -> Stage I -> Stage II, plus the baselines (K=0 SFT, "
                                   "Stage I only, Stage II only) with the same budget; eval on the test split; "
                                   "writes report.md/report.png under runs/NAME and logs everything to MLflow.")
    _config_args(p, required=False)
    p.add_argument("--quick", action="store_true", help=f"tiny budget for smoke tests ({QUICK_CONFIG})")
    p.add_argument("--ablation", action="store_true",
                   help="instead of the methods: STORMS with K in 4/8/16 and lambda in 0/0.1/1 from one Stage 0 "
                        "(table + chart in RUN_DIR/ablation, logged to MLflow)")

    p = sub.add_parser("synth", help="generate the synthetic spatial-temporal benchmark with thought videos",
                       description="Render the procedural videos, questions and ground-truth thought videos into "
                                   "data.root (train/val/test + perception manifests). Deterministic by synth.seed.")
    _config_args(p)

    p = sub.add_parser("targets", help="encode thought videos into K pooled Stage I targets (cached, stamped)",
                       description="Encode each train sample's thought video with the frozen vision encoder + merger "
                                   "of EXPORT, pool into K targets, store a stamped safetensors cache.")
    _config_args(p)
    p.add_argument("--init-from", required=True, help="export folder Stage I starts from (e.g. the stage 0 export)")
    p.add_argument("--out", default=None, help="cache folder (default: RUN_DIR/targets)")

    p = sub.add_parser("train", help="train one stage through DeepSpeed",
                       description="Stage 0: perception pre-training of the tiny backbone (embedded default only); "
                                   "1: alignment with thought-video targets + answer CE; 2: answer-only CE through "
                                   "the latent rollout. Writes RUN_DIR/stageN/{checkpoints,export,summary.json}.")
    _config_args(p)
    p.add_argument("--stage", type=int, choices=(0, 1, 2), help="which stage to train")
    p.add_argument("--init-from", default=None,
                   help="export to start from (default: previous stage's export in RUN_DIR; for stage 0 the "
                        "registry backbone); 'registry' = the registry backbone (checkpoint or tiny random init)")
    p.add_argument("--nproc", type=int, default=None, help="local processes (torchrun); overrides nproc")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)  # pipeline-internal: a serialized TrainJob

    p = sub.add_parser("eval", help="evaluate an export on a split: predictions.jsonl + metrics.json",
                       description="Latent rollout + greedy answer for every item of the split; accuracy overall and "
                                   "per question type, per-item latency.")
    _config_args(p)
    p.add_argument("--model", required=True, help="export folder")
    p.add_argument("--split", default=None, help="manifest split (default: eval.split)")
    p.add_argument("--benchmark", default=None,
                   help="a public benchmark instead of a manifest split: videomme, mvbench, tempcompass, mmvu "
                        "(32 frames, Qwen2.5-VL pixel budget, lmms-eval prompts and scoring; needs --data-root)")
    p.add_argument("--data-root", default=None, help="the benchmark's data root (public-release layout)")
    p.add_argument("--out", default=None, help="output folder (default: MODEL/../eval)")

    p = sub.add_parser("export", help="consolidate a (ZeRO-3) training checkpoint into a save_pretrained export",
                       description="Gather the ZeRO-partitioned weights of a stage's checkpoint (any world size, no "
                                   "GPU or engine needed) into a folder transformers loads, plus the latent-token "
                                   "settings. CHECKPOINT is a job's checkpoints/ folder (its latest) or one tag.")
    p.add_argument("checkpoint", help="e.g. runs/NAME/stage2/checkpoints or runs/NAME/stage2/checkpoints/step000040")
    p.add_argument("--out", required=True, help="export folder to write")

    from storms_dist.eval.benchmarks.cli import add_data_parser, add_score_parser
    from storms_dist.launchers.cli import add_launch_parser
    from storms_dist.thoughts.cli import add_thoughts_parser

    add_score_parser(sub)
    add_data_parser(sub)
    add_thoughts_parser(sub)
    add_launch_parser(sub)
    from storms_dist.scale.cli import add_plan_parser, add_study_parser

    add_plan_parser(sub)
    add_study_parser(sub)

    p = sub.add_parser("infer", help="answer one question about one video with the latent rollout",
                       description="Prefill video + question, K latent steps, forced <|latent_end|>, greedy answer.")
    p.add_argument("--model", required=True, help="export folder")
    p.add_argument("--video", default=None, help="video file")
    p.add_argument("--question", default=None)
    p.add_argument("--options", nargs="+", default=None, help="answer options, in order (lettered A, B, ...)")
    p.add_argument("--sample", default=None, metavar="MANIFEST:UID",
                   help="take video, question and options (in the manifest's order) from one manifest line")
    p.add_argument("--num-latents", type=int, default=None, help="K at inference (default: as trained)")
    p.add_argument("--config", default=None, help="run config for frame sampling / pixel budget (default: built-in)")
    p.add_argument("--warm-runs", type=int, default=3,
                   help="generate calls timed after the first (cold) one; their median is the warm latency")
    return parser


def check_tracking_server(tracking, runs_dir: Path) -> None:
    from storms_dist.tracking import check_tracking_server as check

    check(tracking, runs_dir)


class UsageError(Exception):
    """A wrong combination of options: one line, exit status 2 (as argparse's own usage errors)."""


PROJECT_ROOT = Path(__file__).resolve().parents[1]


def resolve_config_path(path: str | None) -> str | None:
    """Config paths are relative to the working directory, else to the project (``configs/...`` from anywhere)."""
    if path is None or Path(path).exists() or not (PROJECT_ROOT / path).exists():
        return path
    return str(PROJECT_ROOT / path)


def load_run_config(path: str | None, overrides: list[str]):
    from storms_dist.config import load_config
    from storms_dist.run_config import RunConfig

    return load_config(RunConfig, resolve_config_path(path), overrides)


def cmd_demo(args) -> int:
    from storms_dist.pipeline import run_demo

    config = QUICK_CONFIG if args.quick and args.config == DEFAULT_CONFIG else args.config
    cfg = load_run_config(config, args.overrides)
    check_tracking_server(cfg.tracking, Path(cfg.runs_dir))  # a server that is down: one line, before any job
    if args.ablation:
        from storms_dist.pipeline import run_ablation

        paths = run_ablation(cfg)
    else:
        paths = run_demo(cfg)
    print(f"\nreport: {paths['markdown']}\nchart:  {paths['chart']}")
    return 0


def cmd_synth(args) -> int:
    from storms_dist.pipeline import ensure_synth

    cfg = load_run_config(args.config, args.overrides)
    root = ensure_synth(cfg)
    print(f"synthetic set ready in {root}")
    return 0


def cmd_targets(args) -> int:
    from storms_dist.data.manifest import read_manifest
    from storms_dist.data.preprocess import VisionSpec
    from storms_dist.model.build import load_exported
    from storms_dist.targets import build_targets

    cfg = load_run_config(args.config, args.overrides)
    model, _, settings = load_exported(args.init_from)
    out = Path(args.out) if args.out else cfg.run_dir / "targets"
    store = build_targets(model, read_manifest(cfg.data.manifest_path("train")),
                          VisionSpec.from_hf_config(model.backbone.config), cfg.data, out,
                          num_latents=cfg.model.num_latents, cfg=cfg.targets, progress=True)
    print(f"{len(store)} thought-video targets (K={cfg.model.num_latents}) in {out}")
    return 0


def cmd_train(args) -> int:
    from storms_dist.pipeline import job_from_json, run_training
    from storms_dist.train.trainer import TrainJob

    cfg = load_run_config(args.config, args.overrides)
    if args.job:
        job = job_from_json(json.loads(Path(args.job).read_text()))
        from storms_dist.train.trainer import Trainer

        trainer = Trainer(cfg, job)  # already under torchrun
        trainer.train()
        return 0
    if args.stage is None:
        raise UsageError("--stage is required (0, 1 or 2)")
    check_tracking_server(cfg.tracking, Path(cfg.runs_dir))
    if args.nproc is not None:
        from storms_dist.config import replace

        cfg = replace(cfg, nproc=args.nproc)
    init_from = None if args.init_from == "registry" else args.init_from
    if args.init_from is None and args.stage > 0:
        init_from = str(cfg.run_dir / f"stage{args.stage - 1}" / "export")
        if not Path(init_from).is_dir():
            raise UsageError(f"--init-from not given and {init_from} does not exist; "
                             f"train stage {args.stage - 1} first or pass --init-from")
    elif init_from is not None and not Path(init_from).is_dir():
        raise UsageError(f"--init-from {init_from}: no such export folder")
    job = TrainJob(name=f"stage{args.stage}", stage=args.stage, stage_cfg=cfg.stage(args.stage),
                   out_dir=cfg.run_dir / f"stage{args.stage}", init_from=init_from,
                   targets_dir=cfg.run_dir / "targets")
    summary = run_training(cfg, job)
    print(json.dumps({k: v for k, v in summary.items() if k != "loss_curve"}, indent=2))
    return 0


def cmd_eval(args) -> int:
    from storms_dist.eval.evaluate import evaluate, evaluate_benchmark

    cfg = load_run_config(args.config, args.overrides)
    if args.benchmark is not None:
        if args.data_root is None:
            raise SystemExit("storms eval: --benchmark needs --data-root")
        out = Path(args.out) if args.out else Path(args.model).parent / f"eval_{args.benchmark}"
        metrics = evaluate_benchmark(args.model, args.benchmark, args.data_root, cfg.data, cfg.eval, out,
                                     progress=True)
        print(json.dumps({k: v for k, v in metrics.items() if k != "details"}, indent=2))
        return 0
    eval_cfg = cfg.eval if args.split is None else type(cfg.eval)(**{**vars(cfg.eval), "split": args.split})
    out = Path(args.out) if args.out else Path(args.model).parent / "eval"
    metrics = evaluate(args.model, cfg.data, eval_cfg, out, progress=True)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_score(args) -> int:
    from storms_dist.eval.benchmarks.cli import cmd_score as score

    return score(args)


def cmd_data(args) -> int:
    from storms_dist.eval.benchmarks.cli import cmd_data as data

    return data(args)


def cmd_thoughts(args) -> int:
    from storms_dist.thoughts.cli import cmd_thoughts as thoughts

    return thoughts(args)


def cmd_launch(args) -> int:
    from storms_dist.launchers.cli import cmd_launch as launch

    return launch(args)


def cmd_export(args) -> int:
    from storms_dist.model.build import export_from_checkpoint

    out = export_from_checkpoint(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} -> {out}")
    return 0


def infer_inputs(args) -> tuple[str, str, list[str]]:
    """(video, question, options) from --sample MANIFEST:UID or from --video/--question/--options."""
    given = [name for name in ("video", "question", "options") if getattr(args, name) is not None]
    if args.sample is None:
        if len(given) < 3:
            missing = sorted({"video", "question", "options"} - set(given))
            raise UsageError(f"pass --sample MANIFEST:UID, or --video, --question and --options "
                             f"(missing: {', '.join('--' + m for m in missing)})")
        return args.video, args.question, args.options
    if given:
        raise UsageError(f"--sample takes video, question and options from the manifest; drop "
                         f"{', '.join('--' + g for g in given)}")
    from storms_dist.data.manifest import read_manifest

    manifest, sep, uid = args.sample.rpartition(":")
    if not sep or not manifest or not uid:
        raise UsageError(f"--sample {args.sample!r}: expected MANIFEST:UID, e.g. data/test.jsonl:synth-test-000000")
    samples = {s.uid: s for s in read_manifest(manifest)}
    if uid not in samples:
        raise UsageError(f"--sample: {manifest} has no uid {uid!r} ({len(samples)} samples)")
    sample = samples[uid]
    return str(sample.video_path), sample.question, list(sample.options)


def cmd_infer(args) -> int:
    from storms_dist.eval.evaluate import answer_one, format_answer

    video, question, options = infer_inputs(args)
    cfg = load_run_config(args.config, args.overrides)
    result = answer_one(args.model, video, question, options, data_cfg=cfg.data,
                        num_latents=args.num_latents, warm_runs=args.warm_runs)
    print(format_answer(result))
    return 0


def _scale(name: str):
    def run(args) -> int:  # storms plan / storms study live in storms_dist/scale/cli.py
        from storms_dist.scale import cli

        return getattr(cli, name)(args)

    return run


COMMANDS = {"demo": cmd_demo, "synth": cmd_synth, "targets": cmd_targets, "train": cmd_train, "eval": cmd_eval,
            "export": cmd_export, "infer": cmd_infer, "score": cmd_score, "data": cmd_data,
            "thoughts": cmd_thoughts, "launch": cmd_launch, "plan": _scale("cmd_plan"), "study": _scale("cmd_study")}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if "=" not in a or a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = extra
    config = getattr(args, "config", None)
    if config is not None and "=" in config and not Path(config).exists():
        # `storms demo KEY=VALUE`: the optional config was omitted and the first override took its place
        args.overrides = [config, *extra]
        args.config = DEFAULT_CONFIG
    from storms_dist.config import ConfigError
    from storms_dist.data.manifest import ManifestError
    from storms_dist.data.video_io import VideoDecodeError
    from storms_dist.tracking import TrackingServerUnavailable

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, FileNotFoundError, ManifestError, VideoDecodeError, UsageError,
            TrackingServerUnavailable) as e:
        print(f"storms {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
