"""Scale-out is accelerate's: the training scripts under `accelerate launch --num_processes 2` on CPU (gloo), killed
mid-run and resumed with 2 processes, see the same data and end with the same weights as one uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TRAINING = Path(__file__).resolve().parents[1] / "training"
# --multi_gpu with ACCELERATE_USE_CPU=true is accelerate's MULTI_CPU mode: 2 processes joined by gloo (`--cpu
# --num_processes 2` starts a single process).
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip


def run_two_processes(script: str, argv: list, kill_after_checkpoint: int = None, timeout: float = 300,
                      checkpoint_folder: Path = None) -> None:  # fmt: skip
    """Run `script` under accelerate with 2 processes; with `kill_after_checkpoint`, SIGKILL the whole launch (both
    workers) as soon as that checkpoint folder (in `checkpoint_folder`, by default --output_dir) is complete."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "true"}
    process = subprocess.Popen([*LAUNCH, str(TRAINING / script), *argv], env=env, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    if kill_after_checkpoint is None:
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # a hung worker must fail the test, not the whole CI run
            kill_process_tree(process.pid)
            output, _ = process.communicate()
            raise AssertionError(f"{script} did not finish in {timeout} s:\n{output[-3000:]}") from None
        assert process.returncode == 0, output[-3000:]
        return
    folder = checkpoint_folder or Path(argv[argv.index("--output_dir") + 1])
    checkpoint = folder / f"checkpoint-{kill_after_checkpoint}" / "training_position.json"
    deadline = time.time() + timeout
    while not checkpoint.is_file() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    kill_process_tree(process.pid)
    output, _ = process.communicate()
    assert checkpoint.is_file(), output[-3000:]


def kill_process_tree(root_pid: int) -> None:
    """SIGKILL `root_pid` and every descendant: torch's elastic launcher starts each worker in a session of its own,
    so killing the launcher's process group would leave the workers running."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    pending, tree = [root_pid], []
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending += children.get(pid, [])
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def read_log(path: Path) -> list:
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by the kill
            pass
    return entries


def assert_same_weights(expected_file: Path, got_file: Path) -> None:
    expected, got = load_file(expected_file), load_file(got_file)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def kill_resume_and_compare(tmp_path, script: str, common: list, kill_after: int, weights: str) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_two_processes(
        script, [*common, "--output_dir", str(straight), "--debug_example_log", str(tmp_path / "s.jsonl")]
    )
    run_two_processes(script, [*common, "--output_dir", str(killed), "--debug_example_log", str(tmp_path / "k.jsonl"),
                               "--debug_step_sleep", "1.0"], kill_after_checkpoint=kill_after)  # fmt: skip
    assert not (killed / weights).exists()
    run_two_processes(script, [*common, "--output_dir", str(killed), "--debug_example_log", str(tmp_path / "r.jsonl"),
                               "--resume_from_checkpoint", "latest"])  # fmt: skip

    # The main process logs the indices of its shard of every batch: before the kill and after the resume together
    # they are the uninterrupted run's.
    reference = read_log(tmp_path / "s.jsonl")
    before_kill = [entry for entry in read_log(tmp_path / "k.jsonl") if entry["step"] < kill_after]
    after_resume = read_log(tmp_path / "r.jsonl")
    assert after_resume[0]["step"] == kill_after
    assert [e["indices"] for e in before_kill + after_resume] == [e["indices"] for e in reference]
    assert_same_weights(straight / weights, killed / weights)
    assert json.loads((killed / "checkpoint-2" / "resume_settings.json").read_text())["num_processes"] == 2


@pytest.mark.parametrize("script", ["train_text_to_image.py"])
def test_text_to_image_two_processes_kill_and_resume(tmp_path, script):
    from storydiff.training.text_to_image_components import new_vae

    vae = tmp_path / "vae"
    new_vae((4, 8), latent_channels=4, norm_num_groups=4).save_pretrained(vae)
    common = [
        "--dataset", "digits_world", "--vae", str(vae), "--resolution", "24", "--num_world_samples", "24",
        "--unet_block_out_channels", "8,16", "--unet_norm_num_groups", "4", "--unet_attention_head_dim", "4",
        "--text_encoder_hidden_size", "16", "--text_encoder_layers", "1", "--train_batch_size", "4",
        "--gradient_accumulation_steps", "2", "--max_train_steps", "5", "--checkpointing_steps", "2",
        "--lr_warmup_steps", "1", "--validation_steps", "1000", "--evaluation_guidance_scales", "",
        "--validation_prompts", "--report_to", "none",
    ]  # fmt: skip
    kill_resume_and_compare(tmp_path, script, common, kill_after=2, weights="unet/diffusion_pytorch_model.safetensors")


def test_class_conditional_two_processes_kill_and_resume(tmp_path):
    common = [
        "--dataset", "digits", "--resolution", "16", "--block_out_channels", "8,16", "--norm_num_groups", "4",
        "--max_train_samples", "40", "--train_batch_size", "4", "--gradient_accumulation_steps", "2",
        "--max_train_steps", "5", "--checkpointing_steps", "2", "--lr_warmup_steps", "1", "--validation_steps", "1000",
        "--num_validation_images_per_class", "1", "--validation_inference_steps", "2", "--report_to", "none",
    ]  # fmt: skip
    kill_resume_and_compare(tmp_path, "train_class_conditional.py", common, kill_after=2,
                            weights="unet/diffusion_pytorch_model.safetensors")  # fmt: skip


def test_vae_two_processes_kill_and_resume(tmp_path):
    common = [
        "--dataset", "digits_world", "--num_world_samples", "40", "--resolution", "24", "--block_out_channels", "4,8",
        "--norm_num_groups", "4", "--train_batch_size", "4", "--gradient_accumulation_steps", "2",
        "--max_train_steps", "5", "--checkpointing_steps", "2", "--lr_warmup_steps", "1", "--report_to", "none",
    ]  # fmt: skip
    kill_resume_and_compare(tmp_path, "train_vae.py", common, kill_after=2,
                            weights="diffusion_pytorch_model.safetensors")  # fmt: skip


def test_video_ldm_two_processes_kill_and_resume(tmp_path):
    from diffusers import StableDiffusionPipeline
    from tiny_stable_diffusion import tiny_sd_components

    image_model = tmp_path / "image-ldm"
    components = tiny_sd_components(tmp_path / "parts", sample_size=12)
    StableDiffusionPipeline(**components, requires_safety_checker=False).save_pretrained(image_model)
    common = [
        "--pretrained_model_name_or_path", str(image_model), "--dataset", "moving_digits", "--resolution", "24",
        "--num_frames", "4", "--num_videos", "16", "--temporal_attention_head_dim", "4", "--train_batch_size", "2",
        "--gradient_accumulation_steps", "2", "--max_train_steps", "5", "--checkpointing_steps", "2",
        "--lr_warmup_steps", "1", "--validation_prompts", "--num_evaluation_videos", "1",
        "--validation_inference_steps", "1", "--report_to", "none",
    ]  # fmt: skip
    kill_resume_and_compare(tmp_path, "train_video_ldm.py", common, kill_after=2,
                            weights="unet/diffusion_pytorch_model.safetensors")  # fmt: skip


def test_controlnet_two_processes_kill_and_resume(tmp_path):
    from diffusers import StableDiffusionPipeline
    from tiny_stable_diffusion import tiny_sd_components

    base_model = tmp_path / "base"
    components = tiny_sd_components(tmp_path / "parts", sample_size=12)
    StableDiffusionPipeline(**components, requires_safety_checker=False).save_pretrained(base_model)
    common = [
        "--pretrained_model_name_or_path", str(base_model), "--dataset", "digits_world", "--resolution", "24",
        "--num_world_samples", "16", "--digits_conditions", "edges,position_colour", "--unlock", "decoder",
        "--conditioning_embedding_out_channels", "4,8", "--train_batch_size", "2", "--gradient_accumulation_steps",
        "2", "--max_train_steps", "5", "--checkpointing_steps", "2", "--num_validation_examples", "1",
        "--num_validation_images", "1", "--validation_inference_steps", "1", "--num_evaluation_images", "2",
        "--report_to", "none",
    ]  # fmt: skip
    kill_resume_and_compare(tmp_path, "train_controlnet.py", common, kill_after=2,
                            weights="controlnet/diffusion_pytorch_model.safetensors")  # fmt: skip


@pytest.mark.parametrize("condition", ["text", "class"])
def test_coherence_aware_two_processes_kill_and_resume(tmp_path, condition):
    from test_train_coherence_aware import write_scored_folder

    scored = write_scored_folder(tmp_path / "scored")
    common = [
        "--train_data_dir", str(scored), "--resolution", "16", "--train_batch_size", "2", "--max_train_steps", "5",
        "--checkpointing_steps", "2", "--validation_steps", "100", "--validation_inference_steps", "1",
        "--validation_coherences", "0,1", "--mode", "weight", "--condition_dropout", "0.3", "--report_to", "none",
    ]  # fmt: skip
    if condition == "text":
        from diffusers import StableDiffusionPipeline
        from test_train_coherence_aware import TINY_CONDITIONER
        from tiny_stable_diffusion import tiny_sd_components

        base_model = tmp_path / "base"
        components = tiny_sd_components(tmp_path / "parts", sample_size=8)
        StableDiffusionPipeline(**components, requires_safety_checker=False).save_pretrained(base_model)
        common += ["--pretrained_model_name_or_path", str(base_model), *TINY_CONDITIONER]
        weights = "conditioner/diffusion_pytorch_model.safetensors"
    else:
        from test_train_coherence_aware import TINY_CLASS_UNET

        common += TINY_CLASS_UNET
        weights = "unet/diffusion_pytorch_model.safetensors"
    kill_resume_and_compare(tmp_path, "train_coherence_aware.py", common, kill_after=2, weights=weights)


def test_digits_clip_two_processes_match_one_and_resume(tmp_path):
    """Every process of train_digits_clip.py computes the whole (small) batch, so 2 processes train exactly what 1
    does; killed after its first epoch's checkpoint (step 3: 48 canvases in batches of 16) and resumed with 2
    processes, it ends with the same weights."""
    from test_train_digits_clip import TINY

    from storydiff.training.train_digits_clip import main as train_digits_clip

    common = [str(value) for value in TINY] + ["--num_epochs", "3"]
    train_digits_clip([*common, "--output_dir", str(tmp_path / "one"), "--work_dir", str(tmp_path / "one_work")])
    killed, work = tmp_path / "two", tmp_path / "two_work"
    run_two_processes("train_digits_clip.py", [*common, "--output_dir", str(killed), "--work_dir", str(work),
                                               "--debug_step_sleep", "1.0"], kill_after_checkpoint=3,
                      checkpoint_folder=work / "checkpoints")  # fmt: skip
    assert not (killed / "model.safetensors").exists()
    run_two_processes("train_digits_clip.py", [*common, "--output_dir", str(killed), "--work_dir", str(work),
                                               "--resume_from_checkpoint", "latest"])  # fmt: skip
    assert_same_weights(tmp_path / "one" / "model.safetensors", killed / "model.safetensors")
