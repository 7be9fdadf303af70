"""What the README, the docs and setup.py say agrees with each other and with what the code measures."""

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest

REPOSITORY = Path(__file__).resolve().parents[1]


def capability_statuses(markdown: str) -> dict:
    """{capability: status} from the first table whose header is `| capability | what you get | status |`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"\|\s*capability\s*\|.*\|\s*status\s*\|", line))
    statuses = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        name = re.sub(r"\s*\(.*\)$", "", cells[0])  # "Coherence-aware diffusion (CAD)" -> "Coherence-aware diffusion"
        statuses[name.lower()] = cells[-1]
    return statuses


def setup_description() -> str:
    tree = ast.parse((REPOSITORY / "setup.py").read_text())
    call = next(
        node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup"
    )
    return ast.literal_eval(next(keyword.value for keyword in call.keywords if keyword.arg == "description"))


def test_readme_and_docs_home_give_every_capability_the_same_status():
    readme = capability_statuses((REPOSITORY / "README.md").read_text())
    docs_home = capability_statuses((REPOSITORY / "docs" / "index.md").read_text())
    assert readme.keys() == docs_home.keys()
    assert readme == docs_home


def test_setup_description_names_only_the_available_capabilities():
    description = setup_description().lower()
    statuses = capability_statuses((REPOSITORY / "README.md").read_text())
    for capability, status in statuses.items():
        # the name's first word is enough to tell: "coherence-aware", "controlnet", "video", "director", "dynamic"
        mentioned = capability.split()[0] in description
        assert mentioned == status.startswith("available"), f"{capability!r} is {status!r}: {description!r}"


def shipped_director_frames() -> set:
    checkpoints = REPOSITORY / "storydiff" / "checkpoints"
    return {
        json.loads((folder / "model" / "config.json").read_text())["num_frames"]
        for folder in checkpoints.glob("director-*")
    }


def test_the_quick_start_states_the_shipped_models_frame_limit():
    (limit,) = shipped_director_frames()  # all shipped DIRECTOR models share one limit
    readme = (REPOSITORY / "README.md").read_text()
    quick_start = readme[readme.index("## Quick start: DIRECTOR") :]
    quick_start = quick_start[: quick_start.index("\n## ", 1)]
    assert f"at most **{limit} frames**" in quick_start
    assert f"stop at {limit} frames" in (REPOSITORY / "docs" / "demo.md").read_text()


def test_the_evaluation_guide_quotes_the_measured_frechet_distance_of_real_digits():
    from storydiff.evaluation import balanced_real_digits, evaluate_digit_samples, load_digit_classifier

    guide = " ".join((REPOSITORY / "docs" / "guides" / "evaluation.md").read_text().split())
    quoted = re.search(
        r"score (\S+) on average against the test split, with a standard deviation of (\S+) between draws "
        r"\(90 % of draws between (\S+) and (\S+); the demo's draw, seed 0, scores (\S+)\)",
        guide,
    )
    assert quoted, "the guide no longer quotes the real-digit reference in the expected words"
    mean, spread, low, high, demo_draw = (float(value) for value in quoted.groups())

    classifier = load_digit_classifier()
    distances = np.array(
        [
            evaluate_digit_samples(
                *balanced_real_digits("train", 10, classifier.config.sample_size, seed), classifier=classifier
            )["frechet_distance"]
            for seed in range(50)
        ]
    )
    assert distances.mean() == pytest.approx(mean, abs=0.05)
    assert distances.std(ddof=1) == pytest.approx(spread, abs=0.05)
    assert np.percentile(distances, [5, 95]) == pytest.approx([low, high], abs=0.05)
    assert distances[0] == pytest.approx(demo_draw, abs=0.05)
