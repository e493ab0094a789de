"""BERT encoder (the MiniLM sentence-embedding family) in Flax NNX, with sentence-transformers' pooling
modes (mean, CLS, max, mean / sqrt(n), last token) and prompts.

Letters: B batch, T tokens, E model width, H heads.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlab.attention import attention, attention_implementations
from jaxlab.config import check, check_positive
from jaxlab.models.layers import LayerNorm, dense, logical_axes, scan_layers, stack_layers

__all__ = ["BertConfig", "BertEncoder", "pool"]

# sentence-transformers' pooling modes: mean, cls, max, mean_sqrt_len_tokens (sum / sqrt(n)),
# lasttoken (the last real token of a right-padded row)
_POOLING = ("mean", "cls", "max", "mean_sqrt_len", "lasttoken")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig:
    """Architecture and sentence-embedding settings of a BERT encoder. Defaults: tiny, for tests."""

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pooling: str = "mean"
    normalize: bool = False
    attention_implementation: str = "xla"
    # sentence-transformers' prompts: (name, prefix) pairs, e.g. (("query", "query: "),), the one
    # used when no prompt is named, and whether the prompt's tokens are pooled (include_prompt)
    prompts: tuple[tuple[str, str], ...] = ()
    default_prompt_name: str | None = None
    pool_prompt: bool = True

    def __post_init__(self):
        if isinstance(self.prompts, list | tuple):  # JSON gives lists: keep the config hashable
            pairs = tuple(tuple(p) if isinstance(p, list | tuple) else p for p in self.prompts)
            object.__setattr__(self, "prompts", pairs)
        check_positive(
            self,
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "max_position_embeddings",
            "type_vocab_size",
        )
        check(
            self.hidden_size % self.num_heads == 0,
            "num_heads",
            f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}",
        )
        check(
            self.hidden_act in ("gelu", "gelu_new", "relu"),
            "hidden_act",
            f"{self.hidden_act!r} is not one of ['gelu', 'gelu_new', 'relu']",
        )
        check(
            self.pooling in _POOLING, "pooling", f"{self.pooling!r} is not one of {list(_POOLING)}"
        )
        check(
            all(
                isinstance(p, tuple) and len(p) == 2 and all(isinstance(x, str) for x in p)
                for p in self.prompts
            ),
            "prompts",
            f"{self.prompts!r} must be (name, prefix) string pairs",
        )
        check(
            self.default_prompt_name is None or self.default_prompt_name in dict(self.prompts),
            "default_prompt_name",
            f"{self.default_prompt_name!r} is not one of the prompts {list(dict(self.prompts))}",
        )
        check(
            self.attention_implementation in attention_implementations(),
            "attention_implementation",
            f"{self.attention_implementation!r} is not one of {attention_implementations()}",
        )


_ACTS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


class BertLayer(nnx.Module):
    def __init__(self, cfg: BertConfig, *, dtype, rngs: nnx.Rngs):
        e, f = cfg.hidden_size, cfg.intermediate_size
        self.query = dense(rngs, e, e, dtype=dtype, axes=("embed", "heads"))
        self.key = dense(rngs, e, e, dtype=dtype, axes=("embed", "heads"))
        self.value = dense(rngs, e, e, dtype=dtype, axes=("embed", "heads"))
        self.attention_output = dense(rngs, e, e, dtype=dtype, axes=("heads", "embed"))
        self.attention_layernorm = LayerNorm(e, eps=cfg.layer_norm_eps, dtype=dtype)
        self.intermediate = dense(rngs, e, f, dtype=dtype, axes=("embed", "mlp"))
        self.output = dense(rngs, f, e, dtype=dtype, axes=("mlp", "embed"))
        self.output_layernorm = LayerNorm(e, eps=cfg.layer_norm_eps, dtype=dtype)
        self.cfg = cfg

    def __call__(self, x, mask):
        cfg = self.cfg
        b, t, e = x.shape
        h, d = cfg.num_heads, e // cfg.num_heads
        q = self.query(x).reshape(b, t, h, d)
        k = self.key(x).reshape(b, t, h, d)
        v = self.value(x).reshape(b, t, h, d)
        a = attention(
            q, k, v, mask, scale=1.0 / math.sqrt(d), implementation=cfg.attention_implementation
        )
        x = self.attention_layernorm(x + self.attention_output(a.reshape(b, t, e)))
        y = self.output(_ACTS[cfg.hidden_act](self.intermediate(x)))
        return self.output_layernorm(x + y)


class BertEncoder(nnx.Module):
    """BERT encoder: ``model(input_ids, attention_mask=...)`` gives hidden states ``[B, T, E]``.

    :meth:`embed` pools them into sentence embeddings ``[B, E]`` by the config's pooling and
    normalisation settings.
    """

    def __init__(self, cfg: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = dtype
        e = cfg.hidden_size
        init = nnx.initializers.normal(0.02)
        self.word_embeddings = nnx.Embed(
            cfg.vocab_size,
            e,
            dtype=dtype,
            param_dtype=dtype,
            embedding_init=init,
            embedding_metadata=logical_axes("vocab", "embed"),
            rngs=rngs,
        )
        self.position_embeddings = nnx.Embed(
            cfg.max_position_embeddings,
            e,
            dtype=dtype,
            param_dtype=dtype,
            embedding_init=init,
            embedding_metadata=logical_axes("positions", "embed"),
            rngs=rngs,
        )
        self.token_type_embeddings = nnx.Embed(
            cfg.type_vocab_size,
            e,
            dtype=dtype,
            param_dtype=dtype,
            embedding_init=init,
            embedding_metadata=logical_axes("token_types", "embed"),
            rngs=rngs,
        )
        self.embeddings_layernorm = LayerNorm(e, eps=cfg.layer_norm_eps, dtype=dtype)
        self.layers = stack_layers(
            cfg.num_layers, lambda r: BertLayer(cfg, dtype=dtype, rngs=r), rngs
        )

    def __call__(
        self,
        input_ids: jax.Array,  # [B, T]
        *,
        attention_mask: jax.Array | None = None,  # [B, T], 1 = real token
        token_type_ids: jax.Array | None = None,  # [B, T]
    ) -> jax.Array:  # [B, T, E]
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
        b, t = input_ids.shape
        if t > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {t} exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}; truncate the input"
            )
        return self.from_word_embeddings(
            self.word_embeddings(input_ids),
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
        )

    def from_word_embeddings(
        self,
        word_embeddings: jax.Array,  # [B, T, E]: the token embeddings (e.g. to differentiate by)
        *,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:  # [B, T, E]
        """The encoder from token embeddings on (positions, token types and the layers added here)."""
        b, t, _ = word_embeddings.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, t), jnp.int32)
        x = (
            word_embeddings
            + self.position_embeddings(jnp.arange(t))[None]
            + self.token_type_embeddings(token_type_ids)
        )
        x = self.embeddings_layernorm(x)
        mask = jnp.broadcast_to(attention_mask.astype(bool)[:, None, :], (b, t, t))
        x, _ = scan_layers(self.layers, lambda layer, h, _: (layer(h, mask), None), x)
        return x

    def embed(
        self, input_ids, *, attention_mask=None, token_type_ids=None, pool_mask=None
    ) -> jax.Array:
        """Sentence embeddings ``[B, E]`` in float32, pooled and (if configured) L2-normalised.
        ``pool_mask`` ``[B, T]`` (default: the attention mask) picks the tokens pooled, e.g.
        without a prompt's tokens when the model does not pool them."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        hidden = self(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        mask = attention_mask if pool_mask is None else pool_mask
        return pool(hidden, mask, self.config.pooling, self.config.normalize)


def pool(hidden: jax.Array, attention_mask: jax.Array, mode: str = "mean", normalize: bool = False):
    """Pools hidden states ``[B, T, E]`` over real tokens into ``[B, E]`` float32 (float64 for
    float64 states)."""
    h = hidden.astype(jnp.promote_types(hidden.dtype, jnp.float32))
    m = attention_mask.astype(h.dtype)[..., None]
    if mode == "mean":
        out = jnp.sum(h * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
    elif mode == "cls":
        out = h[:, 0]
    elif mode == "max":
        out = jnp.max(jnp.where(m > 0, h, -1e9), axis=1)
    elif mode == "mean_sqrt_len":
        out = jnp.sum(h * m, axis=1) / jnp.sqrt(jnp.maximum(jnp.sum(m, axis=1), 1e-9))
    elif mode == "lasttoken":  # the last real token (rows padded on the right)
        t = h.shape[1]
        last = jnp.max(jnp.where(m[..., 0] > 0, jnp.arange(t)[None], 0), axis=1)
        out = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
    else:
        raise ValueError(f"unknown pooling {mode!r}; known: {list(_POOLING)}")
    if normalize:
        out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return out
