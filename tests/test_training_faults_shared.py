"""Training scripts under faults: Ctrl-C, kills during saves, bad input, non-finite losses, changed resume settings.

Every script uses the shared modules in training/ (arguments, checkpointing, run_guards, datasets_loading,
sample_grids, model_card); the class-conditional script, the fastest, stands in for them where one run shows it.
"""

import json
import os
import signal
import socket
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
from storydiff.training import train_class_conditional
from storydiff.training.checkpointing import (
    ResumeSettingsError,
    TrainingPosition,
    list_checkpoints,
    save_checkpoint,
)
from storydiff.training.datasets_loading import load_image_dataset
from storydiff.training.model_card import launcher_command, training_command
from storydiff.training.run_guards import NonFiniteLossError, resume_hint_on_interrupt
from storydiff.training.sample_grids import labelled_grid

TRAINING = Path(__file__).resolve().parents[1] / "training"
SCRIPTS = [
    "train_class_conditional.py", "train_director.py", "train_clatr.py", "train_digit_classifier.py",
    "train_vae.py", "train_text_to_image.py", "train_video_ldm.py", "train_controlnet.py",
    "train_coherence_aware.py", "compute_coherence.py", "train_digits_clip.py",
]  # fmt: skip
TINY = [
    "--dataset", "digits", "--resolution", "16", "--block_out_channels", "8,16", "--norm_num_groups", "4",
    "--train_batch_size", "4", "--max_train_samples", "8", "--lr_warmup_steps", "1",
    "--num_validation_images_per_class", "1", "--validation_inference_steps", "1", "--validation_steps", "1000",
    "--checkpointing_steps", "2", "--report_to", "none", "--torch_num_threads", "1",
]  # fmt: skip


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def train(output_dir, *extra):
    return train_class_conditional.main([*TINY, "--output_dir", str(output_dir), *extra])


# ------------------------------------------------------------------------------------ item 9: --help and Ctrl-C


def test_help_answers_before_torch_is_imported_and_shows_defaults():
    code = (
        "import runpy, sys\n"
        f"for script in {[str(TRAINING / name) for name in SCRIPTS]!r}:\n"
        "    sys.argv = [script, '--help']\n"
        "    try:\n"
        "        runpy.run_path(script, run_name='__main__')\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'diffusers', 'accelerate', 'datasets') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "HEAVY []" in out
    assert out.count("usage: ") == len(SCRIPTS)
    assert "(default: 0.0005)" in out and "(default: 0.002)" in out  # class-conditional's and the classifier's lr


def test_a_bad_flag_value_is_one_line_and_exit_status_2(tmp_path):
    command = [sys.executable, str(TRAINING / "train_class_conditional.py"), "--dataset", "digits", "--output_dir",
               str(tmp_path / "out"), "--learning_rate", "inf"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "train_class_conditional.py: error: --learning_rate must be a finite number > 0 (and fit a float32), got inf."
    )


def test_ctrl_c_prints_one_resume_line_and_exits_130(tmp_path, capsys):
    # A real SIGINT to this process once checkpoint-2 exists (in-process: a fresh interpreter would add ~10 s of
    # imports); Python turns it into the KeyboardInterrupt a terminal's Ctrl-C gives the script.
    out = tmp_path / "run"
    running = threading.Event()
    running.set()

    def press_ctrl_c():
        deadline = time.time() + 120
        while running.is_set() and not (out / "checkpoint-2").is_dir() and time.time() < deadline:
            time.sleep(0.02)
        if running.is_set():
            os.kill(os.getpid(), signal.SIGINT)

    presser = threading.Thread(target=press_ctrl_c)
    presser.start()
    try:
        with pytest.raises(SystemExit) as exit_info:
            train(out, "--max_train_steps", "100", "--debug_step_sleep", "0.3")
    finally:
        running.clear()
        presser.join()
    assert exit_info.value.code == 130
    assert exit_info.value.__cause__ is None and exit_info.value.__suppress_context__  # no chained traceback
    hints = [line for line in capsys.readouterr().err.splitlines() if "Interrupted" in line]
    assert len(hints) == 1
    assert "--resume_from_checkpoint latest" in hints[0] and "checkpoint-2 (step 2)" in hints[0]


def test_interrupt_without_checkpoint_says_the_run_starts_over(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info, resume_hint_on_interrupt(str(tmp_path)):
        raise KeyboardInterrupt
    assert exit_info.value.code == 130
    assert "no checkpoint yet and starts from step 0" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- item 10: offline


def write_captioned_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    rows = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"picture {i}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def test_image_folder_loads_without_any_network_call(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    # As on a machine where the user did not set HF_HUB_OFFLINE: the library must switch offline by itself.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    attempts = []

    def refuse(*args, **kwargs):  # datasets swallows network errors, so record the attempt instead of trusting one
        attempts.append(args[:1])
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    folder = write_captioned_folder(tmp_path / "captioned")
    dataset = load_image_dataset(train_data_dir=str(folder), other_columns={"--caption_column": "text"})
    assert len(dataset) == 3 and dataset[0]["text"] == "picture 0"
    assert attempts == []
    assert datasets.config.HF_HUB_OFFLINE is False and huggingface_hub.constants.HF_HUB_OFFLINE is False  # restored


# --------------------------------------------------------------------------------- item 14: checks before step 1


def test_columns_are_checked_before_training(tmp_path):
    folder = write_captioned_folder(tmp_path / "captioned")
    with pytest.raises(ValueError, match=r"--image_column 'text' does not hold images"):
        load_image_dataset(train_data_dir=str(folder), image_column="text")
    with pytest.raises(
        ValueError, match=r"--caption_column 'caption' is not a column.*Available columns: image, text"
    ):
        load_image_dataset(train_data_dir=str(folder), other_columns={"--caption_column": "caption"})
    assert len(load_image_dataset(train_data_dir=str(folder), max_train_samples=2)) == 2


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--learning_rate", "inf"], "--learning_rate must be a finite number > 0"),
        (["--learning_rate", "nan"], "--learning_rate must be a finite number > 0"),
        (["--max_train_samples", "0"], "--max_train_samples must be >= 1"),
        (["--max_train_samples", "-3"], "--max_train_samples must be >= 1"),
    ],
)
def test_bad_numbers_are_refused_up_front(tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        train(tmp_path / "run", *extra)
    assert not (tmp_path / "run").exists()


def test_unwritable_output_is_found_before_the_first_step(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    log = tmp_path / "steps.jsonl"
    with pytest.raises(ValueError, match=r"--output_dir .* cannot be written"):
        train(blocker / "run", "--max_train_steps", "2", "--debug_example_log", str(log))
    assert not log.exists()  # not one step trained

    from storydiff.training.train_digit_classifier import main as train_classifier

    with pytest.raises(ValueError, match=r"--work_dir .* cannot be written"):
        train_classifier(["--output_dir", str(tmp_path / "ok"), "--work_dir", str(blocker / "work")])


# ------------------------------------------------------------------------------ item 15: non-finite loss guard


def test_a_nan_loss_stops_the_run_and_nothing_nan_is_saved(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="loss is nan at optimizer update 3"):
        train(out, "--max_train_steps", "6", "--debug_nan_loss_at_step", "3")
    assert [step for step, _ in list_checkpoints(str(out))] == [2]
    assert not (out / "model_index.json").exists()
    weights = load_file(out / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(value).all() for value in weights.values())

    from storydiff.training.train_digit_classifier import main as train_classifier

    argv = ["--resolution", "8", "--block_out_channels", "4", "--num_epochs", "1", "--max_train_samples", "64"]
    argv += ["--report_to", "none", "--output_dir", str(tmp_path / "clf"), "--work_dir", str(tmp_path / "clf_work")]
    with pytest.raises(NonFiniteLossError):
        train_classifier([*argv, "--debug_nan_loss_at_step", "1"])
    assert not (tmp_path / "clf" / "config.json").exists()


# ------------------------------------------------------------------ items 11, 16, 22: checkpoints and resuming


def test_total_limit_1_deletes_the_old_checkpoint_only_after_the_new_one_is_complete(tmp_path, monkeypatch):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    save_checkpoint(accelerator, str(tmp_path), TrainingPosition(global_step=2), total_limit=1)

    def killed_mid_write(folder):
        os.makedirs(folder, exist_ok=True)
        Path(folder, "model.safetensors").write_bytes(b"trunc")
        raise KeyboardInterrupt  # a kill while the new checkpoint is written

    with monkeypatch.context() as patch:
        patch.setattr(accelerator, "save_state", killed_mid_write)
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(accelerator, str(tmp_path), TrainingPosition(global_step=4), total_limit=1)
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [2]  # `latest` still finds step 2

    save_checkpoint(accelerator, str(tmp_path), TrainingPosition(global_step=6), total_limit=1)
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [6]
    del model


def test_resume_is_exact_or_refused_and_the_card_counts_every_session(tmp_path):
    out = tmp_path / "run"
    train(out, "--max_train_steps", "2")
    checkpoint = out / "checkpoint-2"
    settings = json.loads((checkpoint / "resume_settings.json").read_text())
    assert settings["train_batch_size"] == 4 and settings["dataset"]["num_examples"] == 8
    assert settings["model_config"]["block_out_channels"] == [8, 16]

    resume = ["--resume_from_checkpoint", "latest", "--max_train_steps", "3"]
    with pytest.raises(ResumeSettingsError) as error:
        train(out, *resume, "--train_batch_size", "2", "--seed", "5")
    assert "train_batch_size: checkpoint 4, now 2" in str(error.value) and "seed: checkpoint 0, now 5" in str(
        error.value
    )
    assert "--allow_resume_with_changed_settings" in str(error.value)
    with pytest.raises(ResumeSettingsError, match=r"model_config.block_out_channels"):
        train(out, *resume, "--block_out_channels", "8,8")

    # The whole run's wall time: pretend the first session took 1000 s.
    position = json.loads((checkpoint / "training_position.json").read_text())
    assert position["wall_time_s"] > 0 and len(position["recent_losses"]) == 2
    (checkpoint / "training_position.json").write_text(json.dumps({**position, "wall_time_s": 1000.0}))
    with pytest.warns(UserWarning, match="changed settings"):
        train(out, *resume, "--seed", "5", "--allow_resume_with_changed_settings")
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["train_wall_time_s"] >= 1000 and "train_loss_mean_last_3_steps" in metrics

    # accelerate would skip a missing RNG state silently and the resumed run would draw other noise.
    (checkpoint / "random_states_0.pkl").unlink()
    with pytest.raises(ValueError, match=r"has no random_states_0.pkl"):
        train(out, *resume)
    (checkpoint / "random_states_0.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"random_states_0.pkl cannot be read"):
        train(out, *resume)


def test_card_records_an_accelerate_launch():
    assert launcher_command({}) == ["python"]
    environ = {"ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_DYNAMO_BACKEND": "NO", "WORLD_SIZE": "2"}
    assert launcher_command(environ) == ["accelerate", "launch", "--num_processes", "2", "--mixed_precision", "bf16"]
    assert launcher_command({"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "2"}) == [
        "torchrun",
        "--nproc_per_node",
        "2",
    ]
    os.environ.update({"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"})
    try:
        command = training_command(["--seed", "1"], script=str(TRAINING / "train_director.py"))
    finally:
        del os.environ["ACCELERATE_MIXED_PRECISION"], os.environ["ACCELERATE_DYNAMO_BACKEND"]
    assert command.startswith("accelerate launch ") and command.endswith("train_director.py --seed 1")


# --------------------------------------------------------------------------------- item 13: atomic final save


def test_a_failed_final_save_leaves_the_previous_pipeline_loadable(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(out, "--max_train_steps", "2")
    before = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    config_before = (out / "unet" / "config.json").read_text()

    def disk_full(*args, **kwargs):  # the weights and configs are written by then; the card fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_class_conditional, "write_card", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train(out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert (out / "unet" / "config.json").read_text() == config_before
    after = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(before[name], after[name]) for name in before)
    ClassConditionalPipeline.from_pretrained(out)
    assert [step for step, _ in list_checkpoints(str(out))] == [2, 4]  # training state is kept
    assert not [path for path in tmp_path.iterdir() if path.name != "run"]  # no staging folder left behind


# ------------------------------------------------------------------------------ items 17, 23 and consistency


@pytest.mark.parametrize("script", ["train_director", "train_clatr"])
def test_missing_text_encoder_path_is_named(script, tmp_path):
    import importlib

    parse_args = importlib.import_module(f"storydiff.training.{script}").parse_args
    argv = ["--output_dir", str(tmp_path), "--synthetic_samples", "10"]
    with pytest.raises(ValueError, match=r"--text_encoder '/nonexistent/encoder' does not exist"):
        parse_args([*argv, "--text_encoder", "/nonexistent/encoder"])
    assert parse_args([*argv, "--text_encoder", "openai/clip-vit-base-patch32"]).text_encoder  # a Hub id passes


def test_director_script_offers_the_models_conditioning_types():
    from storydiff.models.director import CONDITIONING_TYPES
    from storydiff.training.train_director import CONDITIONING_TYPES as offered

    assert offered == CONDITIONING_TYPES


def test_sample_grids_have_row_and_column_labels():
    images = np.zeros((4, 8, 8, 1), dtype=np.float32)  # black pictures: any dark pixel outside them is text
    grid = labelled_grid(images, rows=["class 0", "class 1"], columns=["sample 1", "sample 2"], title="step 7")
    cell = 64  # 8-pixel images are enlarged to 64
    assert grid.dtype == np.uint8 and grid.shape[2] == 3
    left, top = grid.shape[1] - 2 * cell, grid.shape[0] - 2 * cell
    assert left > 0 and top > 0
    assert (grid[top:, :left] < 128).any() and (grid[:top, left:] < 128).any()  # row labels, column labels
    with pytest.raises(ValueError, match="do not fill 2 rows x 2 columns"):
        labelled_grid(images[:3], rows=["a", "b"], columns=["1", "2"])
