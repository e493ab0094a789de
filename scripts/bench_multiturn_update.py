"""An RL update's loss and gradient on one micro-batch: logits at every position of the padded
rows (the reference) against logits at the response positions only (what ``jaxlab.rl.multiturn``
and ``jaxlab.rl.trainer`` compute, :func:`jaxlab.rl.logprobs.response_logprobs`), and with
``--chunks``, those projected a chunk of positions at a time (``logits_chunk`` of rl_train).
Prints the compiled programs' temporary memory and the median time of each, and their ratios to
the reference, measured in the same run; and the memory each needs beyond that of the decoder
alone (its hidden states and their gradient without any projection), which is the logits' share.

    python scripts/bench_multiturn_update.py                                   # CPU config
    python scripts/bench_multiturn_update.py --config rl/empo2_scienceworld_gpu --set model=DIR
    # long responses, as in single-turn RL (rl_train), chunked:
    python scripts/bench_multiturn_update.py --set max_prompt_tokens=128 max_new_tokens=512 \
        micro_batch=4 --chunks 64 128

The batch is ``micro_batch`` rows of the config's padded width (max_prompt_tokens +
max_new_tokens, rounded up to 64) with a full-length response at the end of each prompt; the
model, LoRA and dtype are the config's.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="rl/empo2_scienceworld")
    p.add_argument("--set", nargs="*", default=[], help="config overrides key=value")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunks", type=int, nargs="*", default=[], help="logits_chunk values")
    args = p.parse_args()

    from jaxlab import rl
    from jaxlab.config import load_config
    from jaxlab.generation.core import sampling_logprobs
    from jaxlab.models.lora import add_lora, trainable
    from jaxlab.rl.logprobs import response_logprobs
    from jaxlab.rl.multiturn import MultiTurnConfig, load_policy

    cfg = load_config(args.config, args.set, cls=MultiTurnConfig)
    model, _ = load_policy(cfg)
    model = add_lora(model, cfg.lora, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, trainable(model), ...)
    n, r = cfg.micro_batch, cfg.max_new_tokens
    w = -(-(cfg.max_prompt_tokens + cfg.max_new_tokens) // 64) * 64
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, 1000, (n, w)), jnp.int32)
    mask = jnp.ones((n, w), jnp.int32)
    loss_mask = np.zeros((n, w - 1), np.float32)
    for i in range(n):  # prompts of different lengths, a full response after each
        start = cfg.max_prompt_tokens - 1 - 16 * i
        loss_mask[i, start : start + r] = 1
    loss_mask = jnp.asarray(loss_mask)
    behaviour = jnp.full((n, w - 1), -3.0, jnp.float32)
    adv = jnp.asarray(rng.normal(size=n), jnp.float32)
    max_len = float(r)
    norm = rl.loss_normalizer(loss_mask, cfg.agg, max_len=max_len)

    def loss(logp, lmask, beh):
        value, _ = rl.policy_loss(
            logp, beh, adv, lmask, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
            dual_clip=cfg.dual_clip, agg=cfg.agg, max_len=max_len, normalizer=norm,
        )  # fmt: skip
        return value

    def every_position(params):
        m = nnx.merge(graphdef, params, rest)
        logits = m(tokens[:, :-1], attention_mask=mask[:, :-1])
        logp = sampling_logprobs(logits, tokens[:, 1:], temperature=cfg.temperature)
        return loss(logp, loss_mask, behaviour)

    def response_only(chunk):
        def fn(params):
            m = nnx.merge(graphdef, params, rest)
            logp, lmask, beh = response_logprobs(
                m, tokens, mask, loss_mask, behaviour, window=r, temperature=cfg.temperature,
                chunk=chunk,
            )  # fmt: skip
            return loss(logp, lmask, beh)

        return fn

    def decoder_alone(params):  # no vocabulary projection: what the rest of the update needs
        m = nnx.merge(graphdef, params, rest)
        hidden = m(tokens[:, :-1], attention_mask=mask[:, :-1], return_hidden=True)
        return jnp.sum(hidden.astype(jnp.float32) * loss_mask[..., None])

    variants = [("every position", every_position), ("response only", response_only(0))]
    variants += [(f"chunks of {c}", response_only(c)) for c in args.chunks]
    variants += [("decoder alone", decoder_alone)]
    results = {}
    for name, fn in variants:
        compiled = jax.jit(jax.value_and_grad(fn)).lower(params).compile()
        mem = compiled.memory_analysis()
        temp = getattr(mem, "temp_size_in_bytes", float("nan")) if mem is not None else float("nan")
        value, grads = compiled(params)
        jax.block_until_ready(grads)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(params))
            times.append(time.perf_counter() - t0)
        gnorm = float(
            jnp.sqrt(sum(jnp.sum(g.astype(jnp.float32) ** 2) for g in jax.tree.leaves(grads)))
        )
        results[name] = {
            "loss": float(value),
            "grad_norm": gnorm,
            "temp_bytes": temp,
            "median_s": float(np.median(times)),
        }
        print(
            f"{name:16s} loss {float(value):+.6f} grad norm {gnorm:.6f} "
            f"temp memory {temp / 2**20:8.1f} MiB  median {np.median(times):.3f} s",
            flush=True,
        )
    a, base = results["every position"], results.pop("decoder alone")["temp_bytes"]
    print(
        f"device {jax.devices()[0].device_kind}, rows {n} x width {w}, response {r} tokens; "
        f"the decoder alone (no projection) needs {base / 2**20:.1f} MiB"
    )
    for name, b in results.items():
        if name != "every position":
            print(
                f"{name} / every position: memory {b['temp_bytes'] / a['temp_bytes']:.3f} "
                f"(beyond the decoder's: {(b['temp_bytes'] - base) / 2**20:.1f} against "
                f"{(a['temp_bytes'] - base) / 2**20:.1f} MiB), time "
                f"{b['median_s'] / a['median_s']:.3f}; loss rel diff "
                f"{abs(a['loss'] - b['loss']) / max(abs(a['loss']), 1e-12):.1e}"
            )
    print(json.dumps({"config": args.config, "rows": n, "width": w, **results}))


if __name__ == "__main__":
    main()
