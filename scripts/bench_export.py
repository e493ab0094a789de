"""Host memory and time of ``save_pretrained`` on SmolLM2-135M (float32, 538 MB of weights).

Host memory is the peak of what ``tracemalloc`` sees during the export (numpy registers its array
buffers with it, and Python's bytes): the host copies of the weights the export makes on top of the
model already in memory. safetensors' own serialisation buffer (allocated in Rust) is not seen. On
a CPU the model's arrays already live in host memory; on an accelerator every tensor is a
device-to-host copy, which this measures. Runs:

- ``all at once`` (the baseline): every tensor brought to the host into one dict, then one
  ``safetensors.numpy.save_file`` (the simple writer's way);
- ``save_pretrained``, one file (``max_shard_size=5GB``);
- ``save_pretrained`` with ``max_shard_size`` 200 MB and 50 MB (the host holds one file's tensors).

    python scripts/bench_export.py --json docs/results/export.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path


def _all_at_once(model, out: Path) -> None:
    from safetensors.numpy import save_file

    from jaxlab.models.export import _plan_tensors, hf_config_from_decoder

    out.mkdir(parents=True)
    tensors = {t.name: t.fetch() for t in _plan_tensors(model, None)}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config_from_decoder(model.config)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--repeats", type=int, default=2, help="runs per setting (the best is kept)")
    args = p.parse_args()

    import jax
    from flax import nnx

    from jaxlab.models import from_pretrained, save_pretrained

    model, _ = from_pretrained("smollm2-135m-instruct")
    weights_mb = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model))) / 1e6
    runs = {
        "all at once (baseline)": lambda out: _all_at_once(model, out),
        "save_pretrained, 1 file": lambda out: save_pretrained(model, None, out),
        "save_pretrained, 200MB shards": lambda out: save_pretrained(
            model, None, out, max_shard_size="200MB"
        ),
        "save_pretrained, 50MB shards": lambda out: save_pretrained(
            model, None, out, max_shard_size="50MB"
        ),
    }
    results = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench_export_"))
    try:
        for name, run in runs.items():
            best = None
            for _ in range(args.repeats):
                out = tmp / "out"
                shutil.rmtree(out, ignore_errors=True)
                tracemalloc.start()
                t0 = time.perf_counter()
                run(out)
                seconds = time.perf_counter() - t0
                added = tracemalloc.get_traced_memory()[1] / 1e6
                tracemalloc.stop()
                files = len(list(out.glob("*.safetensors")))
                if best is None or added < best["peak_host_mb"]:
                    best = {"seconds": seconds, "peak_host_mb": added, "files": files}
            results[name] = best
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    base = results["all at once (baseline)"]["peak_host_mb"]
    print(f"SmolLM2-135M float32 weights: {weights_mb:.0f} MB")
    print(f"{'run':32s} {'files':>5s} {'seconds':>8s} {'peak host MB':>18s} {'vs baseline':>11s}")
    for name, r in results.items():
        print(
            f"{name:32s} {r['files']:5d} {r['seconds']:8.2f} {r['peak_host_mb']:18.0f} "
            f"{r['peak_host_mb'] / base:11.2f}"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps({"weights_mb": weights_mb, "runs": results}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
