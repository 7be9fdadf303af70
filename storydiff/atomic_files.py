"""Write files and whole folders so that a kill or a full disk leaves the old version or the new one, never a mix.

    with atomic_write("outputs/table.md") as file:        # a single file: temp file + fsync + os.replace
        file.write(text)

    save_folder_atomically("out", lambda staging: pipeline.save_pretrained(staging))

`save_folder_atomically` stages the new content in a sibling folder. Entries of the old folder that the new
content does not replace (checkpoints, logs, validation images of a training run) are hard-linked into the staging
folder, so nothing is copied. The staged folder then takes the old one's place with one atomic
`renameat2(RENAME_EXCHANGE)` on Linux, or two renames elsewhere (a window of microseconds without the folder, which
the next save repairs from the `.previous` folder it leaves behind). Readers see the complete old folder or the
complete new one.
"""

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, os.PathLike]
STAGING_SUFFIX = ".staging-"
PREVIOUS_SUFFIX = ".previous"


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "w", encoding: str = None):
    """Open a temporary file beside `path` for writing; on success it replaces `path` in one rename.

    On an exception (a full disk, a kill of the block) `path` keeps its old content and the temporary file is removed.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write opens files for writing only: mode must be 'w' or 'wb', got {mode!r}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes owner-only files; a written file gets the usual mode
        text_options = {"encoding": encoding or "utf-8"} if mode == "w" else {}
        with os.fdopen(descriptor, mode, **text_options) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(path: PathLike, save: Callable[[str], None]) -> Path:
    """Call `save(temporary_path)` (e.g. `figure.savefig`, `image.save`) and move the result onto `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        save(str(temporary))
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return path


def _exchange_paths(first: Path, second: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2(RENAME_EXCHANGE); False where that is not available."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange)
    return result == 0


def _link_tree(source: Path, destination: Path) -> None:
    """Recreate `source` under `destination` with hard links (a copy where links are not possible)."""
    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, destination, copy_function=_link_or_copy, symlinks=True)
    elif source.is_symlink():
        os.symlink(os.readlink(source), destination)
    else:
        _link_or_copy(source, destination)


def _link_or_copy(source, destination) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def repair_interrupted_save(folder: PathLike) -> None:
    """Finish or undo a save that a kill interrupted: restore `folder` from `.previous` if it is missing, and
    delete leftover staging folders (their content never became visible)."""
    folder = Path(folder)
    previous = folder.with_name(folder.name + PREVIOUS_SUFFIX)
    if previous.exists() and not folder.exists():
        os.replace(previous, folder)
    elif previous.exists():
        shutil.rmtree(previous, ignore_errors=True)
    for leftover in folder.parent.glob(f"{folder.name}{STAGING_SUFFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)


def save_folder_atomically(folder: PathLike, write: Callable[[str], None]) -> Path:
    """Replace the content `write(staging_folder)` produces in `folder` in one atomic step.

    `write` fills an empty staging folder beside `folder`. Entries already in `folder` that `write` did not produce
    (checkpoints, logs) are kept, by hard links. If `write` raises, `folder` is untouched and the staging folder is
    removed.
    """
    folder = Path(folder).absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    repair_interrupted_save(folder)
    staging = folder.with_name(f"{folder.name}{STAGING_SUFFIX}{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        write(str(staging))
        if folder.exists():
            for entry in folder.iterdir():
                if not (staging / entry.name).exists() and not os.path.lexists(staging / entry.name):
                    _link_tree(entry, staging / entry.name)
        if folder.exists() and _exchange_paths(staging, folder):
            shutil.rmtree(staging, ignore_errors=True)  # now holds the old content
            return folder
        if folder.exists():
            previous = folder.with_name(folder.name + PREVIOUS_SUFFIX)
            os.replace(folder, previous)
            os.replace(staging, folder)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder
