"""Faults and bad input: damaged checkpoints fall back to the newest intact step, non-finite
losses never reach a checkpoint, resumed runs keep one metrics line per step."""

import json
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.checkpoint import Checkpointer, CheckpointError
from jaxlab.config import load_config
from jaxlab.metric_writer import MetricWriter
from jaxlab.optim import NonFiniteError, make_optimizer, poison_if_nonfinite, skipped_updates
from jaxlab.train import DataConfig, counting_dataset, train_lm

RNG = np.random.default_rng(0)
# random values do not compress: the stored chunks are the raw bytes, so flipped bytes read back
W1 = RNG.standard_normal((128, 128)).astype(np.float32)
W2 = RNG.standard_normal((128, 128)).astype(np.float32)


def _largest_file(folder):
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip(path):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    path.write_bytes(data)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "flipped_bytes": lambda step: _flip(_largest_file(step / "model")),
    "truncated_data": lambda step: _truncate(_largest_file(step / "model")),
    "missing_item": lambda step: shutil.rmtree(step / "model"),
    "unreadable_metadata": lambda step: (step / "model" / "_METADATA").write_text("{not json"),
    "negative_next_index": lambda step: (step / "data_iter" / "metadata").write_text(
        json.dumps({"next_index": -3})
    ),
    "non_integer_next_index": lambda step: (step / "data_iter" / "metadata").write_text(
        json.dumps({"next_index": 1.5})
    ),
}


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """Checkpoints of steps 1 and 2 (the data iterator at positions 1 and 2), made once."""
    directory = tmp_path_factory.mktemp("two_steps")
    data = iter(counting_dataset(DataConfig(seq_len=4, batch_size=2, num_examples=8), 16))
    with Checkpointer(directory, async_save=False) as ckpt:
        next(data)
        ckpt.save(1, model={"w": W1}, data_iter=data)
        next(data)
        ckpt.save(2, model={"w": W2}, data_iter=data)
    return directory


def _save_two_steps(two_steps, directory):
    shutil.copytree(two_steps, directory, dirs_exist_ok=True)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_step_falls_back_to_the_previous_one(two_steps, tmp_path, capfd, damage):
    _save_two_steps(two_steps, tmp_path)
    DAMAGE[damage](tmp_path / "2")
    capfd.readouterr()
    data = iter(counting_dataset(DataConfig(seq_len=4, batch_size=2, num_examples=8), 16))
    with Checkpointer(tmp_path) as ckpt:
        step, restored = ckpt.restore(model={"w": np.zeros_like(W1)}, data_iter=data)
        assert step == 1
        np.testing.assert_array_equal(np.asarray(restored["model"]["w"]), W1)
        assert data.get_state() == {"next_index": 1}
        assert ckpt.damaged_steps == [2] and ckpt.all_steps() == [1]
        # the run can save step 2 again: the damaged one was moved aside, not left in the way
        assert ckpt.save(2, model={"w": W2}, force=True)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "restored step 1" in err[0]
    assert (tmp_path / "damaged" / "2").is_dir()
    assert (tmp_path / "2").is_dir()


def test_no_intact_step_is_an_error_naming_the_folder(two_steps, tmp_path):
    _save_two_steps(two_steps, tmp_path)
    for step in ("1", "2"):
        DAMAGE["flipped_bytes"](tmp_path / step)
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError, match=f"{tmp_path}: no intact checkpoint") as e:
            ckpt.restore(model={"w": np.zeros_like(W1)})
        assert "checksum" in str(e.value)
        assert ckpt.all_steps() == [1, 2]  # nothing moved when nothing could be restored
    # an explicit step is restored or refused, never swapped for another
    with Checkpointer(tmp_path) as ckpt, pytest.raises(CheckpointError, match="2: checkpoint is"):
        ckpt.restore(2, model={"w": np.zeros_like(W1)})


def test_metric_writer_trims_to_the_restored_step_and_writes_valid_json(tmp_path):
    with MetricWriter(tmp_path, tensorboard=False) as log:
        for step in (1, 2, 3, 2, 3):  # a run killed after logging 3 and resumed from 1 before
            log.write({"step": step, "loss": float(step)})
    (tmp_path / "metrics.jsonl").open("a").write('{"step": 4, "lo')  # cut short by a kill
    with MetricWriter(tmp_path, append=True, tensorboard=False, keep_until=2) as log:
        log.write({"step": 3, "loss": float("nan"), "grad_norm": float("inf")})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]  # strict JSON: NaN would not parse in other readers
    assert [r["step"] for r in rows] == [1, 2, 2, 3]
    assert rows[-1]["loss"] == "NaN" and rows[-1]["grad_norm"] == "Infinity"
    assert np.isnan(float(rows[-1]["loss"])) and float(rows[-1]["grad_norm"]) == np.inf


LM = [
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "data.seq_len=16",
    "data.batch_size=8",
    "data.num_examples=64",
    "train.steps=6",
    "train.warmup_steps=0",
    "checkpoint.save_every=2",
    "checkpoint.keep=2",
    "checkpoint.async_save=false",
    "log_every=1",
    "tensorboard=false",
]


def _rows(workdir):
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


_KILLED_TRAIN = textwrap.dedent(
    """
    import json, os, signal, sys
    from orbax.checkpoint._src.path import atomicity
    from jaxlab.config import load_config
    from jaxlab.train import train_lm

    paths = atomicity.AtomicRenameTemporaryPath
    real_create = paths.create

    async def create(self):  # killed once step 6's temporary directory exists: mid-save
        tmp = await real_create(self)
        if self.get_final().name == "6":
            os.kill(os.getpid(), signal.SIGKILL)
        return tmp

    paths.create = create
    train_lm(load_config("lm_tiny", json.loads(sys.argv[2])), sys.argv[1], progress=False)
    sys.exit("step 6 was saved without reaching the hook")
    """
)


def test_killed_and_corrupt_runs_resume_exactly_and_nonfinite_loss_stops_before_saving(
    tmp_path, capfd
):
    cfg = load_config("lm_tiny", LM)
    straight = tmp_path / "straight"
    train_lm(cfg, straight, progress=False)

    # a run killed while saving step 6 (rows 5 and 6 logged, only steps 2 and 4 on disk), whose
    # step-4 checkpoint is then damaged on disk: the resume falls back to step 2
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_TRAIN, str(run), json.dumps(LM)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [r["step"] for r in _rows(run)] == [1, 2, 3, 4, 5, 6]
    with Checkpointer(run / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [2, 4]
    _flip(_largest_file(run / "checkpoints" / "4" / "model"))
    capfd.readouterr()
    train_lm(cfg, run, progress=False)
    assert "restored step 2" in capfd.readouterr().err
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # no step logged twice
    for a, b in zip(rows, _rows(straight), strict=True):  # the same losses, bit for bit
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"])

    # the same run continued to step 10 at a learning rate that makes it diverge: it stops at the
    # first non-finite loss or gradient norm, before the save at step 8
    diverging = load_config("lm_tiny", [*LM, "train.steps=10", "train.lr=1e30"])
    with pytest.raises(NonFiniteError, match="not finite; stopped before saving") as e:
        train_lm(diverging, run, progress=False)
    assert "train.on_nonfinite=skip" in str(e.value)
    rows = _rows(run)
    assert all(np.isfinite([r["loss"], r["grad_norm"]]).all() for r in rows)
    with Checkpointer(run / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [4, 6]  # keep=2 did not rotate a good checkpoint away
        model = _model(cfg)
        assert ckpt.restore(model=model)[0] == 6
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model)))


def test_skip_nonfinite_leaves_weights_and_moments_unchanged():
    import optax

    params = {"w": jnp.arange(4.0), "b": jnp.ones(2)}
    grads = {"w": jnp.full(4, 0.5), "b": jnp.full(2, -1.0)}
    plain = make_optimizer(lr=0.1, grad_clip=1.0)
    skipping = make_optimizer(lr=0.1, grad_clip=1.0, skip_nonfinite=True)
    state = skipping.init(params)
    # a finite loss keeps the gradient; a NaN or infinite loss poisons it, and the update is skipped
    for loss in (jnp.nan, jnp.inf, -jnp.inf):
        poisoned = poison_if_nonfinite(jnp.asarray(loss), grads)
        updates, state = skipping.update(poisoned, state, params)
        assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))
    assert skipped_updates(state) == 3
    kept = poison_if_nonfinite(jnp.asarray(2.0), grads)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(grads)))
    # after the skipped ones, the first real update equals the plain optimizer's first update
    updates, state = skipping.update(kept, state, params)
    want, _ = plain.update(grads, plain.init(params), params)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert skipped_updates(state) == 3 and skipped_updates(plain.init(params)) == 0
    assert isinstance(state, optax.ApplyIfFiniteState)


def _model(cfg):
    from jaxlab.models import Decoder

    return Decoder(cfg.model, rngs=nnx.Rngs(0))
