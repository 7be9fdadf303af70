"""E.T. (Exceptional Trajectories) data: a reader for the on-disk format and a synthetic generator."""

from .et import ET_SPLITS, ET_SUBSETS, load_clatr_split, load_et, read_split_ids
from .synthetic import (
    SyntheticSample,
    generate_synthetic_sample,
    make_synthetic_et,
    synthetic_et_is_complete,
    write_et_sample,
)

__all__ = [
    "ET_SPLITS",
    "ET_SUBSETS",
    "SyntheticSample",
    "generate_synthetic_sample",
    "load_clatr_split",
    "load_et",
    "make_synthetic_et",
    "read_split_ids",
    "synthetic_et_is_complete",
    "write_et_sample",
]
