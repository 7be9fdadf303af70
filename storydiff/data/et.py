"""Reader for the E.T. dataset on disk (Courant et al., ECCV 2024; Hub: robin-courant/et-data).

Layout under `root`: `traj/{id}.txt` (KITTI, camera-to-world), `intrinsics/{id}.npy` ([fx, fy, cx, cy]),
`char/{id}.npy` ((N, 3) character centre shifted to start at the origin), `cam_segments/{id}.npy` and
`char_segments/{id}.npy` (N-1 tagger classes), `caption/{id}.txt`, `caption_cam/{id}.txt`, and the split
files `{full,mixed,pure}_{train,test}_split.txt` and `clatr_{train,val,test}_split.txt` (one id per line).
"""

import os
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
from tqdm.auto import tqdm

from ..trajectories.export import load_kitti
from ..trajectories.validation import check_count

ET_SPLITS = ("train", "test")
ET_SUBSETS = ("full", "mixed", "pure")
CLATR_SPLITS = ("train", "val", "test")

PathLike = Union[str, os.PathLike]


def _features():
    import datasets

    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "num_frames": datasets.Value("int32"),
            "camera_poses": datasets.Array3D(shape=(None, 4, 4), dtype="float32"),
            "character_positions": datasets.Array2D(shape=(None, 3), dtype="float32"),
            "intrinsics": datasets.Sequence(datasets.Value("float32"), length=4),
            "camera_segments": datasets.Sequence(datasets.Value("int64")),
            "character_segments": datasets.Sequence(datasets.Value("int64")),
            "caption": datasets.Value("string"),
            "caption_cam": datasets.Value("string"),
        }
    )


def _check_plain_name(name: str, what: str, where: str = "") -> str:
    """Sample ids and split names become file names under `root`: refuse any that could point elsewhere."""
    where = f"{where}: " if where else ""
    if not isinstance(name, str):
        raise TypeError(f"{where}{what} must be a string, got {type(name).__name__} {name!r}.")
    if (
        not name
        or name in (".", "..")
        or "\0" in name
        or any(separator in name for separator in ("/", "\\"))
        or os.path.isabs(name)
    ):
        raise ValueError(
            f"{where}{what} {name!r} is not allowed: it must be a plain file name inside the E.T. folder "
            "(no '/', '\\', '..' or absolute path), e.g. '2011_F_EuMeT2wBo_00014_00001'."
        )
    return name


def read_split_ids(root: PathLike, name: str) -> List[str]:
    """Ids listed in `root/{name}_split.txt` (one per line, blank lines ignored, final newline optional), e.g.
    `name="mixed_test"`. Each id must be a plain file name: ids that would reach outside `root` are refused."""
    root = os.fspath(root)
    _check_plain_name(name, "split name")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"E.T. dataset folder not found: {root}")
    path = os.path.join(root, f"{name}_split.txt")
    if not os.path.isfile(path):
        available = sorted(f for f in os.listdir(root) if f.endswith("_split.txt"))
        raise FileNotFoundError(f"split file not found: {path} (split files in {root}: {available or 'none'})")
    try:
        with open(path, encoding="utf-8") as file:
            lines = list(enumerate(file, start=1))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not a split file, it is not valid UTF-8 text ({error}).") from None
    return [
        _check_plain_name(line.strip(), "sample id", f"{path}, line {number}")
        for number, line in lines
        if line.strip()
    ]


def _check_max_samples(max_samples: Optional[int]) -> Optional[int]:
    if max_samples is None:  # the whole split
        return None
    return check_count(max_samples, "max_samples (None for the whole split)")


def _load_npy(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"E.T. file not found: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"corrupt .npy file: {path} ({error})") from None


def _load_text(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"E.T. file not found: {path}")
    try:
        with open(path, encoding="utf-8") as file:
            return file.read().strip()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not a caption file, it is not valid UTF-8 text ({error}).") from None


def load_et_sample(root: PathLike, sample_id: str) -> Dict[str, object]:
    """Reads one sample (the columns of `load_et`) and checks that its files agree with each other."""
    root = os.fspath(root)
    _check_plain_name(sample_id, "sample id")
    poses = load_kitti(os.path.join(root, "traj", sample_id + ".txt")).astype(np.float32)
    num_frames = len(poses)
    character_path = os.path.join(root, "char", sample_id + ".npy")
    character = _load_npy(character_path).astype(np.float32)
    if character.shape != (num_frames, 3):
        raise ValueError(f"{character_path}: expected shape ({num_frames}, 3) to match traj/, got {character.shape}.")
    intrinsics_path = os.path.join(root, "intrinsics", sample_id + ".npy")
    intrinsics = _load_npy(intrinsics_path).astype(np.float32).reshape(-1)
    if intrinsics.shape != (4,):
        raise ValueError(f"{intrinsics_path}: expected 4 values [fx, fy, cx, cy], got shape {intrinsics.shape}.")
    segments = {}
    for folder in ("cam_segments", "char_segments"):
        path = os.path.join(root, folder, sample_id + ".npy")
        labels = _load_npy(path)
        if labels.shape != (num_frames - 1,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"{path}: expected {num_frames - 1} integer labels, got shape {labels.shape} ({labels.dtype})."
            )
        if labels.size and (labels.min() < 0 or labels.max() > 26):
            raise ValueError(f"{path}: labels must be motion classes in 0..26, got {labels.min()}..{labels.max()}.")
        segments[folder] = labels.astype(np.int64)
    for name, array in (("traj", poses), ("char", character), ("intrinsics", intrinsics)):
        if not np.isfinite(array).all():
            raise ValueError(f"{name}/{sample_id}: NaN or infinite values.")
    return {
        "id": sample_id,
        "num_frames": num_frames,
        "camera_poses": poses,
        "character_positions": character,
        "intrinsics": intrinsics,
        "camera_segments": segments["cam_segments"],
        "character_segments": segments["char_segments"],
        "caption": _load_text(os.path.join(root, "caption", sample_id + ".txt")),
        "caption_cam": _load_text(os.path.join(root, "caption_cam", sample_id + ".txt")),
    }


def _check_folders(root: str) -> None:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"E.T. dataset folder not found: {root}")
    missing = [
        f
        for f in ("traj", "intrinsics", "char", "cam_segments", "char_segments", "caption", "caption_cam")
        if not os.path.isdir(os.path.join(root, f))
    ]
    if missing:
        raise FileNotFoundError(f"{root} is not an E.T. dataset folder: missing sub-folder(s) {', '.join(missing)}.")


def _dataset_from_ids(
    root: str, ids: Sequence[str], max_samples: Optional[int], description: str, chunk_size: int = 2000
):
    import datasets

    _check_folders(root)
    if max_samples is not None:
        ids = list(ids)[:max_samples]
    features = _features()
    # Arrow tables are built a chunk at a time so that the full E.T. (115K samples) never sits in Python lists
    parts, rows = [], {name: [] for name in features}
    for index, sample_id in enumerate(tqdm(ids, desc=description, disable=len(ids) < 1000)):
        for name, value in load_et_sample(root, sample_id).items():
            rows[name].append(value)
        if (index + 1) % chunk_size == 0:
            parts.append(datasets.Dataset.from_dict(rows, features=features))
            rows = {name: [] for name in features}
    if rows["id"] or not parts:
        parts.append(datasets.Dataset.from_dict(rows, features=features))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def load_et(root: PathLike, split: str = "train", subset: str = "full", max_samples: Optional[int] = None):
    """Loads the `{subset}_{split}` E.T. split under `root` as a `datasets.Dataset`.

    Columns: `id`, `num_frames`, `camera_poses` (N, 4, 4), `character_positions` (N, 3), `intrinsics` (4,),
    `camera_segments` (N-1,), `character_segments` (N-1,), `caption`, `caption_cam`. Use
    `.with_format("numpy")` or `.with_format("torch")` to get arrays.
    """
    if split not in ET_SPLITS:
        raise ValueError(f"split must be one of {ET_SPLITS}, got {split!r}.")
    if subset not in ET_SUBSETS:
        raise ValueError(f"subset must be one of {ET_SUBSETS}, got {subset!r}.")
    max_samples = _check_max_samples(max_samples)
    root = os.fspath(root)
    ids = read_split_ids(root, f"{subset}_{split}")
    return _dataset_from_ids(root, ids, max_samples, f"E.T. {subset}_{split}")


def load_clatr_split(root: PathLike, split: str = "train", max_samples: Optional[int] = None):
    """Loads the CLaTr split `clatr_{split}_split.txt` (split in train/val/test) with the columns of `load_et`."""
    if split not in CLATR_SPLITS:
        raise ValueError(f"split must be one of {CLATR_SPLITS}, got {split!r}.")
    max_samples = _check_max_samples(max_samples)
    root = os.fspath(root)
    ids = read_split_ids(root, f"clatr_{split}")
    return _dataset_from_ids(root, ids, max_samples, f"E.T. clatr_{split}")
