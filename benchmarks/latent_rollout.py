"""Stage II step time vs K under DeepSpeed ZeRO-3, with ``deepspeed.gather_latent_passes`` on and off.

A Stage II step runs K+2 decoder passes (prefill, K one-column latent passes on the KV cache, suffix); under ZeRO-3
every pass all-gathers the parameters of each module it calls unless ``deepspeed.gather_latent_passes`` keeps the
decoder gathered from the prefill to the suffix. For every (K, switch) point this script trains real Stage II steps
with exactly what users run::

    python -m storms_dist train configs/demo/synth_quick.yaml --stage 2 --init-from registry --nproc N KEY=VALUE...

(torchrun, N ranks, gloo on CPU / NCCL on GPU), on one small synthetic set generated once (``ensure_synth``), same
data, seed and settings for every point. K = 0 is one pass (``stage2.mode=single``, answer-only SFT): the switch
does nothing there, so its on/off ratio measures the noise. Every job sets three ZeRO-3 knobs so that the micro
backbones really all-gather per module call on CPU, as a large model does on GPUs (each is a flag; the project
defaults are in parentheses):

* ``deepspeed.stage3_param_persistence_threshold=0`` (1e5, ``--persistence-threshold``): no parameter is kept
  resident for being small; at 1e5 nearly all of a micro backbone's parameters would be;
* ``deepspeed.stage3_prefetch_bucket_size=0`` (5e7, ``--prefetch-bucket-size``): once DeepSpeed has recorded the
  module trace (from the second step), it prefetches up to this many parameter elements ahead along the trace and
  keeps a prefetched parameter until its last prefetched use. A whole micro model (~10 M elements, mostly the tied
  embedding) fits in 5e7, so with the default it is gathered in ONE all-gather per step whatever K and the switch;
* ``deepspeed.stage3_max_reuse_distance=0`` (1e9, ``--max-reuse-distance``): a parameter whose next use in the
  trace is within this many elements is not released; 1e9 covers a whole decoder below ~1e9 parameters, i.e. it
  already keeps a small decoder gathered across the K+2 passes.

With the defaults the switch has nothing to do on a small model; these settings measure what it is for (the cost of
re-gathering the decoder per pass, which a multi-billion-parameter decoder pays under the defaults too, since its
reuse distance exceeds 1e9 and one layer fills the prefetch bucket). Also fixed: ``checkpoint.every_steps=0``,
``checkpoint.resume=false``, ``tracking.enabled=false`` (MLflow logging is outside the timed step anyway) and
``data.decoder=pyav`` (no DALI threads competing for the cores).

From each job's ``train_log.jsonl`` it reports the median over the steps after ``--warmup`` of ``step_s`` (the whole
optimizer step: data, forward, backward, optimizer; what the trainer logs), ``forward_s``, ``backward_s``,
``optimizer_s``, ``data_s``, ``tokens_per_s`` (all ranks), ``tflops_per_device`` (storms_dist/train/flops.py) and
``mfu`` (GPU only), then prints a Markdown table K x switch with the on/off ratio.

Separate jobs run minutes apart, so on a shared machine load drift alone can move a ratio by 2x. ``--paired`` adds,
per K, one job (the project's Trainer class under torchrun, same config; not the CLI, because it instruments
DeepSpeed) that runs ``--warmup`` steps and then ``--steps`` pairs of steps with the switch off and on in ABBA order
(DeepSpeed's memo of which parameters each module call releases is keyed by the setting, so each step's setting takes
effect exactly as in a job that keeps it), and counts the
ZeRO-3 all-gather calls and gathered elements per step: the on/off ratio from adjacent steps, and the count that
explains it.

``--hf-trainer-baseline`` also trains the same random-init backbone on the same data with a plain
``transformers.Trainer`` + DeepSpeed ZeRO-3 (the DeepSpeed config the project generates for the K=0 point, K=0
answer-only SFT, vision tower frozen as in Stage II) under torchrun with the same ranks, and reports its tokens/s,
TFLOP/s and MFU with the same FLOPs formula (``FlopsModel``), in the same run of the script.

Backbones: ``qwen2_5_vl-micro`` / ``qwen2_5_vl-tiny`` (registry random-init entries, ``--init-from registry``) and
``qwen2_5_vl-3b-shaped``: Qwen2.5-VL-3B's published dimensions (text: hidden 2048, 36 layers, 16 heads, 2 KV heads,
intermediate 11008; vision: 32 blocks, hidden 1280, out_hidden 2048), random init. The registry has no entry for a
random-init model of that shape (``qwen2_5_vl-3b`` loads the pretrained checkpoint), so the script writes one once:
it builds the config with ``tiny_hf_config`` (the tokenizer's vocabulary and special ids), initialises it in bf16,
``save_pretrained``s it with the tokenizer into ``WORK/init/qwen2_5_vl-3b-shaped``, and trains with
``model.backbone=qwen2_5_vl-3b --init-from that-folder`` (the registry entry then only supplies the family and the
module keys; the weights come from the folder).

The paired job, the HF Trainer job and the 3B init run in ``benchmarks/latent_rollout_workers.py`` (processes this
script launches; they instrument or replace the trainer, the sweep only runs the CLI).

    # CPU, 2 ranks (gloo): the tables in docs/benchmarks.md (~14 min on 2 cores)
    python benchmarks/latent_rollout.py --ks 16,8,4,0 --gather both --nproc 2 --steps 10 --warmup 2 \\
        --backbone qwen2_5_vl-micro --hf-trainer-baseline --paired --out runs/bench_latent_rollout/results.json
    # GPU (one H100/H200 -> 1 rank, NCCL, bf16), with the HF Trainer baseline; split --ks over several calls where a
    # command may run at most 10 minutes (each 3B job spends ~1-2 min loading and partitioning before its steps)
    python benchmarks/latent_rollout.py --ks 0,4,8,16 --gather both --steps 10 --warmup 4 \\
        --backbone qwen2_5_vl-3b-shaped --hf-trainer-baseline --skip-final-save \\
        --work-dir runs/bench_latent_rollout_gpu --out runs/bench_latent_rollout_gpu/results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "demo" / "synth_quick.yaml"
WORKERS = Path(__file__).resolve().with_name("latent_rollout_workers.py")  # the processes this script launches
METRICS = ("step_s", "forward_s", "backward_s", "optimizer_s", "data_s", "samples_per_s", "tokens_per_s",
           "tflops_per_device", "mfu")

# Qwen2.5-VL-3B-Instruct's published config.json, random init (vocabulary: the tokenizer's, latent tokens included)
QWEN25_VL_3B_SHAPE = dict(
    text_config=dict(
        hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6, tie_word_embeddings=True,
        hidden_act="silu", rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                            "mrope_section": [16, 24, 24]},
    ),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                       hidden_act="silu", patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
                       window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, in_channels=3),
    tie_word_embeddings=True,
)

# (registry entry the CLI is given, data settings). Micro/tiny: the test suite's tiny set; 3B: longer videos.
BACKBONES = {
    "qwen2_5_vl-micro": dict(registry="qwen2_5_vl-micro", size=56, frames=8, max_pixels=3136, micro_batch=4,
                             num_train=32),
    "qwen2_5_vl-tiny": dict(registry="qwen2_5_vl-tiny", size=56, frames=8, max_pixels=3136, micro_batch=4,
                            num_train=32),
    # 16 videos: with 1 rank x 4 per step an epoch is 4 steps, so a 4-step warm-up leaves only cached (decoded) data
    "qwen2_5_vl-3b-shaped": dict(registry="qwen2_5_vl-3b", size=224, frames=16, max_pixels=224 * 224, micro_batch=4,
                                 num_train=16, shape=QWEN25_VL_3B_SHAPE),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", default="0,4,8,16", help="comma-separated K values (latent passes); 0 = one pass (SFT)")
    p.add_argument("--gather", choices=("both", "on", "off"), default="both",
                   help="deepspeed.gather_latent_passes setting(s) to measure")
    p.add_argument("--nproc", type=int, default=None,
                   help="ranks per job (default: 2 on CPU, the number of GPUs with CUDA; one rank per GPU)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per job (and step pairs with --paired)")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    p.add_argument("--backbone", choices=tuple(BACKBONES), default="qwen2_5_vl-micro")
    p.add_argument("--micro-batch", type=int, default=None, help="stage2.micro_batch_size (default per backbone)")
    p.add_argument("--max-reuse-distance", type=int, default=0,
                   help="deepspeed.stage3_max_reuse_distance (0 = re-gather every module call; project default 1e9)")
    p.add_argument("--persistence-threshold", type=int, default=0,
                   help="deepspeed.stage3_param_persistence_threshold (0 = nothing stays gathered; project "
                        "default 1e5)")
    p.add_argument("--prefetch-bucket-size", type=int, default=0,
                   help="deepspeed.stage3_prefetch_bucket_size (0 = no prefetch; project default 5e7)")
    p.add_argument("--paired", action="store_true",
                   help="also run, per K, one job that alternates the switch step by step (warm-up, then --steps "
                        "pairs) and counts ZeRO-3 all-gathers per step: an on/off comparison free of load drift")
    p.add_argument("--skip-sweep", action="store_true",
                   help="run only --paired / --hf-trainer-baseline (no CLI jobs per (K, switch) point)")
    p.add_argument("--hf-trainer-baseline", action="store_true",
                   help="also train the same backbone on the same data with transformers.Trainer + ZeRO-3 (K=0)")
    p.add_argument("--skip-final-save", action="store_true",
                   help="kill each job once its last step is logged: skips the untimed end-of-stage checkpoint and "
                        "export (on the 3B: ~45 GB of ZeRO checkpoint + 7 GB export per point)")
    p.add_argument("--keep-outputs", action="store_true", help="keep each job's checkpoints/ and export/")
    p.add_argument("--work-dir", default=str(REPO / "runs" / "bench_latent_rollout"),
                   help="synthetic data, job folders, the 3B-shaped init folder")
    p.add_argument("--out", default=None, help="results JSON (default: WORK/results.json)")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per job before it is killed")
    args = p.parse_args(argv)
    args.ks = [int(k) for k in args.ks.split(",") if k.strip()]
    if not args.ks or min(args.ks) < 0 or max(args.ks) > 16:
        p.error("--ks: expected K values in 0..16 (model.max_latents is 16)")
    if args.warmup >= args.steps:
        p.error("--warmup must be smaller than --steps")
    return args


# ---- environment ----
def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_cores": os.cpu_count(), "gpus": [torch.cuda.get_device_name(i) for i in range(cuda_device_count())]}
    for name in ("deepspeed", "transformers", "accelerate"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / "runs" / "torch_extensions"))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", "1")  # what the pipeline's torchrun launches use
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


# ---- config: the same overrides for every point ----
def common_overrides(args, work: Path) -> list[str]:
    b = BACKBONES[args.backbone]
    data_root = work / "data" / f"s{b['size']}_f{b['frames']}"
    micro = args.micro_batch or b["micro_batch"]
    return [
        f"runs_dir={work / 'jobs'}", "seed=0",
        f"data.root={data_root}", "synth.seed=0", f"synth.num_train={b['num_train']}", "synth.num_val=8",
        "synth.num_test=8",
        f"synth.size={b['size']}", f"synth.num_frames={max(16, b['frames'])}", "synth.workers=1",
        f"data.frames.num_frames={b['frames']}", f"data.frames.max_frames={b['frames']}",
        f"data.max_pixels={b['max_pixels']}", "data.decoder=pyav",
        f"model.backbone={b['registry']}", "optim.warmup_steps=1", "optim.schedule=constant",
        f"stage2.num_steps={args.steps}", f"stage2.micro_batch_size={micro}", f"stage2.log_every={args.steps}",
        "deepspeed.zero_stage=3", f"deepspeed.stage3_param_persistence_threshold={args.persistence_threshold}",
        f"deepspeed.stage3_max_reuse_distance={args.max_reuse_distance}",
        f"deepspeed.stage3_prefetch_bucket_size={args.prefetch_bucket_size}",
        "checkpoint.every_steps=0", "checkpoint.resume=false", "tracking.enabled=false",
    ]


def point_overrides(k: int, gather: str) -> list[str]:
    return [f"name=k{k}_{gather}", f"model.num_latents={k}", f"stage2.num_latents={k}",
            f"stage2.mode={'rollout' if k else 'single'}", f"deepspeed.gather_latent_passes={gather == 'on'}".lower()]


def load_run_config(overrides: list[str]):
    from storms_dist.config import load_config
    from storms_dist.run_config import RunConfig

    return load_config(RunConfig, BASE_CONFIG, overrides)


def ensure_data(args, work: Path) -> Path:
    from storms_dist.pipeline import ensure_synth

    cfg = load_run_config(common_overrides(args, work) + point_overrides(0, "off"))
    return ensure_synth(cfg, progress=False)


def ensure_3b_shaped_init(args, work: Path) -> Path:
    """A random-init Qwen2.5-VL model with the 3B's shape (bf16) + the tokenizer, written once by a subprocess (so
    this process never holds GPU memory while the jobs run)."""
    folder = work / "init" / args.backbone
    if not ((folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file() and
            any(folder.glob("*.safetensors"))):
        subprocess.run([sys.executable, str(WORKERS), "init", str(folder), "--backbone", args.backbone], check=True,
                       cwd=REPO, env=child_env())
    return folder


# ---- running jobs ----
def run_job(command: list[str], log_path: Path, job_dir: Path, *, steps: int, kill_after_last_step: bool,
            timeout: float, env: dict) -> tuple[int, str]:
    """Run one training command in its own session; with ``kill_after_last_step`` the whole session is killed once
    ``job_dir/train_log.jsonl`` has ``steps`` lines (the end-of-stage save is not timed)."""
    train_log = job_dir / "train_log.jsonl"
    with open(log_path, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                   start_new_session=True)
        started = time.monotonic()
        killed = False
        while process.poll() is None:
            time.sleep(1.0)
            if kill_after_last_step and train_log.is_file() and \
                    len(train_log.read_text().splitlines()) >= steps:
                os.killpg(process.pid, signal.SIGKILL)
                killed = True
            elif time.monotonic() - started > timeout:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise TimeoutError(f"{' '.join(command)}: no result after {timeout:.0f} s (log: {log_path})")
        process.wait()
    rc = 0 if killed else process.returncode
    return rc, log_path.read_text()[-4000:]


def summarize(records: list[dict], warmup: int) -> dict:
    kept = records[warmup:]
    out = {"num_steps": len(records), "num_timed": len(kept)}
    for name in METRICS:
        values = [r[name] for r in kept if r.get(name) is not None]
        if values:
            out[name] = statistics.median(values)
            out[f"{name}_min"], out[f"{name}_max"] = min(values), max(values)
    out["loss_first_last"] = [records[0].get("loss"), records[-1].get("loss")] if records else None
    return out


def run_point(args, work: Path, k: int, gather: str, init_from: str, nproc: int) -> dict:
    overrides = common_overrides(args, work) + point_overrides(k, gather)
    cfg = load_run_config(overrides)  # validates before launching
    job_dir = cfg.run_dir / "stage2"
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "storms_dist", "train", str(BASE_CONFIG.relative_to(REPO)), "--stage", "2",
               "--init-from", init_from, "--nproc", str(nproc), *overrides]
    log_path = work / "logs" / f"k{k}_{gather}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    load_start, t0 = loadavg(), time.time()
    print(f"[latent_rollout] K={k} gather_latent_passes={gather}: running ({nproc} ranks)...", flush=True)
    rc, tail = run_job(command, log_path, job_dir, steps=args.steps, kill_after_last_step=args.skip_final_save,
                       timeout=args.timeout, env=child_env())
    if rc != 0:
        raise RuntimeError(f"K={k} gather={gather}: exit code {rc}; last output:\n{tail}")
    records = [json.loads(line) for line in (job_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]
    result = {"k": k, "gather": gather, "wall_s": round(time.time() - t0, 1), "loadavg_start": load_start,
              "loadavg_end": loadavg(), "log": str(log_path), "job_dir": str(job_dir),
              **summarize(records, args.warmup), "per_step_s": [round(r["step_s"], 4) for r in records]}
    if not args.keep_outputs:
        for sub in ("checkpoints", "export"):
            shutil.rmtree(job_dir / sub, ignore_errors=True)
    print(f"[latent_rollout] K={k} gather={gather}: median step {result['step_s']:.3f} s "
          f"(min {result['step_s_min']:.3f}, max {result['step_s_max']:.3f}), load {result['loadavg_end'][0]}",
          flush=True)
    return result


def run_hf_baseline(args, work: Path, init_from: str, nproc: int) -> dict:
    from storms_dist.train.distributed import free_port

    overrides = common_overrides(args, work) + point_overrides(0, "off")
    overrides = [o for o in overrides if not o.startswith("name=")] + ["name=hf_trainer_k0"]
    cfg = load_run_config(overrides)
    out_dir = cfg.run_dir / "hf_trainer"
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    spec = {"overrides": overrides, "init_from": init_from, "steps": args.steps, "out_dir": str(out_dir)}
    (out_dir / "worker.json").write_text(json.dumps(spec, indent=2) + "\n")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", str(WORKERS), "hf", str(out_dir / "worker.json")]
    log_path = work / "logs" / "hf_trainer_k0.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)  # --skip-sweep: no point job made it
    load_start, t0 = loadavg(), time.time()
    print(f"[latent_rollout] HF Trainer + ZeRO-3 baseline (K=0): running ({nproc} ranks)...", flush=True)
    rc, tail = run_job(command, log_path, out_dir, steps=args.steps, kill_after_last_step=False,
                       timeout=args.timeout, env=child_env())
    records = [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()
               if line.strip()] if (out_dir / "train_log.jsonl").is_file() else []
    finished = (out_dir / "summary.json").is_file() and \
        json.loads((out_dir / "summary.json").read_text()).get("steps") == args.steps and len(records) == args.steps
    if rc != 0 and not finished:
        raise RuntimeError(f"HF Trainer baseline: exit code {rc}; last output:\n{tail}")
    if rc != 0:  # every step ran and was logged; only the process exit failed: keep the measurement, say so
        print(f"[latent_rollout] HF Trainer: all {args.steps} steps logged, but the job exited with code {rc} "
              f"after training (log: {log_path}); its timings are kept", flush=True)
    result = {"k": 0, "gather": "n/a", "trainer": "transformers.Trainer", "exit_code": rc,
              "wall_s": round(time.time() - t0, 1),
              "loadavg_start": load_start, "loadavg_end": loadavg(), "log": str(log_path), "job_dir": str(out_dir),
              **summarize(records, args.warmup), "per_step_s": [round(r["step_s"], 4) for r in records]}
    print(f"[latent_rollout] HF Trainer: median step {result['step_s']:.3f} s", flush=True)
    return result


def run_paired(args, work: Path, k: int, init_from: str, nproc: int) -> dict:
    """One job for K that alternates the switch step by step (off, on, on, off, ...) and counts all-gathers: a
    paired comparison that machine-load drift between separate jobs cannot bias. It runs the project's Trainer class
    under torchrun (same config as the CLI points), not the CLI, because it instruments DeepSpeed's coordinator."""
    from storms_dist.train.distributed import free_port

    overrides = common_overrides(args, work) + point_overrides(k, "off")
    overrides = [o for o in overrides if not o.startswith("name=")] + [f"name=paired_k{k}"]
    cfg = load_run_config(overrides)
    out_dir = cfg.run_dir / "paired"
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    spec = {"overrides": overrides, "init_from": init_from, "warmup": args.warmup, "pairs": args.steps,
            "out_dir": str(out_dir)}
    (out_dir / "worker.json").write_text(json.dumps(spec, indent=2) + "\n")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", str(WORKERS), "paired", str(out_dir / "worker.json")]
    log_path = work / "logs" / f"paired_k{k}.log"
    load_start, t0 = loadavg(), time.time()
    print(f"[latent_rollout] K={k}: paired run (switch alternated per step, all-gathers counted)...", flush=True)
    rc, tail = run_job(command, log_path, out_dir, steps=0, kill_after_last_step=False, timeout=args.timeout,
                       env=child_env())
    if rc != 0:
        raise RuntimeError(f"paired run K={k}: exit code {rc}; last output:\n{tail}")
    rows = json.loads((out_dir / "paired.json").read_text())
    result = {"k": k, "wall_s": round(time.time() - t0, 1), "loadavg_start": load_start, "loadavg_end": loadavg(),
              "log": str(log_path), "rows": rows}
    for gather in ("off", "on"):
        timed = [r for r in rows if r["gather"] == gather and not r["warmup"]]
        result[gather] = {name: statistics.median(r[name] for r in timed)
                          for name in ("step_s", "forward_s", "backward_s", "allgather_calls", "numel_gathered")}
        result[gather].update(step_s_min=min(r["step_s"] for r in timed), step_s_max=max(r["step_s"] for r in timed))
    result["ratio_on_off"] = result["on"]["step_s"] / result["off"]["step_s"]
    print(f"[latent_rollout] K={k} paired: off {result['off']['step_s']:.3f} s, on {result['on']['step_s']:.3f} s "
          f"(on/off {result['ratio_on_off']:.2f}); all-gathers/step off {result['off']['allgather_calls']:.0f}, "
          f"on {result['on']['allgather_calls']:.0f}", flush=True)
    return result


# ---- report ----
def fmt(value, digits=3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(results: list[dict], hf: dict | None, counts: list[dict] = ()) -> str:
    by = {(r["k"], r["gather"]): r for r in results}
    ks = sorted({r["k"] for r in results})
    gpu = any("mfu" in r for r in results)
    header = ["K", "passes", "off: step s (min..max)", "on: step s (min..max)", "on/off", "off: fwd / bwd s",
              "on: fwd / bwd s", "tokens/s off / on", "TFLOP/s/dev off / on"]
    if gpu:
        header.append("MFU off / on")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] if results else []

    def cell(r):
        return "–" if r is None else f"{fmt(r['step_s'])} ({fmt(r['step_s_min'])}..{fmt(r['step_s_max'])})"

    for k in ks:
        off, on = by.get((k, "off")), by.get((k, "on"))
        ratio = f"{on['step_s'] / off['step_s']:.2f}" if on and off else "–"
        row = [str(k), str(k + 2 if k else 1), cell(off), cell(on), ratio,
               "–" if off is None else f"{fmt(off['forward_s'])} / {fmt(off['backward_s'])}",
               "–" if on is None else f"{fmt(on['forward_s'])} / {fmt(on['backward_s'])}",
               f"{fmt(off and off.get('tokens_per_s'), 0)} / {fmt(on and on.get('tokens_per_s'), 0)}",
               f"{fmt(off and off.get('tflops_per_device'), 4)} / {fmt(on and on.get('tflops_per_device'), 4)}"]
        if gpu:
            row.append(f"{fmt(off and off.get('mfu'), 3)} / {fmt(on and on.get('mfu'), 3)}")
        lines.append("| " + " | ".join(row) + " |")
    if counts:
        lines += ["", "| K (paired: one job, switch alternated per step) | off: step s (min..max) "
                  "| on: step s (min..max) | on/off | all-gathers / step off / on "
                  "| gathered M elements / step off / on |",
                  "|---|---|---|---|---|---|"]
        for c in sorted(counts, key=lambda c: c["k"]):
            off, on = c["off"], c["on"]
            lines.append(f"| {c['k']} | {cell(off)} | {cell(on)} | {c['ratio_on_off']:.2f} "
                         f"| {off['allgather_calls']:.0f} / {on['allgather_calls']:.0f} "
                         f"| {off['numel_gathered'] / 1e6:.1f} / {on['numel_gathered'] / 1e6:.1f} |")
    if hf is not None:
        # both rows from per-step logs, median over the same timed steps: same units side by side
        lines += ["", "| trainer (K=0, same model, data, ZeRO-3 config) | step s (min..max) | samples/s | tokens/s "
                  "| TFLOP/s/dev" + (" | MFU |" if gpu else " |"), "|---|---|---|---|---|" + ("---|" if gpu else "")]
        for name, r in (("storms Trainer (`storms train`)", by.get((0, "off"))), ("transformers.Trainer", hf)):
            if r is None:
                continue
            row = [name, cell(r), fmt(r.get("samples_per_s"), 2), fmt(r.get("tokens_per_s"), 0),
                   fmt(r.get("tflops_per_device"), 4)]
            if gpu:
                row.append(fmt(r.get("mfu"), 3))
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / "runs" / "torch_extensions"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else work / "results.json"
    gpus = cuda_device_count()
    nproc = args.nproc or (gpus if gpus else 2)
    if gpus and nproc > gpus:
        raise SystemExit(f"--nproc {nproc}: only {gpus} GPU(s); NCCL needs one GPU per rank")
    gathers = ["off", "on"] if args.gather == "both" else [args.gather]
    b = BACKBONES[args.backbone]
    steps_per_epoch = b["num_train"] // ((args.micro_batch or b["micro_batch"]) * nproc)
    if args.warmup < steps_per_epoch:
        print(f"[latent_rollout] note: an epoch is {steps_per_epoch} steps and the warm-up {args.warmup}: timed steps "
              f"{args.warmup + 1}..{steps_per_epoch} still decode their videos (data_s; cached afterwards)", flush=True)

    started = time.time()
    meta = {"date": date.today().isoformat(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": machine(), "backend": "nccl" if gpus else "gloo", "nproc": nproc,
            "backbone": args.backbone, "steps": args.steps, "warmup": args.warmup,
            "overrides": common_overrides(args, work), "loadavg_start": loadavg()}
    print(f"[latent_rollout] load average at start: {meta['loadavg_start']}", flush=True)
    data_root = ensure_data(args, work)
    meta["data_root"] = str(data_root)
    init_from = "registry"
    if "shape" in BACKBONES[args.backbone]:
        init_from = str(ensure_3b_shaped_init(args, work))
        meta["init_from"] = init_from

    results, hf, counts = [], None, []
    for i, k in enumerate([] if args.skip_sweep else args.ks):
        order = gathers if i % 2 == 0 else gathers[::-1]  # interleave: alternate which setting runs first
        for gather in order:
            results.append(run_point(args, work, k, gather, init_from, nproc))
            save(out, meta, results, hf, counts)
    if args.hf_trainer_baseline:
        hf = run_hf_baseline(args, work, init_from, nproc)
        save(out, meta, results, hf, counts)
    if args.paired:
        for k in args.ks:
            counts.append(run_paired(args, work, k, init_from, nproc))
            save(out, meta, results, hf, counts)
    meta["loadavg_end"] = loadavg()
    meta["wall_min"] = round((time.time() - started) / 60, 1)
    save(out, meta, results, hf, counts)
    text = table(results, hf, counts)
    print(f"\nload average: start {meta['loadavg_start']}, end {meta['loadavg_end']}; wall {meta['wall_min']} min\n")
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    print(f"\nresults: {out}")
    return 0


def save(out: Path, meta: dict, results: list[dict], hf: dict | None, counts: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "points": results, "hf_trainer": hf, "paired": counts},
                              indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
