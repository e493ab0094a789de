"""Decoder-only LM covering the Llama / Qwen2 / Qwen3 / SmolLM family, in Flax NNX.

Letters: B batch, T new tokens, S cache slots, L layers, H query heads, K key/value heads,
D head dim, E model width, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlab import native
from jaxlab.attention import ATTENTION_IMPLEMENTATIONS, RingConfig, attention
from jaxlab.config import check, check_positive, from_dict
from jaxlab.models.archs import DECODER_ARCHS
from jaxlab.models.layers import (
    RMSNorm,
    apply_rope,
    dense,
    padding_positions,
    rope_inv_freq,
    rope_tables,
    scan_layers,
    stack_layers,
)

__all__ = ["DecoderConfig", "Decoder", "KVCache", "with_layer_layout"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """Architecture of a decoder LM. Defaults are a tiny Llama for tests."""

    arch: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    attention_out_bias: bool = False  # bias on the output projection (Llama's attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"
    attention_implementation: str = "xla"  # a name in jaxlab.attention.ATTENTION_IMPLEMENTATIONS
    # options of attention_implementation="ring" (None: RingConfig's defaults); ring attention runs
    # over the mesh set with jax.set_mesh, for training / prefill of unpadded causal sequences.
    # A mapping is converted (and validated) on construction.
    ring: RingConfig | None = None
    # True: layers stacked on a leading axis and run with lax.scan (fast compiles, for training);
    # False: one module per layer, unrolled (fastest decoding: weights are read in place).
    scan_layers: bool = True

    def __post_init__(self):
        DECODER_ARCHS.check(self.arch, "arch")
        check_positive(
            self,
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "max_position_embeddings",
        )
        check(
            self.num_heads % self.num_kv_heads == 0,
            "num_kv_heads",
            f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}",
        )
        check(
            self.head_dim is not None or self.hidden_size % self.num_heads == 0,
            "head_dim",
            f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; give head_dim",
        )
        check(
            self.head_dim is None or self.head_dim > 0,
            "head_dim",
            f"must be positive, got {self.head_dim}",
        )
        check(
            self.dim_per_head % 2 == 0,
            "head_dim",
            f"the per-head size must be even for RoPE, got {self.dim_per_head}",
        )
        check(self.rope_theta > 0, "rope_theta", f"must be positive, got {self.rope_theta}")
        check(self.rms_norm_eps > 0, "rms_norm_eps", f"must be positive, got {self.rms_norm_eps}")
        check(
            self.hidden_act == "silu",
            "hidden_act",
            f"only 'silu' (SwiGLU) is supported, got {self.hidden_act!r}",
        )
        ATTENTION_IMPLEMENTATIONS.check(self.attention_implementation, "attention_implementation")
        if isinstance(self.ring, dict):
            object.__setattr__(self, "ring", from_dict(RingConfig, self.ring, prefix="ring."))
        check(
            self.ring is None or isinstance(self.ring, RingConfig),
            "ring",
            f"must be a RingConfig, a mapping or None, got {self.ring!r}",
        )
        try:
            rope_inv_freq(self.dim_per_head, self.rope_theta, self.rope_scaling)
        except (ValueError, KeyError) as e:
            check(False, "rope_scaling", str(e))

    def __hash__(self):  # rope_scaling is a dict; configs are static metadata of jitted modules
        return hash(tuple(_frozen(getattr(self, f.name)) for f in dataclasses.fields(self)))

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def attention_config(self) -> RingConfig | None:
        """The options the attention implementation takes (its registered config type), or None."""
        wanted = ATTENTION_IMPLEMENTATIONS.get(self.attention_implementation).config
        return self.ring if wanted is not None and isinstance(self.ring, wanted) else None


def _frozen(value):
    """A hashable value equal where ``value`` is equal: dicts as sorted items, lists as tuples."""
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


class KVCache(NamedTuple):
    """Preallocated per-layer keys and values with per-row write positions.

    ``index[b]`` is the next slot row b writes; ``valid[b, s]`` says slot s holds a real token.
    Writing past ``S`` slots is the caller's error (slices clamp).
    """

    k: (
        jax.Array | tuple[jax.Array, ...]
    )  # [L, B, S, K, D], or L arrays [B, S, K, D] (unrolled layers)
    v: jax.Array | tuple[jax.Array, ...]
    index: jax.Array  # [B] int32
    valid: jax.Array  # [B, S] bool


class Attention(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, rngs: nnx.Rngs):
        e, h, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
        self.q_proj = dense(rngs, e, h * d, bias=cfg.attention_bias, dtype=dtype)
        self.k_proj = dense(rngs, e, k * d, bias=cfg.attention_bias, dtype=dtype)
        self.v_proj = dense(rngs, e, k * d, bias=cfg.attention_bias, dtype=dtype)
        self.o_proj = dense(rngs, h * d, e, bias=cfg.attention_out_bias, dtype=dtype)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, eps=cfg.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(d, eps=cfg.rms_norm_eps, dtype=dtype)
        self.cfg = cfg

    def __call__(self, x, rope, mask, kv=None, index=None):
        cfg = self.cfg
        b, t, _ = x.shape
        d = cfg.dim_per_head
        q = self.q_proj(x).reshape(b, t, cfg.num_heads, d)
        k = self.k_proj(x).reshape(b, t, cfg.num_kv_heads, d)
        v = self.v_proj(x).reshape(b, t, cfg.num_kv_heads, d)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, rope)
        k = apply_rope(k, rope)
        layout = "bskd"
        if kv is not None:  # write the new keys/values into each row's slots, attend over the cache
            write = jax.vmap(lambda c, new, i: jax.lax.dynamic_update_slice(c, new, (0, i, 0)))
            k = write(kv[0], jnp.swapaxes(k, 1, 2).astype(kv[0].dtype), index)
            v = write(kv[1], jnp.swapaxes(v, 1, 2).astype(kv[1].dtype), index)
            kv, layout = (k, v), "bksd"
        out = attention(
            q,
            k,
            v,
            mask,
            implementation=cfg.attention_implementation,
            kv_layout=layout,
            config=cfg.attention_config,
        )
        return self.o_proj(out.reshape(b, t, cfg.num_heads * d)), kv


class MLP(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, rngs: nnx.Rngs):
        e, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = dense(rngs, e, f, bias=cfg.mlp_bias, dtype=dtype)
        self.up_proj = dense(rngs, e, f, bias=cfg.mlp_bias, dtype=dtype)
        self.down_proj = dense(rngs, f, e, bias=cfg.mlp_bias, dtype=dtype)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, rope, mask, kv=None, index=None):
        h, kv = self.self_attn(self.input_layernorm(x), rope, mask, kv, index)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv

    def native_weights(self, packed: bool = False) -> tuple[jax.Array, ...]:
        """The weights in :func:`jaxlab.native.decoder_layer`'s order; with ``packed``, its
        matrices in column strips (the copy :func:`with_packed_weights` attached)."""
        ln1, ln2 = self.input_layernorm.weight[...], self.post_attention_layernorm.weight[...]
        if packed:
            wq, wk, wv, wo, wg, wu, wd = self.packed_weights.get_value()
        else:
            wq, wk, wv, wo, wg, wu, wd = (p.kernel[...] for p in self._projections())
        return ln1, wq, wk, wv, wo, ln2, wg, wu, wd

    def _projections(self):
        attn, mlp = self.self_attn, self.mlp
        return (
            attn.q_proj,
            attn.k_proj,
            attn.v_proj,
            attn.o_proj,
            mlp.gate_proj,
            mlp.up_proj,
            mlp.down_proj,
        )


class Decoder(nnx.Module):
    """Decoder-only transformer LM.

    ``model(input_ids)`` gives float32 logits ``[B, T, V]``. Left-padded batches are exact when
    ``attention_mask`` is given: positions then start at 0 on each row's first real token.
    With ``cache=`` the call also returns the updated :class:`KVCache`.
    """

    def __init__(self, cfg: DecoderConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = dtype
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dtype,
            param_dtype=dtype,
            embedding_init=nnx.initializers.normal(0.02),
            rngs=rngs,
        )
        if not cfg.scan_layers:
            self.layers = nnx.List(
                [DecoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)]
            )
        else:
            self.layers = stack_layers(
                cfg.num_layers, lambda r: DecoderLayer(cfg, dtype=dtype, rngs=r), rngs
            )
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = dense(rngs, cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)

    def _has_packed_weights(self) -> bool:  # attached by with_packed_weights
        return not self.config.scan_layers and hasattr(self.layers[0], "packed_weights")

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
        """An empty cache of ``max_len`` slots per row."""
        cfg = self.config
        shape = (batch_size, cfg.num_kv_heads, max_len, cfg.dim_per_head)  # heads before slots
        dtype = dtype or self.dtype
        if cfg.scan_layers:
            k = jnp.zeros((cfg.num_layers, *shape), dtype)
            v = jnp.zeros((cfg.num_layers, *shape), dtype)
        else:
            k = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
            v = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        return KVCache(
            k=k,
            v=v,
            index=jnp.zeros((batch_size,), jnp.int32),
            valid=jnp.zeros((batch_size, max_len), bool),
        )

    def __call__(
        self,
        input_ids: jax.Array,  # [B, T] int
        *,
        positions: jax.Array | None = None,  # [B, T] int
        attention_mask: jax.Array | None = None,  # [B, T], 1 = real token, 0 = padding
        cache: KVCache | None = None,
        return_hidden: bool = False,
        logits_to_keep: int | None = None,
    ):
        """Logits ``[B, T, V]`` (or hidden states with ``return_hidden``); with ``cache`` also the
        updated cache. ``logits_to_keep=n`` computes them for the last ``n`` positions only
        (prefill needs one: the vocabulary projection is ~20% of SmolLM2's prefill FLOPs)."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        if attention_mask.shape != (b, t):
            raise ValueError(
                f"attention_mask {attention_mask.shape} must match input_ids {input_ids.shape}"
            )
        token_valid = attention_mask.astype(bool)

        if cache is None:
            if positions is None:
                positions = padding_positions(token_valid)
            causal = jnp.tril(jnp.ones((t, t), bool))
            mask = causal[None] & token_valid[:, None, :]
            kv, index = None, None
        else:
            s = cache.valid.shape[1]
            slots = cache.index[:, None] + jnp.arange(t)[None]  # [B, T] slot of each new token
            if positions is None:
                seen = jnp.sum(cache.valid, axis=-1, dtype=jnp.int32)
                positions = seen[:, None] + padding_positions(token_valid)
            write = jax.vmap(lambda c, new, i: jax.lax.dynamic_update_slice(c, new, (i,)))
            valid = write(cache.valid, token_valid, cache.index)
            mask = valid[:, None, :] & (jnp.arange(s)[None, None, :] <= slots[:, :, None])
            kv, index = (cache.k, cache.v), cache.index

        x = self.embed_tokens(input_ids)
        cfg = self.config
        inv_freq = jnp.asarray(
            rope_inv_freq(cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling), jnp.float32
        )

        rope = rope_tables(positions, inv_freq)  # once, for every layer

        def body(layer, h, layer_kv):
            return layer(h, rope, mask, layer_kv, index)

        if cfg.scan_layers:
            x, new_kv = scan_layers(self.layers, body, x, kv)
        elif kv is not None and _native_layers(
            cfg, x, kv[0][0], has_packed := self._has_packed_weights()
        ):
            # over a cache on CPU: each layer is one native call that updates its cache in place
            ks, vs = [], []
            packed = has_packed and native.use_strips(x, b * t)
            for i, layer in enumerate(self.layers):
                weights = layer.native_weights(packed)
                x, k_i, v_i = native.decoder_layer(
                    x,
                    *rope,
                    mask,
                    index,
                    kv[0][i],
                    kv[1][i],
                    weights,
                    eps=cfg.rms_norm_eps,
                    scale=cfg.dim_per_head**-0.5,
                    packed=packed,
                )
                ks.append(k_i)
                vs.append(v_i)
            new_kv = (tuple(ks), tuple(vs))
        else:  # one array per layer: decoding reads each layer's weights in place
            outs = []
            for i, layer in enumerate(self.layers):
                x, layer_kv = body(layer, x, None if kv is None else (kv[0][i], kv[1][i]))
                outs.append(layer_kv)
            new_kv = None if kv is None else (tuple(o[0] for o in outs), tuple(o[1] for o in outs))
        if logits_to_keep is not None:
            if not 1 <= logits_to_keep <= t:
                raise ValueError(f"logits_to_keep must lie in [1, {t}], got {logits_to_keep}")
            x = x[:, t - logits_to_keep :]
        x = self.norm(x)
        if return_hidden:
            out = x
        elif self.config.tie_word_embeddings:  # x @ embedding.T, through the native few-row path
            table = self.embed_tokens.embedding[...]
            packed = getattr(self, "packed_head", None)
            rows = x.shape[0] * x.shape[1]
            if packed is not None and native.use_strips(x, rows):
                out = native.strips_matmul(x.reshape(rows, -1), packed.get_value())
                out = out.reshape(*x.shape[:2], -1)
            else:
                out = native.dot_general(x, table, (((x.ndim - 1,), (1,)), ((), ())))
            out = out.astype(jnp.float32)
        else:
            out = self.lm_head(x).astype(jnp.float32)
        if cache is None:
            return out
        return out, KVCache(k=new_kv[0], v=new_kv[1], index=cache.index + t, valid=valid)


def _plain_llama(cfg: DecoderConfig) -> bool:
    """Layers :func:`jaxlab.native.decoder_layer` covers: no biases, no q/k norms, dense
    attention."""
    extras = cfg.attention_bias or cfg.attention_out_bias or cfg.mlp_bias or cfg.qk_norm
    return not extras and cfg.attention_implementation == "xla"


def _native_layers(cfg: DecoderConfig, x: jax.Array, k_cache: jax.Array, packed: bool) -> bool:
    """Whether each layer runs as one :func:`jaxlab.native.decoder_layer` call over the cache: a
    plain Llama layer in float32 on CPU."""
    return _plain_llama(cfg) and native.use_decoder_layer(x, k_cache, packed)


class PackedWeights(nnx.Variable):
    """Matrices in the native kernels' column-strip layout (:func:`jaxlab.native.pack_strips`):
    a decoding copy derived from the parameters, not a parameter itself."""


def packs_weights(model: Decoder) -> bool:
    """Whether generation reads :func:`with_packed_weights`: one module per layer, plain Llama
    layers (the ones decoding runs as :func:`jaxlab.native.decoder_layer`), float32 on CPU with
    the native kernels (:func:`jaxlab.native.use_strips`)."""
    cfg = model.config
    return (
        _plain_llama(cfg)
        and not cfg.scan_layers
        and native.use_strips(model.embed_tokens.embedding[...], native.strips_min_rows())
    )


def with_packed_weights(model: Decoder) -> Decoder:
    """A module tree over ``model``'s arrays (no copies) whose layers also carry their seven
    projection matrices packed in column strips, and the tied head ``embedding.T`` likewise.

    Decoding on CPU reads these: many-row decode steps are compute-bound, and strips stream as
    contiguous memory through register tiles that span the whole depth (see
    :func:`jaxlab.native.strips_matmul`). It costs one more copy of those matrices in memory.
    """
    copy = nnx.merge(*nnx.split(model))
    pack = jax.jit(lambda ws: tuple(native.pack_strips(w) for w in ws))
    for layer in copy.layers:
        layer.packed_weights = PackedWeights(pack([p.kernel[...] for p in layer._projections()]))
    if model.config.tie_word_embeddings:
        table = model.embed_tokens.embedding[...]
        copy.packed_head = PackedWeights(jax.jit(lambda e: native.pack_strips(e.T))(table))
    return copy


def with_layer_layout(model: Decoder, scan_layers: bool) -> Decoder:
    """The same model with its layers stacked (``scan_layers=True``) or one module per layer.

    Returns ``model`` itself when it already has that layout; otherwise a new module whose arrays
    are copies (slices of the stacked arrays, or their stack).
    """
    cfg = model.config
    if cfg.scan_layers == scan_layers:
        return model
    new_cfg = dataclasses.replace(cfg, scan_layers=scan_layers)
    abstract = nnx.eval_shape(lambda: Decoder(new_cfg, dtype=model.dtype, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    source = {tuple(str(k) for k in path): v for path, v in nnx.to_flat_state(nnx.state(model))}
    leaves = []
    for path, var in nnx.to_flat_state(abstract_state):
        key = tuple(str(k) for k in path)
        if key[0] != "layers":
            value = source[key][...]
        elif scan_layers:  # ('layers', rest...) <- stack of ('layers', i, rest...)
            value = jnp.stack(
                [source[("layers", str(i), *key[1:])][...] for i in range(cfg.num_layers)]
            )
        else:  # ('layers', i, rest...) <- ('layers', rest...)[i]
            value = source[("layers", *key[2:])][...][int(key[1])]
        leaves.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))
