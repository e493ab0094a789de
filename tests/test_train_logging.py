"""The trainers' shared optimizer factory and metrics writer (jaxlab.optim, jaxlab.metric_writer)."""

import json
import math
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlab.config import ConfigError, load_config
from jaxlab.metric_writer import MetricWriter
from jaxlab.optim import learning_rate_schedule, make_optimizer


def _reference_lr(step, *, lr, warmup, decay):
    """The schedules of the module docstring, written out in float64."""
    if decay is None:
        return lr if warmup == 0 else lr * min(step / warmup, 1.0)
    warmup = max(warmup, 1)
    decay = max(decay, warmup + 1)
    if step < warmup:
        return lr * step / warmup
    frac = min((step - warmup) / (decay - warmup), 1.0)
    return 0.5 * lr * (1 + math.cos(math.pi * frac))


@pytest.mark.parametrize("warmup, decay", [(0, None), (4, None), (0, 12), (3, 12)])
def test_schedule_is_the_rate_the_optimizer_applies(warmup, decay):
    lr = 0.1
    lr_at = learning_rate_schedule(lr=lr, warmup_steps=warmup, decay_steps=decay)
    tx = make_optimizer(lr=lr, warmup_steps=warmup, decay_steps=decay)
    # a constant gradient: Adam's bias-corrected m / sqrt(v) is 1, so the update is -lr(step)
    params = {"w": jnp.zeros(3)}
    grads = {"w": jnp.ones(3)}
    state = tx.init(params)
    for step in range(15):
        expected = _reference_lr(step, lr=lr, warmup=warmup, decay=decay)
        assert lr_at(step) == pytest.approx(expected, rel=1e-5, abs=1e-9)  # float32 schedule
        updates, state = tx.update(grads, state, params)
        np.testing.assert_allclose(np.asarray(updates["w"]), -expected, rtol=1e-5, atol=1e-8)


def _random_grads(seed):
    k = jax.random.split(jax.random.key(seed), 2)
    return {"a": 3 * jax.random.normal(k[0], (4, 5)), "b": jax.random.normal(k[1], (7,))}


def _run(tx, steps=5):
    params = _random_grads(100)
    state = tx.init(params)
    for s in range(steps):
        updates, state = tx.update(_random_grads(s), state, params)
        params = optax.apply_updates(params, updates)
    return params


def test_trainers_keep_their_optimizers():
    """Through the factory, both trainers build the optimizer they built by hand before."""
    from jaxlab.rl.trainer import RLOptimConfig
    from jaxlab.train import OptimConfig
    from jaxlab.train import make_optimizer as lm_optimizer

    cfg = OptimConfig(lr=1e-2, warmup_steps=2, steps=8, weight_decay=0.01)
    before = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(
            optax.warmup_cosine_decay_schedule(0.0, cfg.lr, 2, 8),
            b1=cfg.b1,
            b2=cfg.b2,
            weight_decay=cfg.weight_decay,
        ),
    )
    for x, y in zip(jax.tree.leaves(_run(lm_optimizer(cfg))), jax.tree.leaves(_run(before))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    rl = RLOptimConfig(lr=3e-3, grad_clip=0.5)
    before = optax.chain(
        optax.clip_by_global_norm(rl.grad_clip),
        optax.adamw(rl.lr, weight_decay=rl.weight_decay),
    )
    after = make_optimizer(**rl.optimizer_settings())
    assert jax.tree.structure(after.init(_random_grads(0))) == jax.tree.structure(
        before.init(_random_grads(0))
    )  # the same state: checkpoints written before restore
    for x, y in zip(jax.tree.leaves(_run(after)), jax.tree.leaves(_run(before))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=0", r"lr: must be positive"),
        ("optim.b2=1.0", r"optim.b2: must lie in \[0, 1\)"),
        ("optim.warmup_steps=-1", r"warmup_steps: must be >= 0"),
        ("optim.grad_clip=0", r"grad_clip: must be positive"),
    ],
)
def test_rl_optimizer_settings_are_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/rl/tiny_sync.yaml", [override])


def _tensorboard_scalars(logdir):
    """(tag, step) -> value from TFRecord-framed Event protos."""
    from tensorboardX.proto.event_pb2 import Event

    scalars = {}
    for events in logdir.glob("events.out.tfevents.*"):
        raw, pos = events.read_bytes(), 0
        while pos < len(raw):
            (length,) = struct.unpack("<Q", raw[pos : pos + 8])
            event = Event.FromString(raw[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                scalars[(v.tag, event.step)] = v.simple_value
    return scalars


def test_metric_writer_jsonl_tensorboard_and_append(tmp_path):
    pytest.importorskip("tensorboardX")
    with MetricWriter(tmp_path, step_key="version") as log:
        log.write({"version": 1, "loss": 0.5, "note": "text", "ok": 3})
        log.write({"version": 2, "loss": 0.25, "note": "more", "ok": 4})
    with MetricWriter(tmp_path, append=True, step_key="version") as log:
        log.write({"version": 3, "loss": 0.125, "note": "", "ok": 5})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["version"] for x in lines] == [1, 2, 3] and lines[1]["note"] == "more"
    scalars = _tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars[("loss", 2)] == 0.25 and scalars[("ok", 3)] == 5.0
    assert not any(tag in ("version", "note") for tag, _ in scalars)
    with MetricWriter(tmp_path, append=False, tensorboard=False) as log:  # a fresh run
        log.write({"step": 1})
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_metric_writer_writes_on_process_zero_only(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda *a, **k: 1)
    with MetricWriter(tmp_path / "other") as log:
        log.write({"step": 1, "loss": 1.0})
    assert not (tmp_path / "other").exists()


def test_train_lm_logs_lr_grad_norm_and_throughput(tmp_path):
    pytest.importorskip("tensorboardX")
    from jaxlab.train import learning_rate, train_lm

    cfg = load_config(
        "configs/lm_tiny.yaml",
        ["train.steps=6", "train.warmup_steps=2", "log_every=3", "data.batch_size=4"],
    )
    train_lm(cfg, tmp_path, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [3, 6]
    for x in lines:
        assert x["lr"] == pytest.approx(learning_rate(cfg.train, x["step"] - 1))
        assert x["lr"] == pytest.approx(
            _reference_lr(x["step"] - 1, lr=cfg.train.lr, warmup=2, decay=6), rel=1e-5
        )
        assert np.isfinite(x["grad_norm"]) and x["grad_norm"] > 0
        assert x["tokens_per_s"] == pytest.approx(x["steps_per_s"] * 4 * cfg.data.seq_len)
    scalars = _tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars[("grad_norm", 6)] == pytest.approx(lines[1]["grad_norm"], rel=1e-6)
    assert scalars[("lr", 3)] == pytest.approx(lines[0]["lr"], rel=1e-6)
