"""Multi-host start: ``jaxlab.distributed`` on one machine, for real.

Two CPU processes (2 virtual devices each) join through ``jax.distributed`` on a loopback port and
run one data-parallel training step over the global 4-device mesh; its loss, gradients and updated
weights equal the same step computed here, in one process, on 4 devices. The settings logic is
checked on hand-written cluster environments (SLURM, Open MPI, JAX_* variables).
"""

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from jaxlab import distributed
from jaxlab.distributed import DistributedError, cluster_settings
from jaxlab.models import save_pretrained
from jaxlab.testing.data_parallel import data_parallel_step, tiny_decoder_on_mesh

WORKER = Path(__file__).with_name("distributed_worker.py")

# float32: the same sums grouped differently (gloo across processes vs in-process all-reduce);
# error relative to each tensor's largest entry (measured here: 1.1e-7)
TOL = 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_one_step_like_one_process(tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JAX_", "SLURM_", "OMPI_", "XLA_FLAGS"))
    }
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}",
        JAX_NUM_PROCESSES="2",
        JAXLAB_COMPILATION_CACHE="0",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(tmp_path)],
            env={**env, "JAX_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        # the reference, while the workers start: one process, 4 of this process's 8 devices
        ref = data_parallel_step(Mesh(np.asarray(jax.devices()[:4]), ("data",)))
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]

    for i in range(2):
        facts = json.loads((tmp_path / f"p{i}.json").read_text())
        assert facts == {
            "joined": [True, True],
            "process_index": i,
            "process_count": 2,
            "device_count": 4,
            "local_device_count": 2,
            "is_main": i == 0,
            "wrote": "written" if i == 0 else None,
            "mesh_processes": [0, 1],
            "export_from_spread_arrays": True,
        }
        got = np.load(tmp_path / f"p{i}.npz")
        assert set(got.files) == set(ref) and len(ref) > 2
        assert np.isfinite(ref["loss"]) and ref["loss"] > 0
        for key, value in ref.items():
            err = np.max(np.abs(got[key] - value)) / np.max(np.abs(value))
            assert err < TOL, (key, err)
        records = (tmp_path / f"p{i}.log").read_text().splitlines()
        expected = ["info from 0", "warning from 0"] if i == 0 else ["warning from 1"]
        assert records == expected
    assert (tmp_path / "main.txt").read_text() == "0"

    # the export from arrays spread over two processes: the tensors of the same model exported here
    from safetensors.numpy import load_file

    model, _ = tiny_decoder_on_mesh(Mesh(np.asarray(jax.devices()[:4]), ("data",)), seed=1)
    save_pretrained(model, None, tmp_path / "reference_export")
    got, want = (
        load_file(tmp_path / d / "model.safetensors") for d in ("export", "reference_export")
    )
    assert got.keys() == want.keys() and len(want) == 2 * 9 + 3
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert sorted(p.name for p in tmp_path.iterdir() if "export" in p.name) == [
        "export",
        "reference_export",
    ]
    # the step did something: every gradient is nonzero
    grads = [v for k, v in ref.items() if k.startswith("grad/")]
    assert len(grads) == len(ref) // 2 and all(np.abs(g).max() > 0 for g in grads)


def _env(**kw) -> dict[str, str]:
    return {k: str(v) for k, v in kw.items()}


SLURM = _env(
    SLURM_JOB_ID=4242,
    SLURM_STEP_NODELIST="gpu[001-002]",
    SLURM_NTASKS=16,
    SLURM_PROCID=9,
    SLURM_LOCALID=1,
)


@pytest.mark.parametrize(
    "env, args, expected",
    [
        ({}, {}, None),  # no cluster: a no-op
        (
            _env(JAX_COORDINATOR_ADDRESS="10.0.0.1:1234", JAX_NUM_PROCESSES=4, JAX_PROCESS_ID=3),
            {},
            {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3},
        ),
        (  # arguments before variables
            _env(JAX_COORDINATOR_ADDRESS="10.0.0.1:1234", JAX_NUM_PROCESSES=4, JAX_PROCESS_ID=3),
            dict(coordinator_address="h:9", num_processes=2, process_id=0),
            {"coordinator_address": "h:9", "num_processes": 2, "process_id": 0},
        ),
        (_env(JAX_NUM_PROCESSES=1), {}, None),  # one process: not distributed
        (  # srun: JAX derives the coordinator from the node list
            SLURM,
            {},
            {"coordinator_address": None, "num_processes": 16, "process_id": 9},
        ),
        (
            {**SLURM, "JAX_COORDINATOR_ADDRESS": "gpu001:5000"},
            {},
            {"coordinator_address": "gpu001:5000", "num_processes": 16, "process_id": 9},
        ),
        ({**SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, {}, None),  # srun -n 1
        ({**SLURM, "JAXLAB_DISTRIBUTED": "0"}, {}, None),  # switched off by hand
        (  # an sbatch script outside srun (no step node list): JAX's SLURM detector is off
            {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"},
            {},
            None,
        ),
        (
            _env(
                OMPI_MCA_orte_hnp_uri="1531576320.0;tcp://10.96.0.1:34911",
                OMPI_COMM_WORLD_SIZE=4,
                OMPI_COMM_WORLD_RANK=2,
                OMPI_COMM_WORLD_LOCAL_RANK=0,
            ),
            {},
            {"coordinator_address": None, "num_processes": 4, "process_id": 2},
        ),
    ],
)
def test_cluster_settings(env, args, expected):
    assert cluster_settings(**args, env=env) == expected


@pytest.mark.parametrize(
    "env, message",
    [
        (_env(JAX_NUM_PROCESSES="two"), "JAX_NUM_PROCESSES='two' is not an integer"),
        (_env(JAX_NUM_PROCESSES=2, JAX_COORDINATOR_ADDRESS="h:1"), "set JAX_PROCESS_ID"),
        (_env(JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=2, JAX_COORDINATOR_ADDRESS="h:1"), "outside 0"),
        (_env(JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=1), "no coordinator"),
        (_env(JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=1, JAX_COORDINATOR_ADDRESS="h"), "HOST:PORT"),
        (_env(JAX_COORDINATOR_ADDRESS="h:1", JAX_PROCESS_ID=0), "set JAX_NUM_PROCESSES"),
        (_env(JAX_NUM_PROCESSES=0), ">= 1"),
        (  # Open MPI 5 (no ORTE URI): JAX cannot find the coordinator by itself
            _env(OMPI_COMM_WORLD_SIZE=4, OMPI_COMM_WORLD_RANK=0),
            "set JAX_COORDINATOR_ADDRESS",
        ),
    ],
)
def test_bad_cluster_settings_are_named(env, message):
    with pytest.raises(DistributedError, match=message):
        cluster_settings(env=env)


def test_single_process_is_a_no_op(monkeypatch):
    for key in list(os.environ):
        if key.startswith(
            ("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_", "OMPI_")
        ):
            monkeypatch.delenv(key)
    assert distributed.initialize() is False
    assert distributed.initialize() is False
    assert not distributed.is_initialized() and not jax.distributed.is_initialized()
    assert distributed.is_main_process() and distributed.process_count() == 1
    calls = []
    assert distributed.main_process_only(lambda x: calls.append(x) or "ran")(5) == "ran"
    assert calls == [5]
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    assert distributed.MainProcessFilter().filter(record)
    distributed.sync("nothing to wait for")
