"""Caption features computed once per training run and cached beside it (DIRECTOR and CLaTr training).

Text encoders are frozen in both scripts, so encoding every caption once and reading the features back on resume
saves the encoder's cost on every step. The cache is checked against a digest of the captions, so a changed data set
is never trained on stale features.
"""

import hashlib
import os

import torch
from safetensors.torch import load_file, save_file

from storydiff.atomic_files import atomic_save
from storydiff.text_features import TextFeatures, encode_text


def caption_features(captions, text_encoder, tokenizer, max_length: int, batch_size: int = 64) -> dict:
    """Pooled vectors, token features and masks of all captions, trimmed to the longest real caption."""
    chunks = [
        encode_text(text_encoder, tokenizer, list(captions[start : start + batch_size]), max_length=max_length)
        for start in range(0, len(captions), batch_size)
    ]
    features = TextFeatures.cat(chunks)
    longest = int(features.mask.sum(1).max())  # padding is masked and zero, so trimming it changes nothing
    return {
        "pooled": features.pooled,
        "tokens": features.tokens[:, :longest].contiguous(),
        "mask": features.mask[:, :longest].contiguous(),
    }


def captions_fingerprint(captions) -> list[int]:
    """A stable digest of the caption list (Python's hash() is salted per process)."""
    return [int(byte) for byte in hashlib.sha256("\n".join(captions).encode("utf-8")).digest()[:16]]


def cached_caption_features(path: str, captions, load_encoder, max_length: int) -> dict:
    """Encode captions once (`load_encoder() -> (text_encoder, tokenizer)` is only called on a cache miss); a resumed
    run reads them back from `path`."""
    fingerprint = captions_fingerprint(captions)
    if os.path.isfile(path):
        cached = load_file(path)
        if cached.pop("fingerprint").tolist() == fingerprint:
            return cached
    text_encoder, tokenizer = load_encoder()
    features = caption_features(captions, text_encoder, tokenizer, max_length)
    # Atomic: a kill mid-write must not leave a truncated cache that the resumed run then fails to read.
    atomic_save(path, lambda temporary: save_file({**features, "fingerprint": torch.tensor(fingerprint)}, temporary))
    return features
