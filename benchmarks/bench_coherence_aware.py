"""Cost of coherence-aware diffusion (CAD): `storydiff.CoherenceAwarePipeline`, its `CoherenceConditioner`, the
`TextRINModel` backbone and the coherence scorers of `storydiff.coherence`.

1. CA-CFG call: a whole `CoherenceAwarePipeline` call (conditioner = a new `CoherenceConditioner`, denoiser = the
   UNet) against diffusers' `StableDiffusionPipeline` with the same UNet, text encoder, tokenizer, VAE and DDIM
   scheduler, the same prompts, latents, steps and guidance scale, `output_type="latent"`. Two CA-CFG rows: the
   empty negative prompt (`negative_prompt=""`: the text encoder runs on the prompts and on "" as in the stock
   pipeline, so the rows differ only by the conditioner, its longer context and the context mask) and, on the
   digits model, the paper's same-prompt negative (`negative_prompt=None`: the text is encoded once). The
   conditioner runs once per call per branch, not per step; the images the UNet received are counted by a forward
   hook (the same in both pipelines) and the context lengths recorded (the conditioner adds 1 coherence + 16
   register tokens). Target: time ratio <= 1.02.
2. Conditioner overhead: the conditioner's forward on both branches' texts (B texts twice, as a guided call runs
   it) against one UNet forward on the 2B latents of a CFG step with the conditioner's context; the per-step
   equivalent is that ratio divided by the number of steps. And that UNet step against the same step on the text
   encoder's context alone (the stock pipeline's: fewer tokens, no mask), which is CA-CFG's per-step extra cost.
3. TextRIN against a UNet2DConditionModel of similar parameter count (the shipped digits UNet, 1.08 M, and a
   TextRIN with the training script's defaults but `latent_dim` 96, 1.11 M): samples per second of a whole guided
   `CoherenceAwarePipeline` call (each denoiser with its own conditioner), and one training step of the denoiser
   (forward, epsilon MSE, backward, AdamW) on the conditioner's detached context.
4. Coherence scoring: `storydiff.coherence.clip_cosine` images per second with the shipped digits CLIP
   (`storydiff.checkpoints.digits_clip_path()`) and with a CLIP ViT-B/32-shaped random `CLIPModel` (transformers'
   `CLIPConfig` defaults, built in code) on 224x224 tensors, paired with the bare model forward on the same
   preprocessed inputs (what the processor and the batching around it cost); and the seconds of
   `storydiff.coherence.classifier_coherence` on scikit-learn's 1797 digits (5 folds).

Models: the shipped digits text-to-image model (`storydiff.checkpoints`: 4x8x8 latents for 32x32 images, VAE stride
4, 24-token 64-wide CLIP text) with a conditioner of the training script's defaults (dim 128, 16 registers, 2
layers, 4 heads); and an SD 1.5-shaped case: a UNet with Stable Diffusion 1.5's config and random weights at
`--sd15-latent-size`, 77 tokens of 768-wide text from a one-layer random CLIP text encoder (its cost is common to
both pipelines; a light one keeps the conditioner's share conservative), a tiny random stride-8 VAE that never
runs, and a conditioner with the paper's defaults (dim 256, 16 registers, 2 layers). Weights and inputs are random
where not shipped: their values do not change the cost.

Every comparison pairs a configuration with its reference back to back in random order, repeated, after untimed
warm-up calls, and reports the median of the paired ratios (`storydiff.benchmarking`): load from other jobs on a
shared machine largely cancels out of the ratios, not out of the absolute times. Peak memory is measured on CUDA
only.

    OMP_NUM_THREADS=2 python benchmarks/bench_coherence_aware.py   # writes docs/benchmarks/coherence_aware_cpu.json
    python benchmarks/bench_coherence_aware.py --device cuda --sd15-latent-size 64 --sd15-steps 25 \
        --sd15-batch-size 4 --sd15-repeats 15 --output docs/benchmarks/coherence_aware_cuda.json
"""

import argparse
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
)

from storydiff import CoherenceAwarePipeline, TextRINModel
from storydiff.benchmarking import (
    DTYPES,
    SD15_TEXT_TOKENS,
    SD15_UNET_CONFIG,
    Run,
    command_line,
    compare,
    free_memory,
    guarded,
    measured_call,
    optimizer_state_bytes,
    quiet_libraries,
    run_settings,
    summary,
    weights,
    write_results,
)
from storydiff.checkpoints import digits_clip_path, text_to_image_pipeline_path
from storydiff.coherence import classifier_coherence, clip_cosine
from storydiff.models.coherence import CoherenceConditioner

REPOSITORY = Path(__file__).resolve().parents[1]
SECTIONS = ("ca_cfg", "conditioner", "text_rin", "scoring")
STOCK = "StableDiffusionPipeline (diffusers)"
CA_EMPTY = "CoherenceAwarePipeline, empty negative prompt"
CA_SAME = "CoherenceAwarePipeline, same-prompt negative (the paper's CA-CFG)"
UNET_STEP = "UNet forward on a CFG step's 2B latents, conditioner's context (masked)"
UNET_STEP_STOCK = "UNet forward on a CFG step's 2B latents, text encoder's context (stock: no mask)"
CONDITIONER = "conditioner on both branches (2 x B texts)"
UNET_DENOISER = "UNet2DConditionModel (shipped digits UNet)"
RIN_DENOISER = "TextRINModel"
# The same-prompt row saves a text encoder run; the SD 1.5-shaped case's one-layer encoder makes that saving
# negligible, so it gets the like-for-like row only (its calls take most of the run's time).
SAME_PROMPT_ROW_MODELS = ("digits",)
PROMPTS = ("a small red 7 in the top left corner", "a large blue 3 in the middle", "a green 1 at the bottom",
           "a yellow 5 on the right")  # fmt: skip
# the training script's (training/train_coherence_aware.py) defaults for the digits model
DIGITS_CONDITIONER = {"dim": 128, "num_registers": 16, "num_layers": 2, "num_heads": 4}
# the paper's defaults on Stable Diffusion-sized text
SD15_CONDITIONER = {"dim": 256, "num_registers": 16, "num_layers": 2, "num_heads": 4}
# the training script's TextRIN defaults with latent_dim 96 instead of 128: 1.11 M parameters, the digits UNet's size
TEXT_RIN = {"interface_dim": 64, "latent_dim": 96, "num_latents": 32, "num_blocks": 3, "compute_layers": 2,
            "num_heads": 4, "patch_size": 1}  # fmt: skip
SD15_TEXT_ENCODER = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 1, "num_attention_heads": 12,
                     "max_position_embeddings": SD15_TEXT_TOKENS}  # fmt: skip
# --quick: the same code paths at sizes that run in seconds
QUICK_SD15_WIDTHS = (32, 64, 64, 64)
QUICK_CLIP = {"text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                              "num_attention_heads": 4},
              "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                "num_attention_heads": 4},
              "projection_dim": 32}  # fmt: skip
QUICK_DIGITS_SAMPLES = 500


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def stride_8_vae() -> AutoencoderKL:
    """A tiny random VAE of stride 8: it never runs (latents in, latents out), it only sets the image size."""
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8,) * 4, norm_num_groups=8)  # fmt: skip


class Model:
    """A text-to-image setup: text encoder, tokenizer, VAE, scheduler, UNet and a new conditioner sized for them."""

    def __init__(self, name: str, args, device: torch.device):
        folder = text_to_image_pipeline_path()
        self.name = name
        self.scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
        torch.manual_seed(args.seed)
        if name == "digits":
            self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
            self.text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
            self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
            self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
            self.source = "storydiff/checkpoints/digits-text-to-image"
            conditioner = DIGITS_CONDITIONER
            self.steps, self.batch_size = args.steps, args.batch_size
        else:
            # the digits tokenizer padded to SD's 77 tokens; a random 768-wide text encoder of one layer
            self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True,
                                                           model_max_length=SD15_TEXT_TOKENS)  # fmt: skip
            self.text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(self.tokenizer), **SD15_TEXT_ENCODER))
            config = dict(SD15_UNET_CONFIG)
            if args.quick:
                config["block_out_channels"] = QUICK_SD15_WIDTHS
            with torch.device(device):  # built and initialised on the device: much faster than on CPU
                self.unet = UNet2DConditionModel(sample_size=args.sd15_latent_size, **config)
            self.vae = stride_8_vae()
            self.source = "UNet2DConditionModel with Stable Diffusion 1.5's config, random weights" + (
                f", widths {QUICK_SD15_WIDTHS} (--quick)" if args.quick else ""
            )
            conditioner = SD15_CONDITIONER
            self.steps, self.batch_size = args.sd15_steps, args.sd15_batch_size
        self.conditioner = CoherenceConditioner(text_dim=self.text_encoder.config.hidden_size,
                                                cross_attention_dim=self.unet.config.cross_attention_dim,
                                                **conditioner)  # fmt: skip
        for model in (self.text_encoder, self.unet, self.vae, self.conditioner):
            model.to(device, DTYPES[args.dtype]).eval()
        self.device = device
        stride = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_shape = (self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        self.image_size = self.unet.config.sample_size * stride
        self.prompts = [PROMPTS[i % len(PROMPTS)] for i in range(self.batch_size)]

    def description(self) -> dict:
        return {
            "unet_source": self.source,
            "unet_parameters": count(self.unet),
            "text_encoder_parameters": count(self.text_encoder),
            "text_shape": [self.tokenizer.model_max_length, self.text_encoder.config.hidden_size],
            "conditioner": {**dict(self.conditioner.config), "parameters": count(self.conditioner)},
            "latent_shape": list(self.latent_shape),
            "image_size": self.image_size,
            "steps": self.steps,
            "batch_size": self.batch_size,
        }

    def latents(self, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(self.batch_size, *self.latent_shape, generator=generator).to(self.device, self.unet.dtype)

    def coherence_pipeline(self, denoiser=None, conditioner=None) -> CoherenceAwarePipeline:
        pipe = CoherenceAwarePipeline(text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                      conditioner=conditioner or self.conditioner, denoiser=denoiser or self.unet,
                                      scheduler=self.scheduler, vae=self.vae)  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def stock_pipeline(self) -> StableDiffusionPipeline:
        pipe = StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=self.unet, scheduler=self.scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        return pipe


def count_images(module, call) -> tuple:
    """Images `module` received during `call()` and the context lengths it saw, counted by a forward pre-hook."""
    seen = {"images": 0, "context_tokens": set()}

    def hook(_, args, kwargs):
        seen["images"] += (args[0] if args else kwargs["sample"]).shape[0]
        seen["context_tokens"].add(kwargs["encoder_hidden_states"].shape[1])

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        call()
    finally:
        handle.remove()
    return seen["images"], sorted(seen["context_tokens"])


# ---------------------------------------------------------------------------------------------------- 1. CA-CFG


def measure_ca_cfg(model: Model, args, rng) -> dict:
    latents = model.latents(args.seed)
    coherence_pipe, stock_pipe = model.coherence_pipeline(), model.stock_pipeline()
    common = {"num_inference_steps": model.steps, "guidance_scale": args.guidance_scale, "height": model.image_size,
              "width": model.image_size, "output_type": "latent"}  # fmt: skip

    def stock():
        stock_pipe(list(model.prompts), latents=latents.clone(), negative_prompt=[""] * model.batch_size, **common)

    def coherence_aware(negative_prompt):
        return lambda: coherence_pipe(list(model.prompts), coherence=1.0, negative_coherence=0.0,
                                      negative_prompt=negative_prompt, latents=latents.clone(), **common)  # fmt: skip

    stock_images, stock_tokens = count_images(model.unet, stock)
    resident = weights(model.text_encoder, model.unet)
    rows = {}
    negatives = {CA_EMPTY: "", CA_SAME: None} if model.name in SAME_PROMPT_ROW_MODELS else {CA_EMPTY: ""}
    for name, negative in negatives.items():
        call = coherence_aware(negative)
        images, tokens = count_images(model.unet, call)
        runs = {
            name: Run(call, lambda: resident + weights(model.conditioner)),
            STOCK: Run(stock, lambda: resident),
        }
        row = guarded(lambda runs=runs: compare(runs, args, rng, model.device), model.device)
        rows[name] = {"unet_images": images, "context_tokens": tokens, **row}
        free_memory(model.device)
    return {
        **model.description(),
        "guidance_scale": args.guidance_scale,
        "scheduler": type(model.scheduler).__name__,
        "output_type": "latent",
        "coherence": {"positive": 1.0, "negative": 0.0},
        "stock_negative_prompt": "",
        "stock_unet_images": stock_images,
        "stock_context_tokens": stock_tokens,
        "target_time_ratio": 1.02,
        "variants": rows,
    }


# ------------------------------------------------------------------------------------------------ 2. conditioner


def measure_conditioner(model: Model, args, rng) -> dict:
    """The conditioner per call against one UNet step; and, to tell where a CA-CFG step's own extra cost comes from,
    the UNet step on the conditioner's context (1 + registers + text tokens, with its mask) against the same step on
    the text encoder's hidden states alone (what the stock pipeline feeds it: no mask)."""
    generator = torch.Generator().manual_seed(args.seed)
    batch, tokens, width = model.batch_size, model.tokenizer.model_max_length, model.text_encoder.config.hidden_size
    dtype = model.unet.dtype
    text = torch.randn(batch, tokens, width, generator=generator).to(model.device, dtype)
    mask = torch.ones(batch, tokens, dtype=torch.long, device=model.device)
    mask[:, tokens // 2 :] = 0  # padded prompts, as the tokenizer gives them
    latents = torch.randn(2 * batch, *model.latent_shape, generator=generator).to(model.device, dtype)
    with torch.no_grad():
        context = model.conditioner(text.repeat(2, 1, 1), 1.0, mask.repeat(2, 1))
    # the stock pipeline's context: text encoder width = the UNet's cross_attention_dim in both models here
    stock_context = torch.randn(2 * batch, tokens, model.unet.config.cross_attention_dim, generator=generator)
    stock_context = stock_context.to(model.device, dtype)

    def conditioner():
        model.conditioner(text, 1.0, mask)
        model.conditioner(text, 0.0, mask)

    def unet_step():
        model.unet(latents, 500, encoder_hidden_states=context.encoder_hidden_states,
                   encoder_attention_mask=context.encoder_attention_mask)  # fmt: skip

    def stock_unet_step():
        model.unet(latents, 500, encoder_hidden_states=stock_context)

    rows = {}
    pairs = {
        CONDITIONER: (Run(conditioner, lambda: weights(model.conditioner)), UNET_STEP),
        UNET_STEP: (Run(unet_step, lambda: weights(model.unet)), UNET_STEP_STOCK),
    }
    with torch.no_grad():
        for name, (run, reference) in pairs.items():
            reference_run = Run(unet_step if reference == UNET_STEP else stock_unet_step, lambda: weights(model.unet))
            runs = {name: run, reference: reference_run}
            rows[name] = guarded(lambda runs=runs: compare(runs, args, rng, model.device), model.device)
            free_memory(model.device)
    if "error" not in rows[CONDITIONER]:
        rows[CONDITIONER]["per_step_equivalent"] = {
            kind: rows[CONDITIONER]["time_ratio"][kind]["median"] / model.steps for kind in ("wall", "cpu")
        }
    return {
        **model.description(),
        "context_tokens": int(context.encoder_hidden_states.shape[1]),
        "stock_context_tokens": tokens,
        "text_tokens_padded": tokens - tokens // 2,
        "per_step_equivalent_is": "median time ratio / steps (the conditioner runs once per call per branch)",
        "comparisons": rows,
    }


# ----------------------------------------------------------------------------------------------- 3. TextRIN


def measure_text_rin(model: Model, args, rng) -> dict:
    """The digits UNet against a TextRIN of about its size, each with its own new conditioner (its
    cross_attention_dim is the denoiser's), through the same pipeline and the same training step."""
    torch.manual_seed(args.seed)
    dtype = model.unet.dtype
    rin_conditioner_config = {**DIGITS_CONDITIONER, "text_dim": model.text_encoder.config.hidden_size,
                              "cross_attention_dim": DIGITS_CONDITIONER["dim"]}  # fmt: skip
    rin_conditioner = CoherenceConditioner(**rin_conditioner_config).to(model.device, dtype).eval()
    rin = TextRINModel(sample_size=model.latent_shape[1], in_channels=model.latent_shape[0],
                       cross_attention_dim=rin_conditioner_config["cross_attention_dim"], **TEXT_RIN)  # fmt: skip
    rin.to(model.device, dtype).eval()
    denoisers = {RIN_DENOISER: (rin, rin_conditioner), UNET_DENOISER: (model.unet, model.conditioner)}
    latents = model.latents(args.seed)

    def call(denoiser, conditioner):
        pipe = model.coherence_pipeline(denoiser, conditioner)
        return lambda: pipe(list(model.prompts), negative_prompt="", num_inference_steps=model.steps,
                            guidance_scale=args.guidance_scale, latents=latents.clone(), output_type="latent")  # fmt: skip

    sampling = guarded(lambda: compare({name: Run(call(*pair), lambda d=pair[0]: weights(d))
                                        for name, pair in denoisers.items()}, args, rng, model.device),
                       model.device)  # fmt: skip
    if "error" not in sampling:
        for row in sampling["configurations"].values():
            row["samples_per_second"] = model.batch_size / row["seconds"]["wall"]["median"]
    free_memory(model.device)

    # training: the denoiser alone on the conditioner's detached context, fp32 weights as in training
    generator = torch.Generator().manual_seed(args.seed)
    batch = model.batch_size
    tokens, width = model.tokenizer.model_max_length, model.text_encoder.config.hidden_size
    text = torch.randn(batch, tokens, width, generator=generator).to(model.device)
    coherence = torch.rand(batch, generator=generator).to(model.device)
    noisy = torch.randn(batch, *model.latent_shape, generator=generator).to(model.device)
    target = torch.randn(noisy.shape, generator=generator).to(model.device)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator).to(model.device)

    def step_run(denoiser, conditioner) -> Run:
        denoiser = type(denoiser).from_config(denoiser.config).to(model.device).train()  # an fp32 copy to train
        with torch.no_grad():
            context = conditioner.float()(text, coherence)
        optimizer = torch.optim.AdamW(denoiser.parameters(), lr=1e-4)

        def step():
            prediction = denoiser(noisy, timesteps, encoder_hidden_states=context.encoder_hidden_states,
                                  encoder_attention_mask=context.encoder_attention_mask).sample  # fmt: skip
            F.mse_loss(prediction.float(), target).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return Run(step, lambda: weights(denoiser) + optimizer_state_bytes(optimizer))

    training = guarded(lambda: compare({name: step_run(*pair) for name, pair in denoisers.items()}, args, rng,
                                       model.device), model.device)  # fmt: skip
    model.conditioner.to(dtype)
    free_memory(model.device)
    return {
        "parameters": {UNET_DENOISER: count(model.unet), RIN_DENOISER: count(rin)},
        "text_rin_config": dict(rin.config),
        "conditioners": {UNET_DENOISER: dict(model.conditioner.config), RIN_DENOISER: rin_conditioner_config},
        "steps": model.steps,
        "batch_size": model.batch_size,
        "guidance_scale": args.guidance_scale,
        "negative_prompt": "",
        "sampling": sampling,
        "training_step": {
            "what": "denoiser forward on the conditioner's detached context, epsilon MSE, backward, AdamW (lr 1e-4); "
            "fp32 weights; TextRIN without a self-conditioning pass",
            **training,
        },
    }


# ------------------------------------------------------------------------------------------------ 4. scoring


def timed(function, args, device) -> dict:
    """Median wall and CPU seconds of `function` over `args.classifier_repeats` calls after `args.warmup` untimed
    ones (nothing to pair it with: scikit-learn has no stock equivalent in this package's reach)."""
    for _ in range(args.warmup):
        function()
    calls = [measured_call(function, device) for _ in range(args.classifier_repeats)]
    return {"wall": summary([c[0] for c in calls]), "cpu": summary([c[1] for c in calls])}


def clip_row(name, model, processor, images, captions, args, rng, device) -> dict:
    model.to(device).eval()
    inputs = processor(text=captions, images=list(images), return_tensors="pt", padding=True, truncation=True,
                       do_rescale=False, do_resize=False, do_center_crop=False)  # fmt: skip
    inputs = {key: value.to(device) for key, value in inputs.items()}

    def bare():
        image = model.get_image_features(pixel_values=inputs["pixel_values"])
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        image, text = (f if torch.is_tensor(f) else f.pooler_output for f in (image, text))
        F.cosine_similarity(image, text, dim=-1)

    def scored():
        clip_cosine(images, captions, model, processor, batch_size=len(captions), device=device, show_progress=False)

    reference = "model forward alone (preprocessed inputs)"
    with torch.no_grad():
        row = guarded(lambda: compare({"clip_cosine": Run(scored, lambda: weights(model)),
                                       reference: Run(bare, lambda: weights(model))}, args, rng, device), device)  # fmt: skip
    if "error" not in row:
        row["images_per_second"] = len(captions) / row["configurations"]["clip_cosine"]["seconds"]["wall"]["median"]
    return {"model": name, "parameters": count(model), "image_size": list(images.shape[-2:]), "batch": len(captions),
            **row}  # fmt: skip


def measure_scoring(args, rng, device) -> dict:
    from sklearn.datasets import load_digits

    generator = torch.Generator().manual_seed(args.seed)
    captions = [PROMPTS[i % len(PROMPTS)] for i in range(args.clip_batch_size)]
    rows = {}
    folder = digits_clip_path()
    digits_model = CLIPModel.from_pretrained(folder, local_files_only=True)
    processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    size = processor.image_processor.crop_size["height"]
    images = torch.rand(len(captions), 3, size, size, generator=generator)
    rows["digits CLIP"] = clip_row("storydiff/checkpoints/digits-clip", digits_model, processor, images, captions,
                                   args, rng, device)  # fmt: skip

    # CLIP ViT-B/32's shape: transformers' CLIPConfig defaults, random weights, the digits tokenizer's vocabulary
    vocabulary = len(processor.tokenizer)
    config = QUICK_CLIP if args.quick else {}
    clip_config = CLIPConfig(text_config={"vocab_size": vocabulary, **config.get("text_config", {})},
                             vision_config=config.get("vision_config", {}),
                             projection_dim=config.get("projection_dim", 512))  # fmt: skip
    torch.manual_seed(args.seed)
    vit = CLIPModel(clip_config)
    vit_processor = CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=processor.tokenizer)
    vit_size = clip_config.vision_config.image_size
    vit_captions = captions[: args.vit_batch_size]
    vit_images = torch.rand(len(vit_captions), 3, vit_size, vit_size, generator=generator)
    name = "CLIP ViT-B/32 shape (random)" + (" at --quick widths" if args.quick else "")
    rows[name] = clip_row(name, vit, vit_processor, vit_images, vit_captions, args, rng, device)
    del vit
    free_memory(device)

    digits = load_digits()
    features, labels = digits.data, digits.target
    if args.quick:
        features, labels = features[:QUICK_DIGITS_SAMPLES], labels[:QUICK_DIGITS_SAMPLES]
    seconds = timed(lambda: classifier_coherence(features, labels, num_folds=5, seed=args.seed), args, device)
    return {
        "clip_cosine": rows,
        "classifier_coherence": {
            "data": "sklearn.datasets.load_digits (8x8, 64 features)" + (" first 500 (--quick)" if args.quick else ""),
            "samples": len(labels),
            "num_folds": 5,
            "classifier": "StandardScaler + LogisticRegression(max_iter=1000, C=0.1) (the default)",
            "calls": seconds["wall"]["n"],
            "seconds": seconds,
            "samples_per_second": len(labels) / seconds["wall"]["median"],
        },
    }


# ------------------------------------------------------------------------------------------------------ main


def ratio_text(row: dict) -> str:
    if "error" in row:
        return row["error"]
    ratio = row["time_ratio"]
    return f"{ratio['of']} / {ratio['over']} time {ratio['wall']['median']:.3f}"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes that run in seconds (the test): 1 pair, no warm-up, 2 steps, batch 1, "
                        "narrow SD-shaped UNet and CLIP, 500 digits")  # fmt: skip
    parser.add_argument("--models", nargs="+", default=["digits", "sd15"], choices=["digits", "sd15"])
    parser.add_argument("--batch-size", "--batch_size", type=int, default=4, help="images per call, digits model")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps per call, digits model")
    parser.add_argument("--sd15-latent-size", "--sd15_latent_size", type=int, default=8)
    parser.add_argument("--sd15-steps", "--sd15_steps", type=int, default=4)
    parser.add_argument("--sd15-batch-size", "--sd15_batch_size", type=int, default=1)
    parser.add_argument("--sd15-repeats", "--sd15_repeats", type=int, default=3, help="timed pairs, SD 1.5 shape")
    parser.add_argument("--clip-batch-size", "--clip_batch_size", type=int, default=64, help="digits CLIP images")
    parser.add_argument("--vit-batch-size", "--vit_batch_size", type=int, default=8, help="ViT-B/32-shaped images")
    parser.add_argument("--classifier-repeats", "--classifier_repeats", type=int, default=3,
                        help="timed calls of classifier_coherence")  # fmt: skip
    parser.add_argument("--guidance-scale", "--guidance_scale", type=float, default=4.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="inference weights")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--repeats", type=int, default=15, help="timed pairs per comparison")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each configuration first")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="default: docs/benchmarks/coherence_aware_<device type>.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.batch_size, args.steps = 1, 0, 1, 2
        args.sd15_steps, args.sd15_batch_size, args.sd15_repeats, args.sd15_latent_size = 2, 1, 1, 8
        args.clip_batch_size, args.vit_batch_size, args.classifier_repeats = 4, 1, 1
    sizes = (args.repeats, args.batch_size, args.sd15_batch_size, args.sd15_repeats, args.clip_batch_size,
             args.vit_batch_size, args.sd15_latent_size, args.classifier_repeats)  # fmt: skip
    if min(sizes) < 1 or args.warmup < 0 or min(args.steps, args.sd15_steps) < 2:
        raise SystemExit("Repeats, batch sizes and --sd15-latent-size must be positive, steps at least 2, "
                         "--warmup at least 0.")  # fmt: skip
    if args.vit_batch_size > args.clip_batch_size:
        raise SystemExit("--vit-batch-size must be at most --clip-batch-size (its captions are the first ones).")
    if args.guidance_scale <= 1:
        raise SystemExit("--guidance-scale must be above 1: CA-CFG runs both branches only when guided.")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    quiet_libraries()
    started = time.perf_counter()
    rng = random.Random(args.seed)
    device = torch.device(args.device)
    output = Path(args.output or REPOSITORY / "docs" / "benchmarks" / f"coherence_aware_{device.type}.json")
    import sklearn
    import transformers

    results = {
        "command": command_line(__file__, REPOSITORY, argv),
        "quick": args.quick,
        "models": args.models,
        "sd15_repeats": args.sd15_repeats,
        **run_settings(args, device, transformers=transformers.__version__, sklearn=sklearn.__version__),
    }

    model_sections = [s for s in ("ca_cfg", "conditioner") if s in args.sections]
    for name in args.models:
        if not model_sections and not (name == "digits" and "text_rin" in args.sections):
            continue
        model = Model(name, args, device)
        repeats = args.repeats
        args.repeats = args.sd15_repeats if name == "sd15" else repeats
        if "ca_cfg" in args.sections:
            results.setdefault("ca_cfg", {})[name] = measure_ca_cfg(model, args, rng)
            for row in results["ca_cfg"][name]["variants"].values():
                print(f"ca_cfg {name}: {ratio_text(row)}", flush=True)
        if "conditioner" in args.sections:
            results.setdefault("conditioner", {})[name] = measure_conditioner(model, args, rng)
            for row in results["conditioner"][name]["comparisons"].values():
                per_step = row.get("per_step_equivalent")
                text = f"conditioner {name}: {ratio_text(row)}" + (f", per step {per_step}" if per_step else "")
                print(text, flush=True)
        args.repeats = repeats
        if name == "digits" and "text_rin" in args.sections:
            results["text_rin"] = measure_text_rin(model, args, rng)
            print(f"text_rin: sampling {ratio_text(results['text_rin']['sampling'])}; training "
                  f"{ratio_text(results['text_rin']['training_step'])}", flush=True)  # fmt: skip
        del model
        free_memory(device)
    if "scoring" in args.sections:
        results["scoring"] = measure_scoring(args, rng, device)
        for name, row in results["scoring"]["clip_cosine"].items():
            print(f"scoring {name}: {row.get('images_per_second', row.get('error'))} images/s", flush=True)
        print(f"classifier_coherence: {results['scoring']['classifier_coherence']['seconds']['wall']['median']:.2f} s",
              flush=True)  # fmt: skip
    write_results(results, output, started)
    return results


if __name__ == "__main__":
    main()
