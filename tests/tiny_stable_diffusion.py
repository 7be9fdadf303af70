"""Tiny random Stable Diffusion and SDXL components for offline CPU tests.

Everything is built in code: the CLIP tokenizer comes from a small byte-level vocabulary and merge list written to
a folder, the models from tiny configs with fixed seeds. A 2-step pipeline call on these takes a few tens of
milliseconds, so tests can compare whole pipeline runs bit for bit.

    from tiny_stable_diffusion import tiny_sd_components, tiny_sdxl_components

    pipe = StableDiffusionPipeline(**tiny_sd_components(tmp_path))
    pipe_xl = StableDiffusionXLPipeline(**tiny_sdxl_components(tmp_path))
"""

import json
import string
from pathlib import Path
from typing import Optional

import torch
from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TOKENIZER_MAX_LENGTH = 16
TEXT_HIDDEN_SIZE = 32
TEXT_PROJECTION_DIM = 32


def tiny_clip_tokenizer(folder, max_length: int = TOKENIZER_MAX_LENGTH) -> CLIPTokenizer:
    """A CLIP tokenizer over letters, digits, punctuation and a few merges, written to `folder` and loaded back.

    Printable ASCII maps to itself under CLIP's byte-level encoding, so single characters (and the same characters
    with the end-of-word marker `</w>`) cover any lowercase ASCII prompt. Special tokens take the last ids, as in
    real CLIP, so the text model's pooling finds the end-of-text token.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    characters = string.ascii_lowercase + string.digits + string.punctuation
    tokens = [*characters, *(f"{c}</w>" for c in characters)]
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("c", "a"), ("ca", "t</w>"), ("d", "o")]
    tokens += ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer.from_pretrained(folder, model_max_length=max_length, local_files_only=True)


def _text_config(tokenizer: CLIPTokenizer, projection_dim: Optional[int] = None) -> CLIPTextConfig:
    extra = {} if projection_dim is None else {"projection_dim": projection_dim}
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=tokenizer.model_max_length,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _tiny_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(4, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=2,
        layers_per_block=1,
    )


def tiny_sd_components(
    tmp_path, sample_size: int = 16, time_cond_proj_dim: Optional[int] = None, seed: int = 0
) -> dict:
    """Components for `StableDiffusionPipeline(**components)`: UNet on `sample_size`^2 latents (images are twice
    that, the VAE downsamples by 2), DDIM scheduler, 2-layer CLIP text encoder, no safety checker.

    `tmp_path` is a folder for the tokenizer files. `time_cond_proj_dim` adds the UNet's guidance-embedding input
    (LCM-style `timestep_cond`)."""
    tokenizer = tiny_clip_tokenizer(Path(tmp_path) / "tiny-sd-tokenizer")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        attention_head_dim=4,
        norm_num_groups=4,
        time_cond_proj_dim=time_cond_proj_dim,
    )
    vae = _tiny_vae(seed)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer)).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {
        "unet": unet.eval(),
        "scheduler": scheduler,
        "vae": vae.eval(),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def tiny_sdxl_components(tmp_path, sample_size: int = 16, seed: int = 0) -> dict:
    """Components for `StableDiffusionXLPipeline(**components)`: a UNet with SDXL's `text_time` added conditioning,
    two CLIP text encoders (the second with a projection, giving the pooled embedding), Euler scheduler.

    `tmp_path` is a folder for the tokenizer files."""
    tokenizer = tiny_clip_tokenizer(Path(tmp_path) / "tiny-sdxl-tokenizer")
    tokenizer_2 = tiny_clip_tokenizer(Path(tmp_path) / "tiny-sdxl-tokenizer-2")
    addition_time_embed_dim = 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        # SDXL concatenates the hidden states of both text encoders
        cross_attention_dim=2 * TEXT_HIDDEN_SIZE,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 1),
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        # 6 micro-conditioning numbers (original size, crop corner, target size) + the pooled text embedding
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + TEXT_PROJECTION_DIM,
        norm_num_groups=4,
    )
    vae = _tiny_vae(seed)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer)).eval()
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, TEXT_PROJECTION_DIM)).eval()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return {
        "unet": unet.eval(),
        "scheduler": scheduler,
        "vae": vae.eval(),
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "image_encoder": None,
        "feature_extractor": None,
    }


def add_tiny_ip_adapter(unet: UNet2DConditionModel, image_embed_dim: int = 8, num_tokens: int = 4, seed: int = 0):
    """Give `unet` a random IP-Adapter, set up the way `UNet2DConditionModel._load_ip_adapter_weights` does: image
    projection layers plus IP-Adapter cross-attention processors. Pipelines then take
    `ip_adapter_image_embeds=[tensor of shape (2, 1, image_embed_dim)]` (negative and positive embedding with CFG)."""
    torch.manual_seed(seed)
    cross_attention_dim = unet.config.cross_attention_dim
    block_out_channels = unet.config.block_out_channels
    processors = {}
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):  # self-attention has no image tokens
            processors[name] = AttnProcessor2_0()
            continue
        if name.startswith("mid_block"):
            hidden_size = block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden_size = list(reversed(block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden_size = block_out_channels[int(name[len("down_blocks.")])]
        processors[name] = IPAdapterAttnProcessor2_0(
            hidden_size=hidden_size, cross_attention_dim=cross_attention_dim, num_tokens=(num_tokens,), scale=1.0
        )
    unet.set_attn_processor(processors)
    projection = ImageProjection(
        image_embed_dim=image_embed_dim, cross_attention_dim=cross_attention_dim, num_image_text_embeds=num_tokens
    )
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([projection])
    unet.config.encoder_hid_dim_type = "ip_image_proj"
    return unet
