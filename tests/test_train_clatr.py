"""training/train_clatr.py: a few steps on a tiny synthetic E.T. folder, and an exact resume."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from storydiff import CLaTrModel
from storydiff.data import make_synthetic_et
from storydiff.training.train_clatr import main

TINY = ["--latent_dim", "16", "--num_layers", "1", "--num_heads", "2", "--ff_size", "32", "--max_frames", "40"]


@pytest.fixture(scope="module")
def et_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("et")
    make_synthetic_et(root, num_samples=30, seed=0, num_frames=(20, 40))
    return str(root)


def _train(et_root, output_dir, steps, log, extra=()):
    argv = [
        "--et_root", et_root, "--output_dir", str(output_dir), *TINY, "--train_batch_size", "8",
        "--max_train_steps", str(steps), "--checkpointing_steps", "2", "--validation_steps", "100",
        "--learning_rate", "1e-3", "--report_to", "none", "--num_threads", "1", "--debug_example_log", str(log),
        *extra,
    ]  # fmt: skip
    return main(argv)


def _batches(log):
    with open(log) as file:
        return [json.loads(line)["indices"] for line in file]


def test_train_saves_a_loadable_model_with_a_card(et_root, tmp_path):
    output = _train(et_root, tmp_path / "run", 3, tmp_path / "log.jsonl")
    assert os.path.isfile(os.path.join(output, "diffusion_pytorch_model.safetensors"))
    model = CLaTrModel.from_pretrained(output)
    assert model.config.text_embed_dim == 384 and model.config.text_encoder_id == "all-MiniLM-L6-v2"
    with open(os.path.join(output, "train_metrics.json")) as file:
        metrics = json.load(file)
    assert metrics["train_steps"] == 3 and metrics["train_loss_mean_last_3_steps"] > 0
    assert 0 <= metrics["val_text_to_trajectory_R@1"] <= 1
    with open(os.path.join(output, "README.md")) as file:
        card = file.read()
    assert "train_clatr.py" in card and "--max_train_steps 3" in card
    # Shuffled: the first epoch does not visit the samples in order.
    assert sum(_batches(tmp_path / "log.jsonl"), [])[:8] != list(range(8))


def test_resume_continues_exactly(et_root, tmp_path):
    _train(et_root, tmp_path / "straight", 4, tmp_path / "straight.jsonl")
    _train(et_root, tmp_path / "interrupted", 2, tmp_path / "interrupted.jsonl")
    _train(
        et_root, tmp_path / "interrupted", 4, tmp_path / "interrupted.jsonl", ["--resume_from_checkpoint", "latest"]
    )
    assert _batches(tmp_path / "interrupted.jsonl") == _batches(tmp_path / "straight.jsonl")
    straight = load_file(tmp_path / "straight" / "diffusion_pytorch_model.safetensors")
    resumed = load_file(tmp_path / "interrupted" / "diffusion_pytorch_model.safetensors")
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, msg=name)


def test_requires_data(tmp_path):
    with pytest.raises(SystemExit):
        main(["--output_dir", str(tmp_path)])
