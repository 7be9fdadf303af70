"""How each training mode of train_coherence_aware.py treats a sample's coherence c (the paper's method and its three
baselines, on the same model so that the comparison is of the training rule only).

| mode       | samples used          | the model is conditioned on            | loss weight   | guidance at test time       |
|------------|-----------------------|----------------------------------------|---------------|-----------------------------|
| `cad`      | all                   | (y, c)                                  | 1             | CA-CFG: (y, c+) vs (y, c-)  |
| `baseline` | all                   | (y, 1), dropped: (null, 0)              | 1             | CFG: (y, 1) vs (null, 0)    |
| `filter`   | c >= threshold        | (y, 1), dropped: (null, 0)              | 1             | CFG                         |
| `weight`   | all                   | (y, 1), dropped: (null, 0)              | c / mean(c)   | CFG                         |

"Dropped" is condition dropout (default 0.1 for the baselines, 0 for `cad`, as in the paper): the caption becomes ""
or the label the null class, and, as in the authors' code, c = 0. The baselines therefore see c only as "is the
condition there", which makes their coherence input equivalent to a plain conditional model's dropout flag.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    import torch

# torch is imported inside the methods: the training script reads MODES while parsing flags, before torch loads
MODES = ("cad", "baseline", "filter", "weight")
DEFAULT_CONDITION_DROPOUT = {"cad": 0.0, "baseline": 0.1, "filter": 0.1, "weight": 0.1}


@dataclass
class ModeBatch:
    coherence: "torch.Tensor"  # (batch,) the coherence the model is conditioned on
    dropped: "torch.Tensor"  # (batch,) bool: the condition is replaced by the null condition ("" / null class)
    loss_weight: "torch.Tensor"  # (batch,) per-sample weight of the denoising loss


class CoherenceTrainingMode:
    """The rule of one mode over a dataset's coherences (`coherences[i]` of dataset row i, each in [0, 1])."""

    def __init__(
        self,
        mode: str,
        coherences: Sequence[float],
        condition_dropout: Optional[float] = None,
        filter_threshold: Optional[float] = None,
    ):
        import torch

        if mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}.")
        self.mode = mode
        self.coherences = torch.as_tensor(coherences, dtype=torch.float32)
        self.condition_dropout = DEFAULT_CONDITION_DROPOUT[mode] if condition_dropout is None else condition_dropout
        if not 0.0 <= self.condition_dropout < 1.0:
            raise ValueError(f"--condition_dropout must be in [0, 1), got {self.condition_dropout}.")
        if (mode == "filter") != (filter_threshold is not None):
            raise ValueError(
                "--filter_threshold is required by --mode filter and used by no other mode (pick it from the "
                "coherence_stats.json that compute_coherence.py wrote; the paper's public configs drop CLIP score < 0.41)."
            )
        self.filter_threshold = filter_threshold
        kept = self.kept_indices()
        if not kept:
            raise ValueError(
                f"--filter_threshold {filter_threshold} keeps no sample (the highest coherence is "
                f"{float(self.coherences.max()):.3f}); lower it."
            )
        self.mean_coherence = float(self.coherences[kept].mean())
        if mode == "weight" and self.mean_coherence <= 0:
            raise ValueError("--mode weight needs some samples with coherence > 0 (every coherence is 0).")

    def kept_indices(self) -> list:
        """Dataset rows this mode trains on: all, or those with c >= threshold for `filter`."""
        import torch

        if self.mode != "filter":
            return list(range(len(self.coherences)))
        return torch.nonzero(self.coherences >= self.filter_threshold)[:, 0].tolist()

    def batch(self, indices: "torch.Tensor") -> ModeBatch:
        """The conditioning coherence, dropout and loss weights for the dataset rows `indices` (draws the dropout from
        the global RNG, which checkpoints restore)."""
        import torch

        coherence = self.coherences[indices.cpu()].to(indices.device)
        dropped = torch.rand(coherence.shape, device=coherence.device) < self.condition_dropout
        given = coherence if self.mode == "cad" else torch.ones_like(coherence)
        conditioning = torch.where(dropped, torch.zeros_like(given), given)
        weight = coherence / self.mean_coherence if self.mode == "weight" else torch.ones_like(coherence)
        return ModeBatch(coherence=conditioning, dropped=dropped, loss_weight=weight)

    def guidance(self) -> dict:
        """How to sample a model of this mode: the negative branch and the coherences of both branches."""
        if self.mode == "cad":
            return {"negative": "same", "coherence": 1.0, "negative_coherence": 0.0}
        return {"negative": "null", "coherence": 1.0, "negative_coherence": 0.0}

    def summary(self) -> dict:
        return {
            "mode": self.mode,
            "condition_dropout": self.condition_dropout,
            "filter_threshold": self.filter_threshold,
            "kept_examples": len(self.kept_indices()),
            "all_examples": len(self.coherences),
            "mean_coherence_of_kept": round(self.mean_coherence, 4),
        }
