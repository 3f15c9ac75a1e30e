"""Everything that needs a GPU, in one command: kernel parity and speed, DALI + video_to_patches vs PyAV + CPU
preprocessing, training throughput / MFU / peak memory with the kernels on and off, HF Trainer + ZeRO-3 beside the
project's trainer, and inference latency (K=8 rollout vs K=0 vs a 256-token textual chain of thought).

    python benchmarks/gpu_suite.py                 # on a GPU machine: installs what it needs, then measures
    python benchmarks/gpu_suite.py --smoke         # CPU-only parts at tiny sizes, a few seconds (also the default
                                                   # without CUDA; tests/test_gpu_suite.py runs it)

Every figure is printed as soon as it is measured and the JSON (``OUT/gpu_suite.json``) and Markdown table
(``OUT/gpu_suite.md``) are rewritten after each one, so a run cut short still leaves its numbers. ``--docs`` also
replaces the block between ``<!-- gpu_suite:begin -->`` and ``<!-- gpu_suite:end -->`` in docs/benchmarks.md.
Sections run in order, each inside ``--budget-s`` (default 480 s = the issue's 8 minutes); a section that fails
records its error and the next one runs. Targets (issue 12) are checked where measured; the table says met / not met.

Install (GPU, unless ``--no-install``): when ``nvidia-smi`` sees a GPU but the installed torch has no CUDA, it
reinstalls torch 2.13.0 from PyPI (the CUDA build; constraints.txt's CPU pin is dropped for this one call), then
``pip install -e '.[triton,dali,liger]'`` (skipped when all of it is already there), and re-runs itself.
flash-attn is built only with ``--flash-attn`` (an nvcc
build of many minutes; the FA2 comparisons are skipped without it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
TARGETS = {  # issue 12; ratio <= or >= the number
    "decode_speedup": (">=", 10.0), "k8_over_k0_step": ("<=", 1.15), "mfu": (">=", 0.45),
    "vs_hf_trainer_tokens": (">=", 1.3), "k8_over_k0_peak_4k": ("<=", 1.1),
}
SIZES = {  # smoke: CPU, seconds; full: one H100/H200
    "smoke": dict(attn=(1, 4, 2, 64, 16), patches=(4, 56, 56), clips=1, clip_frames=8, clip_size=56,
                  frames=4, video_hw=56, prefix=256, new_tokens=16, steps=1, warmup=0),
    "full": dict(attn=(4, 16, 2, 16384, 128), patches=(32, 448, 448), clips=4, clip_frames=64, clip_size=448,
                 frames=32, video_hw=224, prefix=4096, new_tokens=256, steps=3, warmup=2),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU-only parts at tiny sizes (default without CUDA)")
    p.add_argument("--out-dir", type=Path, default=REPO / "runs" / "gpu_suite")
    p.add_argument("--budget-s", type=float, default=480.0, help="skip sections once this much time has passed")
    p.add_argument("--no-install", action="store_true")
    p.add_argument("--flash-attn", action="store_true", help="also pip-install flash-attn (long nvcc build)")
    p.add_argument("--docs", action="store_true", help="write the table into docs/benchmarks.md's gpu_suite block")
    p.add_argument("--skip", default="", help="comma-separated section names to skip")
    return p.parse_args(argv)


def _gpu_visible() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True).returncode == 0


def install(args) -> None:
    """A bare GPU machine: CUDA torch + the project with its kernel and DALI extras, then re-run this script."""
    import importlib.util

    torch_cuda = False
    if importlib.util.find_spec("torch"):
        probe = "import torch, sys; sys.exit(not torch.cuda.is_available())"
        torch_cuda = subprocess.run([sys.executable, "-c", probe],
                                    capture_output=True).returncode == 0
    have = all(importlib.util.find_spec(m) for m in ("storms_dist", "triton", "liger_kernel", "nvidia"))
    if torch_cuda and have and not args.flash_attn:
        print("[install] CUDA torch and the extras are already installed: nothing to install", flush=True)
        return  # also keeps an offline GPU box working
    env = dict(os.environ)
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    if not torch_cuda:
        print("[install] torch without CUDA: installing torch==2.13.0 (CUDA build) from PyPI", flush=True)
        env.pop("PIP_CONSTRAINT", None)
        subprocess.run(pip + ["--force-reinstall", "torch==2.13.0"], check=True, env=env)
    constraints = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
    constraints.write("".join(line for line in (REPO / "constraints.txt").read_text().splitlines(True)
                              if not line.startswith("torch==")))  # the CPU torch pin is for the CPU machines
    constraints.close()
    env["PIP_CONSTRAINT"] = constraints.name
    subprocess.run(pip + ["-e", f"{REPO}[triton,dali,liger]"], check=True, env=env)
    if args.flash_attn:
        subprocess.run(pip + ["--no-build-isolation", "flash-attn"], check=False, env=env)


class Suite:
    def __init__(self, out_dir: Path, smoke: bool, budget_s: float):
        self.out_dir, self.smoke, self.budget_s, self.start = out_dir, smoke, budget_s, time.monotonic()
        self.rows: list[dict] = []
        self.meta: dict = {}
        out_dir.mkdir(parents=True, exist_ok=True)

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def record(self, section: str, name: str, value, unit: str = "", *, target: str | None = None, note: str = ""):
        row = dict(section=section, name=name, value=value, unit=unit, note=note)
        if target is not None and isinstance(value, (int, float)):
            op, bound = TARGETS[target]
            row["target"] = f"{op} {bound}"
            row["met"] = bool(value >= bound if op == ">=" else value <= bound)
        self.rows.append(row)
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        verdict = "" if "met" not in row else f"  (target {row['target']}: {'met' if row['met'] else 'NOT met'})"
        print(f"[{section}] {name} = {shown} {unit}{verdict}{'  ' + note if note else ''}", flush=True)
        self.write()

    def write(self) -> None:
        (self.out_dir / "gpu_suite.json").write_text(json.dumps(dict(meta=self.meta, rows=self.rows), indent=2))
        (self.out_dir / "gpu_suite.md").write_text(self.markdown() + "\n")

    def markdown(self) -> str:
        m = self.meta
        head = (f"Measured {m.get('date')} on {m.get('gpu') or 'CPU only (' + str(m.get('cores')) + ' cores)'}, "
                f"torch {m.get('torch')}, mode {m.get('mode')}, git {m.get('git')}.\n\n")
        lines = ["| section | figure | value | unit | target | note |", "|---|---|---:|---|---|---|"]
        for r in self.rows:
            value = f"{r['value']:.4g}" if isinstance(r["value"], float) else str(r["value"])
            target = "" if "met" not in r else f"{r['target']}: {'met' if r['met'] else '**not met**'}"
            lines.append(f"| {r['section']} | {r['name']} | {value} | {r['unit']} | {target} | {r['note']} |")
        return head + "\n".join(lines)


def _time(fn, *, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` (CUDA-synchronised)."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---- sections ----
def environment(suite: Suite, device) -> None:
    import importlib.util

    import torch

    from storms_dist.kernels._backend import triton_available

    suite.record("environment", "triton importable", triton_available())
    for module in ("flash_attn", "liger_kernel", "nvidia.dali"):
        suite.record("environment", f"{module} installed", importlib.util.find_spec(module.split(".")[0]) is not None)
    if suite.smoke:  # each probe imports transformers + liger in a child: tens of seconds on a loaded 2-core box
        suite.record("environment", "liger Qwen-VL patches", "not probed", note="full mode probes them")
    # Liger's Qwen-VL monkey patches, in a child process (they patch transformers globally when they work)
    for patch in () if suite.smoke else ("apply_liger_kernel_to_qwen2_5_vl", "apply_liger_kernel_to_qwen3_vl"):
        code = f"import liger_kernel.transformers as L; L.{patch}(); print('ok')"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        last = (proc.stdout.strip() or proc.stderr.strip() or "?").splitlines()[-1]
        suite.record("environment", f"liger {patch}", "ok" if last == "ok" else "fails", note=last[:160])
    suite.record("environment", "device", torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu")


def kernel_parity(suite: Suite, device) -> None:
    import torch

    from storms_dist.data.preprocess import VisionSpec
    from storms_dist.kernels.latent_attention import (
        latent_attention,
        latent_attention_reference,
    )
    from storms_dist.kernels.video_to_patches import (
        video_to_patches,
        video_to_patches_reference,
    )

    dtypes = (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32, torch.float16)
    B, H, G, P, D = (1, 4, 2, 33, 16) if suite.smoke else (2, 16, 2, 4096, 128)
    gen = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        make = lambda *s: torch.randn(*s, generator=gen).to(device, dtype).requires_grad_()
        q, kp, vp, kt, vt = make(B, H, 1, D), make(B, G, P, D), make(B, G, P, D), make(B, G, 9, D), make(B, G, 9, D)
        out = latent_attention(q, kp, vp, kt, vt, backend="triton")
        grads = torch.autograd.grad(out.float().sum(), (q, kp, vp, kt, vt))
        ref_in = [t.detach().double().requires_grad_() for t in (q, kp, vp, kt, vt)]
        ref = latent_attention_reference(*ref_in)
        ref_grads = torch.autograd.grad(ref.sum(), ref_in)
        err = max([(out.double() - ref).abs().max().item()] +
                  [(g.double() - r).abs().max().item() for g, r in zip(grads, ref_grads)])
        suite.record("kernel parity", f"latent_attention triton vs fp64 reference, {str(dtype)[6:]}", err,
                     "max abs err (out + grads)")
    spec = VisionSpec.default("qwen2_5_vl")
    frames = torch.randint(0, 256, (5, 56, 84, 3), dtype=torch.uint8, generator=gen).to(device).permute(0, 3, 1, 2)
    ref, _ = video_to_patches_reference(frames, spec)
    for dtype in dtypes:
        got, _ = video_to_patches(frames, spec, out_dtype=dtype, backend="triton")
        suite.record("kernel parity", f"video_to_patches triton vs preprocess.py, {str(dtype)[6:]}",
                     (got.double() - ref.to(dtype).double()).abs().max().item(), "max abs err")


def kernel_speed(suite: Suite, device) -> None:
    import torch
    import torch.nn.functional as F

    from storms_dist.data.preprocess import VisionSpec
    from storms_dist.kernels.latent_attention import latent_attention
    from storms_dist.kernels.video_to_patches import video_to_patches

    B, H, G, P, D = SIZES["smoke" if suite.smoke else "full"]["attn"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    make = lambda *s: torch.randn(*s, device=device, dtype=dtype).requires_grad_()
    q, kp, vp, kt, vt = make(B, H, 1, D), make(B, G, P, D), make(B, G, P, D), make(B, G, 9, D), make(B, G, 9, D)
    shape = f"B={B} H={H} G={G} P={P} D={D} {str(dtype)[6:]}, fwd+bwd"

    def ours(backend):
        return lambda: torch.autograd.grad(latent_attention(q, kp, vp, kt, vt, backend=backend).sum(), (q, kp, vp))

    def sdpa_cat():  # today's path: DynamicCache's cat, then SDPA with GQA
        k, v = torch.cat([kp, kt], 2), torch.cat([vp, vt], 2)
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return torch.autograd.grad(out.sum(), (q, kp, vp))

    backends = ["torch"] + (["triton"] if device.type == "cuda" else [])
    results = {b: _time(ours(b), repeats=5) for b in backends}
    results["sdpa over torch.cat (today)"] = _time(sdpa_cat, repeats=5)
    try:
        from flash_attn import flash_attn_func

        def fa2():
            k, v = torch.cat([kp, kt], 2).transpose(1, 2), torch.cat([vp, vt], 2).transpose(1, 2)
            out = flash_attn_func(q.transpose(1, 2), k, v, causal=True)  # bottom-right causal: the last column
            return torch.autograd.grad(out.sum(), (q, kp, vp))

        if device.type == "cuda":
            results["flash_attn_func over torch.cat"] = _time(fa2, repeats=5)
    except ImportError:
        pass
    for name, seconds in results.items():
        suite.record("kernel speed", f"latent_attention {name}", seconds * 1e3, "ms", note=shape)
    T, Hf, Wf = SIZES["smoke" if suite.smoke else "full"]["patches"]
    frames = torch.randint(0, 256, (T, Hf, Wf, 3), dtype=torch.uint8, device=device).permute(0, 3, 1, 2)
    spec = VisionSpec.default("qwen2_5_vl")
    for backend in backends:
        seconds = _time(lambda: video_to_patches(frames, spec, backend=backend), repeats=5)
        suite.record("kernel speed", f"video_to_patches {backend}", T / seconds, "frames/s", note=f"{T}x{Hf}x{Wf}")


def decode_preprocess(suite: Suite, device) -> None:
    import numpy as np
    import torch

    from storms_dist.data.dali import decode_frames_dali, gpu_decode_available
    from storms_dist.data.preprocess import ResizeConfig, VisionSpec, preprocess_video
    from storms_dist.data.video_io import decode_frames, write_video

    size = SIZES["smoke" if suite.smoke else "full"]
    spec, resize = VisionSpec.default("qwen2_5_vl"), ResizeConfig(min_pixels=28 * 28, max_pixels=448 * 448)
    work = suite.out_dir / "clips"
    work.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    paths, n = [], size["clip_frames"]
    for i in range(size["clips"]):
        path = work / f"clip{i}_{n}x{size['clip_size']}.mp4"
        if not path.is_file():
            base = rng.integers(0, 256, (size["clip_size"], size["clip_size"], 3), dtype=np.uint8)
            frames = np.stack([np.roll(base, 4 * i, axis=1) for i in range(n)])  # a texture sliding sideways
            write_video(path, frames, fps=8.0, codec="h264")
        paths.append(path)
    indices = list(range(n))

    def cpu_path():
        for path in paths:
            preprocess_video(decode_frames(path, indices), spec, resize)

    frames_total = n * len(paths)
    pyav = frames_total / _time(cpu_path, repeats=1 if suite.smoke else 2)
    suite.record("decode + preprocess", "PyAV + CPU preprocess_video", pyav, "frames/s",
                 note=f"{len(paths)} h264 clips")
    if device.type == "cuda" and gpu_decode_available():
        def gpu_path():
            for path in paths:
                preprocess_video(decode_frames_dali(path, indices, device="gpu"), spec, resize)  # kernel: auto

        dali = frames_total / _time(gpu_path, repeats=2)
        suite.record("decode + preprocess", "DALI GPU + video_to_patches", dali, "frames/s")
        suite.record("decode + preprocess", "speed-up", dali / pyav, "x", target="decode_speedup")
    else:
        suite.record("decode + preprocess", "DALI GPU + video_to_patches", "not run", note="needs CUDA + DALI GPU")
    del torch


def _model(suite: Suite, device):
    import torch

    from storms_dist.model.build import (
        ModelConfig,
        build_model,
        build_tokenizer,
        latent_token_ids,
    )
    from storms_dist.model.registry import get_backbone

    tokenizer = build_tokenizer()
    if suite.smoke:
        return build_model(ModelConfig(backbone="qwen2_5_vl-micro", dtype="float32", attn_implementation="sdpa"),
                           tokenizer).to(device), tokenizer, "qwen2_5_vl-micro"
    from latent_rollout import QWEN25_VL_3B_SHAPE

    from storms_dist.model.build import _hf_classes, tiny_hf_config
    from storms_dist.model.registry import BackboneSpec
    from storms_dist.model.storms import STORMSModel

    shaped = BackboneSpec(name="qwen2_5_vl-3b-shaped", family="qwen2_5_vl", tiny_config=QWEN25_VL_3B_SHAPE,
                          vision_keys=("model.visual.",), merger_keys=("model.visual.merger.",))
    config = tiny_hf_config(shaped, tokenizer)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            backbone = _hf_classes("qwen2_5_vl")[1](config)
    finally:
        torch.set_default_dtype(previous)
    return STORMSModel(backbone, get_backbone("qwen2_5_vl-3b"), latent_token_ids(tokenizer)), tokenizer, \
        "Qwen2.5-VL-3B-shaped (random init, bf16)"


def _batch(model, tokenizer, device, *, num_latents, frames, hw, text_prefix=0, with_answer=True):
    """One row: a ``frames``-frame ``hw`` x ``hw`` video (or a ``text_prefix``-token text prompt) + a 2-token answer."""
    import torch

    from storms_dist.model.build import latent_token_ids
    from storms_dist.model.latent import collate_latent_batch

    ids = tokenizer.convert_tokens_to_ids
    gen = torch.Generator().manual_seed(0)
    patch = model.backbone.config.vision_config.patch_size
    grid = (frames // 2, hw // patch, hw // patch)
    if text_prefix:
        prompt, types = torch.randint(10, 5000, (text_prefix,), generator=gen).tolist(), [0] * text_prefix
    else:
        video = [ids("<|vision_start|>")] + [ids("<|video_pad|>")] * (grid[0] * grid[1] * grid[2] // 4) + \
            [ids("<|vision_end|>")]
        prompt = [11, 12, 13] + video + [14, 15]
        types = [2 if t == ids("<|video_pad|>") else 0 for t in prompt]
    answer = [42, ids("<|im_end|>")] if with_answer else []
    batch, layout = collate_latent_batch([prompt], [types], [answer], num_latents=num_latents,
                                         ids=latent_token_ids(tokenizer), pad_id=tokenizer.pad_token_id)
    if not with_answer:
        batch = {k: v[:, : layout.prefix_len] for k, v in batch.items() if k != "labels"}
    if not text_prefix:
        num_patches = grid[0] * grid[1] * grid[2]
        batch["pixel_values_videos"] = torch.randn(num_patches, 3 * 2 * patch * patch, generator=gen)
        batch["video_grid_thw"] = torch.tensor([grid])
    return {k: v.to(device) for k, v in batch.items()}, layout


def training(suite: Suite, device, state: dict) -> None:
    import torch

    from storms_dist.train.flops import FlopsModel, peak_flops_per_device

    size = SIZES["smoke" if suite.smoke else "full"]
    model, tokenizer, name = _model(suite, device)
    state["model"] = (model, tokenizer, name)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    flops = FlopsModel.from_model(model, vision_trained=True)
    peak_flops = peak_flops_per_device()
    kernel = "auto"  # triton on CUDA, the torch reference on CPU
    measured = {}
    for label, num_latents, attention, text_prefix in (
            ("K=0", 0, "off", 0), ("K=8 off", 8, "off", 0), (f"K=8 {kernel}", 8, kernel, 0),
            ("K=0 4k prefix", 0, "off", size["prefix"]), ("K=8 off 4k prefix", 8, "off", size["prefix"]),
            (f"K=8 {kernel} 4k prefix", 8, kernel, size["prefix"])):
        if suite.left_s() < 30:
            suite.record("training", label, "skipped", note="out of budget")
            continue
        model.latent_attention = attention
        batch, layout = _batch(model, tokenizer, device, num_latents=num_latents, frames=size["frames"],
                               hw=size["video_hw"], text_prefix=text_prefix)

        def step():
            optimizer.zero_grad(set_to_none=True)
            out = model(batch, layout, mode="rollout" if num_latents else "single")
            out.loss.backward()
            optimizer.step()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = _time(step, repeats=size["steps"], warmup=size["warmup"])
        tokens = int(batch["attention_mask"].sum())
        num_patches = 0 if text_prefix else int(batch["video_grid_thw"].prod(-1).sum())
        step_flops = flops.step_flops(batch["attention_mask"], 2, num_patches)
        measured[label] = dict(step_s=seconds, tokens_per_s=tokens / seconds)
        note = f"{name}, {tokens} tokens" + ("" if text_prefix else f", {size['frames']} frames")
        suite.record("training", f"{label} step", seconds, "s", note=note)
        suite.record("training", f"{label} tokens/s", tokens / seconds, "tokens/s")
        suite.record("training", f"{label} TFLOP/s", step_flops / seconds / 1e12, "TFLOP/s")
        if peak_flops:
            suite.record("training", f"{label} MFU", step_flops / seconds / peak_flops, "",
                         target="mfu" if label.startswith("K=8") and not text_prefix else None)
        if device.type == "cuda":
            measured[label]["peak"] = torch.cuda.max_memory_allocated() / 2**30
            suite.record("training", f"{label} peak memory", measured[label]["peak"], "GiB")
    model.latent_attention = "off"
    for off_or_kernel in ("off", kernel):
        k8, k0 = measured.get(f"K=8 {off_or_kernel}"), measured.get("K=0")
        if k8 and k0:
            suite.record("training", f"K=8 {off_or_kernel} / K=0 step", k8["step_s"] / k0["step_s"], "x",
                         target="k8_over_k0_step")
        k8, k0 = measured.get(f"K=8 {off_or_kernel} 4k prefix"), measured.get("K=0 4k prefix")
        if k8 and k0 and "peak" in k8:
            suite.record("training", f"K=8 {off_or_kernel} / K=0 peak memory, 4k prefix", k8["peak"] / k0["peak"],
                         "x", target="k8_over_k0_peak_4k")
    state["k0_tokens_per_s"] = measured.get("K=0", {}).get("tokens_per_s")


def inference(suite: Suite, device, state: dict) -> None:
    import torch

    size = SIZES["smoke" if suite.smoke else "full"]
    model, tokenizer, name = state.get("model") or _model(suite, device)
    model.eval()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for label, num_latents, new_tokens, eos in (("K=8 latent rollout + answer", 8, 4, end),
                                                ("K=0 + answer", 0, 4, end),
                                                (f"{size['new_tokens']}-token textual CoT (K=0)", 0,
                                                 size["new_tokens"], -1)):  # eos -1: never stops early
        batch, _ = _batch(model, tokenizer, device, num_latents=num_latents, frames=size["frames"],
                          hw=size["video_hw"], with_answer=False)
        with torch.no_grad():
            seconds = _time(lambda: model.generate(batch, num_latents=num_latents, eos_token_id=eos,
                                                   max_new_tokens=new_tokens), repeats=1 if suite.smoke else 3)
        suite.record("inference", f"{label} latency", seconds, "s/item", note=f"{name}, batch 1")


def hf_trainer(suite: Suite, device, state: dict) -> None:
    """The project's trainer (DeepSpeed ZeRO-3, K=0) and HF Trainer + ZeRO-3 on the same data, via
    benchmarks/latent_rollout.py (its own jobs, same settings)."""
    if device.type != "cuda":
        suite.record("hf trainer", "HF Trainer + ZeRO-3 vs project trainer", "not run", note="GPU only")
        return
    state.pop("model", None)
    import torch

    torch.cuda.empty_cache()
    out = suite.out_dir / "latent_rollout.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "latent_rollout.py"), "--backbone", "qwen2_5_vl-3b-shaped",
           "--ks", "0", "--gather", "on", "--steps", "6", "--warmup", "2", "--hf-trainer-baseline",
           "--skip-final-save", "--work-dir", str(suite.out_dir / "latent_rollout"), "--out", str(out),
           "--timeout", str(max(60, int(suite.left_s())))]
    subprocess.run(cmd, cwd=REPO, timeout=max(60, suite.left_s()), check=False)
    data = json.loads(out.read_text())
    ours = next((p.get("tokens_per_s") for p in data.get("points", []) if p.get("tokens_per_s")), None)
    theirs = (data.get("hf_trainer") or {}).get("tokens_per_s")
    suite.record("hf trainer", "project trainer ZeRO-3 K=0 tokens/s", ours if ours else "n/a", "tokens/s")
    suite.record("hf trainer", "HF Trainer + ZeRO-3 K=0 tokens/s", theirs if theirs else "n/a", "tokens/s")
    if ours and theirs:
        suite.record("hf trainer", "project / HF Trainer tokens/s", ours / theirs, "x", target="vs_hf_trainer_tokens")


SECTIONS = ("environment", "kernel_parity", "kernel_speed", "decode_preprocess", "training", "inference",
            "hf_trainer")


def write_docs(suite: Suite) -> None:
    docs = REPO / "docs" / "benchmarks.md"
    begin, end = "<!-- gpu_suite:begin -->", "<!-- gpu_suite:end -->"
    text = docs.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{docs} has no {begin} ... {end} block to replace")
    head, rest = text.split(begin, 1)
    docs.write_text(head + begin + "\n" + suite.markdown() + "\n" + end + rest.split(end, 1)[1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.smoke and not args.no_install and _gpu_visible():
        install(args)
        return subprocess.run([sys.executable, __file__, "--no-install", *(argv or sys.argv[1:])]).returncode
    import torch

    smoke = args.smoke or not torch.cuda.is_available()
    if not torch.cuda.is_available():  # the Triton kernels then run under the CPU interpreter (parity only)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    suite = Suite(args.out_dir, smoke, args.budget_s)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    suite.meta = dict(date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), host=platform.node(),
                      cores=os.cpu_count(), torch=torch.__version__, mode="smoke (CPU parts)" if smoke else "full",
                      gpu=torch.cuda.get_device_name(0) if device.type == "cuda" else None,
                      git=git.stdout.strip() or "?")
    print(f"# gpu_suite {suite.meta}", flush=True)
    skip, state, failed = set(filter(None, args.skip.split(","))), {}, []
    for section in SECTIONS:
        if section in skip:
            continue
        if suite.left_s() <= 0:
            suite.record(section, "section", "skipped", note="out of budget")
            continue
        fn, started = globals()[section], time.monotonic()
        try:
            fn(suite, device, state) if section in ("training", "inference", "hf_trainer") else fn(suite, device)
        except Exception as e:  # one broken section must not cost the others' numbers
            failed.append(section)
            suite.record(section, "error", f"{type(e).__name__}: {str(e)[:200]}")
        print(f"[{section}] done in {time.monotonic() - started:.1f} s", flush=True)
    suite.write()
    if args.docs:
        write_docs(suite)
    print(suite.markdown(), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
