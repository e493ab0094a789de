"""User mistakes on the command line: one ``error:`` line naming the option or file, exit status 2,
nothing half-written; internal bugs keep their traceback."""

import subprocess
import sys

import pytest

import jaxlab.cli.rl
from jaxlab.cli import main


def _run(argv, capsys):
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.err.strip().splitlines()


@pytest.fixture
def place(tmp_path):
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").write_text("keep me")
    (tmp_path / "binary.jsonl").write_bytes(b'{"query": "q", "evidence": "e"}\n\xff\xfe\n')
    (tmp_path / "doc.txt").write_text("Some filler. More filler.")
    (tmp_path / "broken_data").mkdir()
    (tmp_path / "broken_data" / "queries.parquet").write_text("not parquet")
    return tmp_path


CASES = [
    # (argv with {d} for the folder, words the one error line must hold)
    ("sky simulate --out {d}/missing/x.fits", ["--out", "missing does not exist"]),
    ("sky simulate --out {d}/a_folder --overwrite", ["--out", "is a folder"]),
    ("sky simulate --out {d}/a_file", ["a_file exists", "--overwrite"]),
    ("sky train --out {d}/a_file --overwrite --simulate 1", ["--out", "not a folder"]),
    ("rl simulate --lengths lognormal:nan,1", ["lognormal:nan,1", "finite"]),
    ("rl simulate --lengths bimodal:10,100,2", ["P_LONG"]),
    ("rl simulate --lengths uniform:9,3", ["LO must be <= HI"]),
    ("rl simulate --json {d}/missing/r.json", ["--json", "does not exist"]),
    ("rl simulate --json {d}/a_folder --overwrite", ["--json", "is a folder"]),
    ("train-lm --config lm_tiny --workdir {d}/a_file", ["a_file", "not a directory"]),
    (
        "posir build --items {d}/binary.jsonl --documents {d}/doc.txt --out {d}/built",
        ["binary.jsonl:2", "not UTF-8"],
    ),
    ("posir eval --data {d}/broken_data --out {d}/reports", ["queries.parquet"]),
    ("posir eval --data {d}/broken_data --out {d}/a_file", ["--out", "not a folder"]),
]


@pytest.mark.parametrize("argv, words", CASES, ids=[c[0].split(" --")[0] for c in CASES])
def test_user_mistakes_are_one_error_line(place, capsys, argv, words):
    before = sorted(p.name for p in place.rglob("*"))
    rc, err = _run(argv.format(d=place).split(), capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    for word in words:
        assert word in err[0], (word, err[0])
    assert ".tmp" not in err[0]  # the option's path, not a hidden temporary one
    assert sorted(p.name for p in place.rglob("*")) == before  # nothing written
    assert (place / "a_file").read_text() == "keep me"


def test_the_real_process_prints_no_traceback(tmp_path):
    out = tmp_path / "missing" / "plate.fits"
    proc = subprocess.run(
        [sys.executable, "-m", "jaxlab", "sky", "simulate", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert [x for x in proc.stderr.splitlines() if x.startswith("error: ")] == [
        f"error: --out {out}: the folder {out.parent} does not exist"
    ]


def test_internal_bugs_keep_their_traceback_and_os_errors_do_not(monkeypatch, capsys):
    def bug(args):
        raise ValueError("an internal bug")

    monkeypatch.setattr(jaxlab.cli.rl, "_run_simulate", bug)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["rl", "simulate"])

    def disk_full(args):
        raise OSError(28, "No space left on device", "out.json")

    monkeypatch.setattr(jaxlab.cli.rl, "_run_simulate", disk_full)
    rc, err = _run(["rl", "simulate"], capsys)
    assert rc == 2 and err == ["error: [Errno 28] No space left on device: 'out.json'"]


@pytest.mark.parametrize("text", ["[1, 2]", '"llama"', "null", "\udcff"])
def test_hf_config_that_is_not_an_object_is_a_load_error(tmp_path, text):
    from jaxlab.models import LoadError, from_pretrained

    (tmp_path / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(LoadError, match="config.json: (must hold a JSON object|not valid JSON)"):
        from_pretrained(str(tmp_path))


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_sampling_settings_fail_before_the_model_loads(capsys, value):
    for command in ("generate", "chat"):
        argv = [command, "--model", "no-such-model", f"--temperature={value}"]
        if command == "generate":
            argv += ["--prompt", "hi"]
        rc, err = _run(argv, capsys)
        assert rc == 2 and len(err) == 1 and "temperature must be a finite number" in err[0], err


@pytest.mark.parametrize(
    "argv, option",
    [
        ("rl simulate --group-size 0", "--group-size"),
        ("rl simulate --update-cost nan", "--update-cost"),
        ("rl simulate --update-cost=-1", "--update-cost"),
        ("rl simulate --max-staleness=-1", "--max-staleness"),
        ("sky simulate --out x.fits --fibers 0", "--fibers"),
        ("sky train --out m --steps 0", "--steps"),
        ("posir build --out d --queries=-5", "--queries"),
        ("posir eval --data d --out o --batch-size 0", "--batch-size"),
    ],
)
def test_numeric_options_are_checked_where_declared(capsys, argv, option):
    with pytest.raises(SystemExit) as e:
        main(argv.split())
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {option}: must be" in last and "Traceback" not in last
