"""Fresh components for a small Stable-Diffusion-shaped model: a word-level CLIP tokenizer built from the training
captions, a small CLIP text encoder, a `UNet2DConditionModel` and an `AutoencoderKL`.

Everything is a stock diffusers or transformers class, so a pipeline assembled from them saves to a folder that the
stock `StableDiffusionPipeline.from_pretrained(folder)` loads. The training scripts build them when they start from
scratch (`train_vae.py`, `train_text_to_image.py --vae ...`); a fine-tuning run loads them from a pipeline instead.
"""

import json
import re
from pathlib import Path
from typing import Iterable, Sequence

# CLIP's pre-tokenizer splits words, single digits and runs of punctuation (after lower-casing); this mirrors it for
# the ASCII captions the vocabulary is built from.
_CLIP_WORD_PATTERN = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")
_ASCII_PRINTABLE = [chr(code) for code in range(33, 127)]  # map to themselves under CLIP's byte-level encoding


def caption_words(captions: Iterable[str]) -> list:
    """The distinct words (as CLIP's pre-tokenizer splits them) of `captions`, sorted."""
    words = set()
    for caption in captions:
        words.update(_CLIP_WORD_PATTERN.findall(caption.lower()))
    return sorted(words)


def word_level_clip_tokenizer(words: Sequence[str], folder, max_length: int = 24):
    """A `CLIPTokenizer` whose vocabulary holds every word of `words` as one token, written to `folder`.

    Each word gets a chain of byte-pair merges (w, o) -> (wo, r) -> (wor, d</w>). BPE applies the lowest-ranked merge
    first, so one word's chain can cut into another word ("magenta" makes "ma" before "small" can make "sm"); such a
    word gets extra merges, ranked after all others, that join the pieces it ends up with, until every word is one
    token (merges ranked last never change a word that already was). Single characters (with and without the
    end-of-word mark) stay in the vocabulary, so an unknown word still tokenizes, letter by letter. Special tokens take
    the last ids, as in real CLIP, so the text model's pooling finds the end-of-text token.
    """

    if max_length < 4:
        raise ValueError(f"max_length must be >= 4 (start, end and at least two words), got {max_length}.")
    for word in words:
        if not word or any(c not in _ASCII_PRINTABLE for c in word):
            raise ValueError(f"Vocabulary words must be non-empty printable ASCII without spaces, got {word!r}.")
    pieces_of = {word: list(word[:-1]) + [word[-1] + "</w>"] for word in words}
    merges = []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for _ in range(16):
        for pieces in pieces_of.values():
            joined = pieces[0]
            for piece in pieces[1:]:
                merges.append((joined, piece))
                joined += piece
        merges = list(dict.fromkeys(merges))  # a shared prefix gives the same merge once
        tokenizer = _write_clip_tokenizer(folder, merges, max_length)
        pieces_of = {word: tokenizer.tokenize(word) for word in words}
        pieces_of = {word: pieces for word, pieces in pieces_of.items() if len(pieces) > 1}
        if not pieces_of:
            return tokenizer
    raise RuntimeError(f"Could not give these words one token each: {sorted(pieces_of)}.")


def _write_clip_tokenizer(folder: Path, merges: list, max_length: int):
    from transformers import CLIPTokenizer

    tokens = [*_ASCII_PRINTABLE, *(f"{c}</w>" for c in _ASCII_PRINTABLE)]
    tokens += [token for token in dict.fromkeys(a + b for a, b in merges) if token not in set(tokens)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer.from_pretrained(folder, model_max_length=max_length, local_files_only=True)


def new_text_encoder(tokenizer, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, seed: int = 0):
    """A randomly initialised `CLIPTextModel` for `tokenizer` (positions up to its `model_max_length`)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_attention_heads=num_heads,
        num_hidden_layers=num_layers,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=hidden_size,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config)


def new_unet(
    sample_size: int,
    cross_attention_dim: int,
    block_out_channels: Sequence[int] = (64, 128),
    layers_per_block: int = 1,
    attention_head_dim: int = 8,
    norm_num_groups: int = 16,
    latent_channels: int = 4,
    seed: int = 0,
):
    """A `UNet2DConditionModel` with cross-attention at every level, Stable Diffusion's block layout in miniature."""
    import torch
    from diffusers import UNet2DConditionModel

    levels = len(block_out_channels)
    if sample_size % 2 ** (levels - 1):
        raise ValueError(f"Latent size {sample_size} must be divisible by 2**{levels - 1} for {levels} UNet levels.")
    if any(channels % norm_num_groups for channels in block_out_channels):
        raise ValueError(f"Every UNet width {list(block_out_channels)} must be divisible by {norm_num_groups} groups.")
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * levels,
        up_block_types=("CrossAttnUpBlock2D",) * levels,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
    )


def new_vae(
    block_out_channels: Sequence[int] = (32, 64, 64),
    latent_channels: int = 4,
    layers_per_block: int = 1,
    norm_num_groups: int = 16,
    image_channels: int = 3,
    seed: int = 0,
):
    """An `AutoencoderKL` that downsamples by 2**(len(block_out_channels) - 1), as Stable Diffusion's VAE (by 8)."""
    import torch
    from diffusers import AutoencoderKL

    if any(channels % norm_num_groups for channels in block_out_channels):
        raise ValueError(f"Every VAE width {list(block_out_channels)} must be divisible by {norm_num_groups} groups.")
    levels = len(block_out_channels)
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=image_channels,
        out_channels=image_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
    )
