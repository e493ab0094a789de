"""A tiny random-weight Llama written as an HF checkpoint directory, with a real tokenizer.

:func:`write_tiny_llama` writes ``config.json``, ``model.safetensors`` and the tokenizer's files
(``save_pretrained``), so that ``from_pretrained(path)`` loads it like any HF model: servers and
command-line tools can be tested end to end in seconds with a real vocabulary and chat template.

``bigrams`` plants next-token rules: after token ``a`` the model prefers token ``b`` by a wide
margin. Each rule's source token gets a hidden dimension of its own (zero in every other token's
embedding) that the layers never write to, and the untied output head reads it into ``b``'s
logit; so other tokens do not leak into the rules, while the random layers make the rest of the
output depend on the whole context. Chains of rules make the
model write a chosen text after a chosen token, e.g. a tool call after a forced prefix; everything
else is random.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["write_tiny_llama", "chain_bigrams"]

_RULE_VALUE = 4.0  # a rule source's value in its own dimension
_RULE_GAIN = 100.0  # the final norm's weight on the rules' dimensions


def chain_bigrams(trigger: int, tokens: list[int]) -> dict[int, int]:
    """Rules that make ``tokens`` follow ``trigger``: ``{trigger: t0, t0: t1, ...}``; raises when a
    token would need two different successors."""
    rules: dict[int, int] = {}
    for a, b in zip([trigger, *tokens[:-1]], tokens):
        if rules.get(a, b) != b:
            raise ValueError(f"token {a} would need two successors ({rules[a]} and {b})")
        rules[a] = b
    return rules


def write_tiny_llama(
    path: str | Path,
    tokenizer=None,
    *,
    vocab_size: int | None = None,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    context: int = 512,
    seed: int = 0,
    bigrams: Mapping[int, int] | None = None,
    margin: float = 30.0,
    layer_std: float = 0.3,
) -> Path:
    """Writes the checkpoint directory ``path`` and returns it.

    Args:
      tokenizer: a :class:`jaxlab.tokenization.Tokenizer` whose files are saved beside the
        weights (its vocabulary size is the model's unless ``vocab_size`` is given).
      context: ``max_position_embeddings``.
      bigrams: ``{a: b}`` next-token rules (see the module docstring); ``margin`` is roughly the
        logit lead they give.
      layer_std: scale of the random layer weights: large enough that the whole context (not
        only the last token) moves the logits, small enough that the rules hold.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if vocab_size is None:
        if tokenizer is None:
            raise ValueError("give a tokenizer or a vocab_size")
        vocab_size = tokenizer.vocab_size
    h, f = hidden_size, intermediate_size
    head_dim = h // num_heads
    rng = np.random.default_rng(seed)

    def normal(*shape, std=layer_std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    rules = dict(bigrams or {})
    if len(rules) > h // 2:
        raise ValueError(
            f"{len(rules)} bigram rules need a hidden size of at least {2 * len(rules)}"
        )
    embed = rng.standard_normal((vocab_size, h)).astype(np.float32)
    head = normal(vocab_size, h, std=0.02)
    embed[:, : len(rules)] = 0.0  # one dimension per rule source, zero elsewhere
    final_norm = np.ones(h, np.float32)
    final_norm[: len(rules)] = _RULE_GAIN  # the rules hold however large the residual grows
    for j, (a, b) in enumerate(rules.items()):
        embed[a, j] = _RULE_VALUE
        head[b, j] += margin / _RULE_VALUE
    tensors = {
        "model.embed_tokens.weight": embed,
        "model.norm.weight": final_norm,
        "lm_head.weight": head,
    }
    r = len(rules)
    for i in range(num_layers):
        p = f"model.layers.{i}."
        o_proj, down_proj = normal(h, num_heads * head_dim), normal(h, f)
        o_proj[:r] = down_proj[:r] = 0.0  # the layers never write into the rules' dimensions
        tensors.update(
            {
                p + "input_layernorm.weight": np.ones(h, np.float32),
                p + "post_attention_layernorm.weight": np.ones(h, np.float32),
                p + "self_attn.q_proj.weight": normal(num_heads * head_dim, h),
                p + "self_attn.k_proj.weight": normal(num_kv_heads * head_dim, h),
                p + "self_attn.v_proj.weight": normal(num_kv_heads * head_dim, h),
                p + "self_attn.o_proj.weight": o_proj,
                p + "mlp.gate_proj.weight": normal(f, h),
                p + "mlp.up_proj.weight": normal(f, h),
                p + "mlp.down_proj.weight": down_proj,
            }
        )
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": h,
        "intermediate_size": f,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": context,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        tokenizer.hf.save_pretrained(str(path))
    return path
