"""CLIP score and FID hooks for real models.

These need weights storydiff does not ship, so they cannot run offline: `clip_score` loads a CLIP checkpoint
from the Hub (or takes a `CLIPModel` you built), and `frechet_feature_distance` uses torch-fidelity's
FID Inception network (`pip install torch-fidelity`; it downloads its weights on first use) unless you pass your
own `feature_extractor`. Images follow diffusers' output convention (values in [0, 1]; numpy (N, H, W, C),
torch (N, C, H, W) or a list of PIL images).
"""

from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from storydiff.evaluation.digits import _images_to_tensor
from storydiff.metrics import frechet_distance

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]


def _to_pil(images) -> list:
    from PIL import Image

    tensor = _images_to_tensor(images)
    if tensor.shape[1] == 1:
        tensor = tensor.repeat(1, 3, 1, 1)
    arrays = (tensor.permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)
    return [Image.fromarray(array) for array in arrays]


@torch.no_grad()
def clip_score(
    images,
    prompts: Union[str, Sequence[str]],
    model="openai/clip-vit-base-patch32",
    processor=None,
    device: Union[str, torch.device] = "cpu",
    batch_size: int = 32,
) -> float:
    """CLIP score of images against their prompts: `100 * mean(max(cos(image_embedding, text_embedding), 0))`.

    This is the definition of Hessel et al. (2021) as torchmetrics computes it; the paper's text-to-image results
    use it with ViT-L/14 (`model="openai/clip-vit-large-patch14"`).

    Args:
        images: N images in [0, 1] (numpy (N, H, W, C), torch (N, C, H, W) or a list of PIL images).
        prompts: One prompt per image, or a single prompt for all of them.
        model: A Hub id or local folder of a CLIP checkpoint, or a `transformers.CLIPModel`.
        processor: A `CLIPProcessor`; loaded from `model` when that is an id or folder.
        device: Where the CLIP model runs.
        batch_size: Images per forward pass.
    """
    from transformers import CLIPModel, CLIPProcessor

    if isinstance(model, str):
        processor = processor if processor is not None else CLIPProcessor.from_pretrained(model)
        model = CLIPModel.from_pretrained(model)
    elif not isinstance(model, CLIPModel):
        raise TypeError(f"`model` must be a Hub id, a folder or a CLIPModel, got {type(model).__name__}.")
    elif processor is None:
        raise ValueError("Pass the `processor` (a CLIPProcessor) that goes with the CLIPModel you gave.")
    model = model.to(device).eval()

    pil_images = _to_pil(images)
    prompts = [prompts] * len(pil_images) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(pil_images):
        raise ValueError(f"Got {len(pil_images)} images but {len(prompts)} prompts; give one prompt per image.")

    scores = []
    for start in range(0, len(pil_images), batch_size):
        inputs = processor(
            text=prompts[start : start + batch_size],
            images=pil_images[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
        ).to(device)
        outputs = model(**inputs)
        # image_embeds and text_embeds come back L2-normalised, so their dot product is the cosine.
        cosine = (outputs.image_embeds * outputs.text_embeds).sum(dim=-1)
        scores.append(100.0 * cosine.clamp(min=0).float().cpu())
    return float(torch.cat(scores).mean())


def inception_feature_extractor(device: Union[str, torch.device] = "cpu") -> FeatureExtractor:
    """The FID Inception-v3 network (2048-d pool features) from torch-fidelity, as a feature extractor.

    Needs `pip install torch-fidelity`; the weights (the TensorFlow FID network ported to PyTorch) download on
    first use. The extractor takes float (N, 3, H, W) images in [0, 1] and resizes them to 299x299 itself.
    """
    from storydiff.optional_imports import require

    inception = require(
        "torch_fidelity.feature_extractor_inceptionv3",
        purpose="FID's Inception network",
        alternative="pass your own `feature_extractor=` to frechet_feature_distance",
    )
    network = inception.FeatureExtractorInceptionV3(name="inception-v3-compat", features_list=["2048"])
    network = network.to(device).eval()

    def extract(images: torch.Tensor) -> torch.Tensor:
        # torch-fidelity expects uint8 images, as FID is defined on 8-bit images.
        return network((images * 255.0).round().to(device, torch.uint8))[0]

    return extract


@torch.no_grad()
def frechet_feature_distance(
    generated,
    real,
    feature_extractor: Optional[FeatureExtractor] = None,
    batch_size: int = 64,
    device: Union[str, torch.device] = "cpu",
) -> float:
    """Frechet distance between two image sets in a feature extractor's space: FID by default.

    Args:
        generated, real: Images in [0, 1] (numpy (N, H, W, C), torch (N, C, H, W) or lists of PIL images).
            Grey images are repeated to 3 channels.
        feature_extractor: A callable mapping a float (B, 3, H, W) batch in [0, 1] on `device` to (B, F)
            features. Defaults to `inception_feature_extractor(device)` (FID). Reported FIDs use 10k-50k images;
            small sets give large, biased values, comparable only at equal sample counts.
        batch_size: Images per feature extractor call.
        device: Where the batches go.
    """
    if feature_extractor is None:
        feature_extractor = inception_feature_extractor(device)
    elif not callable(feature_extractor):
        raise TypeError(f"`feature_extractor` must be callable, got {type(feature_extractor).__name__}.")

    def features_of(images) -> np.ndarray:
        tensor = _images_to_tensor(images)
        if tensor.shape[1] == 1:
            tensor = tensor.repeat(1, 3, 1, 1)
        batches = []
        for start in range(0, tensor.shape[0], batch_size):
            features = feature_extractor(tensor[start : start + batch_size].to(device))
            if not isinstance(features, torch.Tensor) or features.ndim != 2:
                raise ValueError("`feature_extractor` must return a 2-D tensor (batch, features).")
            batches.append(features.detach().double().cpu())
        return torch.cat(batches).numpy()

    return frechet_distance(features_of(generated), features_of(real))
