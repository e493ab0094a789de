"""One process of test_distributed's two-process job (run as a script, not collected by pytest).

Joins the job through ``jaxlab.distributed.initialize()`` from the ``JAX_*`` variables the test sets,
runs the data-parallel step over a mesh of all 4 devices (2 here, 2 in the other process) and writes
what it saw to ``OUT_DIR``: ``p{i}.npz`` (the step's results), ``p{i}.json`` (process facts),
``p{i}.log`` (log records through MainProcessFilter), ``main.txt`` (by process 0 only) and
``export/`` (save_pretrained of weights split over both processes).
"""

import json
import logging
import sys
from pathlib import Path

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes

from jaxlab import distributed  # noqa: E402


def main(out: Path) -> None:
    joined = [distributed.initialize(), distributed.initialize()]  # the second call: a no-op

    import numpy as np
    from jax.sharding import Mesh

    from jaxlab.testing.data_parallel import data_parallel_step

    i = jax.process_index()
    handler = logging.FileHandler(out / f"p{i}.log")
    handler.addFilter(distributed.MainProcessFilter(min_level=logging.WARNING))
    log = logging.getLogger("jaxlab.test_worker")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.info("info from %d", i)
    log.warning("warning from %d", i)

    @distributed.main_process_only
    def write_main():
        (out / "main.txt").write_text(str(jax.process_index()))
        return "written"

    wrote = write_main()

    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    result = data_parallel_step(mesh)
    np.savez(out / f"p{i}.npz", **result)

    # export from weights split over both processes' devices: gathered per tensor, written by 0
    from jaxlab.models import save_pretrained
    from jaxlab.testing.data_parallel import tiny_decoder_on_mesh

    model, _ = tiny_decoder_on_mesh(mesh, seed=1, sharded=True)
    spread = not model.embed_tokens.embedding[...].is_fully_addressable
    save_pretrained(model, None, out / "export")
    distributed.sync("test-worker-done")
    facts = {
        "joined": joined,
        "process_index": i,
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "is_main": distributed.is_main_process(),
        "wrote": wrote,
        "mesh_processes": sorted({d.process_index for d in mesh.devices.flat}),
        "export_from_spread_arrays": spread,
    }
    (out / f"p{i}.json").write_text(json.dumps(facts))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
