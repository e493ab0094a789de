"""MiniLM encoding throughput: jaxlab vs sentence-transformers (torch CPU) on the same texts.

Texts of about 256 tokens (the model's max_seq_length), batch 64, float32, both measured in this
process (best of --repeats after a warm-up). Prints texts/s and the ratio.

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
        row.update(
            reference_texts_per_s=args.texts / ref_s,
            speedup=ref_s / ours_s,
            min_cosine_vs_reference=cos,
            torch_threads=torch.get_num_threads(),
        )
    print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
