"""The one place jaxlab builds an Orbax CheckpointManager.

A checkpoint holds, per step: the model state, the optimizer state, the data-iterator state and
any JSON-serialisable extras (controller state, config). Saves are asynchronous and atomic: Orbax
writes into a temporary directory and renames it when complete, so a save that is interrupted
part-way leaves the previous checkpoint untouched.

    ckpt = Checkpointer(workdir / "checkpoints", save_every=100, keep=3)
    step = ckpt.restore_or(0, model=model, optimizer=opt, data_iter=it)
    for step in range(step, steps):
        ...
        ckpt.save(step + 1, model=model, optimizer=opt, data_iter=it)
    ckpt.close()  # waits for the last async save
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxlab.config import check
from jaxlab.errors import UserError

__all__ = ["CheckpointConfig", "CheckpointError", "Checkpointer", "create_checkpoint_manager"]

_STATE_ITEMS = ("model", "optimizer", "arrays")
_JSON_ITEMS = ("data_iter", "extra")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """When trainers save: every ``save_every`` steps (updates, for RL), keeping the newest ``keep``."""

    save_every: int = 50
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        check(self.save_every >= 1, "save_every", f"must be >= 1, got {self.save_every}")
        check(self.keep >= 1, "keep", f"must be >= 1, got {self.keep}")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, partial or corrupt. The message names the directory."""


def create_checkpoint_manager(
    directory: str | Path,
    *,
    save_every: int = 1,
    keep: int | None = 3,
    async_save: bool = True,
    read_only: bool = False,
) -> ocp.CheckpointManager:
    """The Orbax CheckpointManager every jaxlab trainer uses.

    Args:
      directory: where step directories are written.
      save_every: save only steps that are multiples of this (``save(..., force=True)`` overrides).
      keep: keep the newest ``keep`` checkpoints (None keeps all).
      async_save: write in a background thread; :meth:`wait_until_finished` before exiting.
      read_only: open for restoring only.
    """
    if save_every < 1:
        raise ValueError(f"save_every must be >= 1, got {save_every}")
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None, got {keep}")
    options = ocp.CheckpointManagerOptions(
        # Saves exactly the multiples of save_every (no implicit save of the first step).
        save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
    )
    handlers = {name: ocp.StandardCheckpointHandler() for name in _STATE_ITEMS}
    handlers.update({name: ocp.JsonCheckpointHandler() for name in _JSON_ITEMS})
    return ocp.CheckpointManager(
        Path(directory).absolute(), options=options, item_handlers=handlers
    )


def _state_of(obj: Any) -> Any:
    if isinstance(obj, nnx.Module | nnx.Optimizer) or hasattr(obj, "__nnx_repr__"):
        return nnx.state(obj)
    return obj


class Checkpointer:
    """Saves and restores {model, optimizer, data iterator, extras} by step.

    ``model`` and ``optimizer`` may be NNX objects (restored in place) or plain pytrees.
    ``data_iter`` is anything with ``get_state()`` / ``set_state(state)`` returning JSON data
    (grain iterators do). ``extra`` is a JSON-serialisable dict.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        save_every: int = 1,
        keep: int | None = 3,
        async_save: bool = True,
    ):
        self.directory = Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: exists and is not a directory")
        self.manager = create_checkpoint_manager(
            self.directory, save_every=save_every, keep=keep, async_save=async_save
        )
        self._closed = False
        atexit.register(self._close_at_exit)

    # -- saving ----------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        *,
        model: Any = None,
        optimizer: Any = None,
        data_iter: Any = None,
        extra: dict[str, Any] | None = None,
        arrays: Any = None,
        force: bool = False,
    ) -> bool:
        """Starts saving ``step`` if the policy says so (or ``force``); returns whether it did.

        ``arrays`` is any further pytree of arrays (e.g. an engine's KV caches); pass host copies
        of buffers that later computations donate."""
        args = {}
        if model is not None:
            args["model"] = ocp.args.StandardSave(_state_of(model))
        if optimizer is not None:
            args["optimizer"] = ocp.args.StandardSave(_state_of(optimizer))
        if arrays is not None:
            args["arrays"] = ocp.args.StandardSave(arrays)
        if data_iter is not None:
            args["data_iter"] = ocp.args.JsonSave(data_iter.get_state())
        if extra is not None:
            json.dumps(extra)  # fail now, in the caller's thread, if it cannot be written
            args["extra"] = ocp.args.JsonSave(extra)
        if not args:
            raise ValueError("save() needs at least one of model, optimizer, data_iter, extra")
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def wait(self) -> None:
        """Blocks until the last asynchronous save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager (also done at interpreter exit)."""
        if not self._closed:
            self._closed = True
            atexit.unregister(self._close_at_exit)
            self.manager.wait_until_finished()
            self.manager.close()

    def _close_at_exit(self) -> None:
        try:
            self.close()
        except RuntimeError:  # orbax's event loop may already be gone at interpreter shutdown
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- restoring -------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(
        self,
        step: int | None = None,
        *,
        model: Any = None,
        optimizer: Any = None,
        data_iter: Any = None,
        arrays: Any = None,
    ) -> tuple[int, dict[str, Any]]:
        """Restores ``step`` (default: the latest) into the given objects.

        NNX objects are updated in place; plain pytrees serve as the target structure and the
        restored pytrees are returned in the dict under ``"model"`` / ``"optimizer"``.

        Returns:
          ``(step, restored)`` where ``restored`` holds every restored item, ``extra`` included.
        """
        self.wait()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"{self.directory}: no complete checkpoint to restore")
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(
                f"{self.directory}: no checkpoint for step {step}; available: {steps}"
            )
        step_dir = self.directory / str(step)
        present = {p.name for p in step_dir.iterdir()} if step_dir.is_dir() else set()

        targets = {"model": model, "optimizer": optimizer, "arrays": arrays}
        args = {}
        for name, obj in targets.items():
            if obj is None:
                continue
            if name not in present:
                raise CheckpointError(
                    f"{step_dir}: holds no {name!r} item (found: {sorted(present)})"
                )
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_of(obj))
            self._check_shapes(step, step_dir, name, abstract)
            args[name] = ocp.args.StandardRestore(abstract)
        if data_iter is not None:
            if "data_iter" not in present:
                raise CheckpointError(f"{step_dir}: holds no data-iterator state")
            args["data_iter"] = ocp.args.JsonRestore()
        if "extra" in present:
            args["extra"] = ocp.args.JsonRestore()
        if not args:
            return step, {}
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        except CheckpointError:
            raise
        except Exception as e:  # orbax / tensorstore raise many types for unreadable data
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(
                f"{step_dir}: checkpoint is corrupt or incompatible: {msg[:300]}"
            ) from e

        out = {}
        for name, obj in targets.items():
            if obj is None:
                continue
            value = restored[name]
            if isinstance(obj, nnx.Module | nnx.Optimizer):
                nnx.update(obj, value)
            out[name] = value
        if data_iter is not None:
            data_iter.set_state(restored["data_iter"])
            out["data_iter"] = restored["data_iter"]
        if "extra" in args:
            out["extra"] = restored["extra"]
        return step, out

    def _check_shapes(self, step: int, step_dir: Path, name: str, abstract: Any) -> None:
        """Compares stored array shapes with the target's before Orbax reads any data, so that a
        config change is reported by name (and Orbax's restore is not left half-started)."""
        try:
            stored = self.manager.item_metadata(step)[name]
        except Exception as e:
            raise CheckpointError(
                f"{step_dir}: checkpoint is corrupt: cannot read the metadata of {name!r}: {e}"
            ) from e
        if stored is None:
            return

        def key(path):  # NNX variables add a trailing `.value` to the pytree path
            return jax.tree_util.keystr(path).removesuffix(".value").removesuffix("['value']")

        want = {key(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(abstract)}
        have = {
            key(p): tuple(getattr(x, "shape", ()))
            for p, x in jax.tree_util.tree_leaves_with_path(stored)
        }
        # Orbax spells some containers differently in metadata (tuples as dicts), so only entries
        # found under the same path are compared here; the restore itself checks the rest.
        for key, shape in want.items():
            if key in have and have[key] != shape:
                raise CheckpointError(
                    f"{step_dir}: {name}{key} is stored with shape {have[key]}, but the target has {shape} "
                    "(a different model config?)"
                )

    def restore_or(self, default_step: int, **targets) -> int:
        """Restores the latest checkpoint if there is one; otherwise returns ``default_step``."""
        if self.latest_step() is None:
            return default_step
        step, _ = self.restore(**targets)
        return step

    def delete_all(self) -> None:
        """Removes the checkpoint directory (for tests and fresh restarts)."""
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)
