"""Featurisation, standardisation, character encoding, validation, exports and plots of camera trajectories."""

import json
import sys
import types

import numpy as np
import pytest
import torch

from storydiff.trajectories import (
    CAMERA_FRAME0_MEAN,
    CAMERA_FRAME0_STD,
    CAMERA_VELOCITY_MEAN,
    CAMERA_VELOCITY_STD,
    CHARACTER_VELOCITY_MEAN,
    CHARACTER_VELOCITY_STD,
    animate_trajectory,
    check_poses,
    check_positions,
    decode_character,
    destandardize_camera_features,
    encode_character,
    features_to_poses,
    load_json_trajectory,
    load_kitti,
    plot_trajectory,
    poses_to_features,
    save_json,
    save_kitti,
    standardize_camera_features,
    to_blender_script,
    to_json,
    to_kitti,
)


def random_rotations(generator, shape):
    q, r = torch.linalg.qr(torch.randn(*shape, 3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    return q * torch.sign(torch.linalg.det(q))[..., None, None]  # det +1


def random_poses(shape=(12,), seed=0):
    generator = torch.Generator().manual_seed(seed)
    poses = torch.zeros(*shape, 4, 4, dtype=torch.float64)
    poses[..., :3, :3] = random_rotations(generator, shape)
    poses[..., :3, 3] = torch.randn(*shape, 3, generator=generator, dtype=torch.float64)
    poses[..., 3, 3] = 1.0
    return poses


def test_feature_layout():
    poses = random_poses((6,))
    features = poses_to_features(poses)
    assert features.shape == (6, 9)
    assert torch.equal(features[:, 0:3], poses[:, :3, 0]) and torch.equal(features[:, 3:6], poses[:, :3, 1])
    assert torch.equal(features[0, 6:], poses[0, :3, 3])
    assert torch.allclose(features[1:, 6:], poses[1:, :3, 3] - poses[:-1, :3, 3])


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 2, 4)])
def test_featurisation_round_trip(shape):
    poses = random_poses(shape, seed=len(shape))
    recovered = features_to_poses(poses_to_features(poses))
    assert recovered.shape == poses.shape
    assert torch.allclose(recovered, poses, atol=1e-10)


def test_round_trip_accepts_numpy_float32():
    poses = random_poses((20,)).numpy().astype(np.float32)
    recovered = features_to_poses(poses_to_features(poses))
    assert recovered.dtype == torch.float32
    assert np.allclose(recovered.numpy(), poses, atol=1e-5)


def test_decoded_rotations_are_orthonormal_for_noisy_features():
    features = torch.randn(4, 30, 9, generator=torch.Generator().manual_seed(1))
    rotation = features_to_poses(features)[..., :3, :3]
    identity = torch.eye(3).expand_as(rotation)
    assert torch.allclose(rotation @ rotation.transpose(-1, -2), identity, atol=1e-5)
    assert torch.allclose(torch.linalg.det(rotation), torch.ones(4, 30), atol=1e-5)
    check_poses(features_to_poses(features))


def test_standardisation_values_and_round_trip():
    poses = random_poses((10,), seed=3).float()
    features = poses_to_features(poses)
    standardized = standardize_camera_features(features)
    assert torch.equal(standardized[:, :6], features[:, :6])  # rotations untouched
    assert torch.allclose(standardized[0, 6:], (features[0, 6:] - CAMERA_FRAME0_MEAN) / CAMERA_FRAME0_STD)
    assert torch.allclose(standardized[1:, 6:], (features[1:, 6:] - CAMERA_VELOCITY_MEAN) / CAMERA_VELOCITY_STD)
    assert torch.allclose(destandardize_camera_features(standardized), features, atol=1e-6)
    assert torch.equal(poses_to_features(poses), features)  # inputs are not modified in place
    # the published E.T. statistics
    assert torch.allclose(CAMERA_FRAME0_MEAN, torch.tensor([0.00201, -0.27489, -1.23617]), atol=1e-5)
    assert torch.allclose(CAMERA_VELOCITY_STD, torch.tensor([0.027841, 0.018198, 0.031385]), atol=1e-6)


def test_standardisation_batched():
    features = poses_to_features(random_poses((2, 8), seed=4))
    assert torch.allclose(standardize_camera_features(features)[1], standardize_camera_features(features[1]))


def test_character_encoding_convention_and_round_trip():
    rng = np.random.default_rng(0)
    positions = np.cumsum(rng.normal(0, 0.02, size=(40, 3)), axis=0) + np.array([2.0, -1.0, 5.0])
    encoded = encode_character(positions)
    assert encoded.shape == (40, 3)
    # frame 0 is the (zero) origin standardised with the velocity statistics, like every other frame
    assert torch.allclose(encoded[0], (-CHARACTER_VELOCITY_MEAN / CHARACTER_VELOCITY_STD).double(), atol=1e-6)
    expected = (np.diff(positions, axis=0) - CHARACTER_VELOCITY_MEAN.numpy()) / CHARACTER_VELOCITY_STD.numpy()
    assert np.allclose(encoded[1:].numpy(), expected)
    assert torch.allclose(encode_character(positions + 7.0), encoded)  # shift invariant
    decoded = decode_character(encoded).numpy()
    assert np.allclose(decoded, positions - positions[0], atol=1e-9)
    assert encode_character(torch.zeros(2, 5, 3)).shape == (2, 5, 3)


def test_check_poses_accepts_rigid_and_returns_tensor():
    poses = random_poses((2, 6))
    assert torch.equal(check_poses(poses), poses)
    assert isinstance(check_poses(poses[0].numpy()), torch.Tensor)


def test_check_poses_bad_inputs():
    poses = random_poses((6,))
    with pytest.raises(TypeError, match="torch.Tensor or numpy.ndarray"):
        check_poses("poses")
    with pytest.raises(ValueError, match=r"\(N, 4, 4\)"):
        check_poses(poses[:, :3])
    with pytest.raises(ValueError, match=r"\(N, 4, 4\)"):
        check_poses(poses[0])
    with pytest.raises(ValueError, match="longer than the model's maximum of 5 frames"):
        check_poses(poses, max_frames=5)
    bad = poses.clone()
    bad[2, 1, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        check_poses(bad)
    bad = poses.clone()
    bad[3, :3, :3] *= 1.2
    with pytest.raises(ValueError, match="pose 3 is not rigid"):
        check_poses(bad)
    bad = poses.clone()
    bad[1, :3, 0] *= -1
    with pytest.raises(ValueError, match="reflection"):
        check_poses(bad)
    bad = poses.clone()
    bad[0, 3, 0] = 0.5
    with pytest.raises(ValueError, match=r"last row must be \[0, 0, 0, 1\]"):
        check_poses(bad)
    with pytest.raises(ValueError, match="no frames"):
        check_poses(torch.zeros(0, 4, 4))


def test_check_positions_bad_inputs():
    assert check_positions(np.zeros((5, 3))).shape == (5, 3)
    assert check_positions(torch.zeros(2, 5, 3), max_frames=5).shape == (2, 5, 3)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        check_positions(np.zeros((5, 4)))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        check_positions(np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        check_positions(np.full((4, 3), np.nan))
    with pytest.raises(ValueError, match="longer than the model's maximum of 4 frames"):
        check_positions(np.zeros((5, 3)), max_frames=4)
    with pytest.raises(TypeError):
        check_positions(np.array([["a", "b", "c"]]))


def test_kitti_round_trip(tmp_path):
    poses = random_poses((15,))
    text = to_kitti(poses)
    lines = text.strip().split("\n")
    assert len(lines) == 15 and all(len(line.split()) == 12 for line in lines)
    assert np.allclose([float(v) for v in lines[0].split()], poses[0, :3].reshape(-1).numpy(), rtol=1e-6)
    save_kitti(tmp_path / "traj.txt", poses)
    assert np.allclose(load_kitti(tmp_path / "traj.txt"), poses.numpy(), atol=1e-5)


def test_load_kitti_errors_name_file_and_line(tmp_path):
    path = tmp_path / "broken.txt"
    path.write_text("1 0 0 0 0 1 0 0 0 0 1 0\n1 0 0 0 0 1 0\n")
    with pytest.raises(ValueError, match=r"broken.txt, line 2: expected 12 numbers"):
        load_kitti(path)
    path.write_text("1 0 0 0 0 1 0 0 0 0 1 zero\n")
    with pytest.raises(ValueError, match=r"broken.txt, line 1: not a number"):
        load_kitti(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_kitti(path)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_kitti(tmp_path / "missing.txt")


def test_json_export(tmp_path):
    poses = random_poses((5,))
    character = np.arange(15, dtype=np.float64).reshape(5, 3)
    payload = json.loads(to_json(poses, fps=30, character=character))
    assert payload["fps"] == 30 and payload["num_frames"] == 5
    assert np.allclose(payload["camera_to_world"], poses.numpy())
    assert np.allclose(payload["character_positions"], character)
    save_json(tmp_path / "t.json", poses)
    assert np.allclose(load_json_trajectory(tmp_path / "t.json"), poses.numpy())
    with pytest.raises(ValueError, match=r"\(5, 3\)"):
        to_json(poses, character=character[:4])


class _FakeMatrix:
    def __init__(self, rows):
        self.rows = np.asarray(rows, dtype=np.float64)


def _fake_blender(monkeypatch):
    """Just enough of bpy / mathutils to run the exported script and record its keyframes."""
    keyframes = []

    class FakeObject:
        def __init__(self, name, data=None):
            self.name, self.data, self.matrix_world, self.location = name, data, None, None
            self.rotation_mode = "XYZ"

        def keyframe_insert(self, data_path, frame):
            is_character = self.name == "Character"
            value = np.array(self.location, dtype=np.float64) if is_character else self.matrix_world.rows.copy()
            keyframes.append((self.name, data_path, frame, value))

    scene = types.SimpleNamespace(render=types.SimpleNamespace(), collection=types.SimpleNamespace(), camera=None)
    scene.collection.objects = types.SimpleNamespace(link=lambda obj: None)
    context = types.SimpleNamespace(scene=scene, active_object=None)

    def add_sphere(radius, location):
        context.active_object = FakeObject("Sphere")
        context.active_object.location = location

    bpy = types.ModuleType("bpy")
    bpy.context = context
    bpy.data = types.SimpleNamespace(
        cameras=types.SimpleNamespace(new=lambda name: types.SimpleNamespace(name=name, lens=None)),
        objects=types.SimpleNamespace(new=lambda name, data: FakeObject(name, data)),
    )
    bpy.ops = types.SimpleNamespace(mesh=types.SimpleNamespace(primitive_uv_sphere_add=add_sphere))
    mathutils = types.ModuleType("mathutils")
    mathutils.Matrix = _FakeMatrix
    monkeypatch.setitem(sys.modules, "bpy", bpy)
    monkeypatch.setitem(sys.modules, "mathutils", mathutils)
    return scene, keyframes


def test_blender_script_compiles_runs_and_converts_axes(monkeypatch):
    poses = random_poses((4,))
    character = np.array([[0.0, -1.0, 2.0]] * 4)
    script = to_blender_script(poses, fps=25, character=character)
    compile(script, "director_camera.py", "exec")
    scene, keyframes = _fake_blender(monkeypatch)
    exec(compile(script, "director_camera.py", "exec"), {})
    assert scene.render.fps == 25 and scene.frame_end == 4 and scene.camera.name == "DirectorCamera"
    camera_keys = [k for k in keyframes if k[0] == "DirectorCamera" and k[1] == "rotation_quaternion"]
    assert [k[2] for k in camera_keys] == [1, 2, 3, 4]
    world = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=np.float64)  # OpenCV world (y down) -> z up
    for (_, _, _, matrix), pose in zip(camera_keys, poses.numpy()):
        assert np.allclose(matrix[:3, 3], world @ pose[:3, 3], atol=1e-5)
        assert np.allclose(-matrix[:3, 2], world @ pose[:3, 2], atol=1e-5)  # Blender cameras look down -z
        assert np.allclose(matrix[:3, 1], world @ -pose[:3, 1], atol=1e-5)  # Blender +y up = OpenCV -y
    character_keys = [k for k in keyframes if k[0] == "Character"]
    assert len(character_keys) == 4 and np.allclose(character_keys[0][3], [0.0, 2.0, 1.0])


def test_plot_and_gif(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    poses = features_to_poses(torch.randn(30, 9, generator=torch.Generator().manual_seed(0)) * 0.1)
    character = np.cumsum(np.full((30, 3), 0.02), axis=0)
    ax = plot_trajectory(poses, character=character, title="test")
    assert ax.get_title() == "test" and len(ax.lines) >= 2
    ax.figure.savefig(tmp_path / "plot.png")
    plt.close(ax.figure)
    assert (tmp_path / "plot.png").stat().st_size > 1000
    path = animate_trajectory(poses, tmp_path / "anim.gif", character=character, fps=25, max_frames=3)
    with Image.open(path) as gif:
        assert gif.n_frames == 3
    with pytest.raises(ValueError, match="3D axes"):
        plot_trajectory(poses, ax=plt.figure().add_subplot())
