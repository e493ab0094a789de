"""LoRA adapters on the decoder's projections: exact start and merge, only adapters train, a LoRA
step equals the same step taken through explicitly merged weights, sharding, merged export read
by transformers, and LoRA in the SFT and RL trainers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch  # (the parity extra: `make test` installs it)
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxlab.config import ConfigError
from jaxlab.mesh import MeshConfig, make_mesh
from jaxlab.models import Decoder, LoRAConfig, add_lora, merge_lora, save_pretrained, without_lora
from jaxlab.models.layers import LoRADense
from jaxlab.models.lora import LORA_TARGETS, trainable
from jaxlab.sharding import shard_model
from jaxlab.testing import TINY_DECODER
from jaxlab.train import next_token_loss, train_step_with_metrics

CFG = dataclasses.replace(
    TINY_DECODER, vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2
)
LORA = LoRAConfig(rank=4, alpha=8.0)


def _random_adapters(model, seed=1, scale=0.1):
    """Moves every adapter away from its start (B = 0 makes a fresh adapter a no-op)."""
    state = nnx.state(model, nnx.LoRAParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [a + scale * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))
    return model


def _tokens(seed=0, shape=(4, 12)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, shape), jnp.int32)


@nnx.jit
def _forward(model, x):
    return model(x)


def test_adapters_start_as_the_base_and_merge_into_the_same_function():
    base = Decoder(CFG, rngs=nnx.Rngs(0))
    x = _tokens()
    model = add_lora(base, LORA, rngs=nnx.Rngs(1))
    names = {str(p[-1]) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    assert names == {"lora_a", "lora_b"}
    n_dense = sum(isinstance(m, LoRADense) for _, m in model.iter_modules())
    assert n_dense == len(LORA_TARGETS)  # stacked layers: one module per projection
    assert model.layers.self_attn.q_proj.kernel is base.layers.self_attn.q_proj.kernel  # no copy
    np.testing.assert_array_equal(_forward(model, x), _forward(base, x))  # B = 0
    _random_adapters(model)
    adapted = np.asarray(_forward(model, x))
    assert np.abs(adapted - np.asarray(_forward(base, x))).max() > 1e-2
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRADense) for _, m in merged.iter_modules())
    np.testing.assert_allclose(_forward(merged, x), adapted, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(_forward(without_lora(model), x), _forward(base, x))
    # float64 reference of one merged kernel: W + alpha / r * A B
    q = model.layers.self_attn.q_proj
    want = np.asarray(q.kernel[...], np.float64) + (LORA.alpha / LORA.rank) * np.einsum(
        "lir,lro->lio", np.asarray(q.lora_a[...], np.float64), np.asarray(q.lora_b[...], np.float64)
    )
    np.testing.assert_allclose(
        merged.layers.self_attn.q_proj.kernel[...], want, rtol=1e-6, atol=1e-6
    )
    only_q = add_lora(base, LoRAConfig(rank=2, targets=("q_proj",)), rngs=nnx.Rngs(0))
    assert isinstance(only_q.layers.self_attn.q_proj, LoRADense)
    assert not isinstance(only_q.layers.mlp.up_proj, LoRADense)
    with pytest.raises(ConfigError, match="targets"):
        LoRAConfig(rank=2, targets=("qkv",))


def test_a_lora_step_trains_only_adapters_and_equals_the_step_on_merged_weights():
    """One step of ``train_step_with_metrics`` on a LoRA model against the same step taken by
    hand: gradients of the loss of a plain decoder whose kernels are ``W + s A B``, as functions
    of (A, B), then the same optax update (SGD with weight decay: linear in the gradient, so the
    comparison checks the gradients; Adam's g / sqrt(v) would amplify float32 rounding of tiny
    gradients). Adam's state is checked to hold the adapters only."""
    model = _random_adapters(add_lora(Decoder(CFG, rngs=nnx.Rngs(0)), LORA, rngs=nnx.Rngs(1)))
    tokens = _tokens(3)
    tx = optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.5))
    base_before = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(nnx.LoRAParam)))
    adapters = {
        tuple(map(str, path)): (m.lora_a[...], m.lora_b[...])
        for path, m in model.iter_modules()
        if isinstance(m, LoRADense)
    }
    plain_def, plain_state = nnx.split(without_lora(model))
    kernels = {k + ("kernel",) for k in adapters}

    def merged_loss(ad):
        flat = []
        for path, var in nnx.to_flat_state(plain_state):
            key = tuple(map(str, path))
            if key in kernels:
                a, b = ad[key[:-1]]
                var = var.replace(var[...] + (LORA.alpha / LORA.rank) * (a @ b))
            flat.append((path, var))
        return next_token_loss(nnx.merge(plain_def, nnx.from_flat_state(flat)), tokens)

    want_loss, grads = jax.value_and_grad(merged_loss)(adapters)
    updates, _ = tx.update(grads, tx.init(adapters), adapters)
    want = optax.apply_updates(adapters, updates)

    assert trainable(model) is nnx.LoRAParam
    adam = nnx.Optimizer(model, optax.adam(1e-3), wrt=trainable(model))
    opt_leaves = jax.tree.leaves(nnx.state(adam, nnx.OptState))
    lora_sizes = sum(a.size for a in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    assert sum(a.size for a in opt_leaves if a.ndim) == 2 * lora_sizes  # mu, nu: adapters only
    optimizer = nnx.Optimizer(model, tx, wrt=trainable(model))
    out = train_step_with_metrics(model, optimizer, tokens)
    np.testing.assert_allclose(out["loss"], want_loss, rtol=1e-6)
    for key, (a, b) in want.items():
        m = model
        for part in key:
            m = m[int(part)] if part.isdigit() else getattr(m, part)
        np.testing.assert_allclose(m.lora_a[...], a, rtol=1e-5, atol=1e-6, err_msg=str(key))
        np.testing.assert_allclose(m.lora_b[...], b, rtol=1e-5, atol=1e-6, err_msg=str(key))
    base_after = nnx.state(model, nnx.Not(nnx.LoRAParam))
    jax.tree.map(np.testing.assert_array_equal, base_after, base_before)


def test_adapters_shard_like_the_kernels_they_adapt():
    mesh = make_mesh(MeshConfig(fsdp=2, tensor=4))
    model = shard_model(add_lora(Decoder(CFG, rngs=nnx.Rngs(0)), LORA, rngs=nnx.Rngs(1)), mesh)
    q, down = model.layers.self_attn.q_proj, model.layers.mlp.down_proj
    assert q.kernel[...].sharding.spec == P(None, "fsdp", "tensor")
    assert q.lora_a[...].sharding.spec == P(None, "fsdp")  # [L, embed, r]
    assert q.lora_b[...].sharding.spec == P(None, None, "tensor")  # [L, r, heads]
    assert down.lora_a[...].sharding.spec == P(None, "tensor")  # [L, mlp, r]
    assert q.lora_b[...].addressable_shards[0].data.shape == (CFG.num_layers, LORA.rank, 8)


def test_merged_export_loads_in_transformers_with_the_adapted_logits(tmp_path):
    model = _random_adapters(add_lora(Decoder(CFG, rngs=nnx.Rngs(0)), LORA, rngs=nnx.Rngs(1)))
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 10))
    ours = np.asarray(model(jnp.asarray(ids)), np.float64)
    save_pretrained(model, None, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids)).logits.numpy().astype(np.float64)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4


def test_lora_rl_and_sft_configs_train_adapters_with_the_base_as_reference():
    """The RL trainer with ``lora.rank > 0``: adapters are what the optimizer holds, the KL
    reference is the base weights (no copy), and the Engine decodes the merged weights."""
    from jaxlab.rl.trainer import RLTrainConfig, RLTrainer
    from jaxlab.sft import SFTConfig

    assert SFTConfig(lora=LoRAConfig(rank=8)).lora.rank == 8
    cfg = RLTrainConfig(model="tiny", lora=LoRAConfig(rank=2))
    cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, kl_coef=0.1))
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        trainer = RLTrainer(cfg, d)
    assert trainer.ref_model is None
    assert trainable(trainer.model) is nnx.LoRAParam
    opt = jax.tree.leaves(nnx.state(trainer.optimizer, nnx.OptState))
    n_lora = sum(a.size for a in jax.tree.leaves(nnx.state(trainer.model, nnx.LoRAParam)))
    assert sum(a.size for a in opt if a.ndim) == 2 * n_lora


def test_a_lora_runs_checkpoint_exports_as_the_merged_model(tmp_path):
    """``python -m jaxlab export --model RUN`` of a LoRA run: the run's config names the adapters,
    the checkpoint fills base and adapters, and the export holds the merged kernels."""
    import json

    from jaxlab.checkpoint import Checkpointer
    from jaxlab.cli import main
    from jaxlab.models import from_pretrained
    from jaxlab.testing.char_tokenizer import char_tokenizer

    tok = char_tokenizer()
    cfg = dataclasses.replace(CFG, vocab_size=tok.vocab_size)
    model = _random_adapters(add_lora(Decoder(cfg, rngs=nnx.Rngs(0)), LORA, rngs=nnx.Rngs(1)))
    run = tmp_path / "run"
    with Checkpointer(run / "checkpoints", async_save=False) as ckpt:
        ckpt.save(3, model=model, force=True)
    config = {
        "model": "tiny",
        "tiny_model": dataclasses.asdict(cfg),
        "lora": dataclasses.asdict(LORA),
    }
    (run / "config.json").write_text(json.dumps(config))
    assert main(["export", "--model", str(run), "--out", str(tmp_path / "out")]) == 0
    exported, _ = from_pretrained(tmp_path / "out")
    x = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
    np.testing.assert_allclose(_forward(exported, x), _forward(model, x), rtol=1e-5, atol=1e-5)
