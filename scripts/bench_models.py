"""Forward-pass speed of jaxlab's real models against their PyTorch references, on this machine.

    python scripts/bench_models.py [--out bench_models.json]

SmolLM2-135M-Instruct: full-sequence logits (prefill) for a batch, jaxlab (jit, float32) vs
transformers (torch CPU, float32, eager attention) loaded from the same GGUF. MiniLM: `encode` vs
sentence-transformers' `encode` on the same texts. Prints a table of ratios and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab.testing.bench import time_call


def bench_smollm2(batch, length, repeats):
    import torch
    from transformers import AutoModelForCausalLM

    from jaxlab.models import from_pretrained
    from jaxlab.models.registry import SMOLLM2_GGUF, package_path

    model, _ = from_pretrained(SMOLLM2_GGUF)
    path = package_path(SMOLLM2_GGUF)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        ).eval()
    ids = np.random.default_rng(0).integers(0, 49152, (batch, length))
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    jx = jnp.asarray(ids)
    ours = time_call(lambda: run(state, jx).block_until_ready(), repeats=repeats)
    tx = torch.tensor(ids)

    def torch_fwd():
        with torch.no_grad():
            ref(tx)

    theirs = time_call(torch_fwd, repeats=repeats)
    tokens = batch * length
    return {
        "case": f"SmolLM2 prefill B={batch} T={length}",
        "jaxlab_s": ours,
        "reference_s": theirs,
        "jaxlab_tokens_per_s": tokens / ours,
        "reference_tokens_per_s": tokens / theirs,
        "speedup": theirs / ours,
        "reference": "transformers (torch CPU, same GGUF)",
    }


def bench_minilm(n_texts, words, repeats):
    from sentence_transformers import SentenceTransformer

    from jaxlab.models import encode, from_pretrained
    from jaxlab.models.registry import MINILM_DIR, package_path

    rng = np.random.default_rng(0)
    vocab = "time person year way day thing man world life hand part child eye woman place work week".split()
    texts = [
        " ".join(rng.choice(vocab, size=int(rng.integers(words // 2, words))))
        for _ in range(n_texts)
    ]
    model, tokenizer = from_pretrained(MINILM_DIR)
    st = SentenceTransformer(str(package_path(MINILM_DIR)), device="cpu")
    ours = time_call(lambda: encode(model, tokenizer, texts, batch_size=64), repeats=repeats)
    theirs = time_call(lambda: st.encode(texts, batch_size=64), repeats=repeats)
    return {
        "case": f"MiniLM encode N={n_texts} ~{words} words",
        "jaxlab_s": ours,
        "reference_s": theirs,
        "jaxlab_texts_per_s": n_texts / ours,
        "reference_texts_per_s": n_texts / theirs,
        "speedup": theirs / ours,
        "reference": "sentence-transformers (torch CPU)",
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_models.json")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import torch

    print(
        f"jax {jax.__version__} on {jax.default_backend()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)"
    )
    rows = [
        bench_smollm2(8, 128, args.repeats),
        bench_smollm2(1, 128, args.repeats),
        bench_minilm(256, 180, args.repeats),
    ]
    print(f"{'case':40s} {'jaxlab s':>10s} {'ref s':>10s} {'speedup':>8s}")
    for r in rows:
        print(
            f"{r['case']:40s} {r['jaxlab_s']:10.3f} {r['reference_s']:10.3f} {r['speedup']:8.2f}x"
        )
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
