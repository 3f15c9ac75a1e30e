"""The processor side of an export: image / video processor configs and the chat template, so that transformers'
``AutoProcessor`` can be built from an export folder with the values our own preprocessing used.

Our preprocessing is a plain-torch reimplementation (``data/preprocess.py``, ``data/prompt.py``); these files
describe it in transformers' terms: the pixel budget (``data.min_pixels`` / ``data.max_pixels``), the patch and merge
geometry and mean/std of the ``VisionSpec``, the frame-sampling settings of ``data.frames``, and a chat template
that renders the same prompt ``build_prompt`` builds (one ``<|video_pad|>`` placeholder, which the processor expands;
Qwen2/2.5-VL insert the default system turn, Qwen3-VL does not).

What plain transformers cannot know from these files: the latent turn (``generate`` appends ``<|latent_start|>``,
K latent steps and ``<|latent_end|>``), and the mRoPE rule (``model/mrope.py``; pass ``position_ids``). Frame
sampling: our rule is qwen-vl-utils' (``data/sampling.py``), which the video processor's own sampler does not
reproduce exactly, so ``do_sample_frames`` is false and the sampling settings are recorded for reference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from storms_dist.data.preprocess import VisionSpec
from storms_dist.data.prompt import QWEN2_DEFAULT_SYSTEM

PROCESSOR_CLASS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                   "qwen3_vl": "Qwen3VLProcessor"}
VIDEO_PROCESSOR_CLASS = {"qwen2_vl": "Qwen2VLVideoProcessor", "qwen2_5_vl": "Qwen2VLVideoProcessor",
                         "qwen3_vl": "Qwen3VLVideoProcessor"}
IMAGE_PROCESSOR_CLASS = {"qwen2_vl": "Qwen2VLImageProcessor", "qwen2_5_vl": "Qwen2VLImageProcessor",
                         "qwen3_vl": "Qwen2VLImageProcessor"}
CHAT_TEMPLATE_FILE = "chat_template.jinja"
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
                   CHAT_TEMPLATE_FILE)


def chat_template(family: str, *, system_prompt: bool = True) -> str:
    """Jinja chat template of ``build_prompt``'s format: string or ``[{"type": "video"} | {"type": "text", ...}]``
    message contents, ``<|im_start|>role\\n ... <|im_end|>\\n`` turns, the generation prompt on request."""
    # data.system_prompt false (the grid default) drops the family's default system turn, as build_prompt does
    default_system = "" if family == "qwen3_vl" or not system_prompt else QWEN2_DEFAULT_SYSTEM
    # every line opens with a whitespace-stripping tag, so only the quoted strings reach the output
    return "{%- set default_system = '" + default_system + "' %}\n" + r"""{%- if messages[0]['role'] != 'system' and default_system %}
    {{- '<|im_start|>system\n' + default_system + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\n' }}
    {%- if message['content'] is string %}
        {{- message['content'] }}
    {%- else %}
        {%- for part in message['content'] %}
            {%- if part.get('type') == 'video' or 'video' in part %}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' }}
            {%- elif part.get('type') == 'image' or 'image' in part %}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
            {%- elif part.get('type') == 'text' %}
                {{- part['text'] }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {{- '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


def processor_configs(spec: VisionSpec, *, min_pixels: int, max_pixels: int, frames: dict[str, Any]
                      ) -> dict[str, dict[str, Any]]:
    """File name -> JSON content of the image processor, video processor and processor configs."""
    common = {
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True, "image_mean": list(spec.image_mean), "image_std": list(spec.image_std),
        "patch_size": spec.patch_size, "temporal_patch_size": spec.temporal_patch_size,
        "merge_size": spec.merge_size, "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "min_pixels": min_pixels, "max_pixels": max_pixels, "resample": 3,  # bicubic, as data/preprocess.py
        "processor_class": PROCESSOR_CLASS[spec.family],
    }
    video = {**common, "video_processor_type": VIDEO_PROCESSOR_CLASS[spec.family], "do_sample_frames": False,
             "min_frames": frames.get("min_frames"), "max_frames": frames.get("max_frames"),
             "fps": frames.get("fps"), "num_frames": frames.get("num_frames")}
    return {
        "preprocessor_config.json": {**common, "image_processor_type": IMAGE_PROCESSOR_CLASS[spec.family]},
        "video_preprocessor_config.json": video,
        "processor_config.json": {"processor_class": PROCESSOR_CLASS[spec.family]},
    }


def write_processor_files(out_dir: str | Path, spec: VisionSpec, *, min_pixels: int, max_pixels: int,
                          frames: dict[str, Any], system_prompt: bool = True) -> None:
    out_dir = Path(out_dir)
    for name, content in processor_configs(spec, min_pixels=min_pixels, max_pixels=max_pixels,
                                           frames=frames).items():
        (out_dir / name).write_text(json.dumps(content, indent=2) + "\n")
    # overwrites the text-only template tokenizer.save_pretrained wrote: one template for tokenizer and processor
    (out_dir / CHAT_TEMPLATE_FILE).write_text(chat_template(spec.family, system_prompt=system_prompt))
