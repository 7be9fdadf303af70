"""training/train_director.py: a few steps on a tiny synthetic E.T. folder, an exact resume, the saved pipeline."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from storydiff import DirectorPipeline
from storydiff.data import make_synthetic_et
from storydiff.text_features import load_text_encoder
from storydiff.training.train_director import main

TINY = ["--hidden_size", "16", "--num_layers", "1", "--num_heads", "2", "--num_registers", "2",
        "--num_condition_layers", "1", "--num_frames", "40"]  # fmt: skip


@pytest.fixture(scope="module")
def et_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("et")
    make_synthetic_et(root, num_samples=24, seed=0, num_frames=(20, 40))
    return str(root)


def _train(et_root, output_dir, steps, log, extra=()):
    argv = [
        "--et_root", et_root, "--output_dir", str(output_dir), *TINY, "--train_batch_size", "8",
        "--max_train_steps", str(steps), "--checkpointing_steps", "2", "--validation_steps", "100",
        "--num_validation_samples", "2", "--num_inference_steps", "2", "--lr_warmup_steps", "1",
        "--learning_rate", "1e-3", "--report_to", "none", "--torch_num_threads", "1",
        "--debug_example_log", str(log), *extra,
    ]  # fmt: skip
    return main(argv)


def _batches(log):
    with open(log) as file:
        return [json.loads(line)["indices"] for line in file]


def test_train_saves_a_loadable_pipeline_without_text_encoder(et_root, tmp_path):
    output = _train(
        et_root,
        tmp_path / "run",
        3,
        tmp_path / "log.jsonl",
        ["--conditioning_type", "adaln", "--no-save_text_encoder"],
    )
    assert os.path.isfile(os.path.join(output, "model", "diffusion_pytorch_model.safetensors"))
    assert not os.path.isdir(os.path.join(output, "text_encoder"))
    with open(os.path.join(output, "train_metrics.json")) as file:
        metrics = json.load(file)
    assert metrics["train_steps"] == 3 and metrics["val_loss"] > 0
    assert 0 <= metrics["val_camera_f1"] <= 1
    card = open(os.path.join(output, "README.md")).read()
    assert "train_director.py" in card and "--max_train_steps 3" in card and "load_text_encoder" in card
    assert sum(_batches(tmp_path / "log.jsonl"), [])[:8] != list(range(8))  # shuffled
    text_encoder, tokenizer = load_text_encoder()
    pipe = DirectorPipeline.from_pretrained(output, text_encoder=text_encoder, tokenizer=tokenizer)
    assert pipe.model.config.conditioning_type == "adaln" and pipe.model.config.text_embed_dim == 384
    pipe.set_progress_bar_config(disable=True)
    out = pipe("The camera trucks right.", num_frames=12, num_inference_steps=2)
    assert out.trajectories.shape == (1, 12, 4, 4) and np.isfinite(out.trajectories).all()


def test_resume_continues_exactly(et_root, tmp_path):
    # constant LR: the interrupted run's first leg stops at step 2, and a cosine schedule's horizon would differ
    extra = ["--no-save_text_encoder", "--text_features", "on_the_fly", "--lr_scheduler", "constant"]
    _train(et_root, tmp_path / "straight", 4, tmp_path / "straight.jsonl", extra)
    _train(et_root, tmp_path / "interrupted", 2, tmp_path / "interrupted.jsonl", extra)
    _train(
        et_root,
        tmp_path / "interrupted",
        4,
        tmp_path / "interrupted.jsonl",
        [*extra, "--resume_from_checkpoint", "latest"],
    )
    assert _batches(tmp_path / "interrupted.jsonl") == _batches(tmp_path / "straight.jsonl")
    straight = load_file(tmp_path / "straight" / "model" / "diffusion_pytorch_model.safetensors")
    resumed = load_file(tmp_path / "interrupted" / "model" / "diffusion_pytorch_model.safetensors")
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, msg=name)


def test_requires_data(tmp_path):
    with pytest.raises(SystemExit):
        main(["--output_dir", str(tmp_path)])
