"""The one place jaxlab builds a device mesh: named axes ``data`` and ``sp`` (sequence parallel).

Code written against these names runs unchanged on one CPU device, 8 virtual CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``), one GPU or a pod (after
``jax.distributed.initialize()`` on each host).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh

from jaxlab.config import check

__all__ = ["MeshConfig", "make_mesh"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    data: int = 1  # data-parallel replicas (batch split)
    sp: int = 1  # sequence-parallel devices (ring attention)

    def __post_init__(self):
        for name in ("data", "sp"):
            val = getattr(self, name)
            check(isinstance(val, int) and val >= 1, name, f"must be a positive int, got {val!r}")


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A ``(data, sp)`` mesh over the first data × sp devices; a clear error if there are too few."""
    devices = jax.devices() if devices is None else devices
    n = cfg.data * cfg.sp
    if n > len(devices):
        raise ValueError(
            f"mesh data={cfg.data} × sp={cfg.sp} needs {n} devices, but {len(devices)} are "
            "visible (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)"
        )
    return Mesh(np.asarray(devices[:n]).reshape(cfg.data, cfg.sp), ("data", "sp"))
