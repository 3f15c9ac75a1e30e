"""Thought-video generation (``storms thoughts``): keyframes, prompts, generator backends, the sharded pipeline.

Thought videos are training-only: Stage I aligns the latent states with encodings of them (``storms targets``).
See docs/thoughts.md.
"""
