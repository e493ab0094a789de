"""Parity of jaxlab's models with the transformers PyTorch implementations (float32).

Random-initialised tiny configs are written with ``save_pretrained`` and loaded by jaxlab.
Every parameter (norm weights and biases included) is randomised so nothing is trivially 1 or 0.
Error measure: max |ours - ref| / max |ref| over real tokens, at most 1e-4.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch  # (the parity extra: `make test` installs it; missing is a failure)
import transformers

from jaxlab.models import BertEncoder, Decoder, from_pretrained  # noqa: E402

TOL = 1e-4


def _rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _randomise(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
    return model


def _save(model, tmp_path):
    model.save_pretrained(tmp_path, safe_serialization=True)
    return tmp_path


DECODER_CASES = {
    "llama": dict(cls="LlamaConfig", kw=dict(attention_bias=False)),
    "llama_tied_bias_llama3rope": dict(
        cls="LlamaConfig",
        kw=dict(
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    "llama_linear_rope": dict(
        cls="LlamaConfig",
        kw=dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)),
    ),
    "mistral": dict(  # no sliding window (refused below); head_dim apart from hidden / heads
        cls="MistralConfig",
        kw=dict(
            sliding_window=None,
            head_dim=24,
            rope_parameters=dict(rope_type="default", rope_theta=1e6),
        ),
    ),
    "qwen2": dict(cls="Qwen2Config", kw=dict()),
    "qwen3": dict(cls="Qwen3Config", kw=dict(head_dim=32)),
}


def _hf_decoder(case, tmp_path):
    spec = DECODER_CASES[case]
    cfg = getattr(transformers, spec["cls"])(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        **spec["kw"],
    )
    cls = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").__class__
    torch.manual_seed(0)
    model = _randomise(cls(cfg).eval())
    return model, _save(model, tmp_path)


@pytest.mark.parametrize("case", list(DECODER_CASES))
def test_decoder_matches_transformers(case, tmp_path):
    hf_model, path = _hf_decoder(case, tmp_path)
    model, tokenizer = from_pretrained(path)
    assert isinstance(model, Decoder) and tokenizer is None
    assert model.config.arch == DECODER_CASES[case]["cls"].removesuffix("Config").lower()

    rng = np.random.default_rng(1)
    # one sequence
    ids = rng.integers(0, 128, size=(1, 21))
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(model(jnp.asarray(ids)))
    assert _rel_err(ours, ref) < TOL

    # a left-padded batch; HF is given the same positions (counted from each row's first real token)
    lengths = [21, 9, 15, 1]
    ids = rng.integers(0, 128, size=(4, 21))
    mask = np.zeros((4, 21), np.int64)
    for i, n in enumerate(lengths):
        mask[i, 21 - n :] = 1
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        ref = hf_model(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        ).logits.numpy()
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    real = mask.astype(bool)
    assert np.isfinite(ours).all()
    assert _rel_err(ours[real], ref[real]) < TOL

    # and each padded row equals the same sequence run alone
    for i, n in enumerate(lengths):
        alone = np.asarray(model(jnp.asarray(ids[i : i + 1, 21 - n :])))
        assert _rel_err(ours[i, 21 - n :], alone[0]) < TOL


def test_legacy_rope_scaling_key_loads_as_transformers_computes(tmp_path):
    """Older config.json files spell linear scaling ``rope_scaling: {type: linear, factor}``
    beside a top-level ``rope_theta``; the logits are those of transformers' linear scaling."""
    import json

    hf_model, path = _hf_decoder("llama_linear_rope", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["rope_parameters"]
    cfg.update(rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 4.0})
    (path / "config.json").write_text(json.dumps(cfg))
    model, _ = from_pretrained(path)
    assert model.config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    ids = np.random.default_rng(3).integers(0, 128, size=(2, 40))
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)).logits.numpy()
    assert _rel_err(model(jnp.asarray(ids)), ref) < TOL


def test_mistral_with_a_sliding_window_is_refused(tmp_path):
    from jaxlab.models import LoadError

    cfg = transformers.MistralConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )  # sliding_window defaults to 4096
    _save(transformers.MistralForCausalLM(cfg), tmp_path)
    with pytest.raises(LoadError, match="mistral with sliding-window attention is not supported"):
        from_pretrained(tmp_path)


def test_bert_matches_transformers(tmp_path):
    cfg = transformers.BertConfig(
        vocab_size=120,
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=80,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    hf_model = _randomise(transformers.BertModel(cfg, add_pooling_layer=False).eval())
    hf_model.config._attn_implementation = "eager"
    path = _save(hf_model, tmp_path)
    model, _ = from_pretrained(path)
    assert isinstance(model, BertEncoder)

    rng = np.random.default_rng(2)
    lengths = [17, 5, 12]
    ids = rng.integers(0, 120, size=(3, 17))
    mask = np.zeros((3, 17), np.int64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1  # BERT batches are right-padded: positions are absolute
    types = rng.integers(0, 2, size=(3, 17))
    with torch.no_grad():
        ref = hf_model(
            torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types)
        ).last_hidden_state.numpy()
    ours = np.asarray(
        model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), token_type_ids=jnp.asarray(types))
    )
    real = mask.astype(bool)
    assert _rel_err(ours[real], ref[real]) < TOL

    # mean pooling over real tokens, checked against numpy on the reference hidden states
    pooled = np.asarray(
        model.embed(
            jnp.asarray(ids), attention_mask=jnp.asarray(mask), token_type_ids=jnp.asarray(types)
        )
    )
    ref_pooled = (ref * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    assert _rel_err(pooled, ref_pooled) < TOL


# -- loading: sharded checkpoints and clear errors -------------------------------------------------


def test_sharded_checkpoint_loads(tmp_path):
    hf_model, _ = _hf_decoder("qwen2", tmp_path / "single")
    hf_model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    a, _ = from_pretrained(tmp_path / "single")
    b, _ = from_pretrained(tmp_path / "sharded")
    ids = jnp.asarray([[1, 5, 9, 3]])
    np.testing.assert_array_equal(np.asarray(a(ids)), np.asarray(b(ids)))


def test_loading_errors_are_clear(tmp_path):
    import json
    import shutil

    from jaxlab.models import LoadError

    _, path = _hf_decoder("llama", tmp_path / "ok")
    with pytest.raises(LoadError, match="no config.json"):
        from_pretrained(tmp_path)  # the parent has no config.json

    bad = tmp_path / "arch"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(LoadError, match="model_type 'gpt_neox' is not supported; supported: llama"):
        from_pretrained(bad)

    shape = tmp_path / "shape"
    shutil.copytree(path, shape)
    (shape / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 100}))
    with pytest.raises(
        LoadError,
        match=r"mlp.down_proj.kernel has shape \(3, 96, 64\), the config needs \(3, 100, 64\)",
    ):
        from_pretrained(shape)

    layers = tmp_path / "layers"
    shutil.copytree(path, layers)
    (layers / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 4}))
    with pytest.raises(LoadError, match=r"missing for layers \[3\]"):
        from_pretrained(layers)

    missing = tmp_path / "missing"
    shutil.copytree(path, missing)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(missing / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, missing / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LoadError, match=r"missing weight for norm.weight \(shape \(64,\)\)"):
        from_pretrained(missing)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(path, corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="model.safetensors: cannot read safetensors file"):
        from_pretrained(corrupt)

    empty = tmp_path / "empty"
    shutil.copytree(path, empty)
    (empty / "model.safetensors").unlink()
    with pytest.raises(LoadError, match=r"no \*.safetensors weights"):
        from_pretrained(empty)
