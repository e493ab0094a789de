"""Building blocks shared by the models: norms, rotary embeddings, stacked (scanned) layers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab.config import check
from jaxlab.registry import Registry

__all__ = [
    "logical_axes",
    "RMSNorm",
    "dense",
    "LoRADense",
    "LoRAConfig",
    "LORA_TARGETS",
    "LayerNorm",
    "rope_inv_freq",
    "rope_tables",
    "apply_rope",
    "stack_layers",
    "scan_layers",
    "padding_positions",
    "REMAT_POLICIES",
]


LOGICAL_AXES = "logical_axes"  # the Variable metadata key of the names


def logical_axes(*names: str | None) -> dict[str, Any]:
    """Variable metadata naming each axis of a parameter by its logical role (``"embed"``,
    ``"heads"``, ``"kv_heads"``, ``"mlp"``, ``"vocab"``, ``"norm"``; stacked layers add
    ``"layers"`` in front). :mod:`jaxlab.sharding` maps the names to mesh axes by one table of
    rules; the parameters are created unsharded (placed by :func:`jaxlab.sharding.shard_model` or
    created in place by :func:`jaxlab.sharding.create_sharded`). The key is jaxlab's own, not
    Flax's ``out_sharding``, which Flax would resolve against whatever mesh is set."""
    return {LOGICAL_AXES: tuple(names)}


class RMSNorm(nnx.Module):
    """RMS normalisation as in Llama/Qwen: ``w * (x / sqrt(mean(x²) + eps))``, statistics in float32
    (float64 for float64 inputs), the output in the input's dtype. ``dtype`` is the weight's."""

    def __init__(self, dim: int, *, eps: float, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        del rngs
        self.weight = nnx.Param(jnp.ones((dim,), dtype), **logical_axes("norm"))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * x32.astype(x.dtype)  # HF's order of casts


class LayerNorm(nnx.Module):
    """LayerNorm with HF parameter names (``weight``, ``bias``), statistics in float32 (float64 for
    float64 inputs)."""

    def __init__(self, dim: int, *, eps: float, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        del rngs
        self.weight = nnx.Param(jnp.ones((dim,), dtype), **logical_axes("norm"))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype), **logical_axes("norm"))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = jnp.promote_types(x.dtype, jnp.float32)
        x32 = x.astype(dtype)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(dtype) + self.bias[...].astype(dtype)).astype(x.dtype)


# the decoder's projections an adapter can sit on
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """``rank`` 0: no adapters (full fine-tuning). ``alpha / rank`` scales the adapter's output.
    ``targets``: which projections of every layer get one (:data:`LORA_TARGETS`)."""

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        check(
            isinstance(self.rank, int) and self.rank >= 0, "rank", f"must be >= 0, got {self.rank}"
        )
        check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        check(not unknown, "targets", f"{unknown} are not among {list(LORA_TARGETS)}")
        check(bool(self.targets) or not self.rank, "targets", "name at least one projection")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def for_target(self, name: str) -> tuple[int, float] | None:
        """``(rank, alpha)`` for projection ``name``, or None when it gets no adapter."""
        return (self.rank, self.alpha) if self.enabled and name in self.targets else None


class LoRADense(nnx.Linear):
    """``nnx.Linear`` with a low-rank adapter (LoRA, Hu et al. 2021):
    ``y = x W + b + (alpha / r) · (x A) B``.

    ``A [in, r]`` starts uniform in ±1/sqrt(in) (PEFT's Kaiming-uniform bound) and ``B [r, out]`` at
    zero, so a new adapter leaves the layer's output unchanged. Both are ``nnx.LoRAParam`` s (a
    kind of ``nnx.Param``): ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` trains only them.
    The kernel and bias keep their names and paths, so base weights load and shard as usual.
    """

    def __init__(self, din: int, dout: int, *, rank: int, alpha: float, axes, rngs: nnx.Rngs, **kw):
        super().__init__(din, dout, rngs=rngs, **kw)
        pd = self.param_dtype
        init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")  # ±1/sqrt(in)
        self.lora_a = nnx.LoRAParam(
            init(rngs.params(), (din, rank), pd), **logical_axes(axes[0], None)
        )
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, dout), pd), **logical_axes(None, axes[1]))
        self.lora_scale = float(alpha) / rank

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        a, b = (p[...].astype(self.dtype or x.dtype) for p in (self.lora_a, self.lora_b))
        return y + (self.lora_scale * ((x.astype(a.dtype) @ a) @ b)).astype(y.dtype)


def dense(
    rngs: nnx.Rngs,
    din: int,
    dout: int,
    *,
    bias: bool = True,
    dtype=jnp.float32,
    param_dtype=None,
    axes: tuple[str | None, str | None] = (None, None),
    lora: tuple[int, float] | None = None,
) -> nnx.Linear:
    """A linear layer with the models' conventions: N(0, 0.02) init, compute in ``dtype``,
    parameters in ``param_dtype`` (default ``dtype``); ``axes`` are the logical names of the
    kernel's input and output axes (:func:`logical_axes`; the bias takes the output's).
    ``lora=(rank, alpha)`` gives a :class:`LoRADense` (an adapter on top of the same kernel)."""
    kw = dict(
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype or dtype,
        kernel_init=nnx.initializers.normal(0.02),
        kernel_metadata=logical_axes(*axes),
        bias_metadata=logical_axes(axes[1]),
        rngs=rngs,
    )
    if lora is not None:
        return LoRADense(din, dout, rank=lora[0], alpha=lora[1], axes=axes, **kw)
    return nnx.Linear(din, dout, **kw)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> np.ndarray:
    """Inverse frequencies ``[D/2]`` of rotary embeddings, with optional Llama-3 or linear scaling."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))  # "type" is HF's older key
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * np.pi / inv
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling type {kind!r}; supported: default, linear, llama3")


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)`` of each position's rotary angles, ``[B, T, D/2]`` float32 each (float64 when
    ``inv_freq`` is).

    Computed once per forward and shared by every layer: XLA on CPU otherwise fuses the cosines
    into each layer's rotation and evaluates them per head (a measurable share of a decode step; ``docs/models.md``).
    """
    inv_freq = jnp.asarray(inv_freq)
    dtype = jnp.promote_types(inv_freq.dtype, jnp.float32)  # float64 in a float64 model
    freqs = positions.astype(dtype)[..., None] * inv_freq.astype(dtype)
    return jax.lax.optimization_barrier((jnp.cos(freqs), jnp.sin(freqs)))


def apply_rope(x: jax.Array, tables: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotary embedding in HF's rotate-half convention.

    Args:
      x: ``[B, T, H, D]``.
      tables: :func:`rope_tables` of the tokens' positions, ``[B, T, D/2]`` each.
    """
    cos, sin = (jnp.concatenate([t, t], axis=-1)[:, :, None, :] for t in tables)
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def padding_positions(attention_mask: jax.Array) -> jax.Array:
    """Positions ``[B, T]`` that start at 0 on the first real token of each (left-padded) row."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def stack_layers(
    num_layers: int, make: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs
) -> nnx.Module:
    """Creates ``num_layers`` copies of a layer with parameters stacked on a leading axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(
        in_axes=(0,),
        out_axes=0,
        transform_metadata={nnx.PARTITION_NAME: "layers", LOGICAL_AXES: "layers"},
    )
    def create(r):
        return make(r)

    return create(rngs)


# What a layer keeps for its backward pass (jax.checkpoint policies), by name: "none" keeps
# everything (no recomputation), "full" keeps only the layer's input and recomputes the rest,
# "dots" keeps the matmul outputs without batch dimensions (the projections) and recomputes
# the cheap elementwise work, as maxtext's "minimal" policy does.
REMAT_POLICIES = Registry("rematerialisation policy")
REMAT_POLICIES.register("none", jax.checkpoint_policies.everything_saveable)  # no remat at all
REMAT_POLICIES.register("full", jax.checkpoint_policies.nothing_saveable)
REMAT_POLICIES.register("dots", jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


def scan_layers(
    layers: nnx.Module, body: Callable, carry: Any, xs: Any = None, *, remat: str = "none"
) -> tuple[Any, Any]:
    """Runs ``body(layer, carry, x) -> (carry, y)`` over stacked layers with ``lax.scan``.

    One compiled layer body regardless of depth keeps compile time flat in the number of layers.
    ``remat`` names what each layer keeps for the backward pass (:data:`REMAT_POLICIES`):
    activation memory for recomputation, the same gradients.
    """
    graphdef, state = nnx.split(layers)

    def step(c, inputs):
        layer_state, x = inputs
        return body(nnx.merge(graphdef, layer_state), c, x)

    if remat != "none":
        step = jax.checkpoint(step, policy=REMAT_POLICIES.get(remat), prevent_cse=False)
    return jax.lax.scan(step, carry, (state, xs))
