"""training/train_class_conditional.py: a short run, an image folder, bad input, and kill-and-resume."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from storydiff import ClassConditionalPipeline
from storydiff.training.checkpointing import list_checkpoints
from storydiff.training.train_class_conditional import main

SCRIPT = Path(__file__).resolve().parents[1] / "training" / "train_class_conditional.py"
TINY = [
    "--resolution", "16",
    "--block_out_channels", "8,16",
    "--norm_num_groups", "4",
    "--train_batch_size", "4",
    "--lr_warmup_steps", "2",
    "--num_validation_images_per_class", "1",
    "--validation_inference_steps", "2",
    "--torch_num_threads", "1",
]  # fmt: skip


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_short_digits_run_saves_loadable_pipeline_card_and_logs(tmp_path):
    out = tmp_path / "run"
    argv = ["--dataset", "digits", *TINY, "--output_dir", str(out), "--max_train_steps", "3"]
    main(argv + ["--validation_steps", "2", "--checkpointing_steps", "2", "--mixed_precision", "no"])

    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(out.glob("unet/*.bin"))
    assert (out / "validation" / "step_000002.png").is_file() and (out / "samples.png").is_file()
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert [step for step, _ in list_checkpoints(str(out))] == [2]

    card = (out / "README.md").read_text()
    assert "library_name: diffusers" in card and "- class-conditional" in card
    assert "training/train_class_conditional.py --dataset digits" in card and "--max_train_steps 3" in card
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["train_steps"] == 3 and np.isfinite(metrics["train_loss_mean_last_3_steps"])
    assert f"| train_loss_mean_last_3_steps | {metrics['train_loss_mean_last_3_steps']:.4g} |" in card

    pipe = ClassConditionalPipeline.from_pretrained(out)
    assert pipe.config.num_classes == 10 and pipe.unet.config.num_class_embeds == 11
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[3, 7], guidance_scale=2.0, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 16, 16, 1)


def write_image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for name in ("circle", "square"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_image_folder_training_and_missing_column(tmp_path):
    folder = write_image_folder(tmp_path / "images")
    out = tmp_path / "run"
    common = ["--train_data_dir", str(folder), *TINY, "--output_dir", str(out), "--report_to", "none"]
    with pytest.raises(ValueError, match=r"--label_column 'kind' is not a column.*Available columns: image, label"):
        main(common + ["--label_column", "kind", "--max_train_steps", "1"])

    main(common + ["--max_train_steps", "2", "--image_channels", "1", "--random_flip", "--no-use_ema"])
    pipe = ClassConditionalPipeline.from_pretrained(out)
    assert pipe.config.num_classes == 2 and pipe.labels == {"circle": 0, "square": 1}
    assert pipe.unet.config.in_channels == 1


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--output_dir", "x"], "exactly one data source"),
        (["--output_dir", "x", "--dataset", "digits", "--dataset_name", "a/b"], "exactly one data source"),
        (["--output_dir", "x", "--dataset", "digits", "--class_dropout_prob", "1.5"], "class_dropout_prob"),
        (["--output_dir", "x", "--dataset", "digits", "--resolution", "18"], "divisible"),
        (["--output_dir", "x", "--dataset", "digits", "--resolution", "24", "--report_to", "none"], "16 or 32"),
        (["--output_dir", "x", "--dataset", "digits", "--block_out_channels", "8,a"], "comma-separated"),
        (["--output_dir", "x", "--dataset", "digits", "--gradient_accumulation_steps", "0"], "gradient_accumulation"),
    ],
)
def test_bad_arguments(argv, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a rejected run may create stays out of the checkout
    with pytest.raises(ValueError, match=match):
        main(argv)


def read_log(path: Path) -> list:
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by the kill
            pass
    return entries


def test_kill_and_resume_sees_the_same_data_and_ends_with_the_same_weights(tmp_path, capsys):
    # 20 examples in batches of 4 with 2-batch accumulation: 5 batches and 3 updates per epoch, so checkpoint-4
    # sits in the middle of epoch 1 and the run crosses epoch boundaries.
    common = [
        "--dataset", "digits", *TINY, "--max_train_samples", "20",
        "--gradient_accumulation_steps", "2", "--max_train_steps", "9", "--checkpointing_steps", "2",
        "--validation_steps", "1000", "--report_to", "none",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    victim = subprocess.Popen(
        [sys.executable, str(SCRIPT), *common, "--output_dir", str(killed),
         "--debug_example_log", str(tmp_path / "killed.jsonl"), "--debug_step_sleep", "0.5"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def kill_after_checkpoint_4():
        deadline = time.time() + 240
        while not (killed / "checkpoint-4").is_dir() and victim.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)

    killer = threading.Thread(target=kill_after_checkpoint_4)
    killer.start()
    # The uninterrupted reference runs in this process meanwhile.
    main([*common, "--output_dir", str(straight), "--debug_example_log", str(tmp_path / "straight.jsonl")])
    killer.join()
    assert victim.wait() == -signal.SIGKILL
    assert (killed / "checkpoint-4").is_dir() and not (killed / "model_index.json").exists()

    # Resume in this process (the killed process is gone; a fresh one would only add start-up time).
    capsys.readouterr()
    main([*common, "--output_dir", str(killed), "--debug_example_log", str(tmp_path / "resumed.jsonl"),
          "--resume_from_checkpoint", "latest"])  # fmt: skip
    assert f"Resuming from {killed / 'checkpoint-4'}" in capsys.readouterr().out

    reference = read_log(tmp_path / "straight.jsonl")
    # The killed run's batches after checkpoint-4 were lost with it; the resumed run redoes them.
    before_kill = [entry for entry in read_log(tmp_path / "killed.jsonl") if entry["step"] < 4]
    after_resume = read_log(tmp_path / "resumed.jsonl")
    assert after_resume[0]["step"] == 4 and after_resume[0]["epoch"] == 1
    assert before_kill + after_resume == reference
    assert len(reference) == 15  # 9 updates = 3 epochs of 5 batches
    for epoch in range(3):
        seen = [i for entry in reference if entry["epoch"] == epoch for i in entry["indices"]]
        assert sorted(seen) == list(range(20))  # every example once per epoch
    assert [e["indices"] for e in reference[:5]] != [e["indices"] for e in reference[5:10]]  # reshuffled

    # Same data, same restored RNG, optimizer and EMA states: the same final (EMA) weights, bit for bit.
    expected = load_file(straight / "unet" / "diffusion_pytorch_model.safetensors")
    got = load_file(killed / "unet" / "diffusion_pytorch_model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
