"""Peak memory and step time of one K-step rollout training step at a long prefix: ``model.latent_attention`` off
(HF DynamicCache, today's path) vs the kernel backends, with the K = 0 single pass beside them.

Each point (prefix length, mode, K) runs in its own process: build the registry backbone (random init, fp32 on CPU,
bf16 on CUDA), one batch of ``--batch`` rows whose prompt is ``--prefix`` text tokens (the vision tower runs the
same in every mode, so it is left out: the decoder sees the same prefix length it would with that many visual
tokens), then ``--warmup`` + ``--steps`` forward + backward steps (no optimizer). Reported per point:

* ``step_s``: median wall time of the measured steps;
* ``peak_mib``: CPU: the process's peak resident memory (``VmHWM``, reset through ``/proc/self/clear_refs`` before
  the measured steps) minus the resident memory just before them; CUDA: ``torch.cuda.max_memory_allocated`` minus
  the allocated memory before them;
* ``saved_mib``: the activation bytes autograd keeps for backward (distinct storages seen by
  ``saved_tensors_hooks``, parameters left out), which is exact and load-independent.

    python benchmarks/latent_attention.py --prefix 4096,16384 --num-latents 8 --out runs/bench_latent_attention.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="qwen2_5_vl-tiny", help="registry name (random-init entries)")
    p.add_argument("--prefix", default="4096,16384", help="comma-separated prefix lengths (tokens)")
    p.add_argument("--num-latents", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--modes", default="off,auto", help="comma-separated model.latent_attention values")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-k0", action="store_true", help="skip the K=0 single-pass points")
    p.add_argument("--out", type=Path, default=None, help="JSON results (also prints a Markdown table)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one point, JSON on stdout
    return p.parse_args(argv)


def machine() -> dict:
    import torch

    info = dict(host=platform.node(), cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                torch=torch.__version__, python=platform.python_version(),
                date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), loadavg=list(os.getloadavg()))
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS


def build(backbone: str, prefix: int, num_latents: int, batch: int, mode: str):
    """The model (latent_attention=mode) and one batch with a ``prefix``-token text prompt per row."""
    import torch

    from storms_dist.model.build import (
        ModelConfig,
        build_model,
        build_tokenizer,
        latent_token_ids,
    )
    from storms_dist.model.latent import collate_latent_batch

    tokenizer = build_tokenizer()
    cfg = ModelConfig(backbone=backbone, num_latents=num_latents, attn_implementation="sdpa",
                      latent_attention="off" if num_latents == 0 else mode)
    model = build_model(cfg, tokenizer, seed=0).train()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 5000, (prefix,), generator=gen).tolist() for _ in range(batch)]
    answers = [[int(torch.randint(20, 80, (1,), generator=gen)), tokenizer.convert_tokens_to_ids("<|im_end|>")]
               for _ in range(batch)]
    data, layout = collate_latent_batch(prompts, [[0] * prefix] * batch, answers, num_latents=num_latents,
                                        ids=latent_token_ids(tokenizer), pad_id=tokenizer.pad_token_id)
    return model, {k: v.to(device) if torch.is_tensor(v) else v for k, v in data.items()}, layout, device


def run_point(backbone: str, prefix: int, num_latents: int, batch: int, mode: str, steps: int, warmup: int) -> dict:
    import torch

    torch.manual_seed(0)
    model, data, layout, device = build(backbone, prefix, num_latents, batch, mode)
    forward_mode = "rollout" if num_latents else "single"
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(data, layout, mode=forward_mode)
        out.loss.backward()
        return out.loss.item()

    for _ in range(warmup):
        step()
    model.zero_grad(set_to_none=True)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _rss_mib("VmRSS")
    times, loss = [], None
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else _rss_mib("VmHWM") - base

    storages: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # saved by reference, not activations

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(data, layout, mode=forward_mode)
    del out
    return dict(backbone=backbone, prefix=prefix, num_latents=num_latents, batch=batch,
                mode=mode if num_latents else "k0 (single pass)", device=device.type, step_s=statistics.median(times),
                peak_mib=round(peak, 1), saved_mib=round(sum(storages.values()) / 2**20, 1), loss=loss)


def _worker(args) -> None:
    point = json.loads(args.worker)
    print(json.dumps(run_point(args.backbone, point["prefix"], point["num_latents"], args.batch, point["mode"],
                               args.steps, args.warmup)))


def markdown(results: list[dict]) -> str:
    lines = ["| prefix | K | latent_attention | step s | peak MiB | saved for backward MiB | peak vs K=0 |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    k0 = {r["prefix"]: r for r in results if r["num_latents"] == 0}
    for r in results:
        ratio = f"{r['peak_mib'] / k0[r['prefix']]['peak_mib']:.2f}x" if r["prefix"] in k0 and k0[r["prefix"]][
            "peak_mib"] > 0 else "-"
        lines.append(f"| {r['prefix']} | {r['num_latents']} | {r['mode']} | {r['step_s']:.3f} | {r['peak_mib']:.0f} "
                     f"| {r['saved_mib']:.0f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    # a fixed mmap threshold: glibc otherwise raises it after the first large free and keeps later tensors on the
    # heap, so resident memory would stay at the warm-up's high-water mark and hide the difference being measured
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", MALLOC_MMAP_THRESHOLD_="131072")
    points = []
    for prefix in (int(p) for p in args.prefix.split(",")):
        points += [dict(prefix=prefix, num_latents=args.num_latents, mode=m) for m in args.modes.split(",")]
        if not args.no_k0:
            points.append(dict(prefix=prefix, num_latents=0, mode="off"))
    info, results = machine(), []
    print(f"# {info}", flush=True)
    for point in points:
        cmd = [sys.executable, __file__, "--worker", json.dumps(point), "--backbone", args.backbone,
               "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode:
            print(f"FAILED {point}: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
            results.append(dict(point, error=proc.stderr.strip().splitlines()[-1:]))
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(result)
        print(json.dumps(result), flush=True)
    ok = [r for r in results if "error" not in r]
    print(markdown(ok))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(machine=info, args={k: str(v) for k, v in vars(args).items()},
                                            results=results), indent=2))
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
