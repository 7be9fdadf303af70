"""Convert an original DIRECTOR Lightning checkpoint (github.com/robincourant/DIRECTOR) into a storydiff folder.

    python training/convert_director_checkpoint.py --checkpoint ca-mixed-e449.ckpt --output_dir director-c \
        [--conditioning_type cross_attention] [--num_heads 16] [--num_frames 300] [--no_ema] \
        [--text_encoder openai/clip-vit-base-patch32]

The output is a `DirectorPipeline` folder (`model/` in safetensors, `scheduler/` with the paper's sampling settings,
and the CLIP text encoder if `--text_encoder` is given). The checkpoint is read with `torch.load(weights_only=True)`:
a file that needs arbitrary pickled objects to load is refused rather than executed.

Key mapping (reference module -> `DirectorModel`), derived from the reference code's `src/models/modules/director.py`
and `src/models/networks.py` (the Lightning module keeps the network at `net.model.*` and its EMA copy at
`ema.ema_model.model.*`; the EMA weights are used unless `--no_ema`):

    input_projection.0            -> proj_in
    time_embedding.map_time.{0,2} -> time_embedding.time_embedding.linear_{1,2}
    cond_projection.{0,1}         -> character_embedding, text_embedding            (A, C)
    joint_cond_projection         -> condition_embedding                            (B)
    cond_registers                -> registers                                      (C)
    cond_sa.{i}.*                 -> condition_blocks.{i}.*                          (C)
    backbone_module.{i}.initial_ln / middle_ln -> transformer_blocks.{i}.norm1 / norm2
    *.sa.qkv (fused q, k, v)      -> *.attn1.to_q / to_k / to_v;  *.sa.out -> *.attn1.to_out.0
    *.ca_ln, *.ca.q, *.ca.kv (fused k, v), *.ca.out -> *.norm_cross, *.attn_cross.to_q / to_k / to_v / to_out.0
    *.ffn.{0,3}                   -> *.ff.net.0.proj, *.ff.net.2
    *.adaln_modulation.1          -> *.adaln_modulation                             (B)
    final_norm, final_linear, final_adaln.1 -> norm_out, proj_out, adaln_out

Behavioural differences of the converted model, both only on padded (shorter than `num_frames`) inputs: storydiff
masks padded frames in every variant (the reference's variant A adds +1 to the attention logits of valid keys instead
of masking padding), and `mask_condition_padding=False` is set so that variant C attends to zero-padded condition
tokens exactly as the reference does. Trajectory features must follow the reference layout (`storydiff.trajectories`).
"""

import argparse
import pickle
import re
from pathlib import Path
from typing import Dict, Optional

import torch

from storydiff.models.director import DirectorModel
from storydiff.schedulers.scheduling_edm_heun import EDMHeunScheduler

PREFIXES = {"ema": "ema.ema_model.model.", "online": "net.model."}


def load_checkpoint(path) -> Dict[str, torch.Tensor]:
    """Read a Lightning checkpoint's `state_dict` safely (`weights_only=True`)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"Refusing to load {path}: it holds pickled objects beyond tensors and plain containers, which could run "
            f"arbitrary code. Re-save its `state_dict` alone (torch.save(ckpt['state_dict'], ...)) from a trusted "
            f"environment. ({error})"
        ) from None
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors.")
    return checkpoint


def network_state_dict(state_dict: Dict[str, torch.Tensor], use_ema: bool = True) -> Dict[str, torch.Tensor]:
    """The denoiser's own weights: strip the Lightning / EDMPrecond prefixes (EMA copy by default)."""
    order = ("ema", "online") if use_ema else ("online", "ema")
    for name in order:
        prefix = PREFIXES[name]
        selected = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if selected:
            return selected
    if any(k.startswith("input_projection.") for k in state_dict):  # already a bare network state dict
        return dict(state_dict)
    raise ValueError("No DIRECTOR network weights found (expected keys under 'ema.ema_model.model.' or 'net.model.').")


def detect_conditioning_type(state: Dict[str, torch.Tensor]) -> str:
    if "joint_cond_projection.weight" in state:
        return "adaln"
    if "cond_registers" in state:
        return "cross_attention"
    if "cond_projection.0.weight" in state:
        return "in_context"
    raise ValueError("Cannot tell the DIRECTOR variant from the checkpoint's keys.")


def infer_config(
    state: Dict[str, torch.Tensor],
    conditioning_type: Optional[str] = None,
    num_heads: int = 16,
    num_frames: int = 300,
    text_embed_dim: int = 512,
) -> dict:
    """`DirectorModel` config from the weights' shapes; what the shapes cannot tell comes from the arguments."""
    detected = detect_conditioning_type(state)
    if conditioning_type is not None and conditioning_type != detected:
        raise ValueError(f"--conditioning_type {conditioning_type} but the checkpoint is a {detected} model.")
    hidden_size, sample_dim = state["input_projection.0.weight"].shape
    layers = {int(m.group(1)) for k in state if (m := re.match(r"backbone_module\.(\d+)\.", k))}
    mlp_hidden = state["backbone_module.0.ffn.0.weight"].shape[0]
    config = dict(
        conditioning_type=detected,
        num_frames=num_frames,
        sample_dim=sample_dim,
        hidden_size=hidden_size,
        num_layers=len(layers),
        num_heads=num_heads,
        mlp_ratio=mlp_hidden // hidden_size,
        time_embed_dim=state["time_embedding.map_time.0.weight"].shape[1],
        text_embed_dim=text_embed_dim,
        mask_condition_padding=False,
    )
    if detected == "in_context":
        character_width = state["cond_projection.0.weight"].shape[1]
        config["text_embed_dim"] = state["cond_projection.1.weight"].shape[1]
        config["num_frames"] = character_width // 3
    elif detected == "adaln":
        config["num_frames"] = (state["joint_cond_projection.weight"].shape[1] - text_embed_dim) // 3
    else:
        config["character_dim"] = state["cond_projection.0.weight"].shape[1]
        config["text_embed_dim"] = state["cond_projection.1.weight"].shape[1]
        config["num_registers"] = state["cond_registers"].shape[0]
        config["num_condition_layers"] = len(
            {int(m.group(1)) for k in state if (m := re.match(r"cond_sa\.(\d+)\.", k))}
        )
    return config


def _convert_block(source: str, target: str, state, out) -> None:
    def take(name):
        return state.pop(f"{source}.{name}")

    def linear(src, dst):
        out[f"{target}.{dst}.weight"] = take(f"{src}.weight")
        if f"{source}.{src}.bias" in state:
            out[f"{target}.{dst}.bias"] = take(f"{src}.bias")

    def split(src, dst_names):
        weights = take(f"{src}.weight").chunk(len(dst_names), dim=0)
        biases = take(f"{src}.bias").chunk(len(dst_names), dim=0) if f"{source}.{src}.bias" in state else None
        for i, dst in enumerate(dst_names):
            out[f"{target}.{dst}.weight"] = weights[i].clone()
            if biases is not None:
                out[f"{target}.{dst}.bias"] = biases[i].clone()

    for norm_source, norm_target in (("initial_ln", "norm1"), ("middle_ln", "norm2"), ("ca_ln", "norm_cross")):
        if f"{source}.{norm_source}.weight" in state:
            linear(norm_source, norm_target)
    split("sa.qkv", ["attn1.to_q", "attn1.to_k", "attn1.to_v"])
    linear("sa.out", "attn1.to_out.0")
    if f"{source}.ca.q.weight" in state:
        linear("ca.q", "attn_cross.to_q")
        split("ca.kv", ["attn_cross.to_k", "attn_cross.to_v"])
        linear("ca.out", "attn_cross.to_out.0")
    linear("ffn.0", "ff.net.0.proj")
    linear("ffn.3", "ff.net.2")
    if f"{source}.adaln_modulation.1.weight" in state:
        linear("adaln_modulation.1", "adaln_modulation")


def convert_state_dict(network_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Reference DIRECTOR network keys -> `DirectorModel` keys (see the module docstring). Every learned tensor must
    be used; leftover keys raise."""
    state = {k: v for k, v in network_state.items() if not k.endswith((".pe", ".freqs"))}  # fixed sinusoids
    out = {}

    def move(src, dst):
        for suffix in ("weight", "bias"):
            if f"{src}.{suffix}" in state:
                out[f"{dst}.{suffix}"] = state.pop(f"{src}.{suffix}")

    move("input_projection.0", "proj_in")
    move("time_embedding.map_time.0", "time_embedding.time_embedding.linear_1")
    move("time_embedding.map_time.2", "time_embedding.time_embedding.linear_2")
    move("cond_projection.0", "character_embedding")
    move("cond_projection.1", "text_embedding")
    move("joint_cond_projection", "condition_embedding")
    if "cond_registers" in state:
        out["registers"] = state.pop("cond_registers")
    for prefix, target in (("cond_sa", "condition_blocks"), ("backbone_module", "transformer_blocks")):
        indices = sorted({int(m.group(1)) for k in state if (m := re.match(rf"{prefix}\.(\d+)\.", k))})
        for i in indices:
            _convert_block(f"{prefix}.{i}", f"{target}.{i}", state, out)
    move("final_norm", "norm_out")
    move("final_linear", "proj_out")
    move("final_adaln.1", "adaln_out")
    if state:
        raise ValueError(f"Unmapped keys in the DIRECTOR checkpoint: {sorted(state)[:10]}")
    return out


def convert_checkpoint(
    checkpoint_path,
    output_dir,
    conditioning_type: Optional[str] = None,
    num_heads: int = 16,
    num_frames: int = 300,
    text_embed_dim: int = 512,
    use_ema: bool = True,
    text_encoder: Optional[str] = None,
):
    """Convert and save a `DirectorPipeline` folder; returns the pipeline."""
    from storydiff.custom_pipelines.director import DirectorPipeline

    network_state = network_state_dict(load_checkpoint(checkpoint_path), use_ema=use_ema)
    config = infer_config(network_state, conditioning_type, num_heads, num_frames, text_embed_dim)
    model = DirectorModel(**config)
    model.load_state_dict(convert_state_dict(network_state), strict=True)
    # the paper's sampler: 10 Heun steps, sigma 80 -> 0.002, rho 40
    scheduler = EDMHeunScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=40.0)
    encoder = tokenizer = None
    if text_encoder is not None:
        from storydiff.text_features import load_text_encoder

        encoder, tokenizer = load_text_encoder(text_encoder)
    pipeline = DirectorPipeline(model=model.eval(), scheduler=scheduler, text_encoder=encoder, tokenizer=tokenizer)
    pipeline.save_pretrained(output_dir)
    return pipeline


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="original DIRECTOR .ckpt (Lightning) or state-dict file")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument(
        "--conditioning_type",
        choices=["in_context", "adaln", "cross_attention"],
        default=None,
        help="checked against the weights; detected when omitted",
    )
    parser.add_argument("--num_heads", type=int, default=16, help="not stored in the weights (paper: 16)")
    parser.add_argument("--num_frames", type=int, default=300, help="variant C only; A and B read it from the weights")
    parser.add_argument("--text_embed_dim", type=int, default=512, help="variant B only (CLIP ViT-B/32: 512)")
    parser.add_argument("--no_ema", action="store_true", help="use the online weights instead of the EMA copy")
    parser.add_argument("--text_encoder", default=None, help="e.g. openai/clip-vit-base-patch32 to bundle it")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    convert_checkpoint(
        args.checkpoint,
        args.output_dir,
        conditioning_type=args.conditioning_type,
        num_heads=args.num_heads,
        num_frames=args.num_frames,
        text_embed_dim=args.text_embed_dim,
        use_ema=not args.no_ema,
        text_encoder=args.text_encoder,
    )
    print(f"Saved a DirectorPipeline folder to {Path(args.output_dir).resolve()}")


if __name__ == "__main__":
    main()
