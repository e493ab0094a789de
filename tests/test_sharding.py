"""Sharded parameters over the (data, fsdp, tensor, sp) mesh: the rules table, sharded creation,
one training step on four mesh shapes equal to the single-device step, mixed precision."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxlab.mesh import MeshConfig, auto_axes, make_mesh
from jaxlab.models import Decoder
from jaxlab.sharding import (
    DEFAULT_RULES,
    bytes_per_device,
    check_fits,
    create_sharded,
    logical_spec,
    param_specs,
    shard_model,
)
from jaxlab.testing import TINY_DECODER
from jaxlab.train import train_step_with_metrics

# heads 4 / kv heads 2 / mlp 64 / vocab 64 / width 32: every axis splits over 8 devices but the
# key/value heads, whose projection (2 heads x 8) still splits over tensor=4 as 16 columns
CFG = dataclasses.replace(
    TINY_DECODER, vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2
)
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]  # data x fsdp x tensor


def test_mesh_config_sizes_and_errors():
    assert MeshConfig(fsdp=-1, tensor=2).sizes(8) == {"data": 1, "fsdp": 4, "tensor": 2, "sp": 1}
    mesh = make_mesh(MeshConfig(data=2, tensor=-1))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4, "sp": 1}
    with pytest.raises(ValueError, match="needs 16 devices, but 8"):
        make_mesh(MeshConfig(data=4, fsdp=4))
    with pytest.raises(ValueError, match="do not split"):
        make_mesh(MeshConfig(data=3, fsdp=-1))
    with pytest.raises(ValueError, match="at most one axis"):
        MeshConfig(data=-1, fsdp=-1)
    explicit = jax.make_mesh((2, 4), ("data", "fsdp"))  # Explicit axes by default
    assert all(t == jax.sharding.AxisType.Auto for t in auto_axes(explicit).axis_types)


def test_logical_spec_follows_the_rules_and_drops_what_does_not_divide():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert logical_spec(("embed", "heads"), (32, 32), mesh) == P("fsdp", "tensor")
    assert logical_spec(("layers", "mlp", "embed"), (2, 64, 32), mesh) == P(None, "tensor", "fsdp")
    assert logical_spec(("batch", None), (8, 5), mesh) == P(("data", "fsdp"))
    # 6 rows: data x fsdp = 4 does not divide, data = 2 does
    assert logical_spec(("batch",), (6,), mesh) == P("data")
    assert logical_spec(("heads",), (3,), mesh) == P()  # 3 heads on tensor=2: whole
    assert logical_spec(("norm",), (32,), mesh) == P()
    assert logical_spec(("embed", "embed"), (32, 32), mesh) == P("fsdp")  # an axis used once
    one = make_mesh(MeshConfig())  # size-1 axes split nothing
    assert logical_spec(("embed", "heads"), (32, 32), one) == P()
    assert dict(DEFAULT_RULES)["embed"] == "fsdp"


def test_every_parameter_is_named_and_each_device_holds_its_share():
    mesh = make_mesh(MeshConfig(fsdp=2, tensor=4))
    model = create_sharded(lambda: Decoder(CFG, rngs=nnx.Rngs(0)), mesh)
    sizes = dict(mesh.shape)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        names = var.get_metadata().get("logical_axes")
        value = var[...]
        assert names is not None and len(names) == value.ndim, path
        spec = value.sharding.spec
        want = list(value.shape)
        for d, entry in enumerate(spec):
            for a in (entry,) if isinstance(entry, str) else entry or ():
                want[d] //= sizes[a]
        for shard in value.addressable_shards:
            assert shard.data.shape == tuple(want), (path, spec)
    q = model.layers.self_attn.q_proj.kernel[...]
    assert q.sharding.spec == P(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (CFG.num_layers, 16, 8)
    # the same values as the model built on one device (up to jit's rounding of the init)
    ref = Decoder(CFG, rngs=nnx.Rngs(0))
    for (p, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(ref))
    ):
        np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), atol=1e-7, err_msg=p)


def test_a_model_too_big_for_its_share_fails_before_allocation():
    mesh = make_mesh(MeshConfig(fsdp=8))
    big = dataclasses.replace(CFG, vocab_size=4096, hidden_size=512, intermediate_size=2048)
    abstract = nnx.state(nnx.eval_shape(lambda: Decoder(big, rngs=nnx.Rngs(0))))
    need = bytes_per_device(abstract, mesh)
    total = sum(x.size * 4 for x in jax.tree.leaves(abstract))
    assert total // 8 <= need < total // 4  # nearly everything is split 8 ways (norms are whole)
    with pytest.raises(ValueError, match=r"GiB per device on mesh .* shard it over more devices"):
        check_fits(abstract, mesh, limit=need - 1)
    assert check_fits(abstract, mesh, limit=need) == need


def _step(model, tokens):
    # Adam's first step is g / (|g| + eps): with eps 1e-8 a gradient entry near 1e-8 turns its
    # summation-order noise into a visible weight difference; eps 1e-4 keeps it a float error
    tx = optax.adamw(1e-2, eps=1e-4, weight_decay=0.1)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    out = train_step_with_metrics(model, optimizer, tokens)
    return out, model, optimizer


@pytest.fixture(scope="module")
def single_step():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (8, 17)), jnp.int32)
    model = Decoder(CFG, rngs=nnx.Rngs(1))
    start = jax.tree.map(np.asarray, nnx.state(model))
    out, model, _ = _step(model, tokens)
    return tokens, start, {k: float(v) for k, v in out.items()}, nnx.state(model)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_a_sharded_training_step_equals_the_single_device_step(shape, single_step):
    tokens, start, want, want_state = single_step
    data, fsdp, tensor = shape
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
    model = Decoder(CFG, rngs=nnx.Rngs(1))
    nnx.update(model, start)
    shard_model(model, mesh)
    batch = jax.device_put(tokens, jax.sharding.NamedSharding(mesh, P(("data", "fsdp"))))
    with jax.set_mesh(mesh):
        out, model, optimizer = _step(model, batch)
    np.testing.assert_allclose(float(out["loss"]), want["loss"], rtol=1e-6)
    np.testing.assert_allclose(float(out["grad_norm"]), want["grad_norm"], rtol=1e-5)
    got = nnx.to_flat_state(nnx.state(model))
    specs = dict(nnx.to_flat_state(param_specs(nnx.state(model), mesh)))
    for (path, a), (_, b) in zip(got, nnx.to_flat_state(want_state)):
        np.testing.assert_allclose(
            np.asarray(a[...]), np.asarray(b[...]), rtol=1e-5, atol=1e-6, err_msg=str(path)
        )
        assert a[...].sharding.spec == specs[path].get_value(), path  # the update kept it placed
    # the optimizer's moments are sharded like the weights they belong to
    mu = optimizer.opt_state[0].mu
    for (path, m), (_, w) in zip(nnx.to_flat_state(mu), got):
        assert m[...].sharding.spec == w[...].sharding.spec, path
        assert m[...].addressable_shards[0].data.shape == w[...].addressable_shards[0].data.shape


def test_mixed_precision_bfloat16_compute_float32_weights(single_step):
    tokens, start, want, _ = single_step
    model = Decoder(CFG, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(1))
    nnx.update(model, start)
    logits = model(tokens[:, :-1])
    assert logits.dtype == jnp.float32
    ref = Decoder(CFG, rngs=nnx.Rngs(1))
    nnx.update(ref, start)
    full = ref(tokens[:, :-1])
    # bfloat16 activations: within bfloat16's resolution of the float32 logits, not equal
    err = float(jnp.max(jnp.abs(logits - full)))
    assert 1e-5 < err < 0.05 * float(jnp.max(jnp.abs(full)))
    out, model, optimizer = _step(model, tokens)
    assert abs(float(out["loss"]) - want["loss"]) < 0.02 * want["loss"]
    for _, var in nnx.to_flat_state(nnx.state(model)):
        assert var[...].dtype == jnp.float32  # master weights stay float32
    for _, var in nnx.to_flat_state(optimizer.opt_state[0].mu):
        assert var[...].dtype == jnp.float32
    cache = model.init_cache(2, 8)
    assert cache.k.dtype == jnp.bfloat16  # the KV cache holds the compute dtype


def test_every_encoder_and_decoder_matrix_has_named_axes():
    from jaxlab.models.bert import BertConfig, BertEncoder

    for make in (
        lambda: BertEncoder(BertConfig(), rngs=nnx.Rngs(0)),
        lambda: Decoder(dataclasses.replace(CFG, scan_layers=False), rngs=nnx.Rngs(0)),
    ):
        for path, var in nnx.to_flat_state(nnx.state(nnx.eval_shape(make))):
            names = var.get_metadata().get("logical_axes")
            assert names is not None and len(names) == len(var.shape), path
            if len(var.shape) >= 2:  # matrices: every axis named (vectors: norm, or a bias)
                assert all(n is not None for n in names), (path, names)


def test_train_lm_on_a_mesh_resumes_on_another_mesh_like_one_device(tmp_path):
    """train-lm with FSDP x tensor parallel, checkpointed at step 2, resumed on a data-parallel
    mesh of another shape: every logged loss equals the single-device run's."""
    import json

    from jaxlab.checkpoint import CheckpointConfig
    from jaxlab.train import DataConfig, LMTrainConfig, OptimConfig, train_lm

    def cfg(steps, **mesh):
        return LMTrainConfig(
            data=DataConfig(seq_len=16, batch_size=8),
            train=OptimConfig(steps=steps, lr=1e-2, warmup_steps=0),
            checkpoint=CheckpointConfig(save_every=2, keep=2, async_save=False),
            mesh=MeshConfig(**mesh),
            log_every=1,
            tensorboard=False,
        )

    def losses(workdir):
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines]

    train_lm(cfg(4), tmp_path / "one", progress=False)
    train_lm(cfg(2, fsdp=4, tensor=2), tmp_path / "mesh", progress=False)
    train_lm(cfg(4, data=8), tmp_path / "mesh", progress=False)  # restores step 2 onto data=8
    np.testing.assert_allclose(losses(tmp_path / "mesh"), losses(tmp_path / "one"), rtol=2e-5)
    assert len(losses(tmp_path / "one")) == 4


@pytest.mark.parametrize("kind", ["explicit", "auto"])
def test_ring_attention_and_the_sharded_estimate_take_either_kind_of_mesh(kind):
    """``jax.make_mesh`` gives Explicit axes, ``Mesh(...)`` Auto ones: both work, with inputs on
    one device or already sharded, and give the dense causal attention and the one-device
    pattern estimate."""
    from jax.sharding import AxisType, Mesh

    from jaxlab.attention import ring_attention, vertical_slash_pattern
    from jaxlab.attention.sparse import sparse_attention_reference

    devices = np.asarray(jax.devices()[:4])
    if kind == "explicit":
        mesh = jax.make_mesh((4,), ("sp",), devices=devices)
        assert mesh.axis_types == (AxisType.Explicit,)
    else:
        mesh = Mesh(devices, ("sp",))
    q, k, v = (
        jax.random.normal(key, (1, 256, 2, 16)) for key in jax.random.split(jax.random.key(0), 3)
    )
    dense = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    out = ring_attention(q, k, v, mesh=mesh, implementation="xla", block_size=32)
    np.testing.assert_allclose(np.asarray(out), np.asarray(dense), atol=2e-5)
    sharded = jax.device_put(q, jax.sharding.NamedSharding(mesh, P(None, "sp")))
    again = ring_attention(sharded, k, v, mesh=mesh, implementation="xla", block_size=32)
    np.testing.assert_allclose(np.asarray(again), np.asarray(dense), atol=2e-5)

    kw = dict(vertical_size=8, slash_size=8, last_q=32)
    local = vertical_slash_pattern(q, k, **kw)
    spread = vertical_slash_pattern(q, k, mesh=mesh, axis_name="sp", **kw)
    np.testing.assert_array_equal(np.asarray(spread.vertical_idx), np.asarray(local.vertical_idx))
    np.testing.assert_array_equal(np.asarray(spread.slash_idx), np.asarray(local.slash_idx))
    ring = ring_attention(q, k, v, mesh=mesh, implementation="xla", block_size=32, pattern=local)
    ref, _ = sparse_attention_reference(q, k, v, local, block_size=32)
    np.testing.assert_allclose(np.asarray(ring), np.asarray(ref), atol=2e-5)


def test_greedy_generation_of_a_sharded_model_equals_one_device():
    from jaxlab.generation import generate
    from jaxlab.testing.char_tokenizer import char_tokenizer

    tok = char_tokenizer()
    cfg = dataclasses.replace(CFG, vocab_size=tok.vocab_size, num_kv_heads=4)
    prompts = ["hello", "abc def", "x"]
    want = generate(Decoder(cfg, rngs=nnx.Rngs(0)), tok, prompts, max_new_tokens=8)
    mesh = make_mesh(MeshConfig(fsdp=2, tensor=4))
    model = shard_model(Decoder(cfg, rngs=nnx.Rngs(0)), mesh)
    assert model.layers.self_attn.k_proj.kernel[...].sharding.spec == P(None, "fsdp", "tensor")
    with jax.set_mesh(mesh):
        got = generate(model, tok, prompts, max_new_tokens=8)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert got.texts == want.texts


def test_rematerialisation_policies_give_the_same_gradients():
    """remat trades memory for recomputation: each policy's loss and gradients equal the plain
    ones, and the backward pass really recomputes (a remat in the program)."""
    from jaxlab.errors import ConfigError
    from jaxlab.train import next_token_loss

    tokens = jnp.asarray(np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 9)), jnp.int32)

    def grads(remat):
        model = Decoder(dataclasses.replace(CFG, remat=remat), rngs=nnx.Rngs(2))
        graphdef, state = nnx.split(model)

        def loss(state):
            return next_token_loss(nnx.merge(graphdef, state), tokens)

        program = str(jax.make_jaxpr(jax.grad(loss))(state))
        return jax.jit(jax.value_and_grad(loss))(state), program

    (want_loss, want), plain = grads("none")
    assert "remat" not in plain and "checkpoint" not in plain
    for policy in ("full", "dots"):
        (got_loss, got), program = grads(policy)
        assert "remat" in program or "checkpoint" in program, policy
        np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match="remat"):
        dataclasses.replace(CFG, remat="sometimes")


@pytest.mark.parametrize("on_mesh", [False, True], ids=["one_device", "mesh_2x2x2"])
def test_gradient_accumulation_equals_the_whole_batch(on_mesh, single_step):
    """Four accumulated micro-batches give the whole batch's update (also sharded)."""
    import contextlib

    from jaxlab.train import DataConfig

    tokens, start, want, want_state = single_step
    model = Decoder(CFG, rngs=nnx.Rngs(1))
    nnx.update(model, start)
    context = contextlib.nullcontext()
    if on_mesh:
        mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
        shard_model(model, mesh)
        tokens = jax.device_put(tokens, jax.sharding.NamedSharding(mesh, P(("data", "fsdp"))))
        context = jax.set_mesh(mesh)
    tx = optax.adamw(1e-2, eps=1e-4, weight_decay=0.1)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    with context:
        out = train_step_with_metrics(model, optimizer, tokens, micro_batches=4)
    np.testing.assert_allclose(float(out["loss"]), want["loss"], rtol=1e-6)
    np.testing.assert_allclose(float(out["grad_norm"]), want["grad_norm"], rtol=1e-5)
    for (path, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(want_state)
    ):
        np.testing.assert_allclose(
            np.asarray(a[...]), np.asarray(b[...]), rtol=1e-5, atol=1e-6, err_msg=str(path)
        )
    with pytest.raises(Exception, match="micro_batches"):
        DataConfig(batch_size=8, micro_batches=3)


def test_engine_decodes_tensor_parallel_like_one_device():
    """The Engine on a mesh: weights split by the rules, the KV cache and the prefix store by
    key/value heads; greedy completions (with a prefix-cache hit) equal the one-device engine's."""
    from jaxlab.generation import Engine, SamplingParams
    from jaxlab.testing.char_tokenizer import char_tokenizer

    tok = char_tokenizer()
    cfg = dataclasses.replace(CFG, vocab_size=tok.vocab_size, num_kv_heads=4)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    first = "the same long prefix, "
    prompts = [first + "once", "abc def", first + "twice", "x"]
    params = SamplingParams(max_new_tokens=6, temperature=0.0)

    def run(**kw):
        engine = Engine(model, num_slots=2, max_len=48, tokenizer=tok, prefix_cache=2, **kw)
        for p in prompts:
            engine.submit(tok.encode(p), params)
        done = sorted(engine.run(), key=lambda c: c.request_id)
        return engine, [c.tokens for c in done]

    _, want = run()
    mesh = make_mesh(MeshConfig(fsdp=2, tensor=4))
    engine, got = run(mesh=mesh)
    assert got == want
    assert engine.stats()["prefix_cache_hits"] >= 1
    k0 = engine._ds.cache.k[0]
    assert k0.sharding.spec == P(None, "tensor")  # [B, K, S, D]
    assert k0.addressable_shards[0].data.shape[1] == cfg.num_kv_heads // 4
    q = engine._state["layers"][0]["self_attn"]["q_proj"]["kernel"]
    assert q[...].sharding.spec == P("fsdp", "tensor")


def test_from_pretrained_reads_each_device_share_into_its_sharding(tmp_path, monkeypatch):
    """``from_pretrained(dir, mesh=)``: every parameter lands in its rules' sharding with values
    equal to the plain load, and a split parameter is read from safetensors one share at a time
    (sharded checkpoint files, with an index, included)."""
    from jaxlab.models import from_pretrained, loading, save_pretrained

    save_pretrained(Decoder(CFG, rngs=nnx.Rngs(3)), None, tmp_path, max_shard_size=20_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    plain, _ = from_pretrained(tmp_path)

    reads: dict[str, list[tuple[int, ...]]] = {}
    real = loading._SafetensorsTensor.__getitem__

    def spy(self, index):
        out = real(self, index)
        reads.setdefault(self.key, []).append(out.shape)
        return out

    monkeypatch.setattr(loading._SafetensorsTensor, "__getitem__", spy)
    mesh = make_mesh(MeshConfig(fsdp=2, tensor=4))
    model, _ = from_pretrained(tmp_path, mesh=mesh)

    want = dict(nnx.to_flat_state(nnx.state(plain)))
    specs = dict(nnx.to_flat_state(param_specs(nnx.state(model), mesh)))
    for path, var in nnx.to_flat_state(nnx.state(model)):
        a = var[...]
        assert a.sharding.spec == specs[path].get_value(), path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(want[path][...]), err_msg=str(path))
    q = model.layers.self_attn.q_proj.kernel[...]  # [L, E, H*D] split over fsdp x tensor
    assert q.sharding.spec == P(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (CFG.num_layers, 16, 8)
    # HF stores q_proj as [H*D, E] per layer: each read is one share, transposed back
    assert set(reads["model.layers.0.self_attn.q_proj.weight"]) == {(8, 16)}


def test_rl_and_train_lm_take_the_compute_dtype_from_config_and_cli(tmp_path):
    """``dtype`` / ``param_dtype`` in the RL config build a bfloat16-compute policy with float32
    weights; ``--dtype`` on ``rl train`` and ``train-lm`` is ``--set dtype=``; bad names fail."""
    from jaxlab.cli import build_parser
    from jaxlab.cli._common import dtype_overrides
    from jaxlab.config import ConfigError, load_config
    from jaxlab.rl.trainer import RLTrainConfig, load_policy

    model, _ = load_policy(RLTrainConfig(model="tiny", dtype="bfloat16"))
    assert model.dtype == jnp.bfloat16
    assert {v[...].dtype for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))} == {
        jnp.dtype(jnp.float32)
    }
    with pytest.raises(ConfigError, match="dtype"):
        RLTrainConfig(dtype="int8")
    parser = build_parser()
    args = parser.parse_args(
        ["rl", "train", "configs/rl/tiny_sync.yaml", "--workdir", str(tmp_path), "--dtype",
         "bfloat16", "--set", "loss.kl_coef=0.0"]
    )  # fmt: skip
    cfg = load_config(args.config, dtype_overrides(args), cls=RLTrainConfig)
    assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "float32")
    args = parser.parse_args(["train-lm", "--workdir", str(tmp_path), "--dtype", "bfloat16"])
    assert dtype_overrides(args) == ["dtype=bfloat16"]
    with pytest.raises(SystemExit):
        parser.parse_args(["train-lm", "--workdir", str(tmp_path), "--dtype", "int8"])
