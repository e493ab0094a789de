"""LoRA adapters on a decoder's projections: config, adding them to a model, merging for export.

    lora = LoRAConfig(rank=16, alpha=32)                     # q, k, v, o, gate, up, down
    model = add_lora(base, lora, rngs=nnx.Rngs(0))          # base weights shared, not copied
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam) # only the adapters train
    reference = without_lora(model)                          # the base policy, for free
    save_pretrained(merge_lora(model), tokenizer, "out/")    # W + (alpha / r) A B

Each targeted ``nnx.Linear`` becomes a :class:`jaxlab.models.layers.LoRADense` with the same kernel
and bias (same paths, same logical axes, so loading and sharding are unchanged) and two
``nnx.LoRAParam`` s: ``lora_a [in, r]`` named by the kernel's input axis and ``lora_b [r, out]``
by its output axis, so FSDP / tensor parallelism split them like the kernel they adapt.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlab.models.decoder import Decoder
from jaxlab.models.layers import LORA_TARGETS, LoRAConfig, LoRADense

__all__ = [
    "LoRAConfig",
    "LORA_TARGETS",
    "add_lora",
    "merge_lora",
    "without_lora",
    "has_lora",
    "trainable",
    "value_and_grad",
]


def has_lora(model: nnx.Module) -> bool:
    """Whether ``model`` carries LoRA adapters (a property of its structure: static under jit)."""
    return bool(jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))


def trainable(model: nnx.Module) -> type[nnx.Variable]:
    """What an optimizer trains and gradients are taken of: the adapters when ``model`` has
    them, else every ``nnx.Param`` (``nnx.Optimizer(model, tx, wrt=trainable(model))``)."""
    return nnx.LoRAParam if has_lora(model) else nnx.Param


def value_and_grad(fn, model: nnx.Module, *args, has_aux: bool = False):
    """``nnx.value_and_grad(fn)(model, *args)`` with respect to :func:`trainable` (model)."""
    argnums = nnx.DiffState(0, trainable(model))
    return nnx.value_and_grad(fn, argnums=argnums, has_aux=has_aux)(model, *args)


def _rebuilt(model, lora: LoRAConfig | None, rngs: nnx.Rngs | None):
    """A new decoder of ``model``'s config and dtypes with ``lora`` (None: none), holding
    ``model``'s arrays wherever the paths agree; returns ``(new model, its state by path)``."""
    if not isinstance(model, Decoder):
        raise TypeError(f"LoRA adapts decoders; got a {type(model).__name__}")
    kw = dict(dtype=model.dtype, param_dtype=model.param_dtype, lora=lora)
    if lora is not None and lora.enabled:
        new = Decoder(model.config, rngs=rngs or nnx.Rngs(0), **kw)  # adapters initialised
    else:
        new = nnx.eval_shape(lambda: Decoder(model.config, rngs=nnx.Rngs(0), **kw))
    return new


def add_lora(model, lora: LoRAConfig, *, rngs: nnx.Rngs | None = None):
    """``model`` with fresh adapters on ``lora.targets`` (``B = 0``: the same outputs as
    ``model``). The base arrays are ``model``'s own (no copy)."""
    if not lora.enabled:
        return model
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    new = _rebuilt(model, lora, rngs)
    base = nnx.state(model)
    adapters = nnx.state(new, nnx.LoRAParam)
    graphdef, _ = nnx.split(new)
    return nnx.merge(graphdef, base, adapters)


def without_lora(model):
    """The base model under ``model``'s adapters, sharing its arrays (no copy): the reference
    policy of LoRA RL. A model without adapters is returned as it is."""
    if not has_lora(model):
        return model
    graphdef, _ = nnx.split(_rebuilt(model, None, None))
    return nnx.merge(graphdef, nnx.state(model, nnx.Not(nnx.LoRAParam)))


def merge_lora(model):
    """A plain decoder whose kernels are ``W + (alpha / r) A B`` (in the parameters' dtype): the
    adapted model's function without adapters, for export, generation and serving."""
    if not has_lora(model):
        return model
    merged = {}
    for path, module in model.iter_modules():
        if isinstance(module, LoRADense):
            w = module.kernel[...]
            a, b = module.lora_a[...], module.lora_b[...]
            delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32)) * module.lora_scale
            merged[tuple(str(p) for p in path) + ("kernel",)] = (w + delta).astype(w.dtype)
    base = without_lora(model)
    state = nnx.state(base)
    flat = []
    for path, var in nnx.to_flat_state(state):
        key = tuple(str(p) for p in path)
        flat.append((path, var.replace(merged[key]) if key in merged else var))
    graphdef, _ = nnx.split(base)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
