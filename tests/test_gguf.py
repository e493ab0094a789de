"""GGUF loading of Llama / Qwen2 / Qwen3 decoders in F32, F16, Q8_0 and Q4_0 against transformers.

Tiny random HF models are written as GGUF the way llama.cpp's converter does (Q/K rows permuted
for Llama), then loaded by jaxlab and by transformers from the same file.
"""

import json
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch  # (the parity extra: `make test` installs it; missing is a failure)
import transformers
from test_model_parity import _hf_decoder, _rel_err  # noqa: E402

from jaxlab.models import from_pretrained  # noqa: E402
from jaxlab.testing.gguf_writer import write_decoder_gguf  # noqa: E402

QUANTS = ["F32", "F16", "Q8_0", "Q4_0"]


def _write(case, quant, tmp_path):
    hf_model, path = _hf_decoder(case, tmp_path / "hf")
    cfg = json.loads((path / "config.json").read_text())
    sd = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    return hf_model, write_decoder_gguf(tmp_path / f"{case}-{quant}.gguf", sd, cfg, quant=quant)


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("case", ["llama", "qwen2"])
def test_gguf_matches_transformers_from_the_same_file(case, quant, tmp_path):
    _, gguf_path = _write(case, quant, tmp_path)
    model, tokenizer = from_pretrained(gguf_path)
    assert tokenizer is None  # no tokenizer metadata in this file
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_model = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        ).eval()
    ids = np.random.default_rng(0).integers(0, 128, (2, 12))
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).logits.numpy()
    assert _rel_err(np.asarray(model(jnp.asarray(ids))), ref) < 1e-4


def test_gguf_qwen3_with_explicit_head_dim(tmp_path):
    """Qwen3 with head_dim != width/heads (GGUF key_length) and q/k norms, stored in F32.

    transformers does not read key_length from GGUF, so the reference is the source model itself
    (exact in F32).
    """
    hf_model, gguf_path = _write("qwen3", "F32", tmp_path)
    model, _ = from_pretrained(gguf_path)
    assert model.config.head_dim == 32 and model.config.qk_norm
    ids = np.random.default_rng(0).integers(0, 128, (2, 12))
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)).logits.numpy()
    assert _rel_err(np.asarray(model(jnp.asarray(ids))), ref) < 1e-4


def test_quantised_gguf_is_close_to_the_float_model(tmp_path):
    """Sanity of dequantisation itself: Q8_0 logits stay near the float32 source model."""
    hf_model, gguf_path = _write("llama", "Q8_0", tmp_path)
    model, _ = from_pretrained(gguf_path)
    ids = np.random.default_rng(0).integers(0, 128, (1, 12))
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)).logits.numpy()
    err = _rel_err(np.asarray(model(jnp.asarray(ids))), ref)
    assert 1e-6 < err < 0.05  # quantisation error is there, and small


def test_metadata_reader_parses_what_gguf_reader_parses(tmp_path):
    """jaxlab's faster reader (plain-array slicing) sees the same fields and tensors as gguf's."""
    import gguf

    from jaxlab.models.gguf_loader import _open

    path = tmp_path / "meta.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.name", "tiny é")
    w.add_uint32("llama.block_count", 3)
    w.add_float32("llama.rope.freq_base", 10000.5)
    w.add_bool("flag", True)
    w.add_array("tokenizer.ggml.tokens", ["<s>", "a", "ab", "∑", ""])
    w.add_array("tokenizer.ggml.scores", [0.5, -1.0, 2.0])
    w.add_array("ints", [1, -2, 3])
    w.add_tensor("t", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    ours, ref = _open(path), gguf.GGUFReader(str(path))
    assert list(ours.fields) == list(ref.fields)
    for key, field in ref.fields.items():
        mine = ours.fields[key]
        assert mine.types == field.types and mine.data == field.data, key
        assert mine.contents() == field.contents(), key
    assert ours.fields["tokenizer.ggml.tokens"].contents() == ["<s>", "a", "ab", "∑", ""]
    (t,) = ours.tensors
    assert t.name == "t" and np.array_equal(
        np.asarray(t.data).reshape(3, 4), np.arange(12).reshape(3, 4)
    )
