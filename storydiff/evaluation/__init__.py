"""Evaluation of generated samples.

* In miniature, offline (`storydiff.evaluation.digits`): a small CNN trained by the project on the digits train
  split scores generated digits by class accuracy and by a Frechet distance in its feature space against the
  held-out test split.
* In the captioned digits world (`storydiff.evaluation.text_adherence`): the attributes a caption states (digit,
  colour, position, size) read back from generated canvases, caption adherence, and a Frechet distance of the
  located digits against held-out real canvases.
* For real models (`storydiff.evaluation.real_models`): CLIP score and FID hooks that work once the user has the
  weights (a CLIP checkpoint from the Hub, torch-fidelity's Inception network, or any feature extractor).
"""

from .digits import (
    DigitClassifier,
    balanced_real_digits,
    class_accuracy,
    classifier_features,
    default_digit_classifier_path,
    digit_frechet_distance,
    evaluate_digit_samples,
    load_digit_classifier,
    real_digit_images,
)
from .real_models import clip_score, frechet_feature_distance, inception_feature_extractor
from .text_adherence import canvas_frechet_distance, caption_adherence, measure_canvas, measure_canvases

__all__ = [
    "DigitClassifier",
    "balanced_real_digits",
    "canvas_frechet_distance",
    "caption_adherence",
    "class_accuracy",
    "classifier_features",
    "clip_score",
    "default_digit_classifier_path",
    "digit_frechet_distance",
    "evaluate_digit_samples",
    "frechet_feature_distance",
    "inception_feature_extractor",
    "load_digit_classifier",
    "measure_canvas",
    "measure_canvases",
    "real_digit_images",
]
