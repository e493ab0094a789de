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


# -- the cli package: help, registry choices, exit codes, outputs -----------------------------------


def _action(parser, *path_and_flag):
    """The argparse action of ``flag`` in the sub-command ``path`` (e.g. "sky", "subtract")."""
    import argparse

    *path, flag = path_and_flag
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return next(a for a in parser._actions if flag in a.option_strings)


def test_help_shows_defaults_and_registry_choices(capsys):
    from jaxlab.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # help text wraps lines
    assert "(default: 64)" in out and "(default: smollm2-135m-instruct)" in out
    with pytest.raises(SystemExit):
        main(["sky", "subtract", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "one of: pca, smi, smi-safe, supersky" in out and "(default: supersky)" in out


def test_cli_choices_come_from_the_registries(monkeypatch, capsys):
    from jaxlab.cli import build_parser, main
    from jaxlab.retrieval import STRATEGIES
    from jaxlab.rl.scheduling import SCHEDULERS, Scheduler
    from jaxlab.sky import METHODS

    parser = build_parser()
    for path, reg in (
        (("rl", "simulate", "--scheduler"), SCHEDULERS),
        (("sky", "subtract", "--method"), METHODS),
        (("posir", "eval", "--strategy"), STRATEGIES),
    ):
        assert list(_action(parser, *path).choices) == reg.names()
    with pytest.raises(SystemExit) as exit_:
        main(["rl", "simulate", "--scheduler", "fifo"])
    assert exit_.value.code == 2
    assert (
        "invalid choice: 'fifo' (choose from 'sorted', 'sorted_adaptive', 'sync')"
        in capsys.readouterr().err
    )
    # a scheduler registered in one place is a choice of the CLI and a valid config value
    monkeypatch.setattr(SCHEDULERS, "_items", dict(SCHEDULERS._items))
    SCHEDULERS.register("eager", Scheduler(True, SCHEDULERS.get("sorted").ready, True))
    assert "eager" in _action(build_parser(), "rl", "simulate", "--scheduler").choices
    assert main(["rl", "simulate", "--scheduler", "eager", "--prompts", "8", "--slots", "8"]) == 0


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    from jaxlab.cli import main

    assert main(["rl", "simulate", "--lengths", "gamma:1,2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bad length distribution 'gamma:1,2'") and err.count("\n") == 1
    assert main(["config", "show", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_internal_bugs_keep_their_traceback(monkeypatch):
    import jaxlab.rl.simulate
    from jaxlab.cli import main

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(jaxlab.rl.simulate, "simulate", broken)
    with pytest.raises(ZeroDivisionError):
        main(["rl", "simulate"])
    code = (
        "import jaxlab.rl.simulate as s\n"
        "s.simulate = lambda *a, **k: 1 / 0\n"
        "from jaxlab.cli import main\n"
        "raise SystemExit(main(['rl', 'simulate']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "ZeroDivisionError" in out.stderr


def test_existing_outputs_need_overwrite(tmp_path, capsys):
    from jaxlab.cli import main

    report = tmp_path / "sim.json"
    report.write_text("{}")
    argv = ["rl", "simulate", "--prompts", "8", "--slots", "8", "--json", str(report)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: {report} exists; pass --overwrite to replace it\n"
    assert report.read_text() == "{}"
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads(report.read_text())["scheduler"] == "sorted"
    plate = tmp_path / "p.fits"
    plate.write_text("x")
    sim = ["sky", "simulate", "--out", str(plate), "--fibers", "12", "--sky-fibers", "4"]
    assert main(sim) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*sim, "--overwrite"]) == 0
    assert plate.stat().st_size > 1000


def test_smi_subtract_without_a_model_is_an_error(tmp_path, capsys):
    from jaxlab.cli import main

    out = tmp_path / "out.fits"
    assert main(["sky", "subtract", "plate.fits", "--method", "smi", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--method smi needs --model DIR" in err and "sky train" in err
    assert not out.exists()
    argv = ["sky", "subtract", "plate.fits", "--method", "pca", "--model", "m", "--out", str(out)]
    assert main(argv) == 2
    assert "'pca' does not" in capsys.readouterr().err


@pytest.fixture
def tiny_lm(monkeypatch):
    """A registered name for a tiny random decoder with the character tokenizer."""
    from flax import nnx

    from jaxlab.models import PRETRAINED, Decoder, DecoderConfig, register_pretrained
    from jaxlab.tokenization import CHAR_SPECIALS, CHARS, char_tokenizer

    cfg = DecoderConfig(
        vocab_size=len(CHAR_SPECIALS) + len(CHARS),
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=128,
        scan_layers=False,
    )
    model, tok = Decoder(cfg, rngs=nnx.Rngs(0)), char_tokenizer()
    monkeypatch.setattr(PRETRAINED, "_items", dict(PRETRAINED._items))
    register_pretrained("cli-test-tiny", lambda *, dtype: (model, tok))
    return "cli-test-tiny"


def test_generate_json_stop_and_prompt_echo(tiny_lm, capsys):
    from jaxlab.cli import main

    prompts = ["ab", "hello there"]
    base = ["generate", "--model", tiny_lm, "--max-new-tokens", "12"]
    for p in prompts:
        base += ["--prompt", p]
    assert main([*base, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    for r in rows:
        assert set(r) == {"prompt", "text", "finish_reason", "tokens"}
        assert r["finish_reason"] in ("length", "eos", "stop") and 1 <= r["tokens"] <= 12
    # several prompts without --json: each output follows the prompt it belongs to
    assert main(base) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == '[1/2] prompt: "ab"' and lines[1] == rows[0]["text"]
    assert '[2/2] prompt: "hello there"' in lines
    # --stop cuts the text where the stop text first appears
    text = rows[0]["text"]
    k = next((i for i, c in enumerate(text) if i > 0 and c.strip()), None)
    if k is None:
        pytest.skip(f"the tiny model generated no usable stop character: {text!r}")
    stop = text[k]
    assert main([*base, "--json", "--stop", stop, "--stop", "never-generated"]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert first["text"] == text[: text.index(stop)] and first["finish_reason"] == "stop"


def test_generate_samples_n_per_prompt_and_rejects_bad_settings(tiny_lm, capsys):
    from jaxlab.cli import main

    base = ["generate", "--model", tiny_lm, "--max-new-tokens", "6", "--prompt", "ab"]
    args = [*base, "--prompt", "cd", "-n", "2", "--temperature", "1.0", "--min-p", "0.05"]
    assert main([*args, "--repetition-penalty", "1.3", "--seed", "4", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["prompt"], r["sample"]) for r in rows] == [
        ("ab", 0),
        ("ab", 1),
        ("cd", 0),
        ("cd", 1),
    ]
    assert main(args) == 0
    assert "[2/2, sample 2/2] prompt: " in capsys.readouterr().out
    # a bad setting is one error line naming the field, before the model loads
    assert main([*base, "--top-p", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "top_p" in err and "Traceback" not in err
