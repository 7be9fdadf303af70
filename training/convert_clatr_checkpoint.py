"""Convert an original CLaTr Lightning checkpoint (github.com/robincourant/CLaTr, e.g. `clatr-e100.ckpt`) into a
storydiff `CLaTrModel` folder.

    python training/convert_clatr_checkpoint.py --checkpoint clatr-e100.ckpt --output_dir clatr \
        [--num_heads 4] [--text_encoder_id openai/clip-vit-base-patch32]

The checkpoint is read with `torch.load(weights_only=True)` (see `convert_director_checkpoint.load_checkpoint`).
Keys may carry a `clatr.` prefix (CLaTr inside a DIRECTOR checkpoint). Sizes are read from the weights; the number
of heads is not stored in them (4 in the paper).

Key mapping (reference module -> `CLaTrModel`), derived from the reference `src/models/actor.py`, whose encoders and
decoder are `torch.nn.TransformerEncoder` / `TransformerDecoder` stacks:

    traj_encoder / text_encoder / traj_decoder -> trajectory_encoder / text_encoder / trajectory_decoder
    *.tokens                                   -> *.distribution_tokens
    *.projection                               -> *.projection
    *.seqTrans{Encoder,Decoder}.layers.{i}.self_attn.in_proj (fused q, k, v) -> *.layers.{i}.self_attn.to_q / to_k / to_v
    *.self_attn.out_proj                       -> *.self_attn.to_out.0
    *.multihead_attn.in_proj / out_proj        -> *.cross_attn.to_q / to_k / to_v / to_out.0       (decoder)
    *.linear1, *.linear2                       -> *.ff.net.0.proj, *.ff.net.2
    *.norm1, *.norm2, *.norm3                  -> same names
    traj_decoder.final_layer                   -> trajectory_decoder.output_projection

The positional-encoding tables are not stored (non-persistent buffers on both sides).
"""

import argparse
import re
from typing import Dict, Optional, Tuple

import torch

from storydiff.models.clatr import CLaTrModel
from storydiff.training.convert_director_checkpoint import load_checkpoint

MODULES = {"traj_encoder": "trajectory_encoder", "text_encoder": "text_encoder", "traj_decoder": "trajectory_decoder"}
LAYER_PATTERN = re.compile(
    r"^(traj_encoder|text_encoder|traj_decoder)\.seqTrans(?:Encoder|Decoder)\.layers\.(\d+)\.(.+)$"
)
LAYER_RENAMES = {
    "self_attn.out_proj.weight": "self_attn.to_out.0.weight",
    "self_attn.out_proj.bias": "self_attn.to_out.0.bias",
    "multihead_attn.out_proj.weight": "cross_attn.to_out.0.weight",
    "multihead_attn.out_proj.bias": "cross_attn.to_out.0.bias",
    "linear1.weight": "ff.net.0.proj.weight",
    "linear1.bias": "ff.net.0.proj.bias",
    "linear2.weight": "ff.net.2.weight",
    "linear2.bias": "ff.net.2.bias",
}


def _strip_prefix(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    if any(key.startswith("clatr.") for key in state_dict):
        state_dict = {key[len("clatr.") :]: value for key, value in state_dict.items() if key.startswith("clatr.")}
    missing = [name for name in MODULES if not any(key.startswith(name + ".") for key in state_dict)]
    if missing:
        raise ValueError(f"Not a CLaTr state dict: no {', '.join(missing)} weights.")
    return state_dict


def infer_config(state_dict: Dict[str, torch.Tensor], num_heads: int = 4) -> dict:
    """`CLaTrModel` config from the reference weights' shapes."""
    state_dict = _strip_prefix(state_dict)
    latent_dim, trajectory_dim = state_dict["traj_encoder.projection.weight"].shape
    layers = {
        int(m.group(2)) for key in state_dict if (m := LAYER_PATTERN.match(key)) and m.group(1) == "traj_encoder"
    }
    return {
        "trajectory_dim": int(trajectory_dim),
        "text_embed_dim": int(state_dict["text_encoder.projection.weight"].shape[1]),
        "latent_dim": int(latent_dim),
        "num_layers": len(layers),
        "num_heads": num_heads,
        "ff_size": int(state_dict["traj_encoder.seqTransEncoder.layers.0.linear1.weight"].shape[0]),
    }


def convert_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Reference CLaTr keys -> `CLaTrModel` keys (fused attention projections split into q, k, v)."""
    state_dict = _strip_prefix(state_dict)
    converted = {}
    for key, value in state_dict.items():
        match = LAYER_PATTERN.match(key)
        if match:
            module, index, rest = MODULES[match.group(1)], match.group(2), match.group(3)
            prefix = f"{module}.layers.{index}."
            fused = re.match(r"^(self_attn|multihead_attn)\.in_proj_(weight|bias)$", rest)
            if fused:
                target = "self_attn" if fused.group(1) == "self_attn" else "cross_attn"
                for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                    converted[f"{prefix}{target}.{name}.{fused.group(2)}"] = part.clone()
            else:
                converted[prefix + LAYER_RENAMES.get(rest, rest)] = value
            continue
        module, _, rest = key.partition(".")
        if rest == "tokens":
            rest = "distribution_tokens"
        elif rest.startswith("final_layer."):
            rest = "output_projection." + rest[len("final_layer.") :]
        elif rest.startswith("sequence_pos_encoding."):
            continue  # the sinusoidal table is recomputed
        converted[f"{MODULES[module]}.{rest}"] = value
    return converted


def convert_checkpoint(
    checkpoint_path: str, output_dir: Optional[str] = None, num_heads: int = 4, text_encoder_id: Optional[str] = None
) -> Tuple[CLaTrModel, dict]:
    """Load a reference checkpoint into a `CLaTrModel` (strictly: every weight must be used and found)."""
    state_dict = load_checkpoint(checkpoint_path)
    config = infer_config(state_dict, num_heads=num_heads)
    model = CLaTrModel(**config, text_encoder_id=text_encoder_id)
    model.load_state_dict(convert_state_dict(state_dict), strict=True)
    if output_dir is not None:
        model.save_pretrained(output_dir, safe_serialization=True)
    return model, config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Convert a reference CLaTr checkpoint to a CLaTrModel folder.")
    parser.add_argument("--checkpoint", required=True, help="Lightning .ckpt (or a saved state dict).")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_heads", type=int, default=4, help="Attention heads (not stored in the weights).")
    parser.add_argument(
        "--text_encoder_id",
        default="openai/clip-vit-base-patch32",
        help="Text encoder whose token features the checkpoint expects (recorded in the config).",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    _, config = convert_checkpoint(args.checkpoint, args.output_dir, args.num_heads, args.text_encoder_id)
    print(f"Saved a CLaTrModel {config} to {args.output_dir}")
    return args.output_dir


if __name__ == "__main__":
    main()
