"""Packaging: the wheel holds what a non-editable install needs, configs load by name, one cache
directory, the version, dependency bounds, and the persistent compilation cache switch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import jaxlab
from jaxlab.config import ConfigError, load_config, resolve_config_path, shipped_configs
from jaxlab.paths import cache_dir, configs_dir

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXLAB_", "JAX_"))}
    env.pop("XLA_FLAGS", None)  # one device is enough here
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


def test_version_comes_from_the_package_metadata():
    assert jaxlab.__version__ == PYPROJECT["project"]["version"] == metadata.version("jaxlab")


@pytest.mark.parametrize("name", ["jax", "flax", "transformers", "gguf"])
def test_fast_moving_dependencies_have_tested_upper_bounds(name):
    reqs = {Requirement(r).name: Requirement(r) for r in PYPROJECT["project"]["dependencies"]}
    spec = reqs[name].specifier
    assert any(s.operator == "<" for s in spec), f"{name} needs an upper bound, has {spec}"
    installed = metadata.version(name)
    assert spec.contains(installed), f"the tested {name} {installed} is outside {spec}"
    # the bound is the next minor (0.x) or major release after the tested one
    (upper,) = [s.version for s in spec if s.operator == "<"]
    major, minor = (int(x) for x in installed.split(".")[:2])
    assert upper in ({f"{major}.{minor + 1}"} if major == 0 else {f"{major + 1}", f"{major + 1}.0"})


def test_configs_have_one_source_and_load_by_name(tmp_path, monkeypatch):
    assert (ROOT / "configs").resolve() == configs_dir().resolve() == ROOT / "jaxlab" / "configs"
    assert "lm_tiny" in shipped_configs() and "rl/tiny_sorted" in shipped_configs()
    monkeypatch.chdir(tmp_path)  # away from the checkout's configs/ folder
    by_path = load_config(ROOT / "configs" / "rl" / "tiny_sorted.yaml")
    for name in ("rl/tiny_sorted", "rl/tiny_sorted.yaml", "configs/rl/tiny_sorted.yaml"):
        assert resolve_config_path(name) == configs_dir() / "rl" / "tiny_sorted.yaml"
        assert load_config(name) == by_path
    assert load_config("lm_tiny", ["train.lr=1e-5"]).train.lr == 1e-5
    # a file that exists is read as given, even when a shipped config has its name
    (tmp_path / "lm_tiny").write_text("kind: lm_train\nlog_every: 3\n")
    assert load_config("lm_tiny").log_every == 3
    with pytest.raises(ConfigError, match=r"config file nope does not exist .*shipped: .*lm_tiny"):
        load_config("nope")


def test_one_cache_directory(monkeypatch, tmp_path):
    from jaxlab import native, tokenization

    monkeypatch.delenv("JAXLAB_CACHE_DIR", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "jaxlab"
    monkeypatch.setenv("JAXLAB_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    assert tokenization._tokenizer_cache_dir(gguf).parent == tmp_path / "c" / "tokenizers"
    assert native._candidates()[1].parent == tmp_path / "c"


def _build_wheel(tmp_path: Path) -> Path:
    """Builds the wheel from a copy of the sources (so the checkout gets no build/ folder)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("jaxlab", "pallas_kernels"):
        shutil.copytree(
            ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc")
        )
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["--no-index", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    (wheel,) = (tmp_path / "dist").glob("jaxlab-*.whl")
    return wheel


def test_wheel_holds_kernel_source_configs_and_console_script(tmp_path):
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = z.read(entry_points).decode()
        z.extractall(tmp_path / "site")
    assert "jaxlab/native/cpu_kernels.cc" in names
    assert not [n for n in names if n.endswith(".so")]  # builds are per machine, never shipped
    shipped = {f"jaxlab/configs/{c}.yaml" for c in shipped_configs()}
    assert shipped and shipped <= names
    assert "pallas_kernels/block_sparse_attention/plan.py" in names
    assert "[console_scripts]\njaxlab = jaxlab.cli:main" in scripts

    # the unpacked wheel works on its own, from a directory with no checkout in sight
    probe = textwrap.dedent(
        """
        import json, jaxlab, jaxlab.native, jaxlab.config as c
        from importlib.metadata import entry_points
        (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "jaxlab"]
        print(json.dumps({
            "file": jaxlab.__file__, "version": jaxlab.__version__,
            "kinds": [type(c.load_config(n)).__name__ for n in ("lm_tiny", "rl/tiny_sync")],
            "kernel_source": jaxlab.native._SOURCE.is_file(),
            "main": ep.load().__module__,
        }))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env=_env(PYTHONPATH=str(tmp_path / "site")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(tmp_path / "site"))
    assert got["version"] == PYPROJECT["project"]["version"]
    assert got["kinds"] == ["LMTrainConfig", "RLTrainConfig"]
    assert got["kernel_source"] and got["main"].startswith("jaxlab.cli")


_CACHE_PROBE = textwrap.dedent(
    """
    import json, os, sys
    from jaxlab.cli import main
    assert main(["config", "show", "--config", "lm_tiny"]) == 0
    import jax, jax.numpy as jnp

    def f(x):  # long enough to compile (> 0.1 s) to be worth caching
        for i in range(40):
            x = jnp.sin(x) @ x + i
        return x

    jax.jit(f).lower(jnp.ones((32, 32))).compile()
    d = jax.config.jax_compilation_cache_dir
    print(json.dumps({
        "dir": d,
        "min_compile_time": jax.config.jax_persistent_cache_min_compile_time_secs,
        "entries": sorted(n for n in os.listdir(d) if n.endswith("-cache")) if d else [],
    }))
    """
)


def _cache_probe(tmp_path, **env):
    out = subprocess.run(
        [sys.executable, "-c", _CACHE_PROBE],
        cwd=tmp_path,
        env=_env(JAXLAB_CACHE_DIR=str(tmp_path / "cache"), **env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cli_turns_on_the_persistent_compilation_cache(tmp_path):
    got = _cache_probe(tmp_path)
    assert got["dir"] == str(tmp_path / "cache" / "jax-compilation-cache")
    assert got["min_compile_time"] == 0.1
    assert any(name.startswith("jit_f-") for name in got["entries"])


def test_compilation_cache_switch_and_jax_settings_win(tmp_path):
    off = _cache_probe(tmp_path, JAXLAB_COMPILATION_CACHE="0")
    assert off["dir"] is None and not (tmp_path / "cache").exists()
    own = _cache_probe(
        tmp_path,
        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "mine"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.01",
    )
    assert own["dir"] == str(tmp_path / "mine") and own["min_compile_time"] == 0.01
    assert own["entries"] and not (tmp_path / "cache").exists()
