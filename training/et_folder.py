"""The E.T. folder a training script reads: `--et_root`, or a synthetic set written first with
`--synthetic_samples N` (into `--et_root`, default `output_dir/synthetic_et`)."""

import os

from storydiff.data import make_synthetic_et, synthetic_et_is_complete


def prepare_et_root(args, accelerator, num_frames: tuple[int, int]) -> str:
    """The E.T. root to train on. With `--synthetic_samples`, the main process writes a synthetic set of clips of
    `num_frames` (min, max) frames unless a finished one is there already (a resumed run reuses it)."""
    root = args.et_root or os.path.join(args.output_dir, "synthetic_et")
    if args.synthetic_samples is not None:
        if accelerator.is_main_process and not synthetic_et_is_complete(root):
            summary = make_synthetic_et(root, args.synthetic_samples, seed=args.synthetic_seed, num_frames=num_frames)
            accelerator.print(f"Wrote {len(summary['ids'])} synthetic E.T. samples to {root}")
        accelerator.wait_for_everyone()
    return root
