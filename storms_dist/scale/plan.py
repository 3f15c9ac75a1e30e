"""``storms plan``: per-GPU memory, communication and a time lower bound for one STORMS training job, without
running it.

Pure and fast: the backbone is built on the meta device (``shapes.py``) and everything else is arithmetic.

- Model states: DeepSpeed's own estimators (``estimate_zero3_model_states_mem_needs`` / ``..._zero2_...``) for
  the trainable parameters. They assume 16-bit training (18 bytes per parameter: 16-bit param + grad, fp32 grad,
  master and two Adam moments). In fp32 (the CPU path) ZeRO keeps a fp32 param, its grad partition, a fp32 master
  clone and two moments (20 bytes), and the gathered largest layer is 8 bytes per parameter instead of 4. Frozen
  parameters (the vision tower by default) hold only their partitioned weights.
- Activations: the tensors a Qwen-VL decoder layer saves for backward, counted per token from the HF modules
  (two RMSNorms: input and normalised; q, k, v after RoPE, repeated to all heads when SDPA runs with a padding
  mask; the attention output and its reshaped copy; SwiGLU: gate, silu, up, product). With activation
  checkpointing: each layer's input plus one layer recomputed.
- The rollout's KV: each of the K latent passes and the suffix pass concatenates the cache (``DynamicCache``
  appends with ``torch.cat``) and the attention saves the grown K/V for backward, so K+1 growing copies stay alive.
- Communication (ZeRO-3): each of the K+2 forward passes gathers the decoder again (one gather with
  ``deepspeed.gather_latent_passes``), backward gathers it once per pass again, gradients are reduce-scattered
  once per micro-batch. hpZ keeps every gather after the first inside the node; qwZ sends int8 weights, qgZ int4
  gradients across nodes.
- Time lower bound: max(FLOPs / (GPUs x peak), inter-node bytes / NIC bandwidth, intra-node bytes / NVLink) --
  perfect overlap, 100% of peak: a bound, not a prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from storms_dist.scale.shapes import Shape, backbone_shape

GiB = 2**30


@dataclass(frozen=True)
class Hardware:
    memory_gib: float
    peak_tflops: float | None
    """Dense bf16 peak (``storms_dist.train.flops.PEAK_TFLOPS_BF16``)."""
    intra_gbps: float
    """GB/s per GPU inside a node (NVLink, one direction)."""
    inter_gbps: float
    """GB/s per GPU across nodes (one 400 Gb/s NIC per GPU = 50 GB/s)."""


def _hardware() -> dict[str, Hardware]:
    from storms_dist.train.flops import PEAK_TFLOPS_BF16 as P

    return {"h100": Hardware(80, P["H100"], 450, 50), "h200": Hardware(141, P["H200"], 450, 50),
            "a100": Hardware(80, P["A100"], 300, 25), "b200": Hardware(180, P["B200"], 900, 50),
            "cpu": Hardware(_local_memory_gib(), None, 10, 1.25)}


def _local_memory_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            return int(next(line for line in f if line.startswith("MemTotal")).split()[1]) / 2**20
    except (OSError, StopIteration):
        return 16.0


GPUS = ("h100", "h200", "a100", "b200", "cpu")

VALIDATION = ("validated on 2-core CPU runs (fp32, ZeRO-3, 1 rank) of qwen2_5_vl-micro/-tiny/-wide/-deep: "
              "predicted peak within {err:.0%} of measured, -2..-7% except a process's first point "
              "(docs/benchmarks.md, 2026-12-01)")
VALIDATED_ERROR = 0.20
"""The largest |planned - measured| / measured the CPU study may show (tests/test_plan.py::test_plan_matches_
measured_peak_memory asserts it on fresh runs)."""

USABLE_FRACTION = 0.92
"""Share of device memory a job may plan for: CUDA context, NCCL buffers and allocator fragmentation take the rest."""


@dataclass(kw_only=True)
class PlanConfig:
    backbone: str
    nodes: int = 1
    gpus_per_node: int = 8
    gpu: str = "h100"
    frames: int = 32
    height: int = 720
    width: int = 1280
    """Source video size; frames are resized into the pixel budget like the data path does."""
    max_pixels: int = 448 * 448
    min_pixels: int = 28 * 28 * 4
    k: int = 8
    mode: Literal["rollout", "single"] = "rollout"
    zero: Literal[0, 1, 2, 3] = 3
    offload: Literal["none", "optimizer", "param"] = "none"
    micro_batch: int = 1
    grad_accum: int = 1
    dtype: Literal["bf16", "fp32"] = "bf16"
    activation_checkpointing: bool = True
    train_vision: bool = False
    autotp: int = 1
    """DeepSpeed AutoTP degree (tensor_parallel.autotp_size); ZeRO partitions over the remaining data-parallel ranks."""
    hpz: int = 1
    """ZeRO++ hpZ partition size (1 = off; normally GPUs per node)."""
    quantized_weights: bool = False
    quantized_gradients: bool = False
    gather_latent_passes: bool = False
    attention: Literal["sdpa", "flash"] | None = None
    """None: flash on GPUs, sdpa on CPU (sdpa with a padding mask repeats K/V to every head)."""
    prompt_tokens: int = 64
    answer_tokens: int = 4
    memory_gib: float | None = None
    """Device memory to plan against; None = the GPU's (cpu: this machine's RAM / ranks per node)."""

    def __post_init__(self):
        from storms_dist.model.registry import backbone_names

        if self.backbone not in backbone_names():
            raise ValueError(f"backbone: unknown {self.backbone!r}; valid choices: {', '.join(backbone_names())}")
        if self.gpu not in GPUS:
            raise ValueError(f"gpu: expected one of {', '.join(GPUS)}, got {self.gpu!r}")
        for key in ("nodes", "gpus_per_node", "frames", "micro_batch", "grad_accum", "autotp", "hpz"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: expected >= 1, got {getattr(self, key)}")
        if self.k < 0:
            raise ValueError(f"k: expected >= 0, got {self.k}")
        if self.world % self.autotp:
            raise ValueError(f"autotp: {self.autotp} does not divide the {self.world} ranks")
        if self.hpz > 1 and (self.zero != 3 or self.gpus_per_node % self.hpz):
            raise ValueError(f"hpz: {self.hpz} needs zero 3 and must divide gpus_per_node ({self.gpus_per_node})")
        if self.offload == "param" and self.zero != 3:
            raise ValueError("offload: param offload needs zero 3")

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        return self.world // self.autotp


@dataclass
class Plan:
    cfg: PlanConfig
    shape: Shape
    tokens: dict[str, int]
    memory: dict[str, float]
    """Bytes per GPU: params, grads+optimizer (model states), activations, kv, workspace, peak."""
    activations_no_ckpt: float
    activations_ckpt: float
    comm: dict[str, float]
    """Bytes per GPU per optimizer step: allgather/reduce_scatter/tp, inter/intra, and the same without ZeRO++."""
    flops_per_step: float
    time_s: dict[str, float] = field(default_factory=dict)
    usable_bytes: float = 0.0
    max_micro_batch: int = 0

    @property
    def fits(self) -> bool:
        return self.memory["peak"] <= self.usable_bytes


# ---- tokens ----
def sequence_tokens(shape: Shape, cfg: PlanConfig) -> dict[str, int]:
    from storms_dist.data.preprocess import smart_resize

    factor = shape.patch * shape.merge
    h, w = smart_resize(cfg.height, cfg.width, factor=factor, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    t = math.ceil(cfg.frames / shape.temporal_patch)
    patches = t * (h // shape.patch) * (w // shape.patch)
    video = patches // shape.merge**2
    # Qwen3-VL puts a "<t seconds>" timestamp and vision start/end around every temporal patch
    per_block = 8 if shape.family == "qwen3_vl" else 0
    prefix = cfg.prompt_tokens + video + t * per_block + 2 + (1 if cfg.k else 0)
    latent = cfg.k + (1 if cfg.k else 0)
    return {"patches": patches, "video": video, "prefix": prefix, "latent": latent, "suffix": cfg.answer_tokens,
            "sequence": prefix + latent + cfg.answer_tokens, "temporal_patches": t, "frame_hw": h * w}


# ---- memory ----
def model_state_bytes(shape: Shape, cfg: PlanConfig) -> dict[str, float]:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import (
        estimate_zero2_model_states_mem_needs,
    )

    p = shape.params
    trainable = p["embed"] + p["lm"] + (p["vision"] + p["merger"] if cfg.train_vision else 0)
    frozen = shape.total - trainable
    tp_share = p["lm"] * (1 - 1 / cfg.autotp)  # AutoTP shards the decoder's linears; embeddings stay replicated
    trainable_rank = trainable - tp_share
    largest = shape.largest_layer
    dp = cfg.dp
    off_opt = cfg.offload in ("optimizer", "param")
    if cfg.zero == 3:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(trainable_rank, largest, num_gpus_per_node=dp, num_nodes=1,
                                                          cpu_offload=off_opt, cpu_offload_params=cfg.offload == "param",
                                                          zero_init=True)
        frozen_bytes = 0.0 if cfg.offload == "param" else 2 * frozen / dp
    else:
        _, gpu = estimate_zero2_model_states_mem_needs(trainable_rank, num_gpus_per_node=1 if cfg.zero == 0 else dp,
                                                       num_nodes=1, cpu_offload=off_opt)
        frozen_bytes = 2.0 * frozen
    if cfg.dtype == "fp32":  # 16-bit -> 32-bit where the estimator counts 16-bit copies (see the module docstring)
        per = 0 if cfg.offload == "param" else (4 if off_opt else 20) / (dp if cfg.zero >= 2 else 1)
        states = trainable_rank * (per + (4 if cfg.zero < 3 else 0)) + (8 * largest if cfg.zero == 3 else 0)
        gpu, frozen_bytes = states, frozen_bytes * 2
    hpz = 2.0 * shape.total / cfg.hpz if cfg.hpz > 1 else 0.0  # hpZ's secondary partition, one per node group
    return {"model_states": float(gpu), "frozen": frozen_bytes, "hpz_secondary": hpz,
            "trainable_params": float(trainable), "frozen_params": float(frozen)}


def activation_bytes(shape: Shape, cfg: PlanConfig, tokens: dict[str, int], *, checkpointing: bool) -> dict[str, float]:
    """Saved-for-backward bytes of one micro-batch, and the rollout's K/V copies."""
    b = 4 if cfg.dtype == "fp32" else 2
    attention = cfg.attention or ("sdpa" if cfg.gpu == "cpu" else "flash")
    tp = cfg.autotp
    d, qd, kvd, inter = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.intermediate
    kv_saved = 2 * (qd if attention == "sdpa" else kvd)  # sdpa with a mask: repeat_kv copies to every head
    per_token_layer = 4 * d + (qd + kv_saved + 2 * qd) / tp + 4 * inter / tp
    n = tokens["sequence"]
    mb, layers = cfg.micro_batch, shape.layers
    rollout = cfg.mode == "rollout" and cfg.k > 0
    # the rollout's one-column passes run without checkpointing (HF would drop the cache), the prefill with it
    ckpt_tokens = tokens["prefix"] if rollout else n
    if checkpointing:
        decoder = mb * (layers * ckpt_tokens * d + ckpt_tokens * per_token_layer + (n - ckpt_tokens) * layers
                        * per_token_layer) * b
    else:
        decoder = mb * n * layers * per_token_layer * b
    kv = 0.0
    if rollout:  # K latent passes + the suffix pass each save a K/V concatenated to the length so far
        grown = sum(tokens["prefix"] + i for i in range(1, cfg.k + 1)) + n
        kv = mb * layers * grown * (2 * kvd + (kv_saved if attention == "sdpa" else 0)) / tp * b
    mask = mb * n * n * b if attention == "sdpa" else 0.0  # one 4-D float mask per batch, shared by the layers
    embeds = mb * n * d * b * 2  # input embeddings and the visual features scattered into them
    head = mb * cfg.answer_tokens * shape.vocab * b * 3  # logits at the answer columns, softmax and its grad
    vision_saved = 0.0
    vision_mlp = 2 if shape.family == "qwen3_vl" else 4  # Qwen3-VL: fc1-gelu-fc2; Qwen2.5-VL: SwiGLU
    vt = mb * tokens["patches"]
    per_patch_block = (9 * shape.vision_hidden + vision_mlp * shape.vision_intermediate) * b
    if cfg.train_vision:
        vision_saved = vt * shape.vision_depth * per_patch_block * (1 / shape.vision_depth if checkpointing else 1)
    # a frozen tower saves nothing, but one block's temporaries (and the patch rows) are alive while it runs
    vision_transient = vt * (per_patch_block + 3 * 2 * shape.patch**2 * 4)
    return {"decoder": decoder, "kv": kv, "mask": mask, "embeds": embeds, "head": head, "vision": vision_saved,
            "vision_transient": vision_transient}


def _memory(shape: Shape, cfg: PlanConfig, tokens) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    states = model_state_bytes(shape, cfg)
    act = activation_bytes(shape, cfg, tokens, checkpointing=cfg.activation_checkpointing)
    act_other = activation_bytes(shape, cfg, tokens, checkpointing=not cfg.activation_checkpointing)
    saved = act["decoder"] + act["mask"] + act["embeds"] + act["head"] + act["vision"]
    forward_peak = saved + act["kv"] + act["vision_transient"]
    # torch's foreach AdamW allocates one parameter-sized fp32 temporary (sqrt of the second moment) while it
    # steps, after backward has freed the activations
    trainable_rank = states["trainable_params"] / (cfg.dp if cfg.zero >= 1 else 1)
    optimizer_ws = 0.0 if cfg.offload != "none" else 4 * trainable_rank
    fixed = states["model_states"] + states["frozen"] + states["hpz_secondary"]
    memory = {"model_states": states["model_states"], "frozen_params": states["frozen"],
              "hpz_secondary": states["hpz_secondary"], "activations": saved, "kv": act["kv"],
              "workspace": max(act["vision_transient"], optimizer_ws), "peak": fixed + max(forward_peak, optimizer_ws)}
    return memory, act, act_other


# ---- communication and time ----
def comm_bytes(shape: Shape, cfg: PlanConfig, tokens) -> dict[str, float]:
    p, dp, b = shape.params, cfg.dp, 2  # 16-bit collectives
    lm = (p["lm"] / cfg.autotp + p["embed"]) * b
    vision = (p["vision"] + p["merger"]) * b
    ring = (dp - 1) / dp if dp > 1 else 0.0
    passes = (cfg.k + 2) if cfg.mode == "rollout" and cfg.k > 0 else 1
    fwd_gathers = 1 if cfg.gather_latent_passes else passes
    bwd_gathers = passes  # backward releases and re-gathers per pass
    trainable = lm + (vision if cfg.train_vision else 0)
    ga = cfg.grad_accum
    if cfg.zero == 3:
        gathers = ga * (lm * (fwd_gathers + bwd_gathers) + vision * (1 + (1 if cfg.train_vision else 0))) * ring
        first = ga * (lm + vision) * ring
    else:
        gathers = trainable * ring if cfg.zero >= 1 else 0.0  # updated partitions are all-gathered once per step
        first = gathers
    reduce = ga * trainable * ring if cfg.zero >= 2 else trainable * 2 * ring  # ZeRO-0/1: one all-reduce
    tp_bytes = 0.0
    if cfg.autotp > 1:  # two all-reduces per layer forward and two backward, each 2(tp-1)/tp of the activations
        act = cfg.micro_batch * tokens["sequence"] * shape.hidden * b
        tp_bytes = ga * shape.layers * 4 * act * 2 * (cfg.autotp - 1) / cfg.autotp
    multi = cfg.nodes > 1
    inter_frac = (1 - cfg.gpus_per_node / cfg.world) if multi else 0.0  # share of a ring's peers off-node
    plain_inter = (gathers + reduce) * (1.0 if multi else 0.0)
    # ZeRO++: hpZ keeps gathers after each step's first inside the node; qwZ halves weights, qgZ quarters grads
    if cfg.hpz > 1 and multi:
        inter_gather = first
        intra = gathers - first
    else:
        inter_gather, intra = (gathers if multi else 0.0), (0.0 if multi else gathers)
    inter = inter_gather * (0.5 if cfg.quantized_weights else 1.0)
    inter += reduce * (0.25 if cfg.quantized_gradients else 1.0) if multi else 0.0
    intra += 0.0 if multi else reduce
    intra += tp_bytes  # AutoTP groups sit inside a node
    return {"allgather": gathers, "reduce_scatter": reduce, "tp_allreduce": tp_bytes, "inter_node": inter,
            "intra_node": intra, "inter_node_plain": plain_inter, "inter_share": inter_frac,
            "gathers_per_micro_batch": float(fwd_gathers + bwd_gathers if cfg.zero == 3 else 0)}


def step_flops(shape: Shape, cfg: PlanConfig, tokens) -> float:
    """FLOPs of one optimizer step on one data-parallel rank, with the trainer's formula (train/flops.py)."""
    import torch

    from storms_dist.train.flops import FlopsModel

    p = shape.params
    model = FlopsModel(num_lm_params=p["lm"], num_vision_params=p["vision"] + p["merger"], hidden_size=shape.hidden,
                       num_layers=shape.layers, vocab_size=shape.vocab, vision_trained=cfg.train_vision)
    mask = torch.ones(cfg.micro_batch, tokens["sequence"])
    flops = model.step_flops(mask, cfg.micro_batch * cfg.answer_tokens, cfg.micro_batch * tokens["patches"])
    return cfg.grad_accum * flops


def make_plan(cfg: PlanConfig) -> Plan:
    shape = backbone_shape(cfg.backbone)
    tokens = sequence_tokens(shape, cfg)
    memory, act, act_other = _memory(shape, cfg, tokens)
    hw = _hardware()[cfg.gpu]
    mem_gib = cfg.memory_gib or (hw.memory_gib / cfg.gpus_per_node if cfg.gpu == "cpu" else hw.memory_gib)
    comm = comm_bytes(shape, cfg, tokens)
    flops = step_flops(shape, cfg, tokens)
    ckpt = act if cfg.activation_checkpointing else act_other
    no_ckpt = act_other if cfg.activation_checkpointing else act
    plan = Plan(cfg=cfg, shape=shape, tokens=tokens, memory=memory, comm=comm, flops_per_step=flops,
                activations_ckpt=ckpt["decoder"] + ckpt["vision"], activations_no_ckpt=no_ckpt["decoder"] + no_ckpt["vision"],
                usable_bytes=mem_gib * GiB * USABLE_FRACTION)
    compute = flops / cfg.autotp / (hw.peak_tflops * 1e12) if hw.peak_tflops else float("nan")
    plan.time_s = {"compute": compute, "inter_node": comm["inter_node"] / (hw.inter_gbps * 1e9),
                   "intra_node": comm["intra_node"] / (hw.intra_gbps * 1e9)}
    plan.time_s["lower_bound"] = max(v for v in plan.time_s.values() if not math.isnan(v))
    plan.max_micro_batch = largest_micro_batch(cfg, plan)
    return plan


def largest_micro_batch(cfg: PlanConfig, plan: Plan, limit: int = 1024) -> int:
    """The largest micro-batch whose planned peak fits (0: not even 1). Activations grow linearly in it."""
    from dataclasses import replace

    one = make_plan_memory(replace(cfg, micro_batch=1))["peak"]
    per_sample = max(make_plan_memory(replace(cfg, micro_batch=2))["peak"] - one, 1.0)
    if one > plan.usable_bytes:
        return 0
    return int(min(limit, 1 + (plan.usable_bytes - one) // per_sample))


def make_plan_memory(cfg: PlanConfig) -> dict[str, float]:
    shape = backbone_shape(cfg.backbone)
    return _memory(shape, cfg, sequence_tokens(shape, cfg))[0]


# ---- from a run config ----
def plan_config_for_run(cfg, *, nodes: int, gpus_per_node: int, gpu: str | None, stage: int = 2,
                        memory_gib: float | None = None, height: int = 720, width: int = 1280,
                        ranks_per_node: int | None = None) -> PlanConfig:
    """The plan of one stage of a run config on the given resources (what ``storms launch`` checks)."""
    stage_cfg = cfg.stage(stage)
    ds = cfg.deepspeed
    frames = cfg.data.frames.num_frames or cfg.data.frames.max_frames
    k = cfg.model.num_latents if stage_cfg.num_latents is None else stage_cfg.num_latents
    on_gpu = gpus_per_node > 0
    offload = "param" if ds.offload_params != "none" else ("optimizer" if ds.offload_optimizer != "none" else "none")
    # model.dtype auto: bf16 on GPUs, fp32 on CPU (build.resolve_dtype)
    dtype = {"float32": "fp32", "bfloat16": "bf16"}.get(cfg.model.dtype, "bf16" if on_gpu else "fp32")
    hpz, qw, qg = resolved_zeropp(ds, gpus_per_node or 1)
    # without GPUs the ranks of a node are CPU processes sharing its memory
    return PlanConfig(backbone=cfg.model.backbone, nodes=nodes, gpus_per_node=gpus_per_node or ranks_per_node or 1,
                      gpu=(gpu or "h100") if on_gpu else "cpu", frames=frames, height=height, width=width, max_pixels=cfg.data.max_pixels, min_pixels=cfg.data.min_pixels, k=k,
                      mode=stage_cfg.mode, zero=ds.zero_stage, offload=offload,
                      micro_batch=stage_cfg.micro_batch_size, grad_accum=stage_cfg.grad_accum, dtype=dtype,
                      activation_checkpointing=cfg.model.activation_checkpointing,
                      train_vision=stage_cfg.trainable.vision, autotp=getattr(ds, "autotp_size", 1), hpz=hpz,
                      quantized_weights=qw, quantized_gradients=qg, gather_latent_passes=ds.gather_latent_passes,
                      memory_gib=memory_gib)


def resolved_zeropp(ds, gpus_per_node: int) -> tuple[int, bool, bool]:
    """(hpZ size, qwZ, qgZ) of a DeepSpeedConfig, its named ZeRO++ preset resolved for ``gpus_per_node``."""
    from storms_dist.train.deepspeed_config import zeropp_settings

    return zeropp_settings(ds, gpus_per_node)


# ---- printing ----
def _gib(x: float) -> str:
    return f"{x / GiB:8.2f} GiB"


def format_plan(plan: Plan) -> str:
    c, m, t, s = plan.cfg, plan.memory, plan.tokens, plan.shape
    zpp = [f"hpZ {c.hpz}"] * (c.hpz > 1) + ["qwZ"] * c.quantized_weights + ["qgZ"] * c.quantized_gradients
    lines = [
        f"storms plan: {c.backbone} ({s.total / 1e9:.3f} B params: lm {s.params['lm'] / 1e9:.3f}, embed "
        f"{s.params['embed'] / 1e9:.3f}, vision+merger {s.vision_total / 1e9:.3f}) on {c.nodes} node(s) x "
        f"{c.gpus_per_node} {c.gpu}, ZeRO-{c.zero}, offload {c.offload}, {c.dtype}, AutoTP {c.autotp}, "
        f"ZeRO++ {' + '.join(zpp) or 'off'}",
        f"  sequence: {c.frames} frames {c.height}x{c.width} -> {t['patches']} patches, {t['video']} video tokens; "
        f"prefix {t['prefix']} + K={c.k} latent + {t['suffix']} answer = {t['sequence']} tokens; mode {c.mode}; "
        f"micro-batch {c.micro_batch} x grad-accum {c.grad_accum}",
        "  per GPU:",
        f"    params+grads+optimizer (trainable, DeepSpeed estimator) {_gib(m['model_states'])}",
        f"    frozen params (partitioned)                            {_gib(m['frozen_params'])}",
        f"    hpZ secondary partition                                {_gib(m['hpz_secondary'])}",
        f"    activations  with checkpointing {_gib(plan.activations_ckpt)}   without {_gib(plan.activations_no_ckpt)}"
        f"   (this job: {'with' if c.activation_checkpointing else 'without'})",
        f"    rollout K/V copies (K+1 grown caches)                  {_gib(m['kv'])}",
        f"    workspace (optimizer step / vision block)              {_gib(m['workspace'])}",
        f"    peak                                                   {_gib(m['peak'])}   of "
        f"{_gib(plan.usable_bytes)} usable ({USABLE_FRACTION:.0%})",
        f"  communication per step per GPU: all-gather {plan.comm['allgather'] / 1e9:.1f} GB "
        f"({plan.comm['gathers_per_micro_batch']:.0f} decoder gathers per micro-batch), reduce-scatter "
        f"{plan.comm['reduce_scatter'] / 1e9:.1f} GB, AutoTP all-reduce {plan.comm['tp_allreduce'] / 1e9:.1f} GB",
        f"    inter-node {plan.comm['inter_node'] / 1e9:.1f} GB (without ZeRO++ {plan.comm['inter_node_plain'] / 1e9:.1f}"
        f" GB), intra-node {plan.comm['intra_node'] / 1e9:.1f} GB",
        f"  FLOPs per step per rank {plan.flops_per_step / 1e12:.1f} TFLOP; time lower bound "
        f"{plan.time_s['lower_bound']:.3f} s (compute {plan.time_s['compute']:.3f}, inter-node "
        f"{plan.time_s['inter_node']:.3f}, intra-node {plan.time_s['intra_node']:.3f})",
        f"  fits: {'yes' if plan.fits else 'NO'}; largest micro-batch that fits: {plan.max_micro_batch}",
        f"  ({VALIDATION.format(err=VALIDATED_ERROR)})",
    ]
    return "\n".join(lines)


def summary_row(plan: Plan) -> str:
    c, m = plan.cfg, plan.memory
    return (f"| {c.backbone} | {plan.shape.total / 1e9:.2f} | {c.nodes}x{c.gpus_per_node} {c.gpu} | "
            f"{m['model_states'] / GiB:.1f} | {plan.activations_ckpt / GiB:.1f} / {plan.activations_no_ckpt / GiB:.1f} "
            f"| {m['kv'] / GiB:.1f} | {m['peak'] / GiB:.1f} | {'yes' if plan.fits else 'no'} | {plan.max_micro_batch} "
            f"| {plan.comm['inter_node'] / 1e9:.0f} / {plan.comm['inter_node_plain'] / 1e9:.0f} | "
            f"{plan.time_s['lower_bound']:.2f} |")


SUMMARY_HEADER = ("| backbone | B params | GPUs | states GiB | act ckpt / no-ckpt GiB | KV GiB | peak GiB | fits | "
                  "max micro-batch | inter-node GB ZeRO++ / plain | step >= s |\n|---|---:|---|---:|---:|---:|---:|---|"
                  "---:|---:|---:|")
