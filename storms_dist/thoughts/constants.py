"""Choices and defaults of ``storms thoughts``, importable without torch/PyAV (the CLI parser is built from them)."""

from __future__ import annotations

BACKENDS: tuple[str, ...] = ("procedural", "diffusers", "files")
KEYFRAME_METHODS: tuple[str, ...] = ("uniform", "scene_change")
CONDITIONS: tuple[str, ...] = ("auto", "first", "middle", "last")
PROMPT_SOURCES: tuple[str, ...] = ("template", "teacher")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
CODECS: tuple[str, ...] = ("vp9", "h264", "mjpeg")  # storms_dist.data.video_io.SUFFIX_BY_CODEC's keys

DEFAULT_TEMPLATE = ("A short video that continues from this frame and clearly shows the motion and events needed to "
                    "answer the question \"{question}\" (options: {options}). The dynamics make the answer visible: "
                    "{answer}. Smooth, realistic motion, static camera.")
TEMPLATE_FIELDS: tuple[str, ...] = ("question", "options", "answer", "answer_letter", "qtype")
"""``{question}``, ``{options}`` ("A. x; B. y; ..."), ``{answer}`` (the correct option's text), ``{answer_letter}``,
``{qtype}``."""
