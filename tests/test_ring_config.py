"""Ring attention as the registered attention implementation "ring", configured by RingConfig:
validated on construction, loaded from YAML, hashable (DecoderConfig is a static jit argument)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from jaxlab.attention import (
    RingConfig,
    SparseConfig,
    attention,
    attention_implementations,
    grouped_attention,
)
from jaxlab.config import ConfigError, from_dict, load_config, to_dict
from jaxlab.errors import UserError
from jaxlab.models import DecoderConfig


def test_ring_config_defaults_and_hash():
    cfg = RingConfig()
    assert (cfg.axis_name, cfg.layout, cfg.block_size, cfg.kernel) == (
        "sp",
        "striped",
        128,
        "pallas",
    )
    assert cfg.vertical_mode == "ring" and cfg.sparse is None
    a = DecoderConfig(
        attention_implementation="ring", ring={"sparse": {"vertical_size": 8, "slash_size": 4}}
    )
    b = DecoderConfig(
        attention_implementation="ring",
        ring=RingConfig(sparse=SparseConfig(vertical_size=8, slash_size=4)),
    )
    assert isinstance(a.ring, RingConfig) and isinstance(a.ring.sparse, SparseConfig)
    assert a == b and hash(a) == hash(b)
    assert a.ring.sparse.last_q == 64 and a.ring.sparse.mode == "fixed"
    assert a.attention_config is a.ring
    assert DecoderConfig(ring={"kernel": "xla"}).attention_config is None  # "xla" takes no options


def test_hierarchical_axes_become_a_tuple():
    cfg = RingConfig(layout="hierarchical", axis_name=["node", "local"])
    assert cfg.axis_name == ("node", "local")
    hash(cfg)


@pytest.mark.parametrize(
    "ring, match",
    [
        ({"layout": "spiral"}, r"ring.layout: 'spiral' is not one of .*: contiguous, hierarchical"),
        ({"kernel": "triton"}, r"ring.kernel: 'triton' is not one of .*: pallas, xla"),
        ({"vertical_mode": "x"}, r"ring.vertical_mode: 'x' is not one of .*: gathered, ring"),
        ({"block_size": 0}, r"ring.block_size: must be a positive int, got 0"),
        ({"layout": "hierarchical"}, r"ring.axis_name: layout 'hierarchical' takes 2 mesh axis"),
        ({"axis_name": ["a", "b"]}, r"ring.axis_name: layout 'striped' takes one mesh axis name"),
        ({"sparse": {"vertical_size": 8}}, r"ring.sparse: .*slash_size"),
        ({"sparse": {"v": 1}}, r"unknown key ring.sparse.v for SparseConfig"),
        (
            {"sparse": {"vertical_size": 8, "slash_size": 4, "mode": "magic"}},
            r"ring.sparse.mode: 'magic' is not one of \['fixed', 'flex'\]",
        ),
        (
            {"sparse": {"vertical_size": 8, "slash_size": 4, "top_p": 0}},
            r"ring.sparse.top_p: must lie in \(0, 1\]",
        ),
        ({"nope": 1}, r"unknown key ring.nope for RingConfig"),
    ],
)
def test_ring_config_errors_name_the_key(ring, match):
    with pytest.raises(ConfigError, match=match):
        DecoderConfig(attention_implementation="ring", ring=ring)


def test_shipped_ring_config_loads_and_round_trips():
    cfg = load_config("configs/lm_ring_sparse_tiny.yaml")
    ring = cfg.model.ring
    assert isinstance(ring, RingConfig) and ring.kernel == "xla" and ring.block_size == 16
    assert ring.sparse == SparseConfig(
        vertical_size=64, slash_size=16, last_q=32, sink_tokens=4, window=16
    )
    assert from_dict(type(cfg), to_dict(cfg)) == cfg
    assert to_dict(cfg)["model"]["ring"]["sparse"]["vertical_size"] == 64
    hash(cfg.model)
    # a static jit argument
    f = jax.jit(lambda c, x: x * c.ring.block_size, static_argnums=0)
    assert int(f(cfg.model, jnp.ones(()))) == 16


def test_ring_overrides_are_validated_with_their_dotted_key():
    path = "configs/lm_ring_sparse_tiny.yaml"
    cfg = load_config(path, ["model.ring.layout=hierarchical", "model.ring.axis_name=[a, b]"])
    assert cfg.model.ring.axis_name == ("a", "b")
    with pytest.raises(ConfigError, match="model.ring.layout: 'spiral' is not one of"):
        load_config(path, ["model.ring.layout=spiral"])
    with pytest.raises(ConfigError, match="model.ring.sparse.window: must be an int >= 0"):
        load_config(path, ["model.ring.sparse.window=-1"])


def test_ring_is_a_sequence_parallel_attention_implementation():
    assert "ring" not in attention_implementations()
    assert "ring" in attention_implementations(sequence_parallel=True)
    q = jnp.zeros((1, 16, 2, 8))
    with pytest.raises(UserError, match="needs a mesh"):
        attention(q, q, q, implementation="ring", config=RingConfig(kernel="xla", block_size=4))
    kv = jnp.zeros((1, 2, 16, 8))
    with pytest.raises(UserError, match="without a KV cache"):
        attention(q, kv, kv, implementation="ring", kv_layout="bksd")
    with pytest.raises(UserError, match="takes a RingConfig config, got SparseConfig"):
        attention(
            q, q, q, implementation="ring", config=SparseConfig(vertical_size=1, slash_size=1)
        )
    with pytest.raises(UserError, match="'xla' takes no config"):
        attention(q, q, q, implementation="xla", config=RingConfig())


def test_ring_through_attention_equals_dense_causal():
    rng = np.random.default_rng(0)
    b, t, h, kv, d = 1, 64, 4, 2, 8
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, t, kv, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, kv, d)), jnp.float32)
    causal = jnp.tril(jnp.ones((t, t), bool))[None]
    want = grouped_attention(q, k, v, causal, scale=d**-0.5)
    mesh = Mesh(np.array(jax.devices()[:4]), ("sp",))
    config = RingConfig(kernel="xla", block_size=8, layout="zigzag")
    with jax.set_mesh(mesh):
        got = attention(q, k, v, causal, implementation="ring", config=config)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # replacing the config (as dataclasses.replace of a DecoderConfig does) keeps it validated
    with pytest.raises(ConfigError, match="block_size"):
        dataclasses.replace(config, block_size=-1)
