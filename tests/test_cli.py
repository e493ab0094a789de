"""The CLI as a user runs it: --help everywhere, config show, train-lm with resume, clear errors."""

import json
import subprocess
import sys

import pytest

from jaxlab.cli import COMMANDS


def _run(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "jaxlab", *args], capture_output=True, text=True, timeout=timeout
    )


def test_top_level_help_lists_every_command():
    out = _run("--help")
    assert out.returncode == 0
    for cmd in COMMANDS:
        assert cmd.name in out.stdout


@pytest.mark.parametrize("name", [c.name for c in COMMANDS])
def test_every_command_has_help(name):
    out = _run(name, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage: python -m jaxlab " + name in out.stdout


def test_config_show_applies_overrides_and_reports_bad_keys():
    out = _run("config", "show", "--config", "configs/lm_tiny.yaml", "--set", "train.lr=1e-5")
    assert out.returncode == 0, out.stderr
    assert "lr: 1.0e-05" in out.stdout and out.stdout.startswith("kind: lm_train")
    bad = _run("config", "show", "--config", "configs/lm_tiny.yaml", "--set", "train.nope=1")
    assert bad.returncode == 2
    assert "error: configs/lm_tiny.yaml: unknown key train.nope" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_train_lm_runs_and_resumes(tmp_path):
    common = [
        "train-lm",
        "--workdir",
        str(tmp_path),
        "--quiet",
        "--set",
        "checkpoint.save_every=10",
        "--set",
        "log_every=10",
        "--set",
        "data.batch_size=4",
    ]
    first = _run(*common, "--set", "train.steps=20")
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [
        "10",
        "20",
    ]
    second = _run(*common, "--set", "train.steps=30")
    assert second.returncode == 0, second.stderr
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [10, 20, 30]  # resumed at 20, not restarted


def test_unknown_model_is_an_error_not_a_traceback():
    out = _run("generate", "--model", "no-such-model", "--prompt", "hi")
    assert out.returncode == 2
    assert "error: cannot load 'no-such-model'" in out.stderr and "Traceback" not in out.stderr
