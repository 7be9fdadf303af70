"""Bad E.T. data and bad generator settings are refused with errors that name the file, the line and what is allowed."""

import os
import shutil

import numpy as np
import pytest

from storydiff.data import (
    generate_synthetic_sample,
    load_clatr_split,
    load_et,
    make_synthetic_et,
    read_split_ids,
    write_et_sample,
)
from storydiff.data.captions import camera_caption, camera_phrase, character_phrase, full_caption
from storydiff.trajectories import load_kitti, to_kitti

SPLIT_NAMES = [f"{subset}_{split}" for subset in ("full", "mixed", "pure") for split in ("train", "test")] + [
    f"clatr_{split}" for split in ("train", "val", "test")
]


@pytest.fixture(scope="module")
def pristine_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("et_pristine")
    make_synthetic_et(root, num_samples=6, seed=0, num_frames=(30, 40), test_fraction=0.34)
    return root


@pytest.fixture
def et_root(pristine_root, tmp_path):
    """A private copy each test may damage."""
    root = tmp_path / "et"
    shutil.copytree(pristine_root, root)
    return root


def _identity_kitti_lines(num_frames: int):
    return to_kitti(np.tile(np.eye(4), (num_frames, 1, 1))).splitlines()


# ----------------------------------------------------------------------------------------------------------- #
# KITTI poses whose rotation is not a rotation


@pytest.mark.parametrize(
    "rotation, message",
    [
        (2.0 * np.eye(3), "not orthonormal"),  # a scaling
        (np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), "not orthonormal"),  # a shear
        (np.diag([1.0, 1.0, -1.0]), "reflection"),  # orthonormal, det -1
    ],
)
def test_load_kitti_refuses_a_rotation_that_is_not_one_naming_file_and_line(tmp_path, rotation, message):
    lines = _identity_kitti_lines(4)
    pose = np.eye(4)[:3]
    pose[:, :3] = rotation
    lines[2] = " ".join(f"{value:.6e}" for value in pose.reshape(-1))
    path = tmp_path / "bad.txt"
    path.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")  # a blank line: pose 2 sits on line 4
    with pytest.raises(ValueError, match=rf"bad\.txt, line 4: pose 2 is not a rigid camera pose, .*{message}"):
        load_kitti(path)


def test_load_kitti_accepts_rotations_within_tolerance_and_its_tolerance_is_adjustable(tmp_path):
    angle = 0.3
    rotation = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    pose = np.eye(4)
    pose[:3, :3] = rotation * (1 + 2e-4)  # |R R^T - I| 4e-4, |det - 1| 6e-4: inside the default 1e-3
    path = tmp_path / "near.txt"
    path.write_text(to_kitti(np.stack([np.eye(4), np.eye(4)])) + " ".join(f"{v:.9e}" for v in pose[:3].ravel()))
    assert load_kitti(path).shape == (3, 4, 4)
    with pytest.raises(ValueError, match="line 3"):
        load_kitti(path, atol=1e-5)
    with pytest.raises(ValueError, match="atol must be a finite number > 0"):
        load_kitti(path, atol=0)


def test_load_kitti_names_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "binary.txt"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=r"binary\.txt: .*not valid UTF-8"):
        load_kitti(path)


def test_load_et_reports_the_sample_file_and_line_of_a_non_rigid_pose(et_root):
    sample_id = read_split_ids(et_root, "full_train")[0]
    path = et_root / "traj" / f"{sample_id}.txt"
    lines = path.read_text().splitlines()
    values = np.array(lines[5].split(), dtype=np.float64).reshape(3, 4)
    values[:, :3] *= 1.5
    lines[5] = " ".join(f"{v:.6e}" for v in values.ravel())
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"traj/{sample_id}\.txt, line 6: .*not orthonormal"):
        load_et(et_root, "train")


# ----------------------------------------------------------------------------------------------------------- #
# split files: ids that escape the folder, encodings, trailing newlines


@pytest.mark.parametrize(
    "bad_id", ["../../etc/passwd", "/etc/passwd", "..", "sub/dir_id", "..\\..\\windows", "id\x00.txt"]
)
def test_split_ids_that_could_leave_the_data_folder_are_refused_with_file_and_line(et_root, bad_id):
    ids = read_split_ids(et_root, "full_test")
    (et_root / "full_test_split.txt").write_text(ids[0] + "\n" + bad_id + "\n")
    with pytest.raises(ValueError, match=r"full_test_split\.txt, line 2: sample id .* plain file name"):
        read_split_ids(et_root, "full_test")
    with pytest.raises(ValueError, match="plain file name"):
        load_et(et_root, "test")


def test_split_names_that_could_leave_the_data_folder_are_refused(et_root):
    (et_root.parent / "outside_split.txt").write_text("x\n")
    with pytest.raises(ValueError, match="split name '../outside' is not allowed"):
        read_split_ids(et_root, "../outside")


def test_split_file_that_is_not_utf8_is_named(et_root):
    (et_root / "full_test_split.txt").write_bytes(b"\xc3\x28\n")
    with pytest.raises(ValueError, match=r"full_test_split\.txt: not a split file, it is not valid UTF-8"):
        read_split_ids(et_root, "full_test")


def test_make_synthetic_et_ends_every_split_file_with_a_newline(pristine_root):
    for name in SPLIT_NAMES:
        text = (pristine_root / f"{name}_split.txt").read_text(encoding="utf-8")
        assert text == "" or (text.endswith("\n") and not text.endswith("\n\n")), name
        assert text.splitlines() == read_split_ids(pristine_root, name)


@pytest.mark.parametrize("ending", ["", "\n", "\r\n", "\n\n"])
def test_split_files_are_read_with_or_without_a_final_newline(et_root, ending):
    ids = read_split_ids(et_root, "full_train")
    newline = "\r\n" if ending == "\r\n" else "\n"
    (et_root / "full_train_split.txt").write_text(newline.join(ids) + ending, newline="")
    assert read_split_ids(et_root, "full_train") == ids
    assert load_et(et_root, "train")["id"] == ids


# ----------------------------------------------------------------------------------------------------------- #
# max_samples and caption files


@pytest.mark.parametrize("loader", [lambda root, n: load_et(root, "train", max_samples=n), load_clatr_split])
@pytest.mark.parametrize(
    "max_samples, error", [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)]
)
def test_max_samples_must_be_a_positive_int(pristine_root, loader, max_samples, error):
    if loader is load_clatr_split:
        loader = lambda root, n: load_clatr_split(root, "train", max_samples=n)  # noqa: E731
    with pytest.raises(error, match=r"max_samples \(None for the whole split\) must be an int >= 1"):
        loader(pristine_root, max_samples)


def test_max_samples_keeps_the_first_ids(pristine_root):
    ids = read_split_ids(pristine_root, "full_train")
    assert load_et(pristine_root, "train", max_samples=2)["id"] == ids[:2]
    assert len(load_et(pristine_root, "train", max_samples=10_000)) == len(ids)


@pytest.mark.parametrize("folder", ["caption", "caption_cam"])
def test_undecodable_caption_file_is_named(et_root, folder):
    sample_id = read_split_ids(et_root, "full_test")[0]
    path = et_root / folder / f"{sample_id}.txt"
    path.write_bytes(b"The camera \xff\xfe pushes in.")
    with pytest.raises(ValueError, match=rf"{folder}/{sample_id}\.txt: not a caption file, it is not valid UTF-8"):
        load_et(et_root, "test")


# ----------------------------------------------------------------------------------------------------------- #
# the synthetic generator's settings


@pytest.mark.parametrize(
    "settings, error, message",
    [
        ({"min_segment_frames": 0}, ValueError, "min_segment_frames must be an int >= 1"),
        ({"min_segment_frames": 2.5}, TypeError, "min_segment_frames must be an int"),
        ({"pure_probability": 1.5}, ValueError, "pure_probability must be a finite number >= 0 and <= 1"),
        ({"pure_probability": float("nan")}, ValueError, "pure_probability must be a finite number"),
        ({"transition_frames": -1}, ValueError, "transition_frames must be an int >= 0"),
        ({"test_fraction": float("nan")}, ValueError, "test_fraction must be a finite number"),
        ({"test_fraction": 1.0}, ValueError, r"test_fraction must be in \[0, 1\)"),
    ],
)
def test_make_synthetic_et_refuses_bad_settings_before_writing(tmp_path, settings, error, message):
    with pytest.raises(error, match=message):
        make_synthetic_et(tmp_path / "et", num_samples=2, num_frames=30, **settings)
    assert not (tmp_path / "et").exists()


def test_generate_synthetic_sample_refuses_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        generate_synthetic_sample(0, 40)
    with pytest.raises(TypeError, match="num_frames must be an int"):
        generate_synthetic_sample(rng, 40.5)
    with pytest.raises(ValueError, match="min_segment_frames must be an int >= 1"):
        generate_synthetic_sample(rng, 40, min_segment_frames=0)
    with pytest.raises(ValueError, match="sample_id '../x' is not allowed"):
        generate_synthetic_sample(rng, 40, sample_id="../x")


def test_write_et_sample_refuses_an_id_that_leaves_the_folder(et_root):
    sample = generate_synthetic_sample(np.random.default_rng(0), 40)
    sample.id = "../../escaped"
    with pytest.raises(ValueError, match="plain file name"):
        write_et_sample(et_root, sample)
    assert not os.path.exists(et_root.parent.parent / "escaped.txt")


# ----------------------------------------------------------------------------------------------------------- #
# captions from tags


def test_captions_refuse_labels_that_are_not_motion_classes():
    rng = np.random.default_rng(0)
    for bad in (-1, 27):
        with pytest.raises(ValueError, match=r"camera label must be a motion class in 0\.\.26"):
            camera_phrase(bad, rng)
        with pytest.raises(ValueError, match=r"character label must be a motion class in 0\.\.26"):
            character_phrase(bad, rng)
    with pytest.raises(TypeError, match="must be an int class index"):
        camera_phrase(1.0, rng)
    with pytest.raises(ValueError, match="camera_labels are empty"):
        camera_caption([], rng)
    with pytest.raises(ValueError, match="motion class in 0..26"):
        camera_caption([1, 1, 30], rng)
    with pytest.raises(ValueError, match=r"camera_labels \(3\) and character_labels \(2\) must label the same"):
        full_caption([1, 1, 1], [0, 0], rng)
    assert camera_caption(np.array([1, 1, 2]), rng).startswith(("The camera", "The shot"))
