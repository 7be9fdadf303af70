"""A view of a plain `pip install storydiff` (no extras), for tests that a user's plain install runs the demo.

Building a fresh environment is too slow for the suite, so `plain_install_view` builds a view of one: a folder of
links to the installed distributions that setup.py's install_requires brings (directly or as their dependencies,
extras excluded) plus storydiff's own editable install. `run_in_plain_install` runs Python code in an isolated
interpreter that sees only that folder: pytest, tensorboard, scikit-image and everything else installed here but not
required are absent there, as on a user's plain install.
"""

import ast
import os
import re
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

REPOSITORY = Path(__file__).resolve().parents[1]
SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"])


def install_requires() -> list:
    """`INSTALL_REQUIRES` of setup.py, read without running it."""
    tree = ast.parse((REPOSITORY / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            getattr(target, "id", None) == "INSTALL_REQUIRES" for target in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no INSTALL_REQUIRES = [...]")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_distributions() -> dict:
    """{canonical name: distribution} of what is installed in this interpreter's site-packages."""
    found = {}
    for distribution in metadata.distributions(path=[str(SITE_PACKAGES)]):
        found.setdefault(canonical(distribution.metadata["Name"]), distribution)
    return found


def required_distributions(requirements, installed: dict) -> set:
    """Names of the distributions `requirements` install: the closure over each one's own requirements, without
    extras."""
    seen, pending = set(), [Requirement(requirement) for requirement in requirements]
    while pending:
        requirement = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonical(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        if name in installed:
            pending += [Requirement(text) for text in installed[name].requires or []]
    return seen


def plain_install_view(folder: Path) -> Path:
    """Fill `folder` with links to the site-packages entries of the required distributions and of storydiff."""
    installed = installed_distributions()
    required = required_distributions(install_requires(), installed) | {"storydiff"}
    not_installed = sorted(required - set(installed))
    assert not not_installed, f"install_requires names distributions not installed here: {not_installed}"
    entries = set()
    for name in required:
        for file in installed[name].files or []:
            if file.parts[0] != "..":  # scripts and data installed outside site-packages
                entries.add(file.parts[0])
    folder.mkdir(parents=True, exist_ok=True)
    for entry in sorted(entries):
        if (SITE_PACKAGES / entry).exists():
            os.symlink(SITE_PACKAGES / entry, folder / entry)
    return folder


def run_in_plain_install(code: str, folder: Path, *args: str) -> subprocess.CompletedProcess:
    """Run `code` (with `args` as sys.argv[1:]) in an interpreter that sees only a plain-install view built in
    `folder / "site-packages"`; its working folder is `folder`."""
    view = plain_install_view(folder / "site-packages")
    bootstrap = (
        "import site, sys\n"
        "site.addsitedir(sys.argv.pop(1))  # the view, storydiff's editable-install finder (.pth) included\n"
    )
    # -I: no PYTHONPATH, no user site, not the current folder; -S: not this interpreter's site-packages
    return subprocess.run(
        [sys.executable, "-I", "-S", "-c", bootstrap + code, str(view), *args],
        capture_output=True,
        text=True,
        cwd=folder,
        timeout=600,
    )
