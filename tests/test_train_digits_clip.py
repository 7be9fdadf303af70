"""training/train_digits_clip.py for a few steps, and the shipped digits CLIP as a coherence score."""

import json

import numpy as np
import pytest

from storydiff.training.checkpointing import ResumeSettingsError
from storydiff.training.train_digits_clip import main

TINY = ["--resolution", 24, "--num_world_samples", 48, "--num_eval_samples", 12, "--eval_batch_size", 6,
        "--batch_size", 16, "--hidden_size", 16, "--num_layers", 1, "--num_heads", 2, "--patch_size", 8,
        "--projection_dim", 8, "--report_to", "none", "--torch_num_threads", 1]  # fmt: skip


def test_a_few_steps_save_a_loadable_clip_and_resume(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    output, work = tmp_path / "clip", tmp_path / "work"
    command = [*TINY, "--output_dir", output, "--work_dir", work]
    metrics = main([*command, "--num_epochs", 2])
    assert metrics["train_steps"] == 6  # 2 epochs of 48 canvases in batches of 16
    for name in ("retrieval_top1", "cosine_mean_true", "cosine_mean_wrong", "cosine_mean_vague"):
        assert np.isfinite(metrics[name])
    assert 0 <= metrics["retrieval_top1"] <= 1
    assert json.loads((output / "train_metrics.json").read_text()) == metrics
    card = (output / "README.md").read_text()
    assert "train_digits_clip.py" in card and "cosine_mean_wrong" in card

    model, processor = CLIPModel.from_pretrained(output), CLIPProcessor.from_pretrained(output)
    assert model.config.vision_config.image_size == 24 and model.config.projection_dim == 8
    assert processor.tokenizer.tokenize("a big magenta seven in the upper left") == [
        "a</w>", "big</w>", "magenta</w>", "seven</w>", "in</w>", "the</w>", "upper</w>", "left</w>",
    ]  # fmt: skip

    # a rerun resumes from the last checkpoint (after epoch 2): nothing left to train, the same model and figures
    resumed = main([*command, "--num_epochs", 2, "--resume_from_checkpoint", "latest"])
    assert {**resumed, "train_wall_time_s": 0} == {**metrics, "train_wall_time_s": 0}
    # the learning-rate schedule spans all epochs: another --num_epochs cannot resume exactly
    with pytest.raises(ResumeSettingsError, match="num_epochs: checkpoint 2, now 3"):
        main([*command, "--num_epochs", 3, "--resume_from_checkpoint", "latest"])


def test_bad_flags():
    with pytest.raises(SystemExit):
        main(["--resolution", 30, "--patch_size", 4])
    with pytest.raises(SystemExit):
        main(["--learning_rate", "nan"])


def test_shipped_digits_clip_separates_true_from_wrong_and_vague_captions():
    from transformers import CLIPModel, CLIPProcessor

    from storydiff.checkpoints import digits_clip_path
    from storydiff.coherence import clip_coherence
    from storydiff.data.noisy import noisy_digits_world

    model = CLIPModel.from_pretrained(digits_clip_path())
    processor = CLIPProcessor.from_pretrained(digits_clip_path())
    world = noisy_digits_world(48, 32, fraction_wrong=1 / 3, fraction_vague=1 / 3, seed=5, split="test")
    coherence = clip_coherence(world["image"], world["text"], model, processor, device="cpu").numpy()
    corruption = np.asarray(world["corruption"])
    true, wrong, vague = (coherence[corruption == kind].mean() for kind in ("none", "wrong", "vague"))
    assert true > 0.7 and true > wrong + 0.5 and true > vague + 0.5
    metrics = json.loads(open(f"{digits_clip_path()}/train_metrics.json").read())
    assert metrics["retrieval_top1"] > 0.5
