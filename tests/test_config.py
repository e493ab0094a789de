"""Configs: every file in configs/ loads; overrides apply; bad keys and values are clear errors."""

import dataclasses
from pathlib import Path

import pytest

import jaxlab.rl.trainer  # noqa: F401  (registers config kinds)
import jaxlab.train  # noqa: F401
from jaxlab.config import (
    ConfigError,
    apply_overrides,
    config_kinds,
    from_dict,
    load_config,
    to_dict,
)
from jaxlab.models import DecoderConfig
from jaxlab.train import LMTrainConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize(
    "path", sorted(CONFIG_DIR.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIG_DIR))
)
def test_every_config_file_loads(path):
    cfg = load_config(path)
    assert type(cfg) in config_kinds().values()
    # round trip: dumping and reloading gives the same config
    assert from_dict(type(cfg), to_dict(cfg)) == cfg


def test_configs_dir_is_not_empty():
    assert list(CONFIG_DIR.glob("*.yaml"))


def test_dotted_overrides():
    cfg = load_config(
        CONFIG_DIR / "lm_tiny.yaml",
        [
            "train.lr=1e-5",
            "model.num_layers=3",
            "model.rope_scaling={rope_type: linear, factor: 2.0}",
        ],
    )
    assert cfg.train.lr == 1e-5 and cfg.model.num_layers == 3
    assert cfg.model.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    # defaults only, no file
    assert load_config(None, ["train.steps=7"], cls=LMTrainConfig).train.steps == 7


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", r"unknown key train\.lrr for OptimConfig; known keys: b1, b2"),
        ("nope.x=1", r"unknown key nope for LMTrainConfig"),
        ("train.steps=abc", r"train\.steps: expected an integer, got 'abc'"),
        ("train.steps=1.5", r"train\.steps: expected an integer"),
        ("train.lr=-1", r"train\.lr: must be positive, got -1\.0"),
        (
            "model.num_heads=3",
            r"model\.num_kv_heads: num_heads=3 is not a multiple of num_kv_heads=2",
        ),
        ("model.arch=gpt2", r"model\.arch: 'gpt2' is not one of"),
        ("model.qk_norm=maybe", r"model\.qk_norm: expected true or false"),
        (
            "model.rope_scaling={rope_type: yarn}",
            r"model\.rope_scaling: unsupported rope scaling type 'yarn'",
        ),
        ("train=3", r"train: expected a mapping for OptimConfig"),
        (
            "model.hidden_size=36",
            r"model\.head_dim: the per-head size must be even for RoPE, got 9",
        ),
        ("train.lr", r"must look like key\.path=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG_DIR / "lm_tiny.yaml", [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    f = tmp_path / "x.yaml"
    f.write_text("kind: no_such_kind\n")
    with pytest.raises(ConfigError, match="unknown kind 'no_such_kind'; known kinds: .*lm_train"):
        load_config(f)
    f.write_text("model: {}\n")
    with pytest.raises(ConfigError, match="missing 'kind'"):
        load_config(f)
    f.write_text("kind: lm_train\nmodel: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)


def test_configs_are_frozen_and_hashable():
    cfg = DecoderConfig(rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_layers = 3
    assert hash(cfg) == hash(DecoderConfig(rope_scaling={"factor": 2.0, "rope_type": "linear"}))


def test_apply_overrides_creates_sections():
    assert apply_overrides({}, ["a.b.c=1", "a.d=[1, 2]"]) == {"a": {"b": {"c": 1}, "d": [1, 2]}}
    with pytest.raises(ConfigError, match="a.b is not a section"):
        apply_overrides({"a": {"b": 1}}, ["a.b.c=2"])
