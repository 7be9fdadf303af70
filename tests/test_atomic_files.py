"""storydiff.atomic_files: the old content or the new, never a mix, whatever fails or is killed in between."""

import os
import stat

import pytest

from storydiff.atomic_files import (
    PREVIOUS_SUFFIX,
    STAGING_SUFFIX,
    atomic_save,
    atomic_write,
    repair_interrupted_save,
    save_folder_atomically,
)


def make_old_output(folder):
    (folder / "checkpoint-1").mkdir(parents=True)
    (folder / "checkpoint-1" / "state").write_text("training state")
    (folder / "config.json").write_text("old")
    return folder


def test_a_successful_save_replaces_what_it_writes_and_keeps_the_rest(tmp_path):
    out = make_old_output(tmp_path / "out")
    save_folder_atomically(out, lambda staging: open(os.path.join(staging, "config.json"), "w").write("new"))
    assert (out / "config.json").read_text() == "new"
    assert (out / "checkpoint-1" / "state").read_text() == "training state"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or backup folder left


def test_a_failing_write_leaves_the_old_folder_untouched(tmp_path):
    out = make_old_output(tmp_path / "out")

    def disk_full(staging):
        (tmp_path / "out.seen").write_text(staging)
        open(os.path.join(staging, "config.json"), "w").write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        save_folder_atomically(out, disk_full)
    assert (out / "config.json").read_text() == "old"
    assert not os.path.exists((tmp_path / "out.seen").read_text())  # the staging folder is gone


def test_the_next_save_repairs_a_save_killed_between_its_renames(tmp_path):
    # the fallback path (no renameat2): killed after moving the old folder aside, before moving the new one in
    out = tmp_path / "out"
    previous = make_old_output(tmp_path / f"out{PREVIOUS_SUFFIX}")
    staging = tmp_path / f"out{STAGING_SUFFIX}dead"
    staging.mkdir()
    (staging / "config.json").write_text("never shown")
    repair_interrupted_save(out)
    assert (out / "config.json").read_text() == "old" and not previous.exists() and not staging.exists()


def test_atomic_write_keeps_the_old_file_on_failure_and_gives_the_usual_mode(tmp_path):
    path = tmp_path / "table.md"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as file:
            file.write("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["table.md"]
    with atomic_write(path) as file:
        file.write("new")
    mask = os.umask(0)
    os.umask(mask)
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
        with atomic_write(path, mode="a"):
            pass
    atomic_save(tmp_path / "figure.png", lambda temporary: open(temporary, "wb").write(b"png"))
    assert (tmp_path / "figure.png").read_bytes() == b"png"
