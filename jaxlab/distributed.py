"""Multi-host start: joining the processes of a pod through JAX's own distributed runtime.

Every process of a multi-host job calls :func:`initialize` before it touches a device (the command
line does so first thing); afterwards ``jax.devices()`` lists every device of the job, meshes span
hosts, and jitted functions run as one SPMD program. On a single process it does nothing, so the
same script runs unchanged on a laptop, one GPU or a pod.

Where the settings come from, first found wins (each one separately):

1. the arguments of :func:`initialize`;
2. ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAX_NUM_PROCESSES``,
   ``JAX_PROCESS_ID`` (and ``JAX_LOCAL_DEVICE_IDS``, read by JAX itself): any launcher;
3. the cluster environments JAX detects itself: SLURM (``srun``: ``SLURM_NTASKS``,
   ``SLURM_PROCID``, ... one process per GPU) and Open MPI (``mpirun``: ``OMPI_COMM_WORLD_*``);
   other JAX detectors (Cloud TPU, Kubernetes, mpi4py) through ``cluster_detection_method``.

A job of one process (``JAX_NUM_PROCESSES=1``, ``srun -n 1``) is not distributed: nothing to join.
``JAXLAB_DISTRIBUTED=0`` keeps a process on its own whatever the environment says (a command run by
hand inside a cluster allocation).

Only process 0 should write shared outputs (metrics, logs, exported models);
:func:`is_main_process`, :func:`main_process_only` and :class:`MainProcessFilter` say or arrange
that. Orbax checkpoints are written by every process together (each its own shards).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from jaxlab.errors import UserError

__all__ = [
    "SWITCH_ENV",
    "DistributedError",
    "cluster_settings",
    "initialize",
    "is_initialized",
    "is_main_process",
    "process_index",
    "process_count",
    "main_process_only",
    "MainProcessFilter",
    "sync",
]

F = TypeVar("F", bound=Callable[..., Any])

SWITCH_ENV = "JAXLAB_DISTRIBUTED"  # 0 / false / no / off: never join, even inside a cluster job
_ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
_ENV_COUNT = "JAX_NUM_PROCESSES"
_ENV_ID = "JAX_PROCESS_ID"


class DistributedError(UserError):
    """The cluster settings are inconsistent or joining the other processes failed."""


def _int_env(env: Mapping[str, str], key: str) -> int | None:
    value = env.get(key)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{key}={value!r} is not an integer") from None


_SLURM_VARS = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
)


def _launcher(env: Mapping[str, str]) -> tuple[str, int, int, bool] | None:
    """``(name, process count, rank, JAX can find the coordinator)`` from the variables of
    SLURM's ``srun`` or Open MPI's ``mpirun`` (the ones JAX's own detectors read), or None."""
    if all(k in env for k in _SLURM_VARS):
        n, rank = _int_env(env, "SLURM_NTASKS"), _int_env(env, "SLURM_PROCID")
        return "SLURM", n, rank, True
    if "OMPI_COMM_WORLD_SIZE" in env and "OMPI_COMM_WORLD_RANK" in env:
        n, rank = _int_env(env, "OMPI_COMM_WORLD_SIZE"), _int_env(env, "OMPI_COMM_WORLD_RANK")
        return "Open MPI", n, rank, "OMPI_MCA_orte_hnp_uri" in env
    return None


def cluster_settings(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any] | None:
    """What :func:`initialize` passes to ``jax.distributed.initialize``, or None for a
    single-process run. Pure: reads ``env`` (default ``os.environ``) and starts nothing.

    The coordinator address of a SLURM or Open MPI (4.x) job may stay None: JAX derives it (the
    job's first node, a port from the job id).

    Raises:
      DistributedError: a malformed or inconsistent setting (named).
    """
    env = os.environ if env is None else env
    if env.get(SWITCH_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None  # the user says: one process, whatever the environment looks like
    address = coordinator_address or env.get(_ENV_ADDRESS) or None
    count = num_processes if num_processes is not None else _int_env(env, _ENV_COUNT)
    pid = process_id if process_id is not None else _int_env(env, _ENV_ID)
    launcher = _launcher(env)
    if launcher is not None:
        name, n, rank, finds_coordinator = launcher
        count = n if count is None else count
        pid = rank if pid is None else pid
    if count is None:
        if address is None and pid is None:
            return None  # no cluster at all
        raise DistributedError(
            f"{_ENV_ADDRESS}={address!r}, {_ENV_ID}={pid!r} were given without the number of "
            f"processes; set {_ENV_COUNT} (or pass num_processes)"
        )
    if count < 1:
        raise DistributedError(f"the number of processes must be >= 1, got {count}")
    if count == 1:
        return None
    if pid is None:
        raise DistributedError(
            f"{count} processes but this one's id is unknown; set {_ENV_ID} (0 ... {count - 1})"
        )
    if not 0 <= pid < count:
        raise DistributedError(f"process id {pid} is outside 0 ... {count - 1}")
    if address is None:
        if launcher is None or not launcher[3]:
            raise DistributedError(
                f"{count} processes but no coordinator; set {_ENV_ADDRESS}=HOST:PORT of process 0"
            )
    elif ":" not in address:
        raise DistributedError(f"coordinator address {address!r} needs a port: HOST:PORT")
    return {"coordinator_address": address, "num_processes": count, "process_id": pid}


def is_initialized() -> bool:
    """Whether this process has joined a multi-process job (``jax.distributed`` is running)."""
    jax = sys.modules.get("jax")
    return jax is not None and jax.distributed.is_initialized()


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    cluster_detection_method: str | None = None,
    initialization_timeout: int = 300,
) -> bool:
    """Joins the other processes of a multi-host job; a no-op on one process. Idempotent.

    Args:
      coordinator_address: ``host:port`` of process 0 (default: ``JAX_COORDINATOR_ADDRESS`` or the
        detected cluster's first node).
      num_processes: processes in the job (default: ``JAX_NUM_PROCESSES`` or the cluster's count).
      process_id: this process's id, ``0 ... num_processes - 1`` (default: ``JAX_PROCESS_ID`` or
        the cluster's rank).
      local_device_ids: the local devices this process drives (default: JAX's choice; SLURM and
        Open MPI give one GPU per process, numbered by local rank).
      cluster_detection_method: force one of JAX's detectors (``"slurm"``, ``"ompi"``,
        ``"mpi4py"``, ``"k8s"``, ...) even when nothing here recognises the cluster.
      initialization_timeout: seconds to wait for every process to join.

    Returns:
      Whether this is now a multi-process run (True also when it already was).

    Call it before anything creates devices (``jax.devices()``, an array): JAX refuses to join
    after its backends exist. The import of JAX is deferred until a cluster is found, so calling it
    costs nothing on one process.
    """
    if is_initialized():
        return True
    if cluster_detection_method is not None:
        settings: dict[str, Any] | None = {
            "coordinator_address": coordinator_address,
            "num_processes": num_processes,
            "process_id": process_id,
        }
    else:
        settings = cluster_settings(coordinator_address, num_processes, process_id)
    if settings is None:
        return False
    import jax

    try:
        jax.distributed.initialize(
            **settings,
            local_device_ids=local_device_ids,
            cluster_detection_method=cluster_detection_method,
            initialization_timeout=initialization_timeout,
        )
    except RuntimeError as e:
        if "should only be called once" in str(e):
            return True
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "before any JAX" in msg or "backend" in msg.lower():
            raise DistributedError(
                "jax.distributed.initialize must run before any JAX computation: call "
                f"jaxlab.distributed.initialize() first thing ({msg})"
            ) from e
        raise DistributedError(f"joining the other processes failed: {msg}") from e
    except ValueError as e:
        raise DistributedError(f"cannot join a multi-process job: {e}") from e
    logging.getLogger(__name__).info(
        "process %d of %d joined; %d devices in all, %d here",
        jax.process_index(),
        jax.process_count(),
        jax.device_count(),
        jax.local_device_count(),
    )
    return True


def process_index() -> int:
    """This process's index (0 without a multi-process job)."""
    import jax

    return jax.process_index()


def process_count() -> int:
    """Processes in the job (1 without a multi-process job)."""
    import jax

    return jax.process_count()


def is_main_process() -> bool:
    """True on process 0, the one that writes metrics, logs and exported files."""
    return process_index() == 0


def main_process_only(fn: F) -> F:
    """Decorates ``fn`` to run on process 0 only; elsewhere the call does nothing and returns None.

    For side effects that must happen once per job (writing a file, printing a summary), never for
    computations the other processes take part in (collectives would wait forever).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if is_main_process():
            return fn(*args, **kwargs)
        return None

    return wrapper  # type: ignore[return-value]


class MainProcessFilter(logging.Filter):
    """A logging filter that lets records through on process 0 only (warnings and errors from every
    process with ``min_level=logging.WARNING``)::

        handler.addFilter(MainProcessFilter())
    """

    def __init__(self, min_level: int | None = None):
        super().__init__()
        self.min_level = min_level

    def filter(self, record: logging.LogRecord) -> bool:
        if self.min_level is not None and record.levelno >= self.min_level:
            return True
        return is_main_process()


def sync(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (nothing to wait for on one)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
