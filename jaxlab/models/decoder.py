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

from jaxlab.attention import ATTENTION_IMPLEMENTATIONS, RingConfig, attention
from jaxlab.config import check, check_positive, from_dict
from jaxlab.models.archs import DECODER_ARCHS
from jaxlab.models.layers import (
    REMAT_POLICIES,
    LoRAConfig,
    RMSNorm,
    apply_rope,
    dense,
    logical_axes,
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
    # what each stacked layer keeps for the backward pass (jaxlab.models.layers.REMAT_POLICIES:
    # none, full, dots): memory for recomputation in training; generation is unaffected
    remat: str = "none"

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
        REMAT_POLICIES.check(self.remat, "remat")
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
    )  # [L, B, K, S, D], or L arrays [B, K, S, D] (unrolled layers)
    v: jax.Array | tuple[jax.Array, ...]
    index: jax.Array  # [B] int32
    valid: jax.Array  # [B, S] bool


def _lora_for(lora: LoRAConfig | None, name: str) -> tuple[int, float] | None:
    return None if lora is None else lora.for_target(name)


class Attention(nnx.Module):
    def __init__(
        self,
        cfg: DecoderConfig,
        *,
        dtype,
        param_dtype=None,
        lora: LoRAConfig | None = None,
        rngs: nnx.Rngs,
    ):
        e, h, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
        pd = param_dtype or dtype
        kw = dict(bias=cfg.attention_bias, dtype=dtype, param_dtype=pd)
        q_axes, kv_axes = ("embed", "heads"), ("embed", "kv_heads")
        self.q_proj = dense(rngs, e, h * d, axes=q_axes, lora=_lora_for(lora, "q_proj"), **kw)
        self.k_proj = dense(rngs, e, k * d, axes=kv_axes, lora=_lora_for(lora, "k_proj"), **kw)
        self.v_proj = dense(rngs, e, k * d, axes=kv_axes, lora=_lora_for(lora, "v_proj"), **kw)
        self.o_proj = dense(
            rngs,
            h * d,
            e,
            bias=cfg.attention_out_bias,
            dtype=dtype,
            param_dtype=pd,
            axes=("heads", "embed"),
            lora=_lora_for(lora, "o_proj"),
        )
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, eps=cfg.rms_norm_eps, dtype=pd)
            self.k_norm = RMSNorm(d, eps=cfg.rms_norm_eps, dtype=pd)
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
        out = self._attend(q, k, v, mask, layout)
        return self.o_proj(out.reshape(b, t, cfg.num_heads * d)), kv

    def _attend(self, q, k, v, mask, kv_layout):
        """The attention itself, by the configured implementation (a subclass may replace it)."""
        cfg = self.cfg
        return attention(
            q,
            k,
            v,
            mask,
            implementation=cfg.attention_implementation,
            kv_layout=kv_layout,
            config=cfg.attention_config,
        )


class MLP(nnx.Module):
    def __init__(
        self,
        cfg: DecoderConfig,
        *,
        dtype,
        param_dtype=None,
        lora: LoRAConfig | None = None,
        rngs: nnx.Rngs,
    ):
        e, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype or dtype)
        self.gate_proj = dense(
            rngs, e, f, axes=("embed", "mlp"), lora=_lora_for(lora, "gate_proj"), **kw
        )
        self.up_proj = dense(
            rngs, e, f, axes=("embed", "mlp"), lora=_lora_for(lora, "up_proj"), **kw
        )
        self.down_proj = dense(
            rngs, f, e, axes=("mlp", "embed"), lora=_lora_for(lora, "down_proj"), **kw
        )

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    attention_cls = Attention  # subclasses may use their own attention module

    def __init__(
        self,
        cfg: DecoderConfig,
        *,
        dtype,
        param_dtype=None,
        lora: LoRAConfig | None = None,
        rngs: nnx.Rngs,
    ):
        pd = param_dtype or dtype
        kw = {} if lora is None else {"lora": lora}  # subclasses' modules may take no lora
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=pd)
        self.self_attn = self.attention_cls(cfg, dtype=dtype, param_dtype=pd, rngs=rngs, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=pd)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=pd, rngs=rngs, **kw)

    def __call__(self, x, rope, mask, kv=None, index=None):
        h, kv = self.self_attn(self.input_layernorm(x), rope, mask, kv, index)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class Decoder(nnx.Module):
    """Decoder-only transformer LM.

    ``model(input_ids)`` gives float32 logits ``[B, T, V]`` (float64 for a float64 model, which
    computes in float64 throughout: the tests' finite-difference reference). ``dtype`` is the
    compute dtype (activations, KV cache), ``param_dtype`` the weights' (default ``dtype``):
    ``dtype=bfloat16, param_dtype=float32`` is mixed precision with float32 master weights.
    ``lora`` (:class:`jaxlab.models.lora.LoRAConfig`) puts low-rank adapters on the projections
    (:func:`jaxlab.models.lora.add_lora` adds them to a built model).
    Every parameter names its axes (:func:`jaxlab.models.layers.logical_axes`) for sharding. Left-padded batches
    are exact when ``attention_mask`` is given: positions then start at 0 on each row's first real
    token.
    With ``cache=`` the call also returns the updated :class:`KVCache`.
    """

    layer_cls = DecoderLayer  # subclasses may use their own layer module

    def __init__(
        self,
        cfg: DecoderConfig,
        *,
        dtype=jnp.float32,
        param_dtype=None,
        lora: LoRAConfig | None = None,
        rngs: nnx.Rngs,
    ):
        self.config = cfg
        self.dtype = dtype
        self.param_dtype = pd = param_dtype or dtype
        lora = lora if lora is not None and lora.enabled else None
        self.lora = lora
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dtype,
            param_dtype=pd,
            embedding_init=nnx.initializers.normal(0.02),
            embedding_metadata=logical_axes("vocab", "embed"),
            rngs=rngs,
        )

        def layer(r):
            kw = {} if lora is None else {"lora": lora}
            return self.layer_cls(cfg, dtype=dtype, param_dtype=pd, rngs=r, **kw)

        if not cfg.scan_layers:
            self.layers = nnx.List([layer(rngs) for _ in range(cfg.num_layers)])
        else:
            self.layers = stack_layers(cfg.num_layers, layer, rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=pd)
        if not cfg.tie_word_embeddings:
            self.lm_head = dense(
                rngs,
                cfg.hidden_size,
                cfg.vocab_size,
                bias=False,
                dtype=dtype,
                param_dtype=pd,
                axes=("embed", "vocab"),
            )

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

    # -- overridable pieces (an accelerator seam such as jaxlab.native's decoding model
    # replaces these on a decoding copy; the model itself knows no kernels) -------------------
    def _unrolled_layers(self, x, rope, mask, index, kv):
        """Runs the layers one module at a time (``scan_layers=False``): decoding then reads each
        layer's weights in place. ``kv``: per-layer caches or None; returns ``(x, new kv)``."""
        outs = []
        for i, layer in enumerate(self.layers):
            x, layer_kv = layer(x, rope, mask, None if kv is None else (kv[0][i], kv[1][i]), index)
            outs.append(layer_kv)
        if kv is None:
            return x, None
        return x, (tuple(o[0] for o in outs), tuple(o[1] for o in outs))

    def _tied_logits(self, x):
        """``x @ embedding.T``: the tied output projection."""
        table = self.embed_tokens.embedding[...].astype(x.dtype)
        return jax.lax.dot_general(
            x,
            table,
            (((x.ndim - 1,), (1,)), ((), ())),
            preferred_element_type=jnp.promote_types(x.dtype, jnp.float32),
        )

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """Logits ``[..., V]`` from hidden states ``[..., D]`` after the final norm (what
        ``return_hidden=True`` gives): a trainer that needs the logits at a few positions only
        gathers those hidden states first and projects them here."""
        if self.config.tie_word_embeddings:
            out = self._tied_logits(hidden)
        else:
            out = self.lm_head(hidden)
        return out.astype(jnp.promote_types(self.dtype, jnp.float32))

    def __call__(
        self,
        input_ids: jax.Array,  # [B, T] int
        *,
        positions: jax.Array | None = None,  # [B, T] int
        attention_mask: jax.Array | None = None,  # [B, T], 1 = real token, 0 = padding
        cache: KVCache | None = None,
        return_hidden: bool = False,
        logits_to_keep: int | None = None,
        segment_ids: jax.Array | None = None,  # [B, T] int: packed documents, 0 = padding
    ):
        """Logits ``[B, T, V]`` (or hidden states with ``return_hidden``); with ``cache`` also the
        updated cache. ``logits_to_keep=n`` computes them for the last ``n`` positions only
        (prefill needs one: the vocabulary projection is a large share of a small model's prefill).

        ``segment_ids`` (training on packed rows, no cache): a token attends only to earlier
        tokens of its own segment (id > 0), and positions restart at each segment's first token
        unless ``positions`` are given; each document then gives the logits it gives alone."""
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
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids are for training on packed rows, not with a cache")
            if segment_ids.shape != (b, t):
                raise ValueError(f"segment_ids {segment_ids.shape} must match {input_ids.shape}")
            token_valid = token_valid & (segment_ids > 0)
            if positions is None:  # restart at each segment's first token
                idx = jnp.arange(t)[None]
                first = jnp.concatenate(
                    [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
                )
                positions = idx - jax.lax.cummax(jnp.where(first, idx, 0), axis=1)

        if cache is None:
            if positions is None:
                positions = padding_positions(token_valid)
            causal = jnp.tril(jnp.ones((t, t), bool))
            mask = causal[None] & token_valid[:, None, :]
            if segment_ids is not None:
                mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
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
            rope_inv_freq(cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling),
            jnp.promote_types(self.dtype, jnp.float32),
        )

        rope = rope_tables(positions, inv_freq)  # once, for every layer

        if cfg.scan_layers:
            x, new_kv = scan_layers(
                self.layers,
                lambda layer, h, kv_l: layer(h, rope, mask, kv_l, index),
                x,
                kv,
                remat=cfg.remat if kv is None else "none",
            )
        else:
            x, new_kv = self._unrolled_layers(x, rope, mask, index, kv)
        if logits_to_keep is not None:
            if not 1 <= logits_to_keep <= t:
                raise ValueError(f"logits_to_keep must lie in [1, {t}], got {logits_to_keep}")
            x = x[:, t - logits_to_keep :]
        x = self.norm(x)
        out = x if return_hidden else self.logits_from_hidden(x)
        if cache is None:
            return out
        return out, KVCache(k=new_kv[0], v=new_kv[1], index=cache.index + t, valid=valid)


def with_layer_layout(model: Decoder, scan_layers: bool) -> Decoder:
    """The same model with its layers stacked (``scan_layers=True``) or one module per layer.

    Returns ``model`` itself when it already has that layout; otherwise a new module whose arrays
    are copies (slices of the stacked arrays, or their stack).
    """
    cfg = model.config
    if cfg.scan_layers == scan_layers:
        return model
    new_cfg = dataclasses.replace(cfg, scan_layers=scan_layers)
    kw = dict(dtype=model.dtype, param_dtype=model.param_dtype, lora=getattr(model, "lora", None))
    abstract = nnx.eval_shape(lambda: Decoder(new_cfg, rngs=nnx.Rngs(0), **kw))
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
