"""Evaluation: the digit classifier, its metrics, its training script, and the CLIP score / FID hooks."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from scipy import linalg
from tiny_stable_diffusion import tiny_clip_tokenizer

from storydiff.evaluation import (
    DigitClassifier,
    balanced_real_digits,
    class_accuracy,
    classifier_features,
    clip_score,
    default_digit_classifier_path,
    digit_frechet_distance,
    evaluate_digit_samples,
    frechet_feature_distance,
    inception_feature_extractor,
    load_digit_classifier,
    real_digit_images,
)


def direct_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The FID formula written out with scipy, independently of storydiff.metrics."""
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


@pytest.fixture(scope="module")
def tiny_classifier():
    torch.manual_seed(0)
    return DigitClassifier(sample_size=8, block_out_channels=(4, 6)).eval()


@pytest.fixture(scope="module")
def random_images():
    generator = np.random.default_rng(0)
    return generator.random((40, 8, 8, 1), dtype=np.float32), generator.integers(0, 10, 40)


def test_classifier_shapes_and_save_load_round_trip(tmp_path, tiny_classifier):
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    assert tiny_classifier(images).shape == (3, 10)
    assert tiny_classifier.features(images).shape == (3, 6) and tiny_classifier.num_features == 6
    tiny_classifier.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_digit_classifier(tmp_path)
    assert loaded.config.block_out_channels == [4, 6] or tuple(loaded.config.block_out_channels) == (4, 6)
    torch.testing.assert_close(loaded(images), tiny_classifier(images))


def test_class_accuracy_matches_argmax_of_logits(tiny_classifier, random_images):
    images, labels = random_images
    with torch.no_grad():
        logits = tiny_classifier(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1)
    predictions = logits.argmax(1).numpy()
    labels = labels.copy()
    labels[:25] = predictions[:25]  # 25 certainly right, the rest right only by chance
    expected = float((predictions == labels).mean())
    assert class_accuracy(images, labels, classifier=tiny_classifier) == pytest.approx(expected)
    assert class_accuracy(images, predictions, classifier=tiny_classifier) == 1.0


def test_image_layouts_give_the_same_features(tiny_classifier, random_images):
    images, _ = random_images
    reference = classifier_features(images, classifier=tiny_classifier)
    assert reference.shape == (40, 6) and reference.dtype == np.float64
    as_torch = torch.from_numpy(images).permute(0, 3, 1, 2)  # diffusers output_type="pt"
    np.testing.assert_allclose(classifier_features(as_torch, classifier=tiny_classifier), reference, atol=1e-6)
    np.testing.assert_allclose(classifier_features(images[..., 0], classifier=tiny_classifier), reference, atol=1e-6)
    rgb = np.repeat(images, 3, axis=-1)  # grey converted back by averaging the channels
    np.testing.assert_allclose(classifier_features(rgb, classifier=tiny_classifier), reference, atol=1e-5)
    pil = [PIL.Image.fromarray((image[..., 0] * 255).round().astype(np.uint8)) for image in images]
    np.testing.assert_allclose(classifier_features(pil, classifier=tiny_classifier), reference, atol=0.05)


def test_inputs_are_resized_to_the_classifier_resolution(tiny_classifier):
    big = np.random.default_rng(1).random((5, 16, 16, 1), dtype=np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(big).permute(0, 3, 1, 2), size=(8, 8), mode="bilinear", antialias=True
    )
    with torch.no_grad():
        direct = tiny_classifier.features(expected * 2 - 1).double().numpy()
    np.testing.assert_allclose(classifier_features(big, classifier=tiny_classifier), direct, atol=1e-6)


def test_digit_frechet_distance_matches_a_direct_scipy_computation(tiny_classifier, random_images):
    generated, _ = random_images
    real = np.random.default_rng(2).random((30, 8, 8, 1), dtype=np.float32) ** 2
    with torch.no_grad():
        features_generated = tiny_classifier.features(torch.from_numpy(generated).permute(0, 3, 1, 2) * 2 - 1)
        features_real = tiny_classifier.features(torch.from_numpy(real).permute(0, 3, 1, 2) * 2 - 1)
    expected = direct_frechet(features_generated.double().numpy(), features_real.double().numpy())
    distance = digit_frechet_distance(generated, real, classifier=tiny_classifier)
    assert distance == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert digit_frechet_distance(generated, generated, classifier=tiny_classifier) == pytest.approx(0.0, abs=1e-6)
    both = evaluate_digit_samples(generated, np.zeros(40, dtype=int), classifier=tiny_classifier, real_test=real)
    assert both["frechet_distance"] == pytest.approx(expected, rel=1e-6) and both["num_samples"] == 40


def test_bad_inputs_raise_clear_errors(tiny_classifier, random_images):
    images, labels = random_images
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        class_accuracy(images * 2 - 1, labels, classifier=tiny_classifier)
    with pytest.raises(ValueError, match="40 images but 39 labels"):
        class_accuracy(images, labels[:39], classifier=tiny_classifier)
    with pytest.raises(ValueError, match="0..9"):
        class_accuracy(images, labels + 10, classifier=tiny_classifier)
    with pytest.raises(ValueError, match="integer class indices"):
        class_accuracy(images, labels.astype(float), classifier=tiny_classifier)
    with pytest.raises(TypeError, match="numpy array"):
        classifier_features("images.png", classifier=tiny_classifier)
    with pytest.raises(ValueError, match="shape"):
        classifier_features(np.zeros((2, 8, 8, 5), dtype=np.float32), classifier=tiny_classifier)
    with pytest.raises(TypeError, match="DigitClassifier"):
        classifier_features(images, classifier=torch.nn.Linear(2, 2))
    with pytest.raises(FileNotFoundError, match="train_digit_classifier"):
        load_digit_classifier("/nonexistent/classifier")


def test_shipped_classifier_recognises_held_out_digits():
    classifier = load_digit_classifier()
    assert default_digit_classifier_path().joinpath("README.md").is_file()
    resolution = classifier.config.sample_size
    test_images = real_digit_images("test", resolution)
    from storydiff.data.digits import digits_arrays

    _, test_labels = digits_arrays("test", resolution)
    assert class_accuracy(test_images, test_labels) > 0.95
    # Real train digits are close to the test split; shuffled pixels of the same digits are far from it.
    train_images = real_digit_images("train", resolution)[:360]
    shuffled = np.random.default_rng(0).permuted(train_images.reshape(360, -1), axis=1).reshape(train_images.shape)
    assert digit_frechet_distance(train_images) * 5 < digit_frechet_distance(shuffled)


@pytest.fixture
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_balanced_real_digits_have_every_class_equally_often():
    images, labels = balanced_real_digits("train", per_class=3, resolution=16, seed=1)
    assert images.shape == (30, 16, 16, 1) and images.min() >= 0 and images.max() <= 1
    np.testing.assert_array_equal(np.bincount(labels), [3] * 10)
    again, _ = balanced_real_digits("train", per_class=3, resolution=16, seed=1)
    np.testing.assert_array_equal(images, again)
    assert not np.array_equal(images, balanced_real_digits("train", per_class=3, resolution=16, seed=2)[0])


def test_training_script_resumes_without_losing_or_repeating_data(tmp_path, keep_torch_threads):
    from storydiff.training.train_digit_classifier import main

    common = ["--resolution", "8", "--block_out_channels", "4", "6", "--num_epochs", "2", "--batch_size", "64"]
    common += ["--max_train_samples", "300", "--report_to", "none", "--torch_num_threads", "1"]
    main([*common, "--output_dir", str(tmp_path / "full"), "--work_dir", str(tmp_path / "full_work")])
    card = (tmp_path / "full" / "README.md").read_text()
    assert "library_name: diffusers" in card and "test-split accuracy" in card and "--num_epochs 2" in card
    assert "training/train_digit_classifier.py --resolution 8" in card

    # A run killed after its first epoch's checkpoint (5 steps of 64 of 300 digits): keep only that checkpoint, and
    # leave what a kill during the second epoch's write leaves behind: an unfinished folder, which must not count.
    main([*common, "--output_dir", str(tmp_path / "first"), "--work_dir", str(tmp_path / "work")])
    checkpoints = tmp_path / "work" / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["checkpoint-10", "checkpoint-5"]
    assert json.loads((checkpoints / "checkpoint-5" / "training_position.json").read_text())["epoch"] == 1
    shutil.rmtree(checkpoints / "checkpoint-10")
    (checkpoints / "checkpoint-10.partial").mkdir()
    (checkpoints / "checkpoint-10").mkdir()  # an empty folder, as the old in-place writes left
    resumed_args = [*common, "--output_dir", str(tmp_path / "resumed"), "--work_dir", str(tmp_path / "work")]
    main([*resumed_args, "--resume_from_checkpoint", "latest"])

    full = DigitClassifier.from_pretrained(tmp_path / "full")
    resumed = DigitClassifier.from_pretrained(tmp_path / "resumed")
    for (name, expected), (_, actual) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(actual, expected, msg=f"{name} differs after resuming")

    # Resuming with another batch size would not be the same run: refused, with the difference named.
    with pytest.raises(ValueError, match=r"train_batch_size: checkpoint 64, now 32"):
        main([*resumed_args, "--batch_size", "32", "--resume_from_checkpoint", "latest"])


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = tiny_clip_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"))
    text = {"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    text |= {"num_attention_heads": 2, "max_position_embeddings": 16, "eos_token_id": tokenizer.eos_token_id}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision |= {"image_size": 16, "patch_size": 8}
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def test_clip_score_matches_cosine_of_projected_embeddings(tiny_clip):
    model, processor = tiny_clip
    images = np.random.default_rng(3).random((3, 16, 16, 3), dtype=np.float32)
    prompts = ["a cat", "the dog", "and 7"]
    score = clip_score(images, prompts, model=model, processor=processor)

    pil = [PIL.Image.fromarray((image * 255).round().astype(np.uint8)) for image in images]
    inputs = processor(text=prompts, images=pil, return_tensors="pt", padding=True)
    with torch.no_grad():
        image_embeds = model.visual_projection(model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output)
        text_embeds = model.text_projection(
            model.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output
        )
    cosine = torch.nn.functional.cosine_similarity(image_embeds, text_embeds)
    assert score == pytest.approx(float((100 * cosine.clamp(min=0)).mean()), rel=1e-4, abs=1e-4)
    # One prompt for all images, and batching, change nothing.
    single = clip_score(images, "a cat", model=model, processor=processor, batch_size=2)
    assert single == pytest.approx(clip_score(images, ["a cat"] * 3, model=model, processor=processor), rel=1e-5)


def test_clip_score_bad_inputs(tiny_clip):
    model, processor = tiny_clip
    images = np.random.default_rng(3).random((2, 16, 16, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_score(images, ["a", "b", "c"], model=model, processor=processor)
    with pytest.raises(ValueError, match="processor"):
        clip_score(images, "a", model=model)
    with pytest.raises(TypeError, match="CLIPModel"):
        clip_score(images, "a", model=torch.nn.Linear(2, 2), processor=processor)


def test_fid_plumbing_with_a_fake_feature_extractor():
    seen_shapes = []

    def mean_colour_and_contrast(batch: torch.Tensor) -> torch.Tensor:
        seen_shapes.append(tuple(batch.shape))
        return torch.stack([batch.mean((1, 2, 3)), batch.std((1, 2, 3)), batch[:, :, :4].mean((1, 2, 3))], dim=1)

    rng = np.random.default_rng(4)
    generated = rng.random((10, 8, 8, 1), dtype=np.float32)  # grey, channels-last
    real = torch.from_numpy(rng.random((12, 3, 8, 8), dtype=np.float32) ** 3)  # RGB, channels-first
    distance = frechet_feature_distance(generated, real, feature_extractor=mean_colour_and_contrast, batch_size=4)
    assert all(shape[1] == 3 for shape in seen_shapes)  # grey images reach the extractor as RGB
    assert [shape[0] for shape in seen_shapes] == [4, 4, 2, 4, 4, 4]
    grey_as_rgb = torch.from_numpy(generated).permute(0, 3, 1, 2).repeat(1, 3, 1, 1)
    expected = direct_frechet(
        mean_colour_and_contrast(grey_as_rgb).double().numpy(), mean_colour_and_contrast(real).double().numpy()
    )
    assert distance == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="2-D tensor"):
        frechet_feature_distance(generated, real, feature_extractor=lambda batch: batch)
    with pytest.raises(TypeError, match="callable"):
        frechet_feature_distance(generated, real, feature_extractor="inception")


def test_inception_extractor_explains_its_missing_dependency(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(ImportError, match="pip install torch-fidelity"):
        inception_feature_extractor()


def load_sweep_script():
    script = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_dynamic_cfg_digits.py"
    spec = importlib.util.spec_from_file_location("reproduce_dynamic_cfg_digits", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reproduction_sweep_script_writes_its_table_plot_and_conclusion(tmp_path, keep_torch_threads):
    sweep = load_sweep_script()

    arguments = ["--schedules", "static", "linear", "--guidance_scales", "2", "4", "--num_inference_steps", "3"]
    arguments += ["--samples_per_class", "2", "--bootstrap", "3", "--output_dir", str(tmp_path), "--name", "mini"]
    results = sweep.main(arguments)
    assert [(row["schedule"], row["guidance_scale"]) for row in results["rows"]] == [
        ("static", 2.0),
        ("linear", 2.0),
        ("static", 4.0),
        ("linear", 4.0),
    ]
    # Linear starts at w_0 = 0: its first of 3 steps skips the null-class pass.
    assert [row["denoiser_work"] for row in results["rows"]] == pytest.approx([1, 5 / 6, 1, 5 / 6])
    markdown = (tmp_path / "mini.md").read_text()
    assert "| static | 2 |" in markdown and "| linear | 4 |" in markdown and "## Conclusion" in markdown
    assert "--samples_per_class 2" in markdown  # the exact command
    with PIL.Image.open(tmp_path / "mini.png") as image:
        assert image.width > 400
    assert len((tmp_path / "mini.csv").read_text().strip().splitlines()) == 1 + 1 + 4  # header, g = 1, points


def test_equal_accuracy_comparison_uses_each_schedules_frontier():
    sweep = load_sweep_script()
    # Static at the 100 % ceiling twice: the better FD counts. Too much guidance can lower accuracy again.
    static = [(0.8, 10.0), (0.9, 20.0), (1.0, 40.0), (1.0, 30.0)]
    curve = [(0.85, 12.0), (0.95, 30.0), (1.0, 29.0), (0.5, 1.0)]
    # levels 0.5, 0.8, 0.85, 0.9, 0.95, 1.0 -> frontiers 1, 12, 12, 29, 29, 29 against 10, 10, 20, 20, 30, 30
    comparison = sweep.compare_at_equal_accuracy(curve, static)
    assert (comparison["num_levels"], comparison["num_better"], comparison["num_worse"]) == (6, 4, 2)
    assert comparison["mean_difference"] == pytest.approx((-9 + 2 - 8 + 9 - 1 - 1) / 6)
    assert comparison["max_accuracy"] == 1.0
    # A schedule that never gets as accurate as static is compared only up to its own highest accuracy.
    assert sweep.compare_at_equal_accuracy([(0.8, 5.0)], static)["num_levels"] == 1
