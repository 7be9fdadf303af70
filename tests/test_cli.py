"""The `storydiff` command line: version, section choice, argument checks before any work, Ctrl-C."""

import os
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest

import storydiff.demo as demo
from storydiff.cli import main

CALLS = []


def recording_section(output_dir, device):
    CALLS.append(("recording", device))
    return [demo.write_text(output_dir / "recording.txt", device)]


def other_section(output_dir, device):
    CALLS.append(("other", device))
    return []


def interrupted_section(output_dir, device):
    raise KeyboardInterrupt


@pytest.fixture
def fake_sections(monkeypatch):
    """Replace the registry with cheap sections that record their calls."""
    CALLS.clear()
    sections = [
        demo.DemoSection("Recording", "recording", f"{__name__}:recording_section"),
        demo.DemoSection("Interrupted", "interrupted", f"{__name__}:interrupted_section"),
        demo.DemoSection("Other", "other", f"{__name__}:other_section"),
    ]
    monkeypatch.setattr(demo, "DEMO_SECTIONS", sections)
    return sections


def storydiff_command(*arguments, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "storydiff", *arguments], capture_output=True, text=True, timeout=300, **kwargs
    )


def test_version_is_the_installed_version():
    result = storydiff_command("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"storydiff {metadata.version('storydiff')}"


def test_list_names_every_section(capsys):
    assert main(["demo", "--list"]) == 0
    printed = capsys.readouterr().out
    for section in demo.DEMO_SECTIONS:
        assert section.slug in printed and section.title in printed


def test_one_section_runs_alone(tmp_path, fake_sections):
    assert main(["demo", "--section", "other", "--output-dir", str(tmp_path)]) == 0
    assert CALLS == [("other", "cpu")]


@pytest.mark.parametrize(
    "arguments", [["--section", "other,recording"], ["--section", "recording", "--section", "other"]]
)
def test_sections_as_a_comma_list_or_repeated_run_in_registry_order(tmp_path, fake_sections, arguments):
    assert main(["demo", *arguments, "--output-dir", str(tmp_path)]) == 0
    assert CALLS == [("recording", "cpu"), ("other", "cpu")]


def expect_usage_error(capsys, arguments, *fragments):
    """The command exits with 2 and one line on stderr that contains every fragment; no section ran."""
    assert main(arguments) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("storydiff: error: "), error
    assert "Traceback" not in error
    for fragment in fragments:
        assert fragment in error
    assert CALLS == []


def test_an_unknown_section_is_refused_before_any_work(tmp_path, fake_sections, capsys):
    expect_usage_error(capsys, ["demo", "--section", "recording,nope", "--output-dir", str(tmp_path / "out")], "nope")
    assert not (tmp_path / "out").exists()


def test_cuda_on_a_machine_without_it_is_refused_before_any_work(tmp_path, fake_sections, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    expect_usage_error(capsys, ["demo", "--device", "cuda", "--output-dir", str(tmp_path / "out")], "'cuda'", "cpu")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device", ["gpu0", "cuda:x", "meta"])
def test_an_unknown_device_is_refused(tmp_path, fake_sections, capsys, device):
    expect_usage_error(capsys, ["demo", "--device", device, "--output-dir", str(tmp_path)], repr(device))


def test_an_existing_file_as_output_dir_is_refused(tmp_path, fake_sections, capsys):
    existing = tmp_path / "results.txt"
    existing.write_text("keep me")
    expect_usage_error(capsys, ["demo", "--output-dir", str(existing)], "existing file")
    assert existing.read_text() == "keep me"


def test_an_output_dir_below_a_file_is_refused(tmp_path, fake_sections, capsys):
    (tmp_path / "results.txt").write_text("keep me")
    expect_usage_error(capsys, ["demo", "--output-dir", str(tmp_path / "results.txt" / "sub")], "cannot write")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="file permissions do not bind root")
def test_a_read_only_output_dir_is_refused(tmp_path, fake_sections, capsys):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        expect_usage_error(capsys, ["demo", "--output-dir", str(read_only)], "cannot write")
    finally:
        read_only.chmod(0o755)


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux sysfs, where no one may create folders")
def test_an_unwritable_location_is_refused_even_for_root(fake_sections, capsys):
    expect_usage_error(capsys, ["demo", "--output-dir", "/sys/storydiff-demo-outputs"], "cannot write")


def test_ctrl_c_in_a_section_says_how_to_finish_and_exits_130(tmp_path, fake_sections, capsys):
    code = main(["demo", "--section", "recording,interrupted,other", "--output-dir", str(tmp_path)])
    assert code == 130
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error
    assert f"storydiff demo --section interrupted,other --output-dir {tmp_path}" in error
    assert (tmp_path / "recording.txt").read_text() == "cpu"  # what finished stays


INTERRUPTIBLE_DEMO = """
import sys, time
import storydiff.demo as demo
from storydiff.cli import main

def waiting_section(output_dir, device):
    print("section started", flush=True)
    time.sleep(60)
    return []

sys.modules["__main__"].waiting_section = waiting_section
demo.DEMO_SECTIONS[:] = [demo.DemoSection("Waiting", "waiting", "__main__:waiting_section")]
sys.exit(main(["demo", "--output-dir", sys.argv[1]]))
"""


def test_ctrl_c_on_the_real_process_prints_one_line_and_no_traceback(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTIBLE_DEMO, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        for line in process.stdout:
            if "section started" in line or time.monotonic() > deadline:
                break
        process.send_signal(signal.SIGINT)
        _, error = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130
    assert "Traceback" not in error
    assert error.strip().splitlines() == [
        f"storydiff demo: interrupted; files already written are complete. To finish, run: "
        f"storydiff demo --section waiting --output-dir {tmp_path}"
    ]
