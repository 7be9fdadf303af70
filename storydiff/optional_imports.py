"""Imports of packages a plain `pip install storydiff` does not bring, with an error that says what to install.

    tensorboard = require("tensorboard", purpose="--report_to tensorboard")

`OPTIONAL_PACKAGES` is the one list of such packages: the module name, the pip package and the install extra of
setup.py that brings it (None for packages no extra installs). The test suite checks it against setup.py and checks
that the package imports these modules nowhere else than through `require`.
"""

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Optional


@dataclass(frozen=True)
class OptionalPackage:
    pip_name: str
    extra: Optional[str]  # the setup.py extra that installs it; None: install the package itself

    def install_command(self) -> str:
        if self.extra is None:
            return f"pip install {self.pip_name}"
        return f'pip install "storydiff[{self.extra}]"'


# module name -> what installs it
OPTIONAL_PACKAGES = {
    "tensorboard": OptionalPackage("tensorboard", "train"),
    "xformers": OptionalPackage("xformers", "xformers"),
    "torch_fidelity": OptionalPackage("torch-fidelity", None),
}


def require(module: str, purpose: str, alternative: Optional[str] = None) -> ModuleType:
    """Import and return `module` (a key of `OPTIONAL_PACKAGES`, or a submodule of one).

    If it is not installed, raises an ImportError that names what needs it (`purpose`, e.g. "FID's Inception
    network"), the command that installs it and, if given, an `alternative` that needs no install.
    """
    top_level = module.partition(".")[0]
    if top_level not in OPTIONAL_PACKAGES:
        raise ValueError(f"{top_level!r} is not a registered optional package; known: {', '.join(OPTIONAL_PACKAGES)}.")
    package = OPTIONAL_PACKAGES[top_level]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        missing = error.name or ""
        if missing and not (module == missing or module.startswith(missing + ".")):
            raise  # the package is there but one of its own dependencies is broken: its own message says which
        message = (
            f"{purpose} needs the `{package.pip_name}` package, which a plain `pip install storydiff` does not "
            f"include: {package.install_command()}."
        )
        if alternative:
            message += f" Or {alternative}."
        raise ImportError(message, name=module) from error
