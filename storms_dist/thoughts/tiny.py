"""A tiny, randomly initialised Wan 2.1 image-to-video pipeline built offline from configs (for tests and smoke runs).

Mirrors diffusers' own fast test (``tests/pipelines/wan/test_wan_image_to_video.py``: the same transformer, VAE,
CLIP image encoder and scheduler sizes) with two offline substitutes for what that test downloads from the hub
(``hf-internal-testing/tiny-random-t5``): a UMT5 text encoder built from a ``T5Config``, and a word-level tokenizer
built in-process with ``tokenizers``. ``save_pretrained`` writes the same folder layout as a real
``Wan-AI/Wan2.1-I2V-*-Diffusers`` download, so the production loading path
(``DiffusionPipeline.from_pretrained(dir, local_files_only=True)``) is what the tests exercise. It generates noise,
of course: it checks plumbing (shapes, frame counts, dtypes, I/O), not quality. About 350 KB on disk.
"""

from __future__ import annotations

from pathlib import Path

# the words the tiny tokenizer knows; everything else maps to <unk> (fine for random weights)
_VOCAB_WORDS = ("a the of and to in on is are what which how show shows video frame ball balls wall moves motion "
                "continues clearly smooth realistic static camera answer question options left right top bottom "
                "red green blue yellow purple cyan next after before first last").split()
TEXT_DIM = 32


def build_tiny_wan_i2v(directory: str | Path, *, seed: int = 0, first_last_frame: bool = False) -> Path:
    """Build the tiny pipeline and ``save_pretrained`` it into ``directory``; returns the folder.

    ``first_last_frame``: the Wan 2.1 FLF2V variant (an image position embedding over two images), which accepts
    ``last_image``."""
    import torch
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanImageToVideoPipeline,
        WanTransformer3DModel,
    )
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        PreTrainedTokenizerFast,
        UMT5Config,
        UMT5EncoderModel,
    )

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in _VOCAB_WORDS:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>")

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=TEXT_DIM, d_kv=8, d_ff=37, num_layers=2,
                                             num_heads=4, relative_attention_num_buckets=8))
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=36, out_channels=16, text_dim=TEXT_DIM, freq_dim=256, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32, image_dim=4,
                                        # CLIP tokens per image: (32 / 1)^2 patches + the class token
                                        pos_embed_seq_len=2 * (32 * 32 + 1) if first_last_frame else None)
    torch.manual_seed(seed)
    image_encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=4, projection_dim=4, num_hidden_layers=2,
                                                     num_attention_heads=2, image_size=32, intermediate_size=16,
                                                     patch_size=1))
    pipe = WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                                   image_processor=CLIPImageProcessor(crop_size=32, size=32),
                                   image_encoder=image_encoder, transformer=transformer)
    directory = Path(directory)
    pipe.save_pretrained(directory)
    return directory
