"""Thought-video generator backends: ``procedural`` (the synthetic set), ``diffusers`` (image-to-video from local
weights: Wan 2.1 I2V, CogVideoX I2V) and ``files`` (user-supplied videos).

A generator turns a :class:`GenerationRequest` (the sample, its keyframes, the conditioning frame, the prompt, a
seed) into a :class:`GeneratedVideo`: RGB frames to encode, or an existing file to copy. Generators are built once
per process (the diffusers pipeline is loaded once) and called once per sample.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from storms_dist.data.manifest import Sample
from storms_dist.data.video_io import VideoDecodeError, probe_video
from storms_dist.thoughts.constants import BACKENDS, DTYPES  # noqa: F401  (BACKENDS: re-exported)
from storms_dist.thoughts.keyframes import Keyframes
from storms_dist.thoughts.naming import file_stem

VIDEO_SUFFIXES: tuple[str, ...] = (".webm", ".mp4", ".avi", ".mkv", ".mov")


class GenerationError(RuntimeError):
    """One sample's thought video could not be made (wrong kind of sample, missing file, pipeline failure)."""


@dataclass(frozen=True)
class GenerationRequest:
    sample: Sample
    seed: int
    keyframes: Keyframes | None = None
    condition: int | None = None
    """Position into ``keyframes`` of the frame image-to-video starts from."""
    prompt: str | None = None


@dataclass
class GeneratedVideo:
    frames: np.ndarray | None = None
    """``[T, H, W, 3]`` uint8 RGB to encode (None when ``source_path`` is given)."""
    fps: float | None = None
    source_path: Path | None = None
    """An existing video file to copy as is (``files`` backend)."""
    codec: str | None = None
    """Preferred codec when the run does not set one (procedural: the synthetic set's own)."""
    info: dict[str, Any] = field(default_factory=dict)
    """Provenance recorded in the sample's ``meta.thought_gen``."""


class Generator(Protocol):
    name: str
    needs_keyframes: bool
    needs_prompt: bool

    def generate(self, request: GenerationRequest) -> GeneratedVideo: ...

    def config(self) -> dict[str, Any]:
        """Everything that determines the output (part of the output folder's stamp)."""
        ...


# ---------------------------------------------------------------------------------------------------- procedural


class ProceduralGenerator:
    """Re-render a synthetic sample's thought video from its manifest ``meta``.

    Exact mode: when the manifest's folder holds the ``storms synth`` stamp (``synth_config.json``, same generator
    version and config hash) and the uid is ``synth-{split}-{index:06d}``, the generator's own planner is re-run for
    ``(seed, split, index)`` (everything in ``synth`` is a pure function of those), its scene is checked against
    ``meta.scene``, and the thought video is rendered exactly as ``storms synth`` did (same ThoughtSpec: times, event
    rings, tallies, trails). Frames are identical, and so are the files (bitexact encoding) with the set's codec.

    Approximate mode (no stamp, another generator version, or a sample whose uid/scene does not match): rebuild the
    scene from ``meta.scene``, simulate it (ball collisions on, as in the default config) and render the thought kind
    ``meta.thought`` (continuation / replay / replay with trails / still) without the event marks, which the manifest
    does not record. ``meta.scene`` is required in both modes.
    """

    name: ClassVar[str] = "procedural"
    needs_keyframes: ClassVar[bool] = False
    needs_prompt: ClassVar[bool] = False

    def __init__(self, *, num_thought_frames: int = 16):
        if num_thought_frames < 1:
            raise ValueError(f"num_thought_frames: expected >= 1, got {num_thought_frames}")
        self.num_thought_frames = num_thought_frames
        self._stamps: dict[Path, Any] = {}

    def config(self) -> dict[str, Any]:
        from storms_dist.data.synth import GENERATOR_VERSION

        return {"backend": self.name, "generator_version": GENERATOR_VERSION,
                "num_thought_frames_fallback": self.num_thought_frames}

    def _synth_config(self, root: Path):
        """The SynthConfig of the set in ``root`` if its stamp is current, else None (cached per folder)."""
        if root not in self._stamps:
            from storms_dist.config import ConfigError, from_dict
            from storms_dist.data.synth import GENERATOR_VERSION, STAMP_NAME, SynthConfig, config_hash

            cfg = None
            try:
                stamp = json.loads((root / STAMP_NAME).read_text())
                candidate = from_dict(SynthConfig, stamp["config"])
                if stamp.get("generator_version") == GENERATOR_VERSION and stamp.get("config_hash") == config_hash(
                        candidate):
                    cfg = candidate
            except (OSError, ValueError, KeyError, TypeError, ConfigError):
                cfg = None
            self._stamps[root] = cfg
        return self._stamps[root]

    def generate(self, request: GenerationRequest) -> GeneratedVideo:
        from storms_dist.data.synth import Scene

        sample = request.sample
        scene_json = sample.meta.get("scene")
        if not isinstance(scene_json, dict):
            raise GenerationError(f"{sample.uid}: meta.scene: the procedural backend needs a synthetic sample "
                                  "(storms synth) with its scene in meta")
        try:
            scene = Scene.from_json(scene_json)
        except (KeyError, TypeError, ValueError) as e:
            raise GenerationError(f"{sample.uid}: meta.scene: malformed ({type(e).__name__}: {e})") from None
        cfg = self._synth_config(sample.root)
        exact = self._exact(sample, scene_json, cfg) if cfg is not None else None
        if exact is not None:
            return exact
        return self._approximate(sample, scene, cfg)

    def _exact(self, sample: Sample, scene_json: dict, cfg) -> GeneratedVideo | None:
        from storms_dist.data.synth import assignment, balanced_pick, render, sample_world, target_values
        from storms_dist.data.synth.generator import _rng

        prefix = f"synth-{sample.split}-"
        if not sample.uid.startswith(prefix) or not sample.uid[len(prefix):].isdigit():
            return None
        index = int(sample.uid[len(prefix):])
        if index >= cfg.num_videos(sample.split):
            return None
        _, variant, k = assignment(cfg, index)
        if variant != sample.meta.get("variant"):
            return None
        target = balanced_pick(target_values(variant, cfg), k, seed=cfg.seed, split=sample.split,
                               key=f"target/{variant}")
        world, plan = sample_world(_rng(cfg, sample.split, index, 0), cfg, variant, target)
        if json.loads(json.dumps(world.scene.to_json())) != scene_json or plan.thought is None:
            return None
        frames = render(world.scene, world.trajectory, plan.thought.times, plan.thought)
        return GeneratedVideo(frames=frames, fps=cfg.fps, codec=cfg.codec,
                              info={"mode": "exact", "thought": plan.thought.kind, "synth_index": index})

    def _approximate(self, sample: Sample, scene, cfg) -> GeneratedVideo:
        from storms_dist.data.synth import EVENT_GAP_FRAMES, ThoughtSpec, render, simulate

        try:
            source = probe_video(sample.video_path)
        except VideoDecodeError as e:
            raise GenerationError(f"{sample.uid}: source video: {e}") from None
        num_frames = source.num_frames
        num_thought = cfg.num_thought_frames if cfg is not None else self.num_thought_frames
        collisions = cfg.ball_collisions if cfg is not None else True
        kind = sample.meta.get("thought", "continuation")
        if kind == "continuation":
            times = tuple(float(num_frames + k) for k in range(num_thought))
        elif kind in ("replay_marked", "replay_trails"):
            times = tuple(float(t) for t in np.linspace(0.0, num_frames - 1, num_thought))
        elif kind == "still_marked":
            times = (0.0,) * num_thought
        else:
            raise GenerationError(f"{sample.uid}: meta.thought: expected continuation, replay_marked, replay_trails "
                                  f"or still_marked, got {kind!r}")
        trajectory = simulate(scene, max(times) + EVENT_GAP_FRAMES, collisions=collisions)
        trails = tuple(range(scene.num_balls)) if kind == "replay_trails" else ()
        spec = ThoughtSpec(kind=kind, times=times, trail_balls=trails)
        return GeneratedVideo(frames=render(scene, trajectory, times, spec), fps=cfg.fps if cfg else source.fps,
                              codec=cfg.codec if cfg else None, info={"mode": "approximate", "thought": kind})


# ---------------------------------------------------------------------------------------------------- files


def find_user_video(directory: Path, uid: str, file_stem: str) -> Path | None:
    """``DIR/<uid><suffix>`` or ``DIR/<file_stem><suffix>`` for a known video suffix, else None."""
    for stem in dict.fromkeys((uid, file_stem)):
        for suffix in VIDEO_SUFFIXES:
            candidate = directory / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


class FilesGenerator:
    """User-supplied thought videos: ``DIR/<uid>.<mp4|webm|avi|mkv|mov>`` (or the sanitised file name the output
    uses), checked to decode and copied into the output folder unchanged."""

    name: ClassVar[str] = "files"
    needs_keyframes: ClassVar[bool] = False
    needs_prompt: ClassVar[bool] = False

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"files backend: {self.directory} is not a folder")

    def config(self) -> dict[str, Any]:
        return {"backend": self.name, "directory": str(self.directory.resolve())}

    def generate(self, request: GenerationRequest) -> GeneratedVideo:
        uid = request.sample.uid
        path = find_user_video(self.directory, uid, file_stem(uid))
        if path is None:
            raise GenerationError(f"{uid}: files: no thought video {self.directory}/{uid}"
                                  f"{{{','.join(VIDEO_SUFFIXES)}}}")
        try:
            info = probe_video(path)
        except VideoDecodeError as e:
            raise GenerationError(f"{uid}: files: {e}") from None
        return GeneratedVideo(source_path=path, fps=info.fps, info={"source": str(path.resolve())})


# ---------------------------------------------------------------------------------------------------- diffusers

FLOAT32_COMPONENTS_WAN = ("vae", "image_encoder")  # the Wan 2.1 I2V model card keeps these in float32


@dataclass(kw_only=True)
class DiffusersConfig:
    """An image-to-video pipeline loaded from a local ``save_pretrained`` folder (no hub: ``local_files_only``)."""

    model_dir: str
    """e.g. a local copy of Wan-AI/Wan2.1-I2V-14B-480P-Diffusers or THUDM/CogVideoX-5b-I2V."""
    device: str = "auto"
    """"auto": cuda when available, else cpu."""
    dtype: str = "bfloat16"
    """Weights' dtype (Wan: the VAE and image encoder stay float32). CPU runs use float32 whatever this says."""
    num_frames: int = 81
    """Frames to generate (Wan: 4n + 1; CogVideoX: 49 or 8n + 1 for 1.5)."""
    height: int | None = None
    width: int | None = None
    """Output size; when unset, the conditioning frame's aspect ratio at ``max_area`` pixels (Wan's recipe)."""
    max_area: int = 480 * 832
    num_inference_steps: int = 40
    guidance_scale: float = 5.0
    negative_prompt: str = ""
    fps: float = 16.0
    """Frame rate written into the thought video (Wan 2.1 generates 16 fps, CogVideoX 8)."""
    use_last_image: bool = False
    """Also pass the last keyframe as ``last_image`` (pipelines that take one: Wan first-last-frame-to-video)."""
    cpu_offload: bool = False
    """``enable_model_cpu_offload()`` instead of moving the whole pipeline to the GPU."""
    max_sequence_length: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("num_frames", "num_inference_steps", "max_area"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if (self.height is None) != (self.width is None):
            raise ValueError("height/width: expected both or neither")
        if not self.fps > 0:
            raise ValueError(f"fps: expected > 0, got {self.fps}")


def output_size(image_hw: tuple[int, int], *, height: int | None, width: int | None, max_area: int,
                multiple: int) -> tuple[int, int]:
    """``(height, width)``: the given size, else the image's aspect ratio at about ``max_area`` pixels, both rounded
    down to ``multiple`` (at least one ``multiple``)."""
    if height is not None and width is not None:
        return int(height), int(width)
    aspect = image_hw[0] / image_hw[1]
    h = round(math.sqrt(max_area * aspect)) // multiple * multiple
    w = round(math.sqrt(max_area / aspect)) // multiple * multiple
    return max(h, multiple), max(w, multiple)


def load_dtypes(class_name: str, dtype: str, device: str) -> Any:
    """``from_pretrained``'s dtype: float32 on CPU; else ``dtype``, with Wan's VAE and image encoder in float32
    (``{"default": bf16, "vae": fp32, "image_encoder": fp32}``, as the Wan 2.1 I2V model card loads them)."""
    import torch

    if device == "cpu" or dtype == "float32":
        return torch.float32
    if class_name.startswith("Wan"):
        return {"default": getattr(torch, dtype), **{name: torch.float32 for name in FLOAT32_COMPONENTS_WAN}}
    return getattr(torch, dtype)


def to_uint8_frames(frames: Any) -> np.ndarray:
    """A pipeline's ``frames[0]`` (numpy/torch float in [0, 1], ``[T, H, W, 3]``, or a list of PIL images) -> uint8."""
    if isinstance(frames, (list, tuple)) and frames and hasattr(frames[0], "convert"):
        return np.stack([np.asarray(f.convert("RGB")) for f in frames])
    if hasattr(frames, "detach"):
        frames = frames.detach().float().cpu().numpy()
    array = np.asarray(frames)
    if array.dtype == np.uint8:
        return array
    return np.clip(np.round(array.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)


class DiffusersGenerator:
    """Image-to-video with a diffusers pipeline from local weights, conditioned on one keyframe and the prompt."""

    name: ClassVar[str] = "diffusers"
    needs_keyframes: ClassVar[bool] = True
    needs_prompt: ClassVar[bool] = True

    def __init__(self, cfg: DiffusersConfig, *, pipeline: Any = None):
        self.cfg = cfg
        self._pipe = pipeline
        self.class_name = type(pipeline).__name__ if pipeline is not None else self._read_class_name()

    def _read_class_name(self) -> str:
        index = Path(self.cfg.model_dir) / "model_index.json"
        try:
            return json.loads(index.read_text())["_class_name"]
        except FileNotFoundError:
            raise FileNotFoundError(f"diffusers backend: {index} not found; --model-dir must be a local diffusers "
                                    "pipeline folder (save_pretrained / a downloaded *-Diffusers repository)") from None
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"diffusers backend: {index}: _class_name: expected the pipeline class ({e})") from None

    def config(self) -> dict[str, Any]:
        return {"backend": self.name, "pipeline": self.class_name,
                **{k: v for k, v in vars(self.cfg).items() if k not in ("device", "cpu_offload")},
                "model_dir": str(Path(self.cfg.model_dir).resolve())}

    @property
    def device(self) -> str:
        import torch

        if self.cfg.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.cfg.device

    @property
    def pipe(self):
        if self._pipe is None:
            self._pipe = self._load()
        return self._pipe

    def _load(self):
        try:
            from diffusers import DiffusionPipeline
        except ImportError as e:
            raise ImportError(f"the diffusers backend needs diffusers and ftfy: pip install -e '.[thoughts]' ({e})") \
                from None

        device = self.device
        pipe = DiffusionPipeline.from_pretrained(self.cfg.model_dir, local_files_only=True,
                                                 dtype=load_dtypes(self.class_name, self.cfg.dtype, device))
        if "image" not in inspect.signature(pipe.__call__).parameters:
            raise GenerationError(f"diffusers backend: {type(pipe).__name__} in {self.cfg.model_dir} takes no image: "
                                  "expected an image-to-video pipeline (WanImageToVideoPipeline, "
                                  "CogVideoXImageToVideoPipeline)")
        if self.cfg.use_last_image:
            if "last_image" not in inspect.signature(pipe.__call__).parameters:
                raise GenerationError(f"diffusers backend: {type(pipe).__name__} takes no last_image; drop "
                                      "--last-image")
            transformer_cfg = getattr(getattr(pipe, "transformer", None), "config", None)
            if (type(pipe).__name__ == "WanImageToVideoPipeline" and getattr(pipe, "image_encoder", None) is not None
                    and getattr(transformer_cfg, "pos_embed_seq_len", None) is None):
                raise GenerationError(f"diffusers backend: {self.cfg.model_dir} is a Wan 2.1 image-to-video model "
                                      "without first-last-frame support; --last-image needs Wan2.1-FLF2V")
        pipe.set_progress_bar_config(disable=True)
        if self.cfg.cpu_offload and device != "cpu":
            pipe.enable_model_cpu_offload()
        else:
            pipe.to(device)
        return pipe

    def _multiple(self, pipe) -> int:
        spatial = int(getattr(pipe, "vae_scale_factor_spatial", 8))
        patch = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "patch_size", 2) or 2
        patch = patch[-1] if isinstance(patch, (list, tuple)) else patch
        return max(2, spatial * int(patch))

    def generate(self, request: GenerationRequest) -> GeneratedVideo:
        import torch
        from PIL import Image

        if request.keyframes is None or request.condition is None or request.prompt is None:
            raise GenerationError(f"{request.sample.uid}: diffusers backend: expected keyframes, a condition frame "
                                  "and a prompt")
        pipe = self.pipe
        first = request.keyframes.frames[request.condition]
        height, width = output_size(first.shape[:2], height=self.cfg.height, width=self.cfg.width,
                                    max_area=self.cfg.max_area, multiple=self._multiple(pipe))
        image = Image.fromarray(np.ascontiguousarray(first)).resize((width, height), Image.Resampling.BICUBIC)
        kwargs: dict[str, Any] = dict(image=image, prompt=request.prompt, negative_prompt=self.cfg.negative_prompt,
                                      height=height, width=width, num_frames=self.cfg.num_frames,
                                      num_inference_steps=self.cfg.num_inference_steps,
                                      guidance_scale=self.cfg.guidance_scale, output_type="np",
                                      generator=torch.Generator(device="cpu").manual_seed(request.seed))
        if self.cfg.max_sequence_length is not None:
            kwargs["max_sequence_length"] = self.cfg.max_sequence_length
        used_last = False
        if self.cfg.use_last_image and len(request.keyframes.indices) > 1:
            last = request.keyframes.frames[-1]
            kwargs["last_image"] = Image.fromarray(np.ascontiguousarray(last)).resize((width, height),
                                                                                      Image.Resampling.BICUBIC)
            used_last = True
        try:
            with torch.inference_mode():
                output = pipe(**kwargs)
        except (RuntimeError, ValueError) as e:
            raise GenerationError(f"{request.sample.uid}: diffusers {type(pipe).__name__}: "
                                  f"{' '.join(str(e).split())[:300]}") from None
        frames = to_uint8_frames(output.frames[0])
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise GenerationError(f"{request.sample.uid}: diffusers: expected frames [T, H, W, 3], got "
                                  f"{list(frames.shape)}")
        # 4:2:0 codecs need even sides; generated sizes are multiples of 16, this only guards odd explicit sizes
        frames = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]
        return GeneratedVideo(frames=frames, fps=self.cfg.fps,
                              info={"pipeline": type(pipe).__name__, "seed": request.seed, "height": height,
                                    "width": width,
                                    "steps": self.cfg.num_inference_steps, "guidance_scale": self.cfg.guidance_scale,
                                    "last_image": used_last})
