"""The one place jaxlab builds an Orbax CheckpointManager.

A checkpoint holds, per step: the model state, the optimizer state, the data-iterator state and
any JSON-serialisable extras (controller state, config). Saves are asynchronous and atomic: Orbax
writes into a temporary directory and renames it when complete, so a save that is interrupted
part-way leaves the previous checkpoint untouched.

Integrity: each save also records a CRC32 per saved array (item ``checksums``), and a restore
compares every restored array with it. When the latest step is damaged (a missing or unreadable
item, unreadable metadata, a checksum mismatch, a data-iterator state the iterator rejects),
:meth:`Checkpointer.restore` falls back to the newest intact step, says so in one ``warning:`` line
on stderr, and moves the damaged steps to ``<directory>/damaged/`` so that the run can save those
steps again; only when no step is intact is it an error naming the directory. A wrong shape (a
changed model config) is an error at once, not a fallback.

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
import sys
import zlib
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxlab.config import check
from jaxlab.errors import UserError

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "Checkpointer",
    "array_checksums",
    "create_checkpoint_manager",
]

_STATE_ITEMS = ("model", "optimizer", "arrays")
_JSON_ITEMS = ("data_iter", "extra", "checksums")


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


class _DamagedStep(CheckpointError):
    """One step cannot be restored because its files are damaged (restore tries an older step)."""


def _leaf_key(path) -> str:
    # NNX variables add a trailing `.value` to the pytree path
    return jax.tree_util.keystr(path).removesuffix(".value").removesuffix("['value']")


def _check_position_fields(state: Any) -> None:
    """Grain iterators take a ``next_index`` they cannot use (1.5) and fail later, in the middle
    of training: positions (keys ending in ``index``) must be integers >= 0."""
    if isinstance(state, dict):
        for key, value in state.items():
            if str(key).endswith("index") and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise ValueError(f"{key} must be an integer >= 0, got {value!r}")
            _check_position_fields(value)
    elif isinstance(state, list):
        for value in state:
            _check_position_fields(value)


def array_checksums(tree: Any) -> dict[str, str]:
    """``{pytree path: "crc32:dtype:shape"}`` of every array leaf of ``tree`` (host bytes).

    Arrays spread over several processes (not fully addressable here) are left out."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            continue
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            continue
        a = np.ascontiguousarray(np.asarray(leaf))
        crc = zlib.crc32(a.reshape(-1).view(np.uint8)) if a.size else 0
        out[_leaf_key(path)] = f"{crc:08x}:{a.dtype.name}:{'x'.join(map(str, a.shape))}"
    return out


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
    (grain iterators do). ``extra`` is a JSON-serialisable dict. ``read_only=True`` opens an
    existing directory for restoring only: nothing in it is created, cleaned up or moved.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        save_every: int = 1,
        keep: int | None = 3,
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: exists and is not a directory")
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: no such checkpoint directory")
        self.read_only = read_only
        self.manager = create_checkpoint_manager(
            self.directory,
            save_every=save_every,
            keep=keep,
            async_save=async_save,
            read_only=read_only,
        )
        self._closed = False
        self.damaged_steps: list[int] = []  # steps a restore found damaged and set aside
        atexit.register(self._close_at_exit)

    @classmethod
    def from_config(cls, directory: str | Path, cfg: CheckpointConfig) -> Checkpointer:
        """A trainer's checkpointer: saves every ``cfg.save_every`` steps, keeps ``cfg.keep``."""
        return cls(directory, save_every=cfg.save_every, keep=cfg.keep, async_save=cfg.async_save)

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
        if not self.manager.should_save(step) and not force:
            return False
        args, checksums = {}, {}
        for name, obj in (("model", model), ("optimizer", optimizer), ("arrays", arrays)):
            if obj is not None:
                state = _state_of(obj)
                args[name] = ocp.args.StandardSave(state)
                checksums[name] = array_checksums(state)
        if data_iter is not None:
            args["data_iter"] = ocp.args.JsonSave(data_iter.get_state())
        if extra is not None:
            json.dumps(extra)  # fail now, in the caller's thread, if it cannot be written
            args["extra"] = ocp.args.JsonSave(extra)
        if not args:
            raise ValueError("save() needs at least one of model, optimizer, data_iter, extra")
        if checksums:
            args["checksums"] = ocp.args.JsonSave(checksums)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def will_save(self, step: int, *, force: bool = False) -> bool:
        """Whether ``save(step, force=force)`` would write a checkpoint."""
        return force or self.manager.should_save(step)

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
        """Restores ``step`` (default: the newest intact step) into the given objects.

        NNX objects are updated in place; plain pytrees serve as the target structure and the
        restored pytrees are returned in the dict under ``"model"`` / ``"optimizer"``. Every
        restored array is checked against the checksum recorded when it was saved.

        With ``step=None``, a damaged latest step is skipped for the newest intact one (one
        ``warning:`` line on stderr; the damaged steps move to ``damaged/``, listed in
        :attr:`damaged_steps`). An explicit ``step`` that is damaged is an error.

        Returns:
          ``(step, restored)`` where ``restored`` holds every restored item, ``extra`` included.
        """
        self.wait()
        steps = self.all_steps()
        targets = {"model": model, "optimizer": optimizer, "arrays": arrays}
        if step is not None:
            if step not in steps:
                raise CheckpointError(
                    f"{self.directory}: no checkpoint for step {step}; available: {steps}"
                )
            return step, self._restore_step(step, targets, data_iter)
        if not steps:
            raise CheckpointError(f"{self.directory}: no complete checkpoint to restore")
        damaged: list[tuple[int, str]] = []
        for candidate in reversed(steps):
            try:
                out = self._restore_step(candidate, targets, data_iter)
            except _DamagedStep as e:
                damaged.append((candidate, str(e)))
                continue
            if damaged:
                self._set_aside(damaged, candidate)
            return candidate, out
        reasons = "; ".join(reason for _, reason in damaged)
        raise CheckpointError(f"{self.directory}: no intact checkpoint to restore: {reasons}")

    def _set_aside(self, damaged: list[tuple[int, str]], restored: int) -> None:
        """Moves damaged steps to ``damaged/`` (out of Orbax's sight, kept for inspection)."""
        self.damaged_steps.extend(step for step, _ in damaged)
        if self.read_only:
            print(
                f"warning: {self.directory}: restored step {restored}; newer step(s) "
                f"{[s for s, _ in damaged]} damaged ({damaged[0][1][:200]})",
                file=sys.stderr,
                flush=True,
            )
            return
        aside = self.directory / "damaged"
        moved = []
        for step, _ in damaged:
            target = aside / str(step)
            n = 1
            while target.exists():
                target, n = aside / f"{step}-{n}", n + 1
            try:
                aside.mkdir(exist_ok=True)
                (self.directory / str(step)).rename(target)
                moved.append(step)
            except OSError:
                pass
        self.manager.reload()
        first = damaged[0][1]
        where = f"moved to {aside}" if moved == [s for s, _ in damaged] else f"moved {moved}"
        print(
            f"warning: {self.directory}: restored step {restored}; newer step(s) "
            f"{[s for s, _ in damaged]} damaged, {where} ({first[:200]})",
            file=sys.stderr,
            flush=True,
        )

    def _restore_step(self, step: int, targets: dict[str, Any], data_iter: Any) -> dict[str, Any]:
        step_dir = self.directory / str(step)
        try:
            present = {p.name for p in step_dir.iterdir()} if step_dir.is_dir() else set()
        except OSError as e:
            raise _DamagedStep(f"{step_dir}: checkpoint is unreadable: {e}") from e

        args = {}
        for name, obj in targets.items():
            if obj is None:
                continue
            if name not in present:
                raise _DamagedStep(f"{step_dir}: holds no {name!r} item (found: {sorted(present)})")
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_of(obj))
            self._check_shapes(step, step_dir, name, abstract)
            args[name] = ocp.args.StandardRestore(abstract)
        if data_iter is not None:
            if "data_iter" not in present:
                raise _DamagedStep(f"{step_dir}: holds no data-iterator state")
            args["data_iter"] = ocp.args.JsonRestore()
        if "extra" in present:
            args["extra"] = ocp.args.JsonRestore()
        if not args:
            return {}
        verify = "checksums" in present and any(name in args for name in targets)
        if verify:
            args["checksums"] = ocp.args.JsonRestore()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        except CheckpointError:
            raise
        except Exception as e:  # orbax / tensorstore raise many types for unreadable data
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise _DamagedStep(
                f"{step_dir}: checkpoint is corrupt or incompatible: {msg[:300]}"
            ) from e
        if verify:
            self._verify(step_dir, restored, [n for n in targets if n in args])

        if data_iter is not None:  # before any object is updated: a rejected state is damage
            state = restored["data_iter"]
            try:
                _check_position_fields(state)
                data_iter.set_state(state)
            except Exception as e:
                raise _DamagedStep(
                    f"{step_dir}: checkpoint is corrupt: the data iterator rejects its saved "
                    f"state {json.dumps(state)[:120]}: {type(e).__name__}: {e}"
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
            out["data_iter"] = restored["data_iter"]
        if "extra" in args:
            out["extra"] = restored["extra"]
        return out

    @staticmethod
    def _verify(step_dir: Path, restored: Any, names: list[str]) -> None:
        """Compares each restored array with the checksum recorded at save time."""
        recorded = restored["checksums"]
        if not isinstance(recorded, dict):
            raise _DamagedStep(f"{step_dir}: checkpoint is corrupt: unreadable checksums")
        for name in names:
            want = recorded.get(name)
            if want is None:
                continue
            have = array_checksums(restored[name])
            for key, value in have.items():
                if key in want and want[key] != value:
                    raise _DamagedStep(
                        f"{step_dir}: checkpoint is corrupt: {name}{key} does not match the "
                        "checksum recorded when it was saved"
                    )

    def _check_shapes(self, step: int, step_dir: Path, name: str, abstract: Any) -> None:
        """Compares stored array shapes with the target's before Orbax reads any data, so that a
        config change is reported by name (and Orbax's restore is not left half-started)."""
        try:
            stored = self.manager.item_metadata(step)[name]
        except Exception as e:
            raise _DamagedStep(
                f"{step_dir}: checkpoint is corrupt: cannot read the metadata of {name!r}: {e}"
            ) from e
        if stored is None:
            return

        want = {
            _leaf_key(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(abstract)
        }
        have = {
            _leaf_key(p): tuple(getattr(x, "shape", ()))
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
