"""MiniLM encoding throughput: jaxlab vs sentence-transformers (torch CPU) on the same texts.

Texts of about 256 tokens (the model's max_seq_length), batch 64, float32, both measured in this
process (best of --repeats after a warm-up). Prints texts/s and the ratio, and a ceiling: the
texts/s if nothing but the encoder's dense layers ran, at torch's own float32 GEMM speed on the
same shapes (attention, norms and activations free).

    python scripts/bench_encode.py [--texts 256] [--batch-size 64] [--json out.json]
    XLA_FLAGS=--xla_cpu_use_onednn=true python scripts/bench_encode.py   # try XLA CPU options
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def texts_of(n, tokenizer, target=256, seed=0):
    from jaxlab.retrieval import builtin_filler
    from jaxlab.retrieval.builder import token_ids

    filler = builtin_filler(2000, seed=seed)
    lens = [len(x) for x in token_ids(tokenizer, filler)]
    out, i = [], 0
    for _ in range(n):
        parts, total = [], 0
        while total < target:
            parts.append(filler[i % len(filler)])
            total += lens[i % len(filler)]
            i += 1
        out.append(" ".join(parts))
    return out


def torch_ceilings(cfg, batch: int, length: int, repeats: int = 3) -> dict:
    """Texts/s if only the encoder's dense layers ran (torch.mm on its shapes), and if its
    attention ran too at the speed of torch's fused CPU kernel (scaled_dot_product_attention)."""
    import time

    import torch

    e, f, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads
    x = torch.randn(batch * length, e)
    h = torch.randn(batch * length, f)
    w_ee, w_ef, w_fe = torch.randn(e, e), torch.randn(e, f), torch.randn(f, e)
    q, k, v = (torch.randn(batch, heads, length, e // heads) for _ in range(3))

    def dense():
        for _ in range(4):  # query, key, value, attention output
            torch.mm(x, w_ee)
        torch.mm(x, w_ef)
        torch.mm(h, w_fe)

    def attend():
        torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def per_batch(fn):
        fn()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(cfg.num_layers):
                fn()
            best = min(best, time.perf_counter() - t0)
        return best

    t_dense, t_attn = per_batch(dense), per_batch(attend)
    return {
        "dense_layers_only_texts_per_s": batch / t_dense,
        "dense_and_attention_texts_per_s": batch / (t_dense + t_attn),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import numpy as np

    from jaxlab.models import encode, from_pretrained
    from jaxlab.models.encode import encode_limit
    from jaxlab.models.registry import MINILM_DIR, package_path
    from jaxlab.testing.bench import time_call

    model, tokenizer = from_pretrained(MINILM_DIR)
    texts = texts_of(args.texts, tokenizer)
    ours_s = time_call(
        lambda: encode(model, tokenizer, texts, batch_size=args.batch_size), repeats=args.repeats
    )
    row = {
        "texts": args.texts,
        "batch_size": args.batch_size,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jaxlab_texts_per_s": args.texts / ours_s,
    }
    if not args.skip_reference:
        import torch
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(package_path(MINILM_DIR)), device="cpu")
        ref_s = time_call(
            lambda: st.encode(texts, batch_size=args.batch_size), repeats=args.repeats
        )
        ours = encode(model, tokenizer, texts[:8], batch_size=args.batch_size)
        ref = st.encode(texts[:8], batch_size=args.batch_size)
        cos = float(np.min(np.sum(ours * ref, axis=1) / np.linalg.norm(ref, axis=1)))
        lengths = [
            len(r) for r in tokenizer.encode_truncated(texts, encode_limit(model, tokenizer))[0]
        ]
        row.update(
            reference_texts_per_s=args.texts / ref_s,
            torch_ceiling=torch_ceilings(model.config, args.batch_size, max(lengths)),
            speedup=ref_s / ours_s,
            min_cosine_vs_reference=cos,
            torch_threads=torch.get_num_threads(),
        )
    print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
