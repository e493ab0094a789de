"""The one place jaxlab builds a device mesh: named axes ``data``, ``fsdp``, ``tensor``, ``sp``.

- ``data``: data-parallel replicas (the batch is split, weights are whole on each replica group).
- ``fsdp``: fully sharded data parallel (the batch is split and so are the weights and optimizer
  state, gathered layer by layer when used).
- ``tensor``: tensor parallel (attention heads, the MLP's hidden units and the vocabulary split).
- ``sp``: sequence parallel (ring attention over the sequence).

Parameters name their axes logically (``embed``, ``heads``, ...; :mod:`jaxlab.models.layers`);
:mod:`jaxlab.sharding` maps the names to these axes by one table of rules. Code written against
these names runs unchanged on one CPU device, 8 virtual CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``), one GPU or a pod (after
:func:`jaxlab.distributed.initialize` on each host).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jaxlab.config import check
from jaxlab.errors import ConfigError

__all__ = ["AXES", "MeshConfig", "make_mesh", "auto_axes", "shard_inputs"]

AXES = ("data", "fsdp", "tensor", "sp")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Sizes of the mesh axes; one of them may be -1: the devices left over by the others."""

    data: int = 1  # data-parallel replicas (batch split, weights replicated)
    fsdp: int = 1  # batch and weights split (FSDP / ZeRO-3)
    tensor: int = 1  # heads, MLP units and vocabulary split
    sp: int = 1  # sequence-parallel devices (ring attention)

    def __post_init__(self):
        for name in AXES:
            val = getattr(self, name)
            check(
                isinstance(val, int) and (val >= 1 or val == -1),
                name,
                f"must be a positive int or -1 (the rest of the devices), got {val!r}",
            )
        check(
            sum(getattr(self, a) == -1 for a in AXES) <= 1,
            "mesh",
            "at most one axis may be -1",
        )

    def sizes(self, num_devices: int) -> dict[str, int]:
        """The axis sizes on ``num_devices`` devices (-1 resolved); a clear error if they do not
        fit."""
        given = {a: getattr(self, a) for a in AXES}
        fixed = math.prod(v for v in given.values() if v != -1)
        rest = [a for a, v in given.items() if v == -1]
        if rest:
            if num_devices % fixed:
                raise ConfigError(
                    f"mesh {self._describe()}: {num_devices} devices do not split by the other "
                    f"axes' {fixed}"
                )
            given[rest[0]] = num_devices // fixed
        n = math.prod(given.values())
        if n > num_devices:
            raise ConfigError(
                f"mesh {self._describe()} needs {n} devices, but {num_devices} are visible (on "
                "CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)"
            )
        return given

    def _describe(self) -> str:
        return " × ".join(f"{a}={getattr(self, a)}" for a in AXES)


def make_mesh(cfg: MeshConfig | None = None, devices=None) -> Mesh:
    """A ``(data, fsdp, tensor, sp)`` mesh over the first data × fsdp × tensor × sp devices, with
    Auto axes (the compiler places what the shardings leave open). ``tensor`` and ``sp`` are the
    innermost axes: their collectives run between neighbouring devices (within a host)."""
    cfg = cfg or MeshConfig()
    devices = jax.devices() if devices is None else list(devices)
    sizes = cfg.sizes(len(devices))
    n = math.prod(sizes.values())
    grid = np.asarray(devices[:n], dtype=object).reshape(tuple(sizes[a] for a in AXES))
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def auto_axes(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis Auto (``jax.make_mesh`` makes Explicit axes by default): the
    functions that take a mesh use this view, so both kinds of mesh work."""
    types = getattr(mesh, "axis_types", None)
    if types is None or all(t == AxisType.Auto for t in types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def shard_inputs(mesh, specs, *arrays):
    """``arrays`` resharded to ``specs`` (one PartitionSpec per array, or one for all) when
    ``mesh`` has Explicit axes (``jax.make_mesh``'s default), where ``shard_map`` demands inputs
    already in its ``in_specs``; unchanged on an Auto mesh, where ``shard_map`` moves them itself.
    None entries stay None."""
    from jax.sharding import NamedSharding, PartitionSpec

    types = getattr(mesh, "axis_types", ())
    if not any(t == AxisType.Explicit for t in types):
        return arrays
    if isinstance(specs, PartitionSpec):
        specs = [specs] * len(arrays)
    return tuple(
        None
        if x is None
        else jax.tree.map(lambda a, s=s: jax.sharding.reshard(a, NamedSharding(mesh, s)), x)
        for x, s in zip(arrays, specs)
    )
