"""Bias and variance of loss aggregations (GRPO, DAPO, Dr. GRPO, ΔL) as gradient estimators.

    python scripts/delta_l_variance.py [--out runs/delta_l] [--trials 20000] [--lm-sequences 2048]

Each aggregation weights the per-response gradient g_i = Σ_t A_i ∇ log π(o_it) by w_i:
GRPO 1/(G·L_i), DAPO 1/Σ_j L_j, Dr. GRPO 1/(G·M), ΔL x_i/M with x_i = L_i^-α / Σ_j L_j^-α.
The weights come from ``jaxlab.rl.aggregate_loss`` itself (the gradient of the aggregated loss
with respect to each response's token-loss sum), so the script measures the library's code.

Estimates are compared on a common scale: each is divided by c = E[Σ_i w_i], its expected total
weight, so that an estimator is unbiased when E[est]/c equals the true gradient g*.
Reported per estimator: the relative bias ‖E[est]/c − g*‖/‖g*‖, the relative variance
E‖est/c − E[est]/c‖²/‖g*‖², and the spread of the gradient scale across batches (std of Σ w / c),
the "length-dependent scale" that makes GRPO and DAPO biased when lengths change.

Experiment 1 (synthetic): g_i ~ N(g*, V·L_i·I) with log-normal lengths (the ΔL paper's model).
Experiment 2 (a real LM): a tiny random decoder samples responses that end at its own EOS; A_i is
a group-baselined reward; g_i are exact per-response gradients of the policy (flattened, projected
to 512 random directions); g* is their mean over all sampled responses.
Writes ``results.json`` and ``delta_l_variance.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab import rl
from jaxlab.progress import progress

ESTIMATORS = {
    "GRPO": ("seq_mean_token_mean", {}),
    "DAPO": ("token_mean", {}),
    "Dr. GRPO": ("seq_mean_token_sum_norm", {}),
    "ΔL α=0.5": ("delta_l", {"alpha": 0.5}),
    "ΔL α=0.75": ("delta_l", {"alpha": 0.75}),
    "ΔL α=1": ("delta_l", {"alpha": 1.0}),
}


def aggregation_weights(lengths: np.ndarray, mode: str, max_len: int, **kw) -> np.ndarray:
    """w_i [..., G]: d aggregate_loss / d (Σ_t ℓ_it), read off jaxlab's own aggregation."""
    lengths = np.asarray(lengths)
    t = int(lengths.max())
    mask = (np.arange(t) < lengths[..., None]).astype(np.float32)

    def loss_of_row_sums(s, m):
        # spread each row's sum evenly over its tokens; the aggregation is linear in the token losses
        per_token = s[:, None] * m / jnp.maximum(m.sum(-1, keepdims=True), 1.0)
        return rl.aggregate_loss(per_token, m, mode, max_len=max_len, **kw)

    grad = jax.jit(jax.vmap(jax.grad(loss_of_row_sums)))
    flat_mask = mask.reshape(-1, *mask.shape[-2:])
    w = grad(jnp.zeros(flat_mask.shape[:2], jnp.float32), jnp.asarray(flat_mask))
    return np.asarray(w, np.float64).reshape(lengths.shape)


def evaluate(weights: np.ndarray, grads: np.ndarray, g_star: np.ndarray) -> dict[str, float]:
    """weights [trials, G], grads [trials, G, D] -> bias / variance / scale spread."""
    total = weights.sum(-1)
    c = total.mean()
    est = np.einsum("ng,ngd->nd", weights, grads) / c
    mean = est.mean(0)
    norm2 = float(g_star @ g_star)
    rel_var = float(((est - mean) ** 2).sum(-1).mean() / norm2)
    return {
        "rel_bias": float(np.linalg.norm(mean - g_star) / np.sqrt(norm2)),
        "bias_noise": float(np.sqrt(rel_var / len(weights))),  # Monte-Carlo error of rel_bias
        "rel_variance": rel_var,
        "scale_spread": float(total.std() / c),
    }


def synthetic(
    trials: int, group: int, dim: int, seed: int, max_len: int
) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(seed)
    g_star = rng.normal(size=dim)
    g_star /= np.linalg.norm(g_star)
    lengths = np.clip(
        np.round(np.exp(rng.normal(np.log(300), 0.8, size=(trials, group)))), 4, max_len
    )
    noise_scale = 0.05
    grads = g_star + noise_scale * np.sqrt(lengths)[..., None] * rng.normal(
        size=(trials, group, dim)
    )
    out = {}
    for name, (mode, kw) in ESTIMATORS.items():
        out[name] = evaluate(
            aggregation_weights(lengths.astype(np.int64), mode, max_len, **kw), grads, g_star
        )
    return out


def real_lm(n_sequences: int, group: int, trials: int, seed: int, proj_dim: int = 512):
    from flax import nnx

    from jaxlab.generation import generate_tokens
    from jaxlab.models import Decoder, DecoderConfig

    cfg = DecoderConfig(
        vocab_size=32,
        hidden_size=48,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=256,
    )
    model = Decoder(cfg, rngs=nnx.Rngs(seed))
    # at temperature 1.3 this random model emits EOS (id 0) after ~30 tokens on average
    prompt = np.array([[5, 9, 2, 7]], np.int32)
    max_new = 160
    chunks = []
    for i in range(0, n_sequences, 256):
        toks, _, _, lengths, _ = generate_tokens(
            model,
            np.repeat(prompt, 256, 0),
            np.ones((256, 4), np.int32),
            max_new_tokens=max_new,
            eos_ids=(0,),
            pad_id=0,
            temperature=1.3,
            seed=seed + i,
        )
        chunks.append((toks, lengths))
    tokens = np.concatenate([c[0] for c in chunks])[:n_sequences]
    lengths = np.concatenate([c[1] for c in chunks])[:n_sequences].astype(np.int64)
    # reward: the share of "small" token ids in the response; group-baselined advantages
    mask = (np.arange(max_new) < lengths[:, None]).astype(np.float32)
    reward = ((tokens < 12) * mask).sum(-1) / np.maximum(lengths, 1)
    adv = reward - reward.mean()

    graphdef, params = nnx.split(model, nnx.Param)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    proj = jax.random.normal(jax.random.key(seed), (flat.size, proj_dim)) / np.sqrt(proj_dim)

    def seq_grad(flat_params, tok, m, a):
        p = unravel(flat_params)
        full = jnp.concatenate([jnp.asarray(prompt[0]), tok])[None]
        logits = nnx.merge(graphdef, p)(full[:, :-1])[0, prompt.shape[1] - 1 :]
        logp = rl.token_logprobs(logits[None], tok[None])[0]
        return -a * jnp.sum(logp * m)

    grad_fn = jax.jit(jax.vmap(lambda t, m, a: jax.grad(seq_grad)(flat, t, m, a) @ proj))
    grads = []
    for i in progress(range(0, n_sequences, 128), desc="per-response gradients"):
        sl = slice(i, i + 128)
        grads.append(
            np.asarray(
                grad_fn(
                    jnp.asarray(tokens[sl]),
                    jnp.asarray(mask[sl]),
                    jnp.asarray(adv[sl], jnp.float32),
                )
            )
        )
    grads = np.concatenate(grads).astype(np.float64)
    g_star = grads.mean(0)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_sequences, size=(trials, group))
    out = {}
    for name, (mode, kw) in ESTIMATORS.items():
        w = aggregation_weights(lengths[idx], mode, max_new, **kw)
        out[name] = evaluate(w, grads[idx], g_star)
    stats = {
        "mean_length": float(lengths.mean()),
        "min_length": int(lengths.min()),
        "max_length": int(lengths.max()),
        "corr_length_reward": float(np.corrcoef(lengths, reward)[0, 1]),
    }
    return out, stats


def table(title: str, res: dict[str, dict[str, float]]) -> str:
    base = res["ΔL α=1"]
    lines = [
        title,
        f"{'estimator':12s} {'rel bias':>9s} {'± MC':>7s} {'rel var':>9s} {'var / ΔL(1)':>12s} "
        f"{'scale spread':>13s}",
    ]
    for name, r in res.items():
        lines.append(
            f"{name:12s} {r['rel_bias']:9.4f} {r['bias_noise']:7.4f} {r['rel_variance']:9.4f} "
            f"{r['rel_variance'] / base['rel_variance']:12.2f} {r['scale_spread']:13.4f}"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4))
    for ax, (title, res) in zip(np.atleast_1d(axes), results.items()):
        names = list(res)
        x = np.arange(len(names))
        for offset, key, label in (
            (-0.27, "rel_variance", "relative variance"),
            (0.0, "rel_bias", "relative bias"),
            (0.27, "scale_spread", "scale spread (length-dependent scale)"),
        ):
            ax.bar(x + offset, [res[n][key] for n in names], 0.27, label=label)
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/delta_l")
    p.add_argument("--trials", type=int, default=20000)
    p.add_argument("--group", type=int, default=16)
    p.add_argument("--lm-sequences", type=int, default=2048, help="0 skips the LM experiment")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    results = {"synthetic: Var(g_i) ∝ L_i": synthetic(args.trials, args.group, 64, args.seed, 4096)}
    print(
        table(
            "Experiment 1 — synthetic, log-normal lengths (median 300, M = 4096)",
            results["synthetic: Var(g_i) ∝ L_i"],
        )
    )
    stats = None
    if args.lm_sequences:
        lm, stats = real_lm(args.lm_sequences, args.group, args.trials, args.seed)
        results["tiny LM: exact per-response gradients"] = lm
        print()
        print(
            table(
                f"Experiment 2 — tiny LM, {args.lm_sequences} sampled responses, lengths {stats}",
                lm,
            )
        )
    (out / "results.json").write_text(
        json.dumps(
            {"results": results, "lm_stats": stats, "args": vars(args)},
            indent=2,
            ensure_ascii=False,
        )
    )
    plot(results, out / "delta_l_variance.png")
    print(f"\nwrote {out / 'results.json'} and {out / 'delta_l_variance.png'}")


if __name__ == "__main__":
    main()
