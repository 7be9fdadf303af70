"""Image datasets for the training scripts: an image folder or a Hub dataset, checked before the first step.

    from storydiff.training.datasets_loading import load_image_dataset

    # Class labels (train_class_conditional.py): an image folder with one sub-folder per class gets a "label" column.
    dataset = load_image_dataset(train_data_dir="my_images/", image_column="image", other_columns={"--label_column": "label"})
    # Captions (a text-to-image script): a Hub dataset with an image and a text column.
    dataset = load_image_dataset(dataset_name="user/captioned", image_column="image",
                                 other_columns={"--caption_column": "text"}, max_train_samples=1000)

It returns the `datasets.Dataset` (split "train", the first `max_train_samples` rows when given) after checking
that every named column exists (the error lists the available ones) and that the image column holds images.

A local image folder is read with the datasets/Hub offline switches set (`offline_datasets()`): `datasets`
otherwise sends a usage-count request to the network for every "imagefolder" load, which fails or hangs where
there is no network and leaks to the network where there is. A Hub dataset is loaded as the user configured
`datasets` (HF_HUB_OFFLINE and the cache are honoured).
"""

import argparse
import contextlib
import os
from typing import Dict, Optional


@contextlib.contextmanager
def offline_datasets():
    """Within the block `datasets` and `huggingface_hub` behave as with HF_HUB_OFFLINE=1: no request leaves the
    machine. Both read the switch from their config modules at call time (datasets 2.x-5.x, huggingface_hub),
    so the block sets those values and puts the old ones back after it."""
    import datasets
    import huggingface_hub.constants as hub_constants

    switches = [
        (datasets.config, "HF_HUB_OFFLINE", True),
        (datasets.config, "HF_DATASETS_OFFLINE", True),
        (datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False),
        (hub_constants, "HF_HUB_OFFLINE", True),
    ]
    previous = [(module, name, getattr(module, name)) for module, name, _ in switches if hasattr(module, name)]
    try:
        for module, name, value in switches:
            if hasattr(module, name):
                setattr(module, name, value)
        yield
    finally:
        for module, name, value in previous:
            setattr(module, name, value)


def is_saved_dataset(folder: str) -> bool:
    """Whether `folder` was written by `Dataset.save_to_disk` (its `state.json` and `dataset_info.json`) or
    `DatasetDict.save_to_disk` (its `dataset_dict.json`), rather than being an image folder."""
    saved_dataset = all(os.path.isfile(os.path.join(folder, name)) for name in ("state.json", "dataset_info.json"))
    return saved_dataset or os.path.isfile(os.path.join(folder, "dataset_dict.json"))


def load_image_dataset(
    *,
    train_data_dir: Optional[str] = None,
    dataset_name: Optional[str] = None,
    dataset_config_name: Optional[str] = None,
    cache_dir: Optional[str] = None,
    image_column: str = "image",
    other_columns: Optional[Dict[str, str]] = None,
    max_train_samples: Optional[int] = None,
):
    """The "train" split of an image folder (`train_data_dir`, read offline) or a Hub dataset (`dataset_name`).
    A `train_data_dir` written by `save_to_disk` (a `Dataset`, or a `DatasetDict` with a "train" split) is read with
    `datasets.load_from_disk`.

    `other_columns` maps a flag to the column it names (`{"--label_column": "label"}`), for error messages.
    Raises `ValueError` for a missing folder, a missing column (listing the available ones), an image column
    without images, or `max_train_samples` < 1.
    """
    import datasets

    if (train_data_dir is None) == (dataset_name is None):
        raise ValueError("Give exactly one of --train_data_dir (an image folder) and --dataset_name (a Hub dataset).")
    if max_train_samples is not None and max_train_samples < 1:
        raise ValueError(f"--max_train_samples must be >= 1, got {max_train_samples}.")
    if train_data_dir is not None:
        if not os.path.isdir(train_data_dir):
            raise ValueError(f"--train_data_dir {train_data_dir!r} is not a folder.")
        if is_saved_dataset(train_data_dir):
            dataset = datasets.load_from_disk(train_data_dir)
            if isinstance(dataset, datasets.DatasetDict):
                if "train" not in dataset:
                    raise ValueError(
                        f"--train_data_dir {train_data_dir!r} holds a DatasetDict without a 'train' split (it has "
                        f"{', '.join(dataset)}); save the split to use with `dataset[split].save_to_disk(folder)`."
                    )
                dataset = dataset["train"]
        else:
            with offline_datasets():
                dataset = datasets.load_dataset(
                    "imagefolder", data_dir=train_data_dir, cache_dir=cache_dir, split="train"
                )
    else:
        dataset = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split="train")

    for flag, column in {"--image_column": image_column, **(other_columns or {})}.items():
        if column not in dataset.column_names:
            raise ValueError(
                f"{flag} {column!r} is not a column of the dataset. Available columns: "
                f"{', '.join(dataset.column_names)}."
            )
    feature = dataset.features[image_column]
    if not isinstance(feature, datasets.Image):
        raise ValueError(
            f"--image_column {image_column!r} does not hold images (its feature is {feature}). Pass the column "
            "with the datasets Image feature; a column of image file paths can be turned into one with "
            f"`dataset.cast_column({image_column!r}, datasets.Image())`."
        )
    if max_train_samples is not None:
        dataset = dataset.select(range(min(max_train_samples, len(dataset))))
    if len(dataset) == 0:
        raise ValueError("The dataset has no training examples.")
    return dataset


def add_image_data_arguments(
    parser: argparse.ArgumentParser, built_in: tuple, folder_help: str, resolution: int, resolution_help: str
):
    """The data flags every image-training script shares: a built-in dataset (`built_in` names), an image folder or
    a Hub dataset, the image column, resolution, flips and a sample cap. Returns the group, for the script's own
    flags (label or caption column, ...)."""
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", type=str, default=None, choices=built_in, help="Built-in dataset.")
    data.add_argument("--train_data_dir", type=str, default=None, help=folder_help)
    data.add_argument("--dataset_name", type=str, default=None, help="Hub dataset id (or local dataset script).")
    data.add_argument("--dataset_config_name", type=str, default=None)
    data.add_argument("--cache_dir", type=str, default=None)
    data.add_argument("--image_column", type=str, default="image")
    data.add_argument("--resolution", type=int, default=resolution, help=resolution_help)
    data.add_argument("--random_flip", action="store_true", help="Random horizontal flips (not for built-in data).")
    data.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N examples.")
    return data


def check_one_data_source(args: argparse.Namespace, built_in: tuple) -> None:
    sources = [args.dataset is not None, args.train_data_dir is not None, args.dataset_name is not None]
    if sum(sources) != 1:
        raise ValueError(
            f"Give exactly one data source: --dataset {' or '.join(built_in)}, --train_data_dir or --dataset_name."
        )


def load_image_dataset_from_args(args: argparse.Namespace, other_columns: Optional[Dict[str, str]] = None):
    """`load_image_dataset` with the flags `add_image_data_arguments` defines."""
    return load_image_dataset(
        train_data_dir=args.train_data_dir,
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        cache_dir=args.cache_dir,
        image_column=args.image_column,
        other_columns=other_columns,
        max_train_samples=args.max_train_samples,
    )
