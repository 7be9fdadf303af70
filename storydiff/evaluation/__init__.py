"""Evaluation of generated samples.

* In miniature, offline (`storydiff.evaluation.digits`): a small CNN trained by the project on the digits train
  split scores generated digits by class accuracy and by a Frechet distance in its feature space against the
  held-out test split.
* In the captioned digits world (`storydiff.evaluation.text_adherence`): the attributes a caption states (digit,
  colour, position, size) read back from generated canvases, caption adherence, and a Frechet distance of the
  located digits against held-out real canvases.
* For videos of moving digits (`storydiff.evaluation.video`): the ink's track and the direction it moves in
  (`track_centres`, `motion_direction`), and `evaluate_videos`: direction accuracy, identity and colour
  consistency over frames, per-frame caption adherence and a frame Frechet distance.
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
from .video import evaluate_videos, motion_direction, track_centres

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
    "evaluate_videos",
    "frechet_feature_distance",
    "inception_feature_extractor",
    "load_digit_classifier",
    "measure_canvas",
    "measure_canvases",
    "motion_direction",
    "real_digit_images",
    "track_centres",
]
