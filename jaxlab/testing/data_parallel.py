"""One data-parallel training step of a tiny decoder over a mesh's ``data`` axis, for checking that a
step spread over processes (``jax.distributed``) equals the same step in one process.

Weights and the batch are built from fixed seeds on every process, placed with
``jax.make_array_from_callback`` (each process fills only the shards of its own devices), and the
step is one ``jax.jit`` of loss, gradients and an optax Adam update. The results are replicated, so
every process reads the whole of each from its own devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlab.testing import TINY_DECODER

__all__ = ["data_parallel_step", "tiny_decoder_on_mesh"]


def _place(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _next_token_loss(graphdef, params, tokens):
    """Mean next-token cross-entropy of ``tokens`` ``[B, T]``."""
    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def tiny_decoder_on_mesh(mesh: Mesh, *, seed: int = 0, sharded: bool = False):
    """``Decoder(TINY_DECODER)`` with seeded random weights placed on ``mesh``: replicated, or
    (``sharded``) each parameter split over the ``data`` axis along its first divisible dimension.

    The weights come from a numpy generator into the abstract model: the same on every process,
    without running the initialisers eagerly.
    """
    from jaxlab.models import Decoder

    abstract = nnx.eval_shape(lambda: Decoder(TINY_DECODER, rngs=nnx.Rngs(seed)))
    graphdef, params = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    n = mesh.shape["data"]

    def init(path, x):
        noise = rng.standard_normal(x.shape)
        value = 1.0 + 0.1 * noise if "norm" in jax.tree_util.keystr(path) else 0.1 * noise
        spec = [None] * len(x.shape)
        if sharded:
            axis = next((i for i, d in enumerate(x.shape) if d % n == 0), None)
            if axis is not None:
                spec[axis] = "data"
        return _place(value.astype(np.float32), NamedSharding(mesh, PartitionSpec(*spec)))

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(init, params)), rng


def data_parallel_step(
    mesh: Mesh, *, batch_size: int = 8, seq_len: int = 16, lr: float = 1e-2, seed: int = 0
) -> dict[str, np.ndarray]:
    """One Adam step of ``Decoder(TINY_DECODER)`` on a random batch split over ``mesh``'s ``data``
    axis, weights replicated.

    Returns:
      Host arrays: ``loss`` (scalar), and ``grad/<path>`` and ``param/<path>`` (after the update)
      for every parameter.
    """
    model, rng = tiny_decoder_on_mesh(mesh, seed=seed)
    graphdef, params = nnx.split(model)
    tokens = rng.integers(0, TINY_DECODER.vocab_size, size=(batch_size, seq_len), dtype=np.int32)
    batch = _place(tokens, NamedSharding(mesh, PartitionSpec("data")))
    optimizer = optax.adam(lr)

    @jax.jit
    def step(params, tokens):
        opt_state = optimizer.init(params)
        loss, grads = jax.value_and_grad(lambda p: _next_token_loss(graphdef, p, tokens))(params)
        updates, _ = optimizer.update(grads, opt_state, params)
        return loss, grads, optax.apply_updates(params, updates)

    loss, grads, new_params = step(params, batch)

    def host(x):  # replicated: this process's first device holds all of it
        assert x.sharding.is_fully_replicated
        return np.asarray(x.addressable_data(0))

    out = {"loss": host(loss)}
    for prefix, tree in (("grad", grads), ("param", new_params)):
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            out[f"{prefix}/{jax.tree_util.keystr(path)}"] = host(leaf)
    assert all(v.dtype == jnp.float32 for v in out.values())
    return out
