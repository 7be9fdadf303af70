"""The demo's text-to-image section on a tiny model trained in the test (the shipped one runs in test_demo.py)."""

import csv

from storydiff import GuidanceSchedule
from storydiff.demo.text_to_image import text_to_image_demo
from storydiff.training.text_to_image_components import new_vae
from storydiff.training.train_text_to_image import main as train_text_to_image


def test_section_writes_a_labelled_grid_and_one_row_per_schedule(tmp_path):
    vae = tmp_path / "vae"
    new_vae((4, 8), latent_channels=4, norm_num_groups=4).save_pretrained(vae)
    model = tmp_path / "model"
    train_text_to_image(["--dataset", "digits_world", "--vae", str(vae), "--resolution", "24",
                         "--num_world_samples", "16", "--unet_block_out_channels", "8,16", "--unet_norm_num_groups", "4",
                         "--unet_attention_head_dim", "4", "--text_encoder_hidden_size", "16",
                         "--text_encoder_layers", "1", "--train_batch_size", "4", "--max_train_steps", "1",
                         "--validation_prompts", "--evaluation_guidance_scales", "", "--report_to", "none",
                         "--output_dir", str(model)])  # fmt: skip

    written = text_to_image_demo(tmp_path / "out", checkpoint=model, schedules=("static", GuidanceSchedule("interval", interval=(0.5, 1.0))),
                                 num_inference_steps=4, num_captions=6)  # fmt: skip
    assert [path.name for path in written] == [
        "text_to_image_grid.png", "text_to_image_metrics.md", "text_to_image_metrics.csv"
    ]  # fmt: skip
    rows = list(csv.DictReader(open(tmp_path / "out" / "text_to_image_metrics.csv")))
    assert [row["schedule"] for row in rows] == ["static", "interval"]
    for row in rows:
        assert 0.0 <= float(row["caption adherence"]) <= 1.0 and 0.0 <= float(row["exact captions"]) <= 1.0
    # static runs both passes at every step; the interval schedule skips the unconditional pass in the first half
    assert float(rows[0]["denoiser work vs static"]) == 1.0 and float(rows[1]["denoiser work vs static"]) == 0.75
    assert "held-out captions" in (tmp_path / "out" / "text_to_image_metrics.md").read_text()
