"""Logical axis names to mesh axes: one table of rules, and the functions that place a model.

Every parameter of jaxlab's models names its axes by role (:func:`jaxlab.models.layers.
logical_axes`): ``vocab``, ``embed``, ``heads``, ``kv_heads``, ``mlp``, ``norm``, and ``layers``
in front of stacked layers. Activations use ``batch``, ``length`` and ``act_embed``.
:data:`DEFAULT_RULES` maps them to the mesh axes of :mod:`jaxlab.mesh` the way maxtext does:

- FSDP shards every weight matrix's model-width axis (``embed``) over ``fsdp``; the batch is split
  over ``data`` and ``fsdp``;
- tensor parallelism splits attention heads, key/value heads, the MLP's hidden units and the
  vocabulary over ``tensor``;
- norms, the layer axis and activations' width stay whole.

A rule maps a name to one mesh axis, a tuple of axes, or None (not split). A dimension that an
axis (or the product of a tuple's axes) does not divide drops the innermost axes until it does,
so any model runs on any mesh (a 2-head model on ``tensor=4`` keeps its key/value heads whole).

    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
    model = create_sharded(lambda: Decoder(cfg, rngs=nnx.Rngs(0)), mesh)  # no full copy anywhere
    # or: shard_model(model, mesh) for a model already in memory
    with jax.set_mesh(mesh):
        loss = train_step(model, optimizer, batch)  # jit partitions the step (GSPMD)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxlab.models.layers import LOGICAL_AXES

__all__ = [
    "Rules",
    "DEFAULT_RULES",
    "logical_spec",
    "param_specs",
    "param_shardings",
    "shard_model",
    "create_sharded",
    "constrain",
    "constrain_state",
    "pin",
    "check_fits",
    "bytes_per_device",
]

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", "sp"),
    ("act_embed", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
    ("positions", None),
    ("token_types", None),
)


def _axes_of(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def logical_spec(
    names: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
) -> PartitionSpec:
    """The PartitionSpec of an array whose axes have these logical ``names``.

    Names without a rule are not split. With ``shape`` and ``mesh``, mesh axes that are missing
    from the mesh, already used by an earlier dimension, or do not divide their dimension are
    dropped (innermost first), so the spec is always valid for that array on that mesh.
    """
    table = dict(rules)
    sizes = dict(mesh.shape) if mesh is not None else None
    used: set[str] = set()
    out = []
    for d, name in enumerate(names):
        axes = list(_axes_of(table.get(name))) if name is not None else []
        if sizes is not None:
            axes = [a for a in axes if a in sizes and a not in used]
            if shape is not None:
                while axes and shape[d] % int(np.prod([sizes[a] for a in axes])):
                    axes.pop()
            axes = [a for a in axes if sizes[a] > 1] or []
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def _names(var: nnx.Variable, ndim: int) -> tuple[str | None, ...]:
    names = var.get_metadata().get(LOGICAL_AXES) or ()
    names = tuple(names)
    if len(names) != ndim:  # an unnamed parameter (or a layout that changed its rank): whole
        return (None,) * ndim
    return names


def param_specs(state: Any, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """PartitionSpecs for every Variable of an ``nnx.State`` (or a module's state), from the
    parameters' logical names; arrays without names (RNG keys, counters) are replicated."""

    def spec(x):
        if isinstance(x, nnx.Variable):
            value = x.get_value() if hasattr(x, "get_value") else x[...]
            shape = getattr(value, "shape", ())
            return x.replace(logical_spec(_names(x, len(shape)), shape, mesh, rules))
        return PartitionSpec()

    return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(state: Any, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """``NamedSharding`` s of :func:`param_specs`, for ``jax.device_put`` or ``out_shardings``."""
    return jax.tree.map(
        lambda p: NamedSharding(mesh, p),
        param_specs(state, mesh, rules),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES):
    """Places every array of ``model`` (in place) by its parameters' logical names; returns it."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh, rules)))
    return model


def create_sharded(
    make: Callable[[], nnx.Module], mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES
) -> nnx.Module:
    """Builds ``make()`` with every array created directly in its sharding: each device only ever
    holds its share (the way to build a model too big for one device). ``make`` must be pure."""
    abstract = nnx.eval_shape(make)
    graphdef, abstract_state = nnx.split(abstract)
    check_fits(abstract_state, mesh, rules)
    specs = param_specs(abstract_state, mesh, rules)
    if all(p == PartitionSpec() for p in jax.tree.leaves(specs)):
        # nothing is split (one device, or a data-parallel mesh): build it as it is and place
        # the copies; a jitted init would only cost a compile
        return shard_model(make(), mesh, rules)
    shardings = param_shardings(abstract_state, mesh, rules)

    def init():
        return nnx.state(make())

    state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def constrain(x: jax.Array, names: Sequence[str | None], rules: Rules = DEFAULT_RULES):
    """``x`` constrained to the sharding of its logical axis ``names`` under the mesh set with
    ``jax.set_mesh``; ``x`` itself when no mesh is set or the mesh has none of the rules' axes
    (one device, or inside ``shard_map``)."""
    mesh = _auto_mesh()
    if mesh is None:
        return x
    spec = logical_spec(names, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, spec)


def _auto_mesh():
    """The mesh set with ``jax.set_mesh`` when it has Auto axes among the rules' ones, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or not set(mesh.axis_names) & {"data", "fsdp", "tensor", "sp"}:
        return None
    if any(t != jax.sharding.AxisType.Auto for t in mesh.axis_types):
        return None  # explicit or manual axes: the types already carry the sharding
    return mesh


def constrain_state(tree: Any, rules: Rules = DEFAULT_RULES) -> Any:
    """Every Variable of ``tree`` (an ``nnx.State``) constrained to its logical names' sharding
    under the mesh set with ``jax.set_mesh`` (unchanged without one). Inside a jitted step this pins
    the outputs' placement to the inputs': the compiler would otherwise choose it."""
    mesh = _auto_mesh()
    if mesh is None:
        return tree

    def pin_one(x):
        if isinstance(x, nnx.Variable):
            value = x.get_value()
            if hasattr(value, "shape"):
                spec = logical_spec(_names(x, value.ndim), value.shape, mesh, rules)
                return x.replace(jax.lax.with_sharding_constraint(value, spec))
        return x

    return jax.tree.map(pin_one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def pin(*modules: nnx.Module, rules: Rules = DEFAULT_RULES) -> None:
    """:func:`constrain_state` applied in place to modules (a model, its optimizer) at the end of
    a jitted step; a no-op without a mesh."""
    if _auto_mesh() is None:
        return
    for module in modules:
        nnx.update(module, constrain_state(nnx.state(module), rules))


def bytes_per_device(state: Any, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES) -> int:
    """Bytes of ``state`` (abstract or concrete) each device holds once sharded by the rules."""
    specs = param_specs(state, mesh, rules)
    sizes = dict(mesh.shape)
    total = 0
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for var, spec in zip(leaves, spec_leaves):
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        spec = spec.get_value() if isinstance(spec, nnx.Variable) else spec
        if not hasattr(value, "shape"):
            continue
        split = 1
        for entry in spec:
            for a in _axes_of(entry):
                split *= sizes[a]
        total += int(np.prod(value.shape)) * np.dtype(value.dtype).itemsize // split
    return total


def check_fits(
    state: Any,
    mesh: jax.sharding.Mesh,
    rules: Rules = DEFAULT_RULES,
    *,
    limit: int | None = None,
    what: str = "the model",
) -> int:
    """Raises a clear error, before anything is allocated, when ``state``'s share exceeds one
    device's memory (``limit`` bytes, or what the device reports; CPUs report none: no check).
    Returns the bytes per device."""
    need = bytes_per_device(state, mesh, rules)
    if limit is None:
        stats = {}
        try:
            stats = mesh.devices.flat[0].memory_stats() or {}
        except Exception:  # noqa: BLE001 - backends without memory stats
            stats = {}
        limit = stats.get("bytes_limit")
    if limit is not None and need > limit:
        raise ValueError(
            f"{what} needs {need / 2**30:.2f} GiB per device on mesh {dict(mesh.shape)}, but a "
            f"device has {limit / 2**30:.2f} GiB: shard it over more devices (mesh fsdp / "
            "tensor), or use a smaller dtype"
        )
    return need
