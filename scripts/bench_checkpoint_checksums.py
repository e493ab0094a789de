"""What the per-array checksums cost a checkpoint save and restore.

    python scripts/bench_checkpoint_checksums.py [--params 25e6] [--repeats 3]

Saves a float32 pytree of about ``--params`` values (a few large arrays, like a model's) with
:class:`jaxlab.checkpoint.Checkpointer` (synchronous saves, so the time is the whole write) and
restores it, and times :func:`jaxlab.checkpoint.array_checksums` on the same tree: the work a save
adds (hashing the host copy) and a restore adds (hashing what it read). Prints the median of
``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

from jaxlab.checkpoint import Checkpointer, array_checksums


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=float, default=25e6)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    n = int(args.params)
    sizes = [n // 2, n // 4, n // 8, n - n // 2 - n // 4 - n // 8]
    tree = {f"w{i}": rng.standard_normal(s, dtype=np.float32) for i, s in enumerate(sizes)}
    mb = sum(a.nbytes for a in tree.values()) / 2**20

    hash_s, save_s, restore_s = [], [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        array_checksums(tree)
        hash_s.append(time.perf_counter() - t)
        with tempfile.TemporaryDirectory() as d, Checkpointer(d, async_save=False) as ckpt:
            t = time.perf_counter()
            ckpt.save(1, model=tree, force=True)
            save_s.append(time.perf_counter() - t)
            target = {k: np.zeros_like(v) for k, v in tree.items()}
            t = time.perf_counter()
            ckpt.restore(model=target)
            restore_s.append(time.perf_counter() - t)
    med = statistics.median
    print(f"{mb:.0f} MB float32 in {len(tree)} arrays, median of {args.repeats}:")
    print(f"  array_checksums (CRC32)     {med(hash_s):.3f} s  ({mb / med(hash_s):.0f} MB/s)")
    print(f"  save (with checksums)       {med(save_s):.3f} s")
    print(f"  restore (with verification) {med(restore_s):.3f} s")
    print(f"  checksum share of save      {100 * med(hash_s) / med(save_s):.0f}%")
    print(f"  checksum share of restore   {100 * med(hash_s) / med(restore_s):.0f}%")


if __name__ == "__main__":
    main()
