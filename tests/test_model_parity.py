"""Parity of jaxlab's models with the transformers PyTorch implementations (float32).

Random-initialised tiny configs are written with ``save_pretrained`` and loaded by jaxlab.
Every parameter (norm weights and biases included) is randomised so nothing is trivially 1 or 0.
Error measure: max |ours - ref| / max |ref| over real tokens, at most 1e-4.
"""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

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
        mask[i, 21 - n:] = 1
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                       position_ids=torch.tensor(positions)).logits.numpy()
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    real = mask.astype(bool)
    assert np.isfinite(ours).all()
    assert _rel_err(ours[real], ref[real]) < TOL

    # and each padded row equals the same sequence run alone
    for i, n in enumerate(lengths):
        alone = np.asarray(model(jnp.asarray(ids[i:i + 1, 21 - n:])))
        assert _rel_err(ours[i, 21 - n:], alone[0]) < TOL


def test_bert_matches_transformers(tmp_path):
    cfg = transformers.BertConfig(
        vocab_size=120, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=80, max_position_embeddings=64,
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
        ref = hf_model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                       token_type_ids=torch.tensor(types)).last_hidden_state.numpy()
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                            token_type_ids=jnp.asarray(types)))
    real = mask.astype(bool)
    assert _rel_err(ours[real], ref[real]) < TOL

    # mean pooling over real tokens, checked against numpy on the reference hidden states
    pooled = np.asarray(model.embed(jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                                    token_type_ids=jnp.asarray(types)))
    ref_pooled = (ref * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    assert _rel_err(pooled, ref_pooled) < TOL
