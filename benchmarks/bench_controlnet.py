"""Cost of storydiff's ControlNet variants (`storydiff.ControlNetFullModel`, `storydiff.ControlNetLiteModel`) against
the UNet they control and against diffusers' own light controls (ControlNet-XS, T2I-Adapter).

0. Parameters (always): the control's own parameter count for every variant, and relative to the UNet it controls.
1. Denoiser step: one forward pass (no grad) on a batch of B latents (2B with `--cfg-batch`, the batch a CFG step
   runs) of the UNet alone against the UNet driven by each control:
   - the full ControlNet (`ControlNetFullModel.from_unet`, the trainable copy of the encoder, `connect="all"`),
   - ControlNet-lite (`ControlNetLiteModel.from_unet`, one convolution per encoder layer),
   - the full ControlNet with `connect="mid_block"` (the same network, only the middle residual reaches the UNet),
   - diffusers' ControlNet-XS (`ControlNetXSAdapter.from_unet` fused into `UNetControlNetXSModel.from_unet`), at the
     `size_ratio` whose adapter parameter count is nearest ControlNet-lite's (`--xs-size-ratio` to set it),
   - diffusers' `T2IAdapter(adapter_type="light_adapter")` through `down_intrablock_additional_residuals`, both
     as its pipeline runs it (the adapter once per call, its features reused on every step: the per-step cost is the
     UNet's with the residual additions) and with the adapter run on every step (what it costs if it were per step).
   Time ratio against the UNet alone and, on CUDA, peak-memory ratio (`--dtype fp16|bf16` for half precision).
   The zero-initialised controls leave the UNet's output unchanged at initialisation: the largest difference from
   the reference is recorded for each (storydiff's ControlNets give exactly 0; the fused ControlNet-XS model differs
   from its base UNet by float rounding, about 1e-4, even with `apply_control=False`; the T2I-Adapter is not
   zero-initialised and does change the output).
2. Training step: forward through control + UNet, epsilon MSE loss, backward, gradient clipping and AdamW over the
   trainable parameters (as `training/train_controlnet.py`): the control's parameters (the mid-block-only variant
   without its down zero convolutions, which get no gradient); the "unlocked decoder" rows also train the UNet's up
   blocks, `conv_norm_out` and `conv_out` (`--unlock decoder` there). Time ratio against the full ControlNet's
   training step with the UNet locked (ControlNet-XS: against a full ControlNet of its own base UNet, see below)
   and, on CUDA, peak-memory ratio. Weights are fp32; `--dtype fp16|bf16` autocasts, as accelerate's mixed
   precision.
3. Dynamic CFG with a ControlNet: a whole `DynamicCFGStableDiffusionControlNetPipeline` call (the full ControlNet,
   DDIM, `--steps` steps, `output_type="latent"`) with `guidance_schedule="static"` against schedules with
   zero-weight steps (`"linear"`, whose first step has weight 0, and `GuidanceSchedule("interval", interval=(0.5, 1))`,
   unguided for the first half of sampling). A schedule with k zero-weight steps of N runs the UNet and the ControlNet
   on the conditional half only on those steps, so it needs (2N - k) / (2N) of the denoiser evaluations: that
   expected ratio, the images the UNet and the ControlNet actually received (counted with forward hooks, one untimed
   call) and the measured time ratio are recorded side by side.

Models: by default the UNet of the shipped digits text-to-image model (`storydiff.checkpoints`, 4x8x8 latents for
32x32 images, VAE stride 4, 24-token 64-wide text), with conditioning embeddings (16, 32, 96) (stride 4). `--unet sd15`
builds a UNet with Stable Diffusion 1.5's config and random weights in code (no download; 77 tokens of 768-wide text)
at `--latent-size`, with embeddings (16, 32, 96, 256) (stride 8); its pipeline in section 3 gets a tiny random VAE of
stride 8 that never runs. Text embeddings, latents and condition images are random: their values do not change the
cost. The pipeline takes them as `prompt_embeds`, `latents` and a condition tensor, so its text encoder never runs.

Limits of diffusers' controls at these widths, handled here and recorded in the JSON:
- ControlNet-XS supports UNets with 2 layers per block only (SD 1.5 / SDXL; `num_layers = 2` in
  diffusers/models/controlnets/controlnet_xs.py): with the digits UNet (1 layer per block) it is measured on a twin
  UNet with the same config but `layers_per_block=2` (random weights), against that twin alone (section 1) and
  against a full ControlNet of that twin (section 2). Its attention heads are the UNet's `attention_head_dim` (8),
  so its widths must be at least 8 (size_ratio 0.125 on the digits UNet gives width 4: a division by zero); the
  automatic size_ratio takes widths that are multiples of the heads.
- The light T2I-Adapter gives one feature per entry of `channels` plus one more at half the last resolution with
  the last width: built for SD 1.5's widths (320, 640, 1280, 1280) as `channels=(320, 640, 1280)`. When the UNet's
  last two widths differ (the digits UNet's (32, 64)) no `channels` matches every down block; `channels` is then the
  UNet's widths, and the extra feature (half the smallest resolution) is computed and unused (the UNet adds an
  intrablock residual only where the shape matches).

Every comparison pairs a configuration with its reference back to back in random order, repeated, after untimed
warm-up calls, and reports the median of the paired ratios (as `bench_video_ldm.py` does): load from other jobs on a
shared machine largely cancels out of the ratios, not out of the absolute times. Peak memory is measured on CUDA only
(`torch.cuda.max_memory_allocated`); on CPU it is recorded as null: the process's resident size is monotone and the
allocator keeps freed memory, so it cannot attribute a peak to one call.

    OMP_NUM_THREADS=2 python benchmarks/bench_controlnet.py       # writes docs/benchmarks/controlnet_cpu.json
    python benchmarks/bench_controlnet.py --device cuda --unet sd15 --latent-size 64 --dtype fp16 --batch-size 2 \
        --cfg-batch --output docs/benchmarks/controlnet_cuda_fp16.json
"""

import argparse
import copy
import math
import os
import random
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    ControlNetXSAdapter,
    DDIMScheduler,
    T2IAdapter,
    UNet2DConditionModel,
    UNetControlNetXSModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

from storydiff import (
    ControlNetFullModel,
    ControlNetLiteModel,
    DynamicCFGStableDiffusionControlNetPipeline,
    GuidanceSchedule,
)
from storydiff.benchmarking import (
    DTYPES,
    SD15_TEXT_TOKENS,
    SD15_UNET_CONFIG,
    Run,
    command_line,
    compare,
    free_memory,
    guarded,
    optimizer_state_bytes,
    quiet_libraries,
    run_settings,
    weights,
    write_results,
)
from storydiff.checkpoints import text_to_image_pipeline_path

REPOSITORY = Path(__file__).resolve().parents[1]
SECTIONS = ("denoiser", "training", "dynamic_cfg")
DEFAULT_EMBEDDING_CHANNELS = (16, 32, 96, 256)  # diffusers' ControlNetModel default: stride 8 with 4 entries
UNET = "UNet alone"
FULL = "full ControlNet"
LITE = "ControlNet-lite"
MID = "full ControlNet, mid block only"
XS = "ControlNet-XS (diffusers)"
T2I = "T2I-Adapter light (diffusers), features once per call"
T2I_EVERY_STEP = "T2I-Adapter light (diffusers), adapter every step"
TWIN_UNET = "UNet alone, 2 layers per block twin"
TWIN_FULL = "full ControlNet of the 2 layers per block twin"
# A VAE of stride 8 for the sd15 pipeline: it never runs (latents in, latents out), it only sets the image size
TINY_STRIDE_8_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (8, 8, 8, 8),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
}
T2I_RES_BLOCKS = 4  # the released light adapters (TencentARC t2iadapter_*_sd14v1 light) use 4


def count(parameters) -> int:
    return sum(p.numel() for p in parameters)


# ---------------------------------------------------------------------------------------------- models under test


def conditioning_widths(stride: int, requested: Optional[list]) -> tuple:
    """The ControlNet conditioning embedding's widths: one entry per factor 2 of the VAE's stride, plus one."""
    steps = int(math.log2(stride))
    widths = tuple(requested) if requested else DEFAULT_EMBEDDING_CHANNELS[: steps + 1]
    if len(widths) != steps + 1:
        raise SystemExit(f"--conditioning-embedding-out-channels needs {steps + 1} widths for a VAE of stride "
                         f"{stride}, got {list(widths)}.")  # fmt: skip
    return widths


def xs_heads(unet) -> int:
    """ControlNet-XS's attention heads: diffusers passes the UNet's `attention_head_dim` as `num_attention_heads`."""
    heads = unet.config.attention_head_dim
    return max(heads) if isinstance(heads, (list, tuple)) else heads


def xs_size_ratio(unet, widths: tuple, target: int) -> tuple:
    """(size_ratio, adapter parameters) of the ControlNet-XS adapter nearest `target` parameters, among the ratios
    whose widths are all positive multiples of the attention heads (a head narrower than one channel fails); the
    candidates are built on the meta device (no memory, no initialisation)."""
    heads, first = xs_heads(unet), unet.config.block_out_channels[0]
    candidates = []
    for width in range(heads, first + 1, heads):
        ratio = width / first
        if all(int(b * ratio) > 0 and int(b * ratio) % heads == 0 for b in unet.config.block_out_channels):
            with torch.device("meta"):
                adapter = ControlNetXSAdapter.from_unet(
                    unet, size_ratio=ratio, conditioning_embedding_out_channels=widths
                )
            candidates.append((abs(count(adapter.parameters()) - target), ratio, count(adapter.parameters())))
    if not candidates:
        raise SystemExit(f"No ControlNet-XS width is a multiple of the UNet's {heads} attention heads.")
    _, ratio, parameters = min(candidates)
    return ratio, parameters


def t2i_channels(unet) -> tuple:
    """(channels, note) of a light T2I-Adapter for `unet`: its features are `channels` plus the last width once more,
    at half the last resolution (see the module doc)."""
    widths = tuple(unet.config.block_out_channels)
    if len(widths) > 1 and widths[-1] == widths[-2]:
        return widths[:-1], "one feature per down block, as the released SD 1.5 light adapters"
    return widths, (f"the UNet's last two widths differ {widths[-2:]}: channels are the UNet's widths and the "
                    "adapter's last feature (half the smallest resolution) is computed and unused")  # fmt: skip


class Setup:
    """The models and shapes every section uses; every model is built fp32 on the device, for the training section's
    copies, then `to_inference_dtype` casts them."""

    def __init__(self, args):
        self.device, self.dtype = torch.device(args.device), DTYPES[args.dtype]
        folder = text_to_image_pipeline_path()
        # the pipeline's other components (section 3 passes embeddings, latents and a condition tensor)
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
        self.text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
        self.scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
        torch.manual_seed(args.seed)
        if args.unet == "digits":
            self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
            self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
            self.text_tokens = self.tokenizer.model_max_length
            self.source = os.path.relpath(os.path.join(folder, "unet"), REPOSITORY)
        else:
            with torch.device(self.device):  # built and initialised on the device: much faster than on CPU
                self.unet = UNet2DConditionModel(sample_size=args.latent_size, **SD15_UNET_CONFIG)
            self.vae = AutoencoderKL(**TINY_STRIDE_8_VAE_CONFIG)
            self.text_tokens = SD15_TEXT_TOKENS
            self.source = "UNet2DConditionModel with Stable Diffusion 1.5's config, random weights"
        self.unet.to(self.device).eval()
        self.vae.to(self.device)
        self.text_encoder.to(self.device)
        self.stride = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.widths = conditioning_widths(self.stride, args.conditioning_embedding_out_channels)
        sample_size = self.unet.config.sample_size
        height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        self.latent_shape = (self.unet.config.in_channels, height, width)
        self.image_size = (height * self.stride, width * self.stride)
        self.text_dim = self.unet.config.cross_attention_dim

        with torch.device(self.device):
            self.full = ControlNetFullModel.from_unet(self.unet, conditioning_embedding_out_channels=self.widths)
            self.lite = ControlNetLiteModel.from_unet(self.unet, conditioning_embedding_out_channels=self.widths)
            self.mid = ControlNetFullModel.from_unet(
                self.unet, conditioning_embedding_out_channels=self.widths, connect="mid_block"
            )
            # ControlNet-XS: on the UNet itself where it has 2 layers per block, else on a twin that has
            self.xs_on_twin = self.unet.config.layers_per_block != 2
            if self.xs_on_twin:
                self.xs_base = UNet2DConditionModel.from_config({**self.unet.config, "layers_per_block": 2}).eval()
                self.xs_base_full = ControlNetFullModel.from_unet(
                    self.xs_base, conditioning_embedding_out_channels=self.widths
                )
            else:
                self.xs_base, self.xs_base_full = self.unet, self.full
            lite_parameters = count(self.lite.parameters())
            self.xs_ratio_given = args.xs_size_ratio is not None
            if args.xs_size_ratio is None:
                self.xs_ratio, _ = xs_size_ratio(self.xs_base, self.widths, lite_parameters)
            else:
                self.xs_ratio = args.xs_size_ratio
            adapter = ControlNetXSAdapter.from_unet(
                self.xs_base, size_ratio=self.xs_ratio, conditioning_embedding_out_channels=self.widths
            )
            self.xs_adapter_parameters = count(adapter.parameters())
            self.xs_widths = list(adapter.config.block_out_channels)
            self.xs = UNetControlNetXSModel.from_unet(self.xs_base, adapter).eval()  # copies the base's weights
            del adapter
            self.t2i_channels, self.t2i_note = t2i_channels(self.unet)
            self.t2i = T2IAdapter(in_channels=3, channels=list(self.t2i_channels), num_res_blocks=T2I_RES_BLOCKS,
                                  downscale_factor=self.stride, adapter_type="light_adapter")  # fmt: skip
        if any(side % self.t2i.total_downscale_factor for side in self.image_size):
            raise SystemExit(f"The light T2I-Adapter needs images whose sides are multiples of "
                             f"{self.t2i.total_downscale_factor}; these are {self.image_size}.")  # fmt: skip
        for model in self.controls():
            model.eval()

    def controls(self) -> list:
        models = [self.full, self.lite, self.mid, self.xs, self.t2i]
        return models + ([self.xs_base, self.xs_base_full] if self.xs_on_twin else [])

    def to_inference_dtype(self):
        # the text encoder too: the pipeline casts prompt embeddings to its dtype (it never runs on them)
        for model in [self.unet, self.text_encoder, self.vae, *self.controls()]:
            model.to(self.dtype)

    def parameters(self) -> dict:
        unet = count(self.unet.parameters())
        xs_base = count(self.xs_base.parameters())
        lite = count(self.lite.parameters())
        base_name = "the 2 layers per block twin" if self.xs_on_twin else "the UNet"

        def row(parameters, base=unet, base_name="the UNet"):
            return {"parameters": parameters, "relative_to_unet": parameters / base, "unet": base_name}

        variants = {
            FULL: row(count(self.full.parameters())),
            LITE: row(lite),
            MID: row(count(self.mid.parameters())),
            XS: row(self.xs_adapter_parameters, xs_base, base_name),
            "T2I-Adapter light (diffusers)": row(count(self.t2i.parameters())),
        }
        if self.xs_on_twin:
            variants[TWIN_FULL] = row(count(self.xs_base_full.parameters()), xs_base, base_name)
        return {
            "unet": unet,
            "variants": variants,
            "controlnet_xs": {
                "size_ratio": self.xs_ratio,
                "block_out_channels": self.xs_widths,
                "attention_heads": xs_heads(self.xs_base),
                "size_ratio_chosen": "given (--xs-size-ratio)"
                if self.xs_ratio_given
                else f"parameters nearest {LITE}'s, among widths that are multiples of the attention heads",
                "relative_to_lite": self.xs_adapter_parameters / lite,
                "base_unet": base_name,
                "base_unet_parameters": xs_base,
                "base_unet_note": "diffusers' ControlNet-XS supports 2 layers per block only; the twin has the "
                "UNet's config with layers_per_block=2 and random weights"
                if self.xs_on_twin
                else None,
                "fused_model_parameters": count(self.xs.parameters()),
            },
            "t2i_adapter": {
                "adapter_type": "light_adapter",
                "channels": list(self.t2i_channels),
                "num_res_blocks": T2I_RES_BLOCKS,
                "downscale_factor": self.stride,
                "total_downscale_factor": self.t2i.total_downscale_factor,
                "note": self.t2i_note,
            },
        }


class Inputs:
    """Random latents, text and condition images for a batch, in the models' dtype, on the device."""

    def __init__(self, setup, batch_size: int, generator: torch.Generator, dtype=None):
        dtype = dtype or setup.dtype

        def randn(*shape):
            return torch.randn(*shape, generator=generator).to(setup.device, dtype)

        self.latents = randn(batch_size, *setup.latent_shape)
        self.text = randn(batch_size, setup.text_tokens, setup.text_dim)
        self.condition = torch.rand(batch_size, 3, *setup.image_size, generator=generator).to(setup.device, dtype)


def controlled(controlnet, unet):
    """UNet + ControlNet, as the stock ControlNet pipeline calls them on one step."""

    def forward(x, timestep):
        down, mid = controlnet(x.latents, timestep, x.text, x.condition, return_dict=False)
        return unet(x.latents, timestep, x.text, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample  # fmt: skip

    return forward


def adapted(adapter, unet, features=None):
    """UNet + T2I-Adapter; with `features` (computed once per call, as `StableDiffusionAdapterPipeline`) the adapter
    does not run. The UNet pops the residuals from the list it is given: a fresh list every call."""

    def forward(x, timestep):
        residuals = list(features) if features is not None else adapter(x.condition)
        return unet(x.latents, timestep, x.text, down_intrablock_additional_residuals=residuals).sample

    return forward


# ------------------------------------------------------------------------------------------------ 1. denoiser step


def measure_denoiser(setup, args, rng) -> dict:
    generator = torch.Generator().manual_seed(args.seed)
    batch = args.batch_size * (2 if args.cfg_batch else 1)
    x = Inputs(setup, batch, generator)
    timestep = torch.tensor(500, device=setup.device)
    with torch.no_grad():
        features = setup.t2i(x.condition)

    def plain(unet):
        return lambda x, timestep: unet(x.latents, timestep, x.text).sample

    unet_weights = weights(setup.unet)
    # name -> (forward, resident bytes, reference name); the references are plain UNets
    variants = {
        FULL: (controlled(setup.full, setup.unet), unet_weights + weights(setup.full), UNET),
        LITE: (controlled(setup.lite, setup.unet), unet_weights + weights(setup.lite), UNET),
        MID: (controlled(setup.mid, setup.unet), unet_weights + weights(setup.mid), UNET),
        XS: (
            lambda x, t: setup.xs(x.latents, t, x.text, x.condition).sample,
            weights(setup.xs),
            TWIN_UNET if setup.xs_on_twin else UNET,
        ),
        T2I: (adapted(setup.t2i, setup.unet, features), unet_weights + weights(setup.t2i), UNET),
        T2I_EVERY_STEP: (adapted(setup.t2i, setup.unet), unet_weights + weights(setup.t2i), UNET),
    }
    references = {UNET: (plain(setup.unet), unet_weights), TWIN_UNET: (plain(setup.xs_base), weights(setup.xs_base))}
    rows = {}
    with torch.no_grad():
        for name, (forward, resident, reference) in variants.items():
            reference_forward, reference_resident = references[reference]
            difference = (forward(x, timestep) - reference_forward(x, timestep)).abs().max().item()
            runs = {
                name: Run(lambda f=forward: f(x, timestep), lambda r=resident: r),
                reference: Run(lambda f=reference_forward: f(x, timestep), lambda r=reference_resident: r),
            }
            row = guarded(lambda runs=runs: compare(runs, args, rng, setup.device), setup.device)
            rows[name] = {"max_abs_difference_vs_reference_at_initialisation": difference, **row}
            free_memory(setup.device)
    return {"batch_size": batch, "cfg_batch": args.cfg_batch, "timestep": 500, "variants": rows}


# ------------------------------------------------------------------------------------------------- 2. training step


def measure_training(setup, args, rng) -> dict:
    """Every variant trains fp32 copies of its models (the UNet copy is shared: its weights change only where a
    variant unlocks them, which does not change the cost), each with its own AdamW; a variant's setup sets which
    parameters require gradients, as `training/train_controlnet.py` does."""
    unet = copy.deepcopy(setup.unet).float().train()
    full, lite, mid, t2i = (copy.deepcopy(m).float().train() for m in (setup.full, setup.lite, setup.mid, setup.t2i))
    xs = copy.deepcopy(setup.xs).float().train()
    xs.freeze_unet_params()
    xs_trainable = [p for p in xs.parameters() if p.requires_grad]
    xs_base_full = copy.deepcopy(setup.xs_base_full).float().train() if setup.xs_on_twin else full
    xs_base = copy.deepcopy(setup.xs_base).float().train() if setup.xs_on_twin else unet
    models = [unet, full, lite, mid, t2i, xs] + ([xs_base, xs_base_full] if setup.xs_on_twin else [])
    decoder = [p for m in (unet.up_blocks, unet.conv_norm_out, unet.conv_out) if m is not None for p in m.parameters()]
    mid_trainable = [p for n, p in mid.named_parameters() if not n.startswith("controlnet_down_blocks.")]

    # name -> (forward, trainable parameters, models it holds, reference name)
    variants = {
        FULL: (controlled(full, unet), list(full.parameters()), [full, unet], None),
        LITE: (controlled(lite, unet), list(lite.parameters()), [lite, unet], FULL),
        MID: (controlled(mid, unet), mid_trainable, [mid, unet], FULL),
        f"{FULL}, unlocked decoder": (controlled(full, unet), list(full.parameters()) + decoder, [full, unet], FULL),
        f"{LITE}, unlocked decoder": (controlled(lite, unet), list(lite.parameters()) + decoder, [lite, unet], FULL),
        XS: (
            lambda x, t: xs(x.latents, t, x.text, x.condition).sample,
            xs_trainable,
            [xs],
            TWIN_FULL if setup.xs_on_twin else FULL,
        ),
        "T2I-Adapter light (diffusers)": (adapted(t2i, unet), list(t2i.parameters()), [t2i, unet], FULL),
    }
    if setup.xs_on_twin:
        variants[TWIN_FULL] = (controlled(xs_base_full, xs_base), list(xs_base_full.parameters()),
                               [xs_base_full, xs_base], None)  # fmt: skip
    optimizers = {name: torch.optim.AdamW(v[1], lr=1e-5) for name, v in variants.items()}
    autocast = torch.autocast(setup.device.type, dtype=setup.dtype, enabled=setup.dtype != torch.float32)
    generator = torch.Generator().manual_seed(args.seed)
    x = Inputs(setup, args.batch_size, generator, dtype=torch.float32)
    target = torch.randn(x.latents.shape, generator=generator).to(setup.device)
    timesteps = torch.randint(0, 1000, (args.batch_size,), generator=generator).to(setup.device)

    def run(name) -> Run:
        forward, trainable, held, _ = variants[name]
        ids = {id(p) for p in trainable}

        def setup_grad():
            for model in models:
                for parameter in model.parameters():
                    parameter.requires_grad_(id(parameter) in ids)

        def step():
            with autocast:
                prediction = forward(x, timesteps)
            loss = F.mse_loss(prediction.float(), target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)

        return Run(step, lambda: weights(*held) + optimizer_state_bytes(optimizers[name]), setup=setup_grad)

    rows = {}
    for name, (*_, reference) in variants.items():
        if reference is None:
            continue
        runs = {name: run(name), reference: run(reference)}
        rows[name] = guarded(lambda runs=runs: compare(runs, args, rng, setup.device), setup.device)
        for model in models:  # after an out-of-memory error inside a step
            model.zero_grad(set_to_none=True)
        optimizers[name].state.clear()  # its moments are not needed again (the reference's are)
        free_memory(setup.device)
    return {
        "optimizer": "AdamW (torch defaults, lr 1e-5), gradient clipping at norm 1",
        "weights": "fp32",
        "autocast": None if setup.dtype == torch.float32 else args.dtype,
        "batch_size": args.batch_size,
        "unlocked_decoder": "the UNet's up_blocks, conv_norm_out and conv_out",
        "trainable_parameters": {name: count(v[1]) for name, v in variants.items()},
        "variants": rows,
    }


# ----------------------------------------------------------------------------------------------- 3. dynamic CFG


def zero_weight_schedules() -> dict:
    return {"linear": "linear", "interval [0.5, 1]": GuidanceSchedule("interval", interval=(0.5, 1.0))}


def count_images(pipe, call) -> dict:
    """Images the UNet and the ControlNet received during `call()`, counted by forward pre-hooks."""
    seen = {"unet": 0, "controlnet": 0}

    def counter(key):
        def hook(module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            seen[key] += sample.shape[0]

        return hook

    handles = [getattr(pipe, key).register_forward_pre_hook(counter(key), with_kwargs=True) for key in seen]
    try:
        call()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def measure_dynamic_cfg(setup, args, rng) -> dict:
    pipe = DynamicCFGStableDiffusionControlNetPipeline(
        vae=setup.vae, text_encoder=setup.text_encoder, tokenizer=setup.tokenizer, unet=setup.unet,
        controlnet=setup.full, scheduler=setup.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(args.seed)
    x = Inputs(setup, args.batch_size, generator)
    negative = torch.randn(x.text.shape, generator=generator).to(setup.device, setup.dtype)
    height, width = setup.image_size

    def call(schedule):
        pipe(prompt_embeds=x.text, negative_prompt_embeds=negative, image=x.condition, height=height, width=width,
             num_inference_steps=args.steps, guidance_scale=args.guidance_scale, guidance_schedule=schedule,
             latents=x.latents, output_type="latent",
             generator=torch.Generator(setup.device).manual_seed(args.seed))  # fmt: skip

    static_images = count_images(pipe, lambda: call("static"))
    rows = {}
    for name, schedule in zero_weight_schedules().items():
        images = count_images(pipe, lambda schedule=schedule: call(schedule))
        scales = pipe.guidance_scales
        skipped = int((scales == 1).sum())
        n = args.steps
        runs = {
            name: Run(lambda schedule=schedule: call(schedule), lambda: weights(setup.unet, setup.full)),
            "static": Run(lambda: call("static"), lambda: weights(setup.unet, setup.full)),
        }
        row = guarded(lambda runs=runs: compare(runs, args, rng, setup.device), setup.device)
        rows[name] = {
            "guidance_scales": [float(s) for s in scales],
            "zero_weight_steps": skipped,
            "expected_evaluation_ratio": (2 * n - skipped) / (2 * n),
            "images_evaluated": images,
            "evaluation_ratio_counted": {key: images[key] / static_images[key] for key in images},
            **row,
        }
        free_memory(setup.device)
    return {
        "pipeline": "DynamicCFGStableDiffusionControlNetPipeline",
        "controlnet": FULL,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "guidance_scale": args.guidance_scale,
        "scheduler": type(setup.scheduler).__name__,
        "output_type": "latent",
        "images_evaluated_static": static_images,
        "schedules": rows,
    }


# ------------------------------------------------------------------------------------------------------------ main


def headline(value: dict) -> str:
    """The section's main figures in one line (the JSON file has them all)."""
    rows = value.get("variants", value.get("schedules", {}))
    parts = []
    for name, row in rows.items():
        if "error" in row:
            parts.append(f"{name}: {row['error']}")
            continue
        ratio, memory = row["time_ratio"], row["peak_memory_ratio"]
        text = f"{name} / {ratio['over']} time {ratio['wall']['median']:.3f}"
        if "expected_evaluation_ratio" in row:
            text += f" (evaluations {row['expected_evaluation_ratio']:.3f})"
        parts.append(text + ("" if memory is None else f", peak memory {memory:.3f}"))
    return "; ".join(parts)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unet", default="digits", choices=["digits", "sd15"], help="shipped digits UNet or SD 1.5")
    parser.add_argument("--latent-size", "--latent_size", type=int, default=64, help="latent side of --unet sd15")
    parser.add_argument("--batch-size", "--batch_size", type=int, default=4, help="latents B per step / call")
    parser.add_argument("--cfg-batch", "--cfg_batch", action="store_true",
                        help="section 1 on 2B latents, the batch a classifier-free-guidance step runs")  # fmt: skip
    parser.add_argument("--conditioning-embedding-out-channels", "--conditioning_embedding_out_channels", type=int,
                        nargs="+", default=None,
                        help="ControlNet condition embedding widths (default (16, 32, 96, 256) cut to the VAE's stride)")  # fmt: skip
    parser.add_argument("--xs-size-ratio", "--xs_size_ratio", type=float, default=None,
                        help="ControlNet-XS size_ratio (default: the one whose parameters are nearest ControlNet-lite's)")  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="inference weights; training autocast")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--repeats", type=int, default=21, help="timed pairs per comparison")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each configuration first")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps of the section 3 pipeline calls")
    parser.add_argument("--guidance-scale", "--guidance_scale", type=float, default=4.0)
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="default: docs/benchmarks/controlnet_<device type>.json")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.batch_size < 1 or args.steps < 2:
        raise SystemExit("--repeats and --batch-size must be positive, --steps at least 2, --warmup at least 0.")
    if args.guidance_scale <= 1:
        raise SystemExit("--guidance-scale must be above 1: at 1 there is no unconditional half to skip.")
    if args.xs_size_ratio is not None and not 0 < args.xs_size_ratio <= 4:
        raise SystemExit(f"--xs-size-ratio must be in (0, 4], got {args.xs_size_ratio}.")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    quiet_libraries()
    started = time.perf_counter()
    rng = random.Random(args.seed)
    setup = Setup(args)
    device = setup.device
    output = Path(args.output or REPOSITORY / "docs" / "benchmarks" / f"controlnet_{device.type}.json")
    command = command_line(__file__, REPOSITORY, argv)
    results = {
        "command": command,
        "unet": args.unet,
        "unet_source": setup.source,
        "latent_shape": list(setup.latent_shape),
        "image_size": list(setup.image_size),
        "vae_stride": setup.stride,
        "text_shape": [setup.text_tokens, setup.text_dim],
        "conditioning_embedding_out_channels": list(setup.widths),
        "parameters": setup.parameters(),
        "batch_size": args.batch_size,
        **run_settings(args, device),
    }
    print("parameters: " + ", ".join(f"{name} {row['parameters']} ({row['relative_to_unet']:.3f} of {row['unet']})"
                                     for name, row in results["parameters"]["variants"].items()), flush=True)  # fmt: skip

    def report(section, value):
        results[section] = value
        print(f"{section}: {headline(value)}", flush=True)

    if "training" in args.sections:  # on fp32 copies: training keeps fp32 weights and autocasts to --dtype
        report("training", measure_training(setup, args, rng))
    setup.to_inference_dtype()
    if "denoiser" in args.sections:
        report("denoiser", measure_denoiser(setup, args, rng))
    if "dynamic_cfg" in args.sections:
        report("dynamic_cfg", measure_dynamic_cfg(setup, args, rng))
    write_results(results, output, started)
    return results


if __name__ == "__main__":
    main()
