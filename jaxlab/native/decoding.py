"""The one seam between jaxlab's models and the native CPU kernels: :func:`prepare_for_decoding`.

Generation calls it on the model it decodes with. On CPU, in float32, with the kernels built, it
returns a :class:`NativeDecoder` over the same arrays: a :class:`~jaxlab.models.Decoder` whose
decode steps run each plain Llama layer as one :func:`jaxlab.native.decoder_layer` call, whose
few-row matmuls, attention over the KV cache and tied head use the native kernels, whose layers
also carry their matrices packed in column strips for prefills and many-row steps
(:func:`jaxlab.native.pack_strips`), and whose weights and caches live on huge pages. Everywhere
else (GPU, bfloat16, ``JAXLAB_NATIVE=0``, no compiler) it returns the model unchanged. Models,
training and encoders never reach the kernels, and never trigger a compiler build.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlab import native
from jaxlab.models.decoder import Attention, Decoder, DecoderConfig, DecoderLayer, KVCache

__all__ = [
    "prepare_for_decoding",
    "NativeDecoder",
    "NativeAttention",
    "PackedWeights",
    "native_weights",
]


class NativeAttention(Attention):
    """Attention over the KV cache (``bksd``) by :func:`jaxlab.native.cache_attention` where it
    applies (the default dense attention, float32 on CPU, kernels built); otherwise as
    :class:`~jaxlab.models.decoder.Attention`."""

    def _attend(self, q, k, v, mask, kv_layout):
        if (
            kv_layout == "bksd"
            and self.cfg.attention_implementation == "xla"
            and native.use_cache_attention(q, k, v)
        ):
            return native.cache_attention(q, k, v, mask, scale=q.shape[-1] ** -0.5)
        return super()._attend(q, k, v, mask, kv_layout)


class NativeDecoderLayer(DecoderLayer):
    attention_cls = NativeAttention


class PackedWeights(nnx.Variable):
    """Matrices in the native kernels' column-strip layout (:func:`jaxlab.native.pack_strips`):
    a decoding copy derived from the parameters, not a parameter itself."""


def _plain_llama(cfg: DecoderConfig) -> bool:
    """Layers :func:`jaxlab.native.decoder_layer` covers: no biases, no q/k norms, the default
    dense attention."""
    extras = cfg.attention_bias or cfg.attention_out_bias or cfg.mlp_bias or cfg.qk_norm
    return not extras and cfg.attention_implementation == "xla"


def _projections(layer):
    attn, mlp = layer.self_attn, layer.mlp
    return (
        attn.q_proj,
        attn.k_proj,
        attn.v_proj,
        attn.o_proj,
        mlp.gate_proj,
        mlp.up_proj,
        mlp.down_proj,
    )


def native_weights(layer, packed: bool = False) -> tuple[jax.Array, ...]:
    """A decoder layer's weights in :func:`jaxlab.native.decoder_layer`'s order; with ``packed``,
    its matrices in column strips (the copy :func:`prepare_for_decoding` attached)."""
    ln1, ln2 = layer.input_layernorm.weight[...], layer.post_attention_layernorm.weight[...]
    if packed:
        wq, wk, wv, wo, wg, wu, wd = layer.packed_weights.get_value()
    else:
        wq, wk, wv, wo, wg, wu, wd = (p.kernel[...] for p in _projections(layer))
    return ln1, wq, wk, wv, wo, ln2, wg, wu, wd


class NativeDecoder(Decoder):
    """A :class:`Decoder` whose decoding runs on the native CPU kernels (see the module doc).

    Built by :func:`prepare_for_decoding`, never directly: its linear layers send few-row matmuls
    to :func:`jaxlab.native.dot_general`, and it may carry packed copies of its matrices.
    """

    layer_cls = NativeDecoderLayer

    def __init__(self, cfg: DecoderConfig, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for _, module in self.iter_modules():
            if isinstance(module, nnx.Linear):
                module.dot_general = native.dot_general

    def _packed(self) -> bool:
        return hasattr(self.layers[0], "packed_weights")

    def _unrolled_layers(self, x, rope, mask, index, kv):
        cfg = self.config
        if kv is None or not _plain_llama(cfg):
            return super()._unrolled_layers(x, rope, mask, index, kv)
        b, t = x.shape[0], x.shape[1]
        packed = self._packed() and native.use_strips(x, b * t)
        if not native.use_decoder_layer(x, kv[0][0], packed):
            return super()._unrolled_layers(x, rope, mask, index, kv)
        # over a cache: each layer is one native call that updates its cache in place
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            x, k_i, v_i = native.decoder_layer(
                x,
                *rope,
                mask,
                index,
                kv[0][i],
                kv[1][i],
                native_weights(layer, packed),
                eps=cfg.rms_norm_eps,
                scale=cfg.dim_per_head**-0.5,
                packed=packed,
            )
            ks.append(k_i)
            vs.append(v_i)
        return x, (tuple(ks), tuple(vs))

    def _tied_logits(self, x):
        """``x @ embedding.T`` by the packed head (many rows) or the few-row kernel."""
        rows = x.shape[0] * x.shape[1]
        packed = getattr(self, "packed_head", None)
        if packed is not None and native.use_strips(x, rows):
            out = native.strips_matmul(x.reshape(rows, -1), packed.get_value())
            return out.reshape(*x.shape[:2], -1)
        table = self.embed_tokens.embedding[...]
        return native.dot_general(x, table, (((x.ndim - 1,), (1,)), ((), ())))

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
        cache = super().init_cache(batch_size, max_len, dtype)
        native.advise_huge_pages(jax.tree.leaves(cache))  # each decode step reads it all
        return cache

    @staticmethod
    def greedy_tokens(logits):
        """The fused ``(argmax, log-prob)`` of generation's greedy path (XLA's argmax is a slow
        scalar loop on CPU)."""
        if native.use_greedy_tokens(logits):
            return native.greedy_tokens(logits)
        return native.reference.greedy_tokens(logits)


def _applies(model: Decoder) -> bool:
    return (
        jax.default_backend() == "cpu"
        and model.dtype == jnp.float32
        and getattr(model, "param_dtype", model.dtype) == jnp.float32
        and os.environ.get("JAXLAB_NATIVE", "1") != "0"
        and native.available()
    )


def prepare_for_decoding(model: Decoder) -> Decoder:
    """The model generation decodes with: ``model`` itself, or on CPU a :class:`NativeDecoder`
    over its arrays (no copies) with the native fast paths attached (module doc).

    For plain Llama layers with one module per layer (``scan_layers=False``, as generation uses)
    its matrices are also packed in column strips (one more copy of them in memory;
    ``JAXLAB_STRIPS=0`` turns it off), and the weights move to huge pages.
    """
    if not isinstance(model, Decoder) or isinstance(model, NativeDecoder) or not _applies(model):
        return model
    cfg = model.config
    abstract = nnx.eval_shape(lambda: NativeDecoder(cfg, dtype=model.dtype, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)
    prepared = nnx.merge(graphdef, nnx.state(model))
    if (
        _plain_llama(cfg)
        and not cfg.scan_layers
        and native.use_strips(model.embed_tokens.embedding[...], native.strips_min_rows())
    ):
        pack = jax.jit(lambda ws: tuple(native.pack_strips(w) for w in ws))
        for layer in prepared.layers:
            layer.packed_weights = PackedWeights(pack([p.kernel[...] for p in _projections(layer)]))
        if cfg.tie_word_embeddings:
            table = model.embed_tokens.embedding[...]
            prepared.packed_head = PackedWeights(jax.jit(lambda e: native.pack_strips(e.T))(table))
    native.advise_huge_pages(jax.tree.leaves(nnx.state(prepared)))
    return prepared
