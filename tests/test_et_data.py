"""The E.T. reader on a synthetic folder, and the synthetic generator's contract (the tagger recovers its plan)."""

import os

import numpy as np
import pytest

from storydiff.data import generate_synthetic_sample, load_clatr_split, load_et, make_synthetic_et, read_split_ids
from storydiff.trajectories import load_kitti, segments_from_labels, tag_camera_motion, tag_character_motion

COLUMNS = [
    "id",
    "num_frames",
    "camera_poses",
    "character_positions",
    "intrinsics",
    "camera_segments",
    "character_segments",
    "caption",
    "caption_cam",
]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("et")
    summary = make_synthetic_et(root, num_samples=40, seed=0, num_frames=(30, 160))
    return root, summary


def test_folders_split_files_and_ids(synthetic_root):
    root, summary = synthetic_root
    for folder in (
        "traj",
        "intrinsics",
        "char",
        "char_raw",
        "cam_segments",
        "char_segments",
        "caption",
        "caption_cam",
        "bounds",
    ):
        assert len(os.listdir(root / folder)) == 40, folder
    for subset in ("full", "mixed", "pure"):
        for split in ("train", "test"):
            assert (root / f"{subset}_{split}_split.txt").is_file()
    train, test = read_split_ids(root, "full_train"), read_split_ids(root, "full_test")
    assert len(train) == 36 and len(test) == 4 and not set(train) & set(test)
    pure, mixed = read_split_ids(root, "pure_train"), read_split_ids(root, "mixed_train")
    assert sorted(pure + mixed) == sorted(train) and pure and mixed
    clatr = [read_split_ids(root, f"clatr_{split}") for split in ("train", "val", "test")]
    assert sorted(sum(clatr, [])) == sorted(summary["ids"])
    for sample_id in summary["ids"]:
        year, rest = sample_id.split("_", 1)
        ytid, shot, chunk = rest[:11], rest[12:17], rest[18:]
        assert 1980 <= int(year) <= 2020 and len(ytid) == 11 and len(shot) == len(chunk) == 5


def test_load_et_columns_and_lengths(synthetic_root):
    root, summary = synthetic_root
    dataset = load_et(root, split="train", subset="full")
    assert dataset.column_names == COLUMNS and len(dataset) == 36
    rows = dataset.with_format("numpy")
    for row in rows:
        n = int(row["num_frames"])
        assert 30 <= n <= 160
        assert row["camera_poses"].shape == (n, 4, 4) and row["camera_poses"].dtype == np.float32
        assert row["character_positions"].shape == (n, 3) and np.allclose(row["character_positions"][0], 0)
        assert row["intrinsics"].shape == (4,)
        assert row["camera_segments"].shape == row["character_segments"].shape == (n - 1,)
        assert isinstance(row["caption"], str) and row["caption"].startswith(("The camera", "At first"))
        assert row["caption_cam"].startswith(("The camera", "The shot"))
    assert len(load_et(root, "test", "mixed")) + len(load_et(root, "test", "pure")) == 4
    assert len(load_clatr_split(root, "val")) == len(read_split_ids(root, "clatr_val"))
    assert len(load_et(root, max_samples=3)) == 3


def test_pure_samples_have_one_camera_segment(synthetic_root):
    root, _ = synthetic_root
    for row in load_et(root, "train", "pure").with_format("numpy"):
        assert len(segments_from_labels(row["camera_segments"])) == 1
    for row in load_et(root, "train", "mixed").with_format("numpy"):
        assert len(segments_from_labels(row["camera_segments"])) > 1


def test_segments_on_disk_are_the_taggers_output(synthetic_root):
    root, summary = synthetic_root
    for sample_id in summary["ids"][:10]:
        poses = load_kitti(root / "traj" / f"{sample_id}.txt")
        character = np.load(root / "char" / f"{sample_id}.npy")
        assert np.array_equal(np.load(root / "cam_segments" / f"{sample_id}.npy"), tag_camera_motion(poses))
        assert np.array_equal(np.load(root / "char_segments" / f"{sample_id}.npy"), tag_character_motion(character))
        raw = np.load(root / "char_raw" / f"{sample_id}.npy")
        assert np.allclose(raw - raw[0], character, atol=1e-5)
        bounds = np.load(root / "bounds" / f"{sample_id}.npy")
        assert bounds[1] - bounds[0] + 1 == len(poses)


def test_tagger_recovers_the_synthetic_plan():
    rng = np.random.default_rng(123)
    camera_agreement, character_agreement, exact, relations = [], [], 0, set()
    for _ in range(150):
        sample = generate_synthetic_sample(rng, int(rng.integers(30, 301)))
        relations.add(sample.relation)
        camera_agreement.append(np.mean(sample.camera_segments == sample.planned_camera_labels))
        character_agreement.append(np.mean(sample.character_segments == sample.planned_character_labels))
        exact += bool(np.array_equal(sample.camera_segments, sample.planned_camera_labels))
        poses = sample.camera_poses[:, :3, :3]
        assert np.allclose(poses @ poses.transpose(0, 2, 1), np.eye(3), atol=1e-6)
    assert relations == {"follow", "lead", "ignore"}
    assert np.mean(camera_agreement) >= 0.95 and np.mean(character_agreement) >= 0.95
    assert exact / 150 >= 0.8


def test_plan_covers_compound_and_sequential_segments():
    rng = np.random.default_rng(7)
    samples = [generate_synthetic_sample(rng, 250) for _ in range(60)]
    labels = np.concatenate([s.camera_segments for s in samples])
    from storydiff.trajectories.tagging import MOTION_PATTERNS

    axes = np.count_nonzero(MOTION_PATTERNS[labels], axis=1)
    assert (axes == 0).any() and (axes == 1).any() and (axes == 2).any()
    assert {1, 2, 3, 6, 9, 18} <= set(labels.tolist())
    assert max(len(segments_from_labels(s.camera_segments)) for s in samples) >= 3
    captions = {s.caption for s in samples}
    assert len(captions) == 60 and any("then" in c or "followed by" in c or "Next" in c for c in captions)


def test_generator_is_deterministic_and_refuses_to_overwrite(tmp_path):
    first = make_synthetic_et(tmp_path / "a", 5, seed=3, num_frames=(40, 60))
    second = make_synthetic_et(tmp_path / "b", 5, seed=3, num_frames=(40, 60))
    assert first["ids"] == second["ids"]
    sample_id = first["ids"][0]
    assert (tmp_path / "a" / "traj" / f"{sample_id}.txt").read_text() == (
        tmp_path / "b" / "traj" / f"{sample_id}.txt"
    ).read_text()
    with pytest.raises(ValueError, match="overwrite=True"):
        make_synthetic_et(tmp_path / "a", 5, seed=4)
    assert make_synthetic_et(tmp_path / "a", 3, seed=4, overwrite=True)["ids"] != first["ids"][:3]
    assert len(os.listdir(tmp_path / "a" / "traj")) == 3
    os.remove(tmp_path / "a" / "clatr_test_split.txt")  # as if the call had been killed before the splits
    resumed = make_synthetic_et(tmp_path / "a", 4, seed=5)
    assert resumed["ids"] == make_synthetic_et(tmp_path / "d", 4, seed=5)["ids"]
    assert len(os.listdir(tmp_path / "a" / "traj")) == 4
    with pytest.raises(ValueError, match="num_frames"):
        make_synthetic_et(tmp_path / "c", 2, num_frames=(50, 40))
    with pytest.raises(ValueError, match="num_samples"):
        make_synthetic_et(tmp_path / "c", 0)


def test_reader_bad_inputs(synthetic_root, tmp_path):
    root, summary = synthetic_root
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'test'\)"):
        load_et(root, split="val")
    with pytest.raises(ValueError, match=r"subset must be one of \('full', 'mixed', 'pure'\)"):
        load_et(root, subset="all")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_et(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="split file not found"):
        load_et(tmp_path)


def _copy_dataset(source, target, sample_ids):
    import shutil

    shutil.copytree(source, target)
    for name in ("full_train",):
        (target / f"{name}_split.txt").write_text("\n".join(sample_ids))


def test_reader_corrupt_and_missing_files(synthetic_root, tmp_path):
    root, summary = synthetic_root
    copy = tmp_path / "copy"
    sample_id = summary["ids"][0]
    _copy_dataset(root, copy, [sample_id])
    (copy / "traj" / f"{sample_id}.txt").write_text("1 0 0\n")
    with pytest.raises(ValueError, match=rf"{sample_id}.txt, line 1"):
        load_et(copy)
    (copy / "traj" / f"{sample_id}.txt").write_text((root / "traj" / f"{sample_id}.txt").read_text())
    (copy / "cam_segments" / f"{sample_id}.npy").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt .npy file"):
        load_et(copy)
    np.save(copy / "cam_segments" / f"{sample_id}.npy", np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="integer labels"):
        load_et(copy)
    np.save(copy / "cam_segments" / f"{sample_id}.npy", np.load(root / "cam_segments" / f"{sample_id}.npy"))
    os.remove(copy / "caption" / f"{sample_id}.txt")
    with pytest.raises(FileNotFoundError, match=rf"caption/{sample_id}.txt"):
        load_et(copy)
    import shutil

    shutil.rmtree(copy / "char")
    with pytest.raises(FileNotFoundError, match="missing sub-folder"):
        load_et(copy)


def test_moving_segments_ease_in_and_out_without_changing_their_tags():
    from storydiff.trajectories import camera_velocities

    rng = np.random.default_rng(11)
    checked = 0
    for _ in range(40):
        sample = generate_synthetic_sample(rng, 200, relation="ignore")
        speed = np.linalg.norm(camera_velocities(sample.camera_poses), axis=1)
        segments = segments_from_labels(sample.planned_camera_labels)
        for (start, end, label), (*_, next_label) in zip(segments, segments[1:]):
            if label != 0 and next_label == 0:  # a move that comes to a stop slows down first
                middle = np.median(speed[start + 10 : end - 10])
                assert speed[end - 1] < 0.5 * middle and speed[end - 1] > 0.02
                checked += 1
        assert np.array_equal(
            tag_camera_motion(sample.camera_poses, postprocess=False) != 0, sample.planned_camera_labels != 0
        )
    assert checked >= 3
    with pytest.raises(ValueError, match="relation"):
        generate_synthetic_sample(rng, 50, relation="orbit")
