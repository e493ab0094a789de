"""Checkpointing: exact resume, retention, and clear errors for missing / corrupt / interrupted saves."""

import os
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
from jaxlab.models import Decoder, DecoderConfig
from jaxlab.train import DataConfig, OptimConfig, counting_dataset, make_optimizer, train_step

MODEL = DecoderConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
)
DATA = DataConfig(seq_len=16, batch_size=4, num_examples=64, seed=3)
OPTIM = OptimConfig(lr=1e-2, warmup_steps=2, steps=8)


def _fresh():
    model = Decoder(MODEL, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, make_optimizer(OPTIM), wrt=nnx.Param)
    data = iter(counting_dataset(DATA, MODEL.vocab_size))
    return model, opt, data


def _train(model, opt, data, n):
    for _ in range(n):
        train_step(model, opt, jnp.asarray(next(data)["tokens"]))


def _params(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_resume_is_bit_exact(tmp_path):
    # uninterrupted: 8 steps
    model, opt, data = _fresh()
    _train(model, opt, data, 8)
    straight = _params(model)

    # 4 steps, save, and (in the same objects) 4 more: what a run that keeps going does
    model, opt, data = _fresh()
    _train(model, opt, data, 4)
    with Checkpointer(tmp_path, save_every=4) as ckpt:
        assert ckpt.save(4, model=model, optimizer=opt, data_iter=data, extra={"note": "half"})
    _train(model, opt, data, 4)
    assert all(np.array_equal(a, b) for a, b in zip(_params(model), straight))

    # new objects (different init), restored at step 4, then 4 steps
    model = Decoder(MODEL, rngs=nnx.Rngs(123))
    opt = nnx.Optimizer(model, make_optimizer(OPTIM), wrt=nnx.Param)
    data = iter(counting_dataset(DATA, MODEL.vocab_size))
    with Checkpointer(tmp_path) as ckpt:
        step, restored = ckpt.restore(model=model, optimizer=opt, data_iter=data)
    assert step == 4 and restored["extra"] == {"note": "half"}
    assert int(opt.step[...]) == 4
    _train(model, opt, data, 4)
    resumed = _params(model)
    assert len(resumed) == len(straight)
    for a, b in zip(resumed, straight):
        assert np.array_equal(a, b)


def test_save_every_and_keep_last(tmp_path):
    model, opt, _ = _fresh()
    with Checkpointer(tmp_path, save_every=2, keep=2) as ckpt:
        saved = [s for s in range(1, 9) if ckpt.save(s, model=model)]
        ckpt.wait()
        assert saved == [2, 4, 6, 8]
        assert ckpt.all_steps() == [6, 8]
        assert ckpt.save(9, model=model, force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [8, 9]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    model, _, _ = _fresh()
    with Checkpointer(tmp_path / "nothing_here") as ckpt:
        with pytest.raises(CheckpointError, match="nothing_here: no complete checkpoint"):
            ckpt.restore(model=model)
    with Checkpointer(tmp_path / "one") as ckpt:
        ckpt.save(1, model=model)
        ckpt.wait()
        with pytest.raises(CheckpointError, match=r"no checkpoint for step 7; available: \[1\]"):
            ckpt.restore(7, model=model)
        with pytest.raises(CheckpointError, match="holds no 'optimizer' item"):
            ckpt.restore(
                model=model, optimizer=nnx.Optimizer(model, make_optimizer(OPTIM), wrt=nnx.Param)
            )


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    model, _, _ = _fresh()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, model=model)
    # damage every data file of the model item
    files = [p for p in (tmp_path / "3" / "model").rglob("*") if p.is_file()]
    assert files
    for f in files:
        f.write_bytes(b"\x00garbage")
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError, match=r"3: checkpoint is corrupt"):
            ckpt.restore(model=model)


def test_wrong_shapes_are_a_clear_error(tmp_path):
    model, _, _ = _fresh()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, model=model)
    other = Decoder(
        DecoderConfig(
            vocab_size=64,
            hidden_size=48,
            intermediate_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
        ),
        rngs=nnx.Rngs(0),
    )
    with (
        Checkpointer(tmp_path) as ckpt,
        pytest.raises(
            CheckpointError,
            match=r"model\['embed_tokens'\]\['embedding'\] is stored with shape \(64, 32\), but the target has \(64, 48\)",
        ),
    ):
        ckpt.restore(model=other)


_KILLED_SAVE = textwrap.dedent(
    """
    import os, signal, sys, threading
    import numpy as np
    from orbax.checkpoint._src.path import atomicity
    from jaxlab.checkpoint import Checkpointer

    directory, stage = sys.argv[1], sys.argv[2]
    reached = threading.Event()

    def kill_when_reached():  # from a thread of its own: the held save may block any other
        reached.wait()
        print("killed at", stage, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    def hold():
        reached.set()
        threading.Event().wait()  # the save goes no further

    # Hooks on the local filesystem's atomic save (a temporary directory renamed when complete):
    # "created" holds step 2 right after its temporary directory is made, "written" after all of
    # its data is written, before the commit.
    paths = atomicity.AtomicRenameTemporaryPath
    real_create, real_finalize = paths.create, paths.finalize

    async def create(self):
        tmp = await real_create(self)
        if self.get_final().name == "2" and stage == "created":
            hold()
        return tmp

    async def finalize(self):
        if self.get_final().name == "2" and stage == "written":
            hold()
        return await real_finalize(self)

    paths.create, paths.finalize = create, finalize
    threading.Thread(target=kill_when_reached, daemon=True).start()
    ckpt = Checkpointer(directory, async_save=True)
    ckpt.save(1, model={"w": np.full((256, 256), 1.0, np.float32)})
    ckpt.wait()
    ckpt.save(2, model={"w": np.full((256, 256), 2.0, np.float32)})
    ckpt.wait()
    sys.exit("step 2 was saved without reaching the hook")  # the test fails: nothing was killed
    """
)


@pytest.mark.parametrize("stage", ["created", "written"])
def test_killed_save_keeps_last_good_checkpoint(tmp_path, stage):
    """A process killed while saving step 2, at a point fixed by a hook (not by timing): just
    after the temporary directory is made, or with all data written but not committed."""
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_SAVE, str(tmp_path), stage],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"killed at {stage}"
    # step 2 was left as an uncommitted temporary directory
    (partial,) = [p for p in tmp_path.iterdir() if p.name.startswith("2.") and "tmp" in p.name]
    if stage == "written":  # the data is all there; only the commit is missing
        assert any(p.is_file() for p in (partial / "model").rglob("*"))
    target = {"w": np.zeros((256, 256), np.float32)}
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1]  # the interrupted step 2 is not taken for a checkpoint
        step, restored = ckpt.restore(model=target)
        assert step == 1 and float(np.asarray(restored["model"]["w"]).min()) == 1.0
        # and the directory stays usable: step 2 can be saved again
        ckpt.save(2, model={"w": np.full((256, 256), 2.0, np.float32)})
        ckpt.wait()
        assert ckpt.all_steps() == [1, 2]
    assert os.path.isdir(tmp_path / "2")
