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
    import os, signal, sys
    import numpy as np
    from jaxlab.checkpoint import Checkpointer
    ckpt = Checkpointer(sys.argv[1], async_save=True)
    ckpt.save(1, model={"w": np.full((4096, 4096), 1.0, np.float32)})
    ckpt.wait()
    ckpt.save(2, model={"w": np.full((4096, 4096), 2.0, np.float32)})  # 64 MB, written in the background
    print("saving", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_killed_save_keeps_last_good_checkpoint(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_SAVE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "saving" in proc.stdout
    # the kill really came mid-save: step 2 was left as an uncommitted temporary directory
    assert any(p.name.startswith("2.") and "tmp" in p.name for p in tmp_path.iterdir())
    target = {"w": np.zeros((4096, 4096), np.float32)}
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1]  # the interrupted step 2 is not taken for a checkpoint
        step, restored = ckpt.restore(model=target)
        assert step == 1 and float(np.asarray(restored["model"]["w"]).min()) == 1.0
        # and the directory stays usable: step 2 can be saved again
        ckpt.save(2, model={"w": np.full((4096, 4096), 2.0, np.float32)})
        ckpt.wait()
        assert ckpt.all_steps() == [1, 2]
    assert os.path.isdir(tmp_path / "2")
