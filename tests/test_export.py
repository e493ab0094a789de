"""HF export: jaxlab decoders written with ``save_pretrained`` and read back by transformers (the
PyTorch implementations, float32) and by jaxlab's own HF loader.

Every parameter of the random models is randomised (norm weights around 1, biases and kernels
around 0), so nothing is trivially 1 or 0. Logit error measure, as in test_model_parity:
max |ours - ref| / max |ref|, at most 1e-4 in float32.
"""

import dataclasses
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # (the parity extra: `make test` installs it; missing is a failure)
import transformers
from flax import nnx
from safetensors import safe_open

from jaxlab.errors import OutputExistsError, UserError
from jaxlab.models import (
    BertConfig,
    BertEncoder,
    Decoder,
    DecoderConfig,
    from_pretrained,
    save_pretrained,
)
from jaxlab.models.decoder import with_layer_layout
from jaxlab.models.export import ExportError, parse_size

TOL = 1e-4

CASES = {
    # tied embeddings, Llama-3 RoPE scaling, q/k/v biases (HF then has an o_proj bias: zeros),
    # MLP biases; one module per layer
    "llama_tied_llama3rope_bias": DecoderConfig(
        arch="llama",
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
        attention_bias=True,
        mlp_bias=True,
        scan_layers=False,
    ),
    "qwen2_qkv_bias": DecoderConfig(arch="qwen2", attention_bias=True, rope_theta=1e6),
    # qk-norm, head_dim apart from hidden / heads, q/k/v biases (o_proj's then zeros), unrolled
    "qwen3_qk_norm_bias": DecoderConfig(
        arch="qwen3", qk_norm=True, head_dim=24, attention_bias=True, scan_layers=False
    ),
    "mistral": DecoderConfig(arch="mistral", head_dim=24, rope_theta=1e6),
}
# linear RoPE scaling, stacked layers: exported from arrays sharded over 8 devices (below)
LINEAR_ROPE = DecoderConfig(arch="llama", rope_scaling=dict(rope_type="linear", factor=4.0))
_SHAPE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=256,
)


def _config(case: str | DecoderConfig) -> DecoderConfig:
    return dataclasses.replace(CASES[case] if isinstance(case, str) else case, **_SHAPE)


def _rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _random_decoder(cfg: DecoderConfig, seed=0, dtype=jnp.float32) -> Decoder:
    """A decoder of ``cfg`` with every parameter drawn at random (built abstract, then filled)."""
    abstract = nnx.eval_shape(lambda: Decoder(cfg, dtype=dtype, rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    leaves = []
    for path, var in nnx.to_flat_state(state):
        noise = rng.standard_normal(var.shape)
        is_norm_weight = "norm" in str(path[-2]) and path[-1] == "weight"
        value = 1.0 + 0.2 * noise if is_norm_weight else 0.2 * noise
        leaves.append((path, var.replace(jnp.asarray(value, dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def _logits(model, ids, mask=None):
    """jaxlab's logits ``[B, T, V]`` from one jitted forward."""
    graphdef, state = nnx.split(model)
    mask = np.ones_like(ids) if mask is None else mask
    fwd = jax.jit(lambda st, i, m: nnx.merge(graphdef, st)(i, attention_mask=m))
    return np.asarray(fwd(state, jnp.asarray(ids), jnp.asarray(mask)))


def _flat(model) -> dict[tuple[str, ...], np.ndarray]:
    stacked = with_layer_layout(model, scan_layers=True)
    return {
        tuple(str(p) for p in path): np.asarray(var[...])
        for path, var in nnx.to_flat_state(nnx.state(stacked, nnx.Param))
    }


def _hf_model(path, dtype=torch.float32):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, attn_implementation="eager"
        ).eval()


def _hf_logits(hf, ids, mask=None):
    positions = None
    if mask is not None:
        positions = torch.tensor(np.maximum(np.cumsum(mask, -1) - 1, 0))
        mask = torch.tensor(mask)
    with torch.no_grad():
        return hf(torch.tensor(ids), attention_mask=mask, position_ids=positions).logits.numpy()


def _expected_loaded_config(cfg: DecoderConfig) -> DecoderConfig:
    """The config jaxlab's HF loader reads back: stacked layers, and the biases as HF's family
    switches them (Llama and Qwen3 bias q/k/v/o together, Qwen2 always biases q/k/v)."""
    out = dataclasses.replace(cfg, scan_layers=True)
    if cfg.arch in ("llama", "qwen3") and (cfg.attention_bias or cfg.attention_out_bias):
        out = dataclasses.replace(out, attention_bias=True, attention_out_bias=True)
    if cfg.arch == "qwen2":
        out = dataclasses.replace(out, attention_bias=True)
    return out


def _check_round_trip(model, path, dtype=jnp.float32):
    """jaxlab's HF loader gives back the same config and bit-identical parameters; parameters the
    HF layout adds (zero biases) are exactly zero."""
    loaded, _ = from_pretrained(path, dtype=dtype)
    assert loaded.config == _expected_loaded_config(model.config)
    ours, back = _flat(model), _flat(loaded)
    assert set(ours) <= set(back)
    for key, value in back.items():
        if key in ours:
            assert value.dtype == ours[key].dtype, key
            np.testing.assert_array_equal(value, ours[key], err_msg=str(key))
        else:
            assert key[-1] == "bias", key
            np.testing.assert_array_equal(value, np.zeros_like(value), err_msg=str(key))
    return loaded


@pytest.mark.parametrize("case", list(CASES))
def test_random_decoder_loads_in_transformers_with_equal_logits(case, tmp_path):
    cfg = _config(case)
    model = _random_decoder(cfg)
    save_pretrained(model, None, tmp_path)
    hf = _hf_model(tmp_path)
    assert (
        type(hf).__name__
        == {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
        }[cfg.arch]
    )
    # every tensor transformers built was in the files (a missing one would be randomly initialised)
    n_hf = sum(p.numel() for p in hf.parameters())
    n_ours = sum(v.size for v in _flat(model).values())
    n_zero_bias = n_hf - n_ours  # biases HF's family adds, written as zeros
    assert n_zero_bias >= 0
    if cfg.arch in ("llama", "qwen3") and cfg.attention_bias:
        assert n_zero_bias == cfg.num_layers * cfg.hidden_size  # o_proj's
    else:
        assert n_zero_bias == 0

    # a left-padded batch (one full row), HF given the same positions
    rng = np.random.default_rng(1)
    lengths = [21, 9, 1]
    ids = rng.integers(0, cfg.vocab_size, size=(3, 21))
    mask = np.zeros((3, 21), np.int64)
    for i, n in enumerate(lengths):
        mask[i, 21 - n :] = 1
    ref = _hf_logits(hf, ids, mask)
    ours = _logits(model, ids, mask)
    real = mask.astype(bool)
    assert np.isfinite(ours).all()
    assert _rel_err(ours[real], ref[real]) < TOL

    _check_round_trip(model, tmp_path)


def test_config_json_reads_back_as_transformers_understands_it(tmp_path):
    """RoPE scaling, tied embeddings, biases and qk-norm as transformers' own config classes parse
    them (beside the logits above: a key transformers ignored could still give equal logits only
    by chance of defaults)."""
    cfg = _config("llama_tied_llama3rope_bias")
    save_pretrained(_random_decoder(cfg), None, tmp_path)
    hf = transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert hf.model_type == "llama" and hf.tie_word_embeddings and hf.attention_bias
    assert hf.mlp_bias and hf.head_dim == 16 and hf.num_key_value_heads == 2
    rope = hf.rope_parameters
    assert rope["rope_type"] == "llama3" and rope["rope_theta"] == 500000.0
    assert rope["factor"] == 8.0 and rope["original_max_position_embeddings"] == 16
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), "numpy") as f:
        names = set(f.keys())
        assert f.metadata() == {"format": "pt"}
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names


def _put_sharded(model, mesh):
    """Every parameter split over the mesh's 8 devices along its first divisible axis."""

    def place(x):
        axis = next((i for i, d in enumerate(x.shape) if d % 8 == 0), None)
        spec = [None] * x.ndim
        if axis is not None:
            spec[axis] = "x"
        return jax.device_put(
            x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
        )

    state = nnx.state(model)
    nnx.update(model, jax.tree.map(place, state))
    return model


def _read_all(path) -> dict[str, np.ndarray]:
    index = path / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else ["model.safetensors"]
    )
    out = {}
    for name in files:
        with safe_open(str(path / name), "numpy") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


def test_sharded_arrays_and_shard_files_write_the_same_tensors(tmp_path):
    """Parameters spread over 8 devices export to exactly the tensors of the single-device model;
    a small max_shard_size splits the files, with an index transformers and jaxlab follow."""
    assert jax.device_count() >= 8
    cfg = _config(LINEAR_ROPE)
    model = _random_decoder(cfg)
    save_pretrained(model, None, tmp_path / "one")
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]), ("x",))
    sharded = _put_sharded(_random_decoder(cfg), mesh)
    emb = sharded.embed_tokens.embedding[...]
    assert len(emb.sharding.device_set) == 8 and not emb.sharding.is_fully_replicated
    save_pretrained(sharded, None, tmp_path / "sharded", max_shard_size="40KB")

    one, split = _read_all(tmp_path / "one"), _read_all(tmp_path / "sharded")
    assert one.keys() == split.keys()
    for key in one:
        np.testing.assert_array_equal(one[key], split[key], err_msg=key)

    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    n = len(files)
    assert n > 3 and files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert set(index["weight_map"]) == set(one)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in one.values())
    for name in files:  # no file above the limit unless it holds one tensor that is
        with safe_open(str(tmp_path / "sharded" / name), "numpy") as f:
            sizes = [f.get_tensor(k).nbytes for k in f.keys()]
        assert sum(sizes) <= 40_000 or len(sizes) == 1

    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, size=(2, 11))
    ref = _hf_logits(_hf_model(tmp_path / "sharded"), ids)
    assert _rel_err(_logits(model, ids), ref) < TOL
    _check_round_trip(model, tmp_path / "sharded")


def test_bfloat16_weights_are_written_and_read_bit_exactly(tmp_path):
    cfg = _config("qwen3_qk_norm_bias")
    model = _random_decoder(cfg, dtype=jnp.bfloat16)
    save_pretrained(model, None, tmp_path / "bf16")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    _check_round_trip(model, tmp_path / "bf16", dtype=jnp.bfloat16)
    hf = _hf_model(tmp_path / "bf16", dtype="auto")
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    np.testing.assert_array_equal(
        hf.model.layers[1].self_attn.q_proj.weight.detach().float().numpy(),
        np.asarray(model.layers[1].self_attn.q_proj.kernel[...], np.float32).T,
    )

    # a float32 model written as bfloat16: each tensor is the float32 one rounded (jnp's cast)
    model32 = _random_decoder(cfg)
    save_pretrained(model32, None, tmp_path / "cast", dtype=jnp.bfloat16)
    back, _ = from_pretrained(tmp_path / "cast", dtype=jnp.bfloat16)
    for key, value in _flat(model32).items():
        np.testing.assert_array_equal(
            _flat(back)[key], np.asarray(jnp.asarray(value).astype(jnp.bfloat16)), str(key)
        )


def test_existing_directory_needs_overwrite(tmp_path):
    model = _random_decoder(dataclasses.replace(_config("mistral"), num_layers=1))
    out = tmp_path / "out"
    out.mkdir()
    save_pretrained(model, None, out)  # an empty directory is fine
    (out / "stale.safetensors").write_bytes(b"old")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(OutputExistsError, match="overwrite") as err:
        save_pretrained(model, None, out)
    assert isinstance(err.value, UserError)
    assert sorted(p.name for p in out.iterdir()) == before  # untouched
    save_pretrained(model, None, out, overwrite=True)
    assert not (out / "stale.safetensors").exists()  # replaced, not mixed with the old files
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    assert not list(tmp_path.glob(".out.tmp*"))


def test_what_hf_cannot_express_is_refused_by_name(tmp_path):
    base = dict(_SHAPE, num_layers=1)
    with pytest.raises(ExportError, match="mistral decoder with .*attention_bias=True"):
        model = _random_decoder(DecoderConfig(arch="mistral", attention_bias=True, **base))
        save_pretrained(model, None, tmp_path / "a")
    with pytest.raises(ExportError, match="qk_norm=False"):
        save_pretrained(_random_decoder(DecoderConfig(arch="qwen3", **base)), None, tmp_path / "b")
    with pytest.raises(ExportError, match="BertEncoder"):
        bert_cfg = BertConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2
        )
        bert = nnx.eval_shape(lambda: BertEncoder(bert_cfg, rngs=nnx.Rngs(0)))
        save_pretrained(bert, None, tmp_path / "c")
    # variables the HF layout has no place for (an adapter, a statistic): named, nothing written
    model = _random_decoder(DecoderConfig(arch="llama", **base))
    model.layers.self_attn.q_proj.lora_a = nnx.Param(jnp.zeros((1, 64, 4)))
    model.calls = nnx.Variable(jnp.zeros(()))
    with pytest.raises(ExportError, match=r"calls \(Variable\), layers\.self_attn\.q_proj\.lora_a"):
        save_pretrained(model, None, tmp_path / "d")
    assert not any(tmp_path.iterdir())
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 * 2**20
    assert parse_size(1234) == 1234
    for bad in ("5 parsecs", "0", -1):
        with pytest.raises(ExportError, match="max_shard_size"):
            parse_size(bad)


SMOLLM2_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Water boils at",
]


def test_smollm2_exported_loads_in_transformers_with_equal_logits(tmp_path):
    """The real model (GGUF, dequantised to float32) as an HF directory: sharded safetensors,
    config, generation config and tokenizer that transformers reads as jaxlab does."""
    from jaxlab.models.registry import SMOLLM2_GGUF

    model, tokenizer = from_pretrained(SMOLLM2_GGUF)
    out = tmp_path / "smollm2"
    save_pretrained(model, tokenizer, out, max_shard_size="200MB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) == 3 and (out / "model.safetensors.index.json").is_file()

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    for prompt in SMOLLM2_PROMPTS:
        assert hf_tok.encode(prompt) == tokenizer.encode(prompt)
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    assert hf_tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    ) == tokenizer.apply_chat_template(messages)
    gen = json.loads((out / "generation_config.json").read_text())
    im_end = tokenizer.hf.convert_tokens_to_ids("<|im_end|>")
    assert im_end in np.atleast_1d(gen["eos_token_id"]).tolist()

    hf = _hf_model(out)
    assert hf.config.tie_word_embeddings and hf.config.num_hidden_layers == 30
    batch = tokenizer(SMOLLM2_PROMPTS)
    ids, mask = batch.input_ids.astype(np.int64), batch.attention_mask.astype(np.int64)
    ref = _hf_logits(hf, ids, mask)
    ours = _logits(model, ids, mask)
    real = mask.astype(bool)
    assert _rel_err(ours[real], ref[real]) < TOL


def test_cli_exports_a_training_run(tmp_path, capsys):
    """``python -m jaxlab export --model RUN_DIR``: the decoder named by the run's config.json with
    the weights of its checkpoint (a train-lm run: the architecture itself; an RL run of the tiny
    character-level model: its tokenizer too)."""
    from jaxlab.checkpoint import Checkpointer
    from jaxlab.cli import main
    from jaxlab.testing import TINY_DECODER
    from jaxlab.tokenization import char_tokenizer

    runs = {
        "lm": (TINY_DECODER, {"model": dataclasses.asdict(TINY_DECODER), "log_every": 10}),
        "rl": (
            dataclasses.replace(TINY_DECODER, vocab_size=char_tokenizer().vocab_size),
            {"model": "tiny", "tiny_model": dataclasses.asdict(TINY_DECODER)},
        ),
    }
    for name, (cfg, run_config) in runs.items():
        workdir = tmp_path / name
        (workdir / "checkpoints").mkdir(parents=True)
        (workdir / "config.json").write_text(json.dumps(run_config))
        models = {step: _random_decoder(cfg, seed=step) for step in (2, 4)}
        with Checkpointer(workdir / "checkpoints", async_save=False) as ckpt:
            for step, model in models.items():
                ckpt.save(step, model=model, force=True)

        out = tmp_path / f"{name}_out"
        assert main(["export", "--model", str(workdir), "--out", str(out)]) == 0
        assert f"(step 4) to {out}" in capsys.readouterr().out
        loaded, tokenizer = from_pretrained(out)
        assert loaded.config == dataclasses.replace(cfg, scan_layers=True)
        for key, value in _flat(models[4]).items():
            np.testing.assert_array_equal(_flat(loaded)[key], value, err_msg=str(key))
        assert (tokenizer is not None) == (name == "rl")

        # an earlier step, in bfloat16; an existing output needs --overwrite
        args = ["export", "--model", str(workdir), "--out", str(out), "--step", "2"]
        assert main(args + ["--dtype", "bfloat16"]) == 2
        assert "--overwrite" in capsys.readouterr().err
        assert main(args + ["--dtype", "bfloat16", "--overwrite"]) == 0
        loaded, _ = from_pretrained(out, dtype=jnp.bfloat16)
        emb = np.asarray(models[2].embed_tokens.embedding[...])
        np.testing.assert_array_equal(
            np.asarray(loaded.embed_tokens.embedding[...]),
            np.asarray(jnp.asarray(emb).astype(jnp.bfloat16)),
        )

    assert (
        main(
            ["export", "--model", str(tmp_path / "lm"), "--out", str(tmp_path / "x"), "--step", "3"]
        )
        == 2
    )
    assert "no checkpoint for step 3" in capsys.readouterr().err
