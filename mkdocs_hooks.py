"""mkdocs hook: show mkdocstrings (griffe) the `storydiff` import namespace as one source tree.

setup.py maps the top-level folders (custom_pipelines/, schedulers/, models/, training/) under `storydiff.*`.
Python's import system follows that mapping; griffe, which reads source files, looks for `storydiff/schedulers/`
and does not. Before each build this hook lays out `build/griffe/storydiff/` as links to the real files and
folders, and mkdocs.yml points mkdocstrings there (`paths: [build/griffe]`).
"""

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent
NAMESPACE_FOLDERS = {"custom_pipelines": "custom_pipelines", "schedulers": "schedulers", "models": "models"}
NAMESPACE_FOLDERS["training"] = "training"
TREE = ROOT / "build" / "griffe" / "storydiff"


def on_startup(command, dirty):
    if TREE.exists():
        shutil.rmtree(TREE)
    TREE.mkdir(parents=True)
    for entry in (ROOT / "storydiff").iterdir():
        if entry.name != "__pycache__":
            (TREE / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    for name, folder in NAMESPACE_FOLDERS.items():
        (TREE / name).symlink_to(ROOT / folder, target_is_directory=True)
