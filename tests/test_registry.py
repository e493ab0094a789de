"""One Registry type for every variant table: errors list the known names, lazy entries need no
import order, config validation and loaders read the same tables."""

import subprocess
import sys

import pytest

from jaxlab.config import CONFIG_KINDS, ConfigError
from jaxlab.errors import UnknownNameError, UserError
from jaxlab.registry import Registry


def test_unknown_name_lists_the_known_ones():
    reg = Registry("colour")
    reg.register("red", 1)

    @reg.register("blue")
    def blue():
        return 2

    assert reg.get("blue") is blue and reg.names() == ["blue", "red"] and "red" in reg
    with pytest.raises(UnknownNameError, match="unknown colour 'green'; known: blue, red"):
        reg.get("green")
    assert issubclass(UnknownNameError, UserError) and issubclass(UserError, ValueError)
    assert [] not in reg  # unhashable: simply not a name
    with pytest.raises(UnknownNameError):
        reg.get([])


def test_a_name_holds_one_value():
    reg = Registry("colour")
    reg.register("red", 1)
    with pytest.raises(ValueError, match="colour 'red' is registered twice"):
        reg.register("red", 2)
    marker = object()
    reg.register("blue", marker)
    reg.register("blue", marker)  # the same value again: nothing happens
    assert len(reg) == 2


def test_check_is_a_config_error_naming_the_field():
    reg = Registry("colour")
    reg.register("red", 1)
    reg.check("red", "paint.colour")
    with pytest.raises(
        ConfigError, match="paint.colour: 'teal' is not one of the registered colour names: red"
    ):
        reg.check("teal", "paint.colour")


def test_lazy_entries_are_known_before_their_module_is_imported():
    reg = Registry("thing")
    reg.register_lazy("ordered", "collections:OrderedDict")
    assert "ordered" in reg and reg.names() == ["ordered"]
    import collections

    assert reg.get("ordered") is collections.OrderedDict
    with pytest.raises(ValueError, match="module:attribute"):
        reg.register_lazy("bad", "collections.OrderedDict")


def test_a_lazy_entry_accepts_the_value_it_names():
    """The module behind a lazy entry may register its value itself (a decorator)."""
    import collections

    reg = Registry("thing")
    reg.register_lazy("ordered", "collections:OrderedDict")
    reg.register("ordered", collections.OrderedDict)
    assert reg.get("ordered") is collections.OrderedDict
    reg.register_lazy("counter", "collections:Counter")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("counter", collections.OrderedDict)


def test_config_kinds_load_without_importing_their_module_first():
    code = (
        "import sys\n"
        "from jaxlab.config import CONFIG_KINDS, load_config\n"
        "assert 'jaxlab.rl.trainer' not in sys.modules\n"
        "assert CONFIG_KINDS.names() == ['lm_train', 'rl_multiturn', 'rl_sdpo', 'rl_train', 'sft']\n"
        "cfg = load_config('configs/rl/tiny_sync.yaml')\n"
        "print(type(cfg).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "RLTrainConfig"
    assert {"lm_train", "rl_train"} <= set(CONFIG_KINDS.names())


def test_project_tables_are_registries_with_listed_names():
    from jaxlab.attention import (
        ATTENTION_IMPLEMENTATIONS,
        LAYOUTS,
        RING_IMPLEMENTATIONS,
        VERTICAL_MODES,
    )
    from jaxlab.models import DECODER_ARCHS, PRETRAINED
    from jaxlab.retrieval import STRATEGIES
    from jaxlab.rl.scheduling import SCHEDULERS
    from jaxlab.sky import METHODS

    expected = {
        "attention implementation": (ATTENTION_IMPLEMENTATIONS, ["cudnn", "jax_nn", "ring", "xla"]),
        "ring layout": (LAYOUTS, ["contiguous", "hierarchical", "striped", "zigzag"]),
        "ring attention implementation": (RING_IMPLEMENTATIONS, ["pallas", "xla"]),
        "vertical mode": (VERTICAL_MODES, ["gathered", "ring"]),
        "decoder architecture": (DECODER_ARCHS, ["llama", "mistral", "qwen2", "qwen3"]),
        "pretrained model": (PRETRAINED, ["all-minilm-l6-v2", "smollm2-135m-instruct"]),
        "long-document strategy": (STRATEGIES, ["chunk_max", "chunk_mean", "truncate"]),
        "scheduler": (SCHEDULERS, ["sorted", "sorted_adaptive", "sync"]),
        "sky method": (METHODS, ["pca", "smi", "smi-safe", "supersky"]),
    }
    for kind, (reg, names) in expected.items():
        assert isinstance(reg, Registry) and reg.kind == kind
        assert reg.names() == names, kind
        with pytest.raises(
            UnknownNameError, match=f"unknown {kind} 'nope'; known: {', '.join(names)}"
        ):
            reg.get("nope")


def test_variant_errors_name_the_registered_choices():
    from jaxlab.attention.layouts import layout_blocks
    from jaxlab.models import DecoderConfig, from_pretrained
    from jaxlab.models.loading import LoadError, decoder_config_from_hf
    from jaxlab.rl.scheduling import SchedulerConfig

    with pytest.raises(ValueError, match="unknown ring layout 'spiral'; known: contiguous, hier"):
        layout_blocks("spiral", 8, 2)
    with pytest.raises(
        ConfigError, match="scheduler: 'fifo' is not one of .*: sorted, sorted_adaptive, sync"
    ):
        SchedulerConfig(scheduler="fifo")
    with pytest.raises(ConfigError, match="arch: 'gpt2' is not one of .*: llama, mistral, qwen2"):
        DecoderConfig(arch="gpt2")
    with pytest.raises(ConfigError, match="attention_implementation: 'flash' .*: cudnn, jax_nn"):
        DecoderConfig(attention_implementation="flash")
    with pytest.raises(LoadError, match="'gpt2' is not a supported decoder; supported: llama, mis"):
        decoder_config_from_hf({"model_type": "gpt2"})
    with pytest.raises(LoadError, match="not a registered name \\(all-minilm-l6-v2, smollm2"):
        from_pretrained("no-such-model")


def test_architectures_are_listed_once():
    from jaxlab.models.archs import DECODER_ARCHS, gguf_architectures
    from jaxlab.models.loading import decoder_config_from_hf

    assert gguf_architectures() == ["llama", "qwen2", "qwen3"]  # llama.cpp stores Mistral as llama
    base = {
        "vocab_size": 32,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "attention_bias": True,
    }
    cfgs = {a: decoder_config_from_hf({**base, "model_type": a}) for a in DECODER_ARCHS.names()}
    assert {a: (c.attention_bias, c.attention_out_bias, c.qk_norm) for a, c in cfgs.items()} == {
        "llama": (True, True, False),
        "mistral": (True, True, False),
        "qwen2": (True, False, False),
        "qwen3": (True, True, True),  # transformers: o_proj bias=attention_bias in Qwen3
    }


def test_pretrained_names_need_no_import_order():
    """The offline names are registered by the module that defines from_pretrained."""
    code = (
        "from jaxlab.models.registry import PRETRAINED, from_pretrained\n"
        "print(','.join(PRETRAINED.names()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "all-minilm-l6-v2,smollm2-135m-instruct"


def test_register_pretrained_adds_a_name(monkeypatch):
    from jaxlab.models import PRETRAINED, from_pretrained, pretrained_names, register_pretrained

    monkeypatch.setattr(PRETRAINED, "_items", dict(PRETRAINED._items))
    register_pretrained("registry-test-model", lambda *, dtype: ("model", dtype))
    assert "registry-test-model" in pretrained_names()
    assert from_pretrained("registry-test-model")[0] == "model"
