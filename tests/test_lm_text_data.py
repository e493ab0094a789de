"""train-lm on users' text: records in three formats, packing with document boundaries (against a
brute-force walk of the token stream), per-document attention (against each document alone),
process sharding, a resumable grain iterator, a run resumed mid-way, pretrained init."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flax import nnx

from jaxlab.checkpoint import CheckpointConfig
from jaxlab.data import RecordError
from jaxlab.data.text import lm_batch, read_documents, text_dataset, tokenize_document
from jaxlab.errors import UserError
from jaxlab.models import Decoder, DecoderConfig
from jaxlab.tokenization import char_tokenizer
from jaxlab.train import DataConfig, LMTrainConfig, OptimConfig, TextDataConfig, train_lm

DOCS = [
    "the cat sat.",
    "a dog ran far away from home",
    "hi",
    "numbers 12 34 56",
    "one more line of text here",
    "short",
    "the last document, a longer one than most of the others",
]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def _three_formats(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(DOCS[:3]) + "\n\n")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS[3:5]))
    pq.write_table(pa.table({"text": DOCS[5:], "n": [1, 2]}), tmp_path / "c.parquet")
    return [str(tmp_path / f) for f in ("a.txt", "b.jsonl", "c.parquet")]


def test_three_formats_and_bad_records(tmp_path):
    files = _three_formats(tmp_path)
    assert read_documents(files) == DOCS
    (tmp_path / "p.txt").write_text("para one\nstill one\n\n\npara two\n")
    assert read_documents([tmp_path / "p.txt"], documents="blank_line") == [
        "para one\nstill one",
        "para two",
    ]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n\n{"body": "no text"}\n')
    with pytest.raises(RecordError, match=r"bad.jsonl:3: field 'text' is missing"):
        read_documents([tmp_path / "bad.jsonl"])
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "bad.parquet")
    with pytest.raises(RecordError, match=r"bad.parquet:row 2: field 'text'"):
        read_documents([tmp_path / "bad.parquet"])
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\n")
    with pytest.raises(RecordError, match=r"bad.txt:2: not UTF-8"):
        read_documents([tmp_path / "bad.txt"])


def test_sft_reads_chat_messages_from_parquet_as_from_jsonl(tmp_path):
    from jaxlab.sft import load_chat_jsonl

    convs = [
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    ]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    pq.write_table(pa.table({"messages": convs}), tmp_path / "c.parquet")
    assert load_chat_jsonl(tmp_path / "c.jsonl") == convs
    assert load_chat_jsonl(tmp_path / "c.parquet") == convs
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match=r"bad.parquet:row 1: expected an object with a 'messages'"):
        load_chat_jsonl(tmp_path / "bad.parquet")


def _walk(stream, docs):
    """Brute force: split a token stream into whole documents, each a permutation's next one
    (documents are distinct); returns their indices in order and the boundaries."""
    order, bounds, i = [], [], 0
    while i < len(stream):
        hits = [j for j, d in enumerate(docs) if list(stream[i : i + len(d)]) == list(d)]
        if not hits:  # the stream ends inside a document: a prefix of one
            assert any(list(d[: len(stream) - i]) == list(stream[i:]) for d in docs)
            bounds.append(i)
            break
        order.append(hits[0])
        bounds.append(i)
        i += len(docs[hits[0]])
    return order, bounds


def test_packing_respects_documents(tok):
    seq, bsz = 16, 3
    docs = [tokenize_document(tok, t) for t in DOCS]
    assert all(d[-1] == tok.eos_token_ids[0] for d in docs)
    it = iter(
        text_dataset(DOCS, tok, seq_len=seq, batch_size=bsz, seed=1, shard_index=0, shard_count=1)
    )
    rows = [next(it) for _ in range(12)]
    tokens = np.concatenate([r["tokens"] for r in rows])  # [R, seq + 1]
    segs = np.concatenate([r["tokens_segment_ids"] for r in rows])
    assert tokens.shape[1] == seq + 1 and (segs > 0).all()  # an endless stream: no padding
    order, bounds = _walk(tokens.reshape(-1), docs)
    n = len(DOCS)
    for e in range(len(order) // n):  # every epoch is a permutation of the documents
        assert sorted(order[e * n : (e + 1) * n]) == list(range(n))
    assert order[:n] != order[n : 2 * n]  # reshuffled per epoch
    # segment ids change exactly at document starts inside a row
    flat_bounds = set(bounds)
    for r in range(len(tokens)):
        for t in range(1, seq + 1):
            assert (segs[r, t] != segs[r, t - 1]) == (r * (seq + 1) + t in flat_bounds)
    b = lm_batch(rows[0])
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    np.testing.assert_array_equal(b["loss_mask"], segs[:bsz, 1:] == segs[:bsz, :-1])


def test_packed_attention_equals_each_document_alone(tok):
    cfg = DecoderConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=64,
    )
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    it = iter(
        text_dataset(DOCS, tok, seq_len=24, batch_size=2, seed=0, shard_index=0, shard_count=1)
    )
    b = lm_batch(next(it))
    run = nnx.jit(lambda m, ids, **kw: m(ids, **kw))
    kw = {k: jnp.asarray(b[k]) for k in ("positions", "segment_ids")}
    logits = np.asarray(run(model, jnp.asarray(b["inputs"]), **kw))
    # each document piece alone, right-padded into one batch (one compile)
    pieces = [
        (r, np.flatnonzero(b["segment_ids"][r] == s))
        for r in range(2)
        for s in np.unique(b["segment_ids"][r])
    ]
    ids = np.zeros((len(pieces), 24), np.int32)
    mask = np.zeros((len(pieces), 24), bool)
    for i, (r, cols) in enumerate(pieces):
        ids[i, : len(cols)], mask[i, : len(cols)] = b["inputs"][r, cols], True
    alone = np.asarray(run(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    for i, (r, cols) in enumerate(pieces):
        np.testing.assert_allclose(logits[r, cols], alone[i, : len(cols)], atol=2e-5, rtol=0)
    checked = len(pieces)
    assert checked >= 3


def test_sharding_by_process_and_iterator_state(tok):
    shards = []
    for k in range(2):
        it = iter(
            text_dataset(DOCS, tok, seq_len=8, batch_size=1, seed=0, shard_index=k, shard_count=2)
        )
        stream = np.concatenate([next(it)["tokens"].reshape(-1) for _ in range(30)])
        docs = [tokenize_document(tok, t) for t in DOCS]
        order, _ = _walk(stream, docs)
        shards.append(set(order))
    assert shards[0] == {0, 2, 4, 6} and shards[1] == {1, 3, 5}
    # the iterator's state restores the exact next batches (what the checkpoint stores)
    it = iter(
        text_dataset(DOCS, tok, seq_len=8, batch_size=2, seed=4, shard_index=0, shard_count=1)
    )
    for _ in range(5):
        next(it)
    state = it.get_state()
    want = [next(it)["tokens"] for _ in range(4)]
    again = iter(
        text_dataset(DOCS, tok, seq_len=8, batch_size=2, seed=4, shard_index=0, shard_count=1)
    )
    again.set_state(state)
    for w in want:
        np.testing.assert_array_equal(next(again)["tokens"], w)


def _cfg(files, steps, **kw):
    return LMTrainConfig(
        model=DecoderConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_layers=1,
            num_heads=2,
            num_kv_heads=1,
            max_position_embeddings=64,
        ),
        data=DataConfig(
            seq_len=16, batch_size=4, text=TextDataConfig(files=tuple(files), tokenizer="char")
        ),
        train=OptimConfig(steps=steps, lr=1e-2, warmup_steps=0),
        checkpoint=CheckpointConfig(save_every=2, keep=3, async_save=False),
        log_every=1,
        tensorboard=False,
        **kw,
    )


def _losses(workdir):
    return [json.loads(x)["loss"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_train_lm_from_pretrained_on_three_formats_resumes_exactly(tmp_path, tok):
    """One corpus in three formats, weights from a saved HF folder (init); the run, cut back to its
    step-2 checkpoint, resumes to the uninterrupted run's losses bit for bit. The first logged loss
    is the loaded model's own loss on the first batch, computed here from the folder."""
    from jaxlab.models import from_pretrained, save_pretrained
    from jaxlab.train import packed_next_token_loss, stack_lm_batch

    files = _three_formats(tmp_path)
    save_pretrained(Decoder(_cfg(files, 3).model, rngs=nnx.Rngs(7)), tok, tmp_path / "init")
    cfg = _cfg(files, 3, init=str(tmp_path / "init"))
    train_lm(cfg, tmp_path / "straight", progress=False)
    straight = _losses(tmp_path / "straight")
    assert len(straight) == 3 and straight[-1] < straight[0]

    loaded, _ = from_pretrained(tmp_path / "init")
    first = lm_batch(
        next(
            iter(
                text_dataset(
                    read_documents(files),
                    tok,
                    seq_len=16,
                    batch_size=4,
                    seed=0,
                    shard_index=0,
                    shard_count=1,
                )
            )
        )
    )
    want = float(packed_next_token_loss(loaded, jnp.asarray(stack_lm_batch(first))))
    assert straight[0] == pytest.approx(want, rel=1e-6)
    fresh = Decoder(cfg.model, rngs=nnx.Rngs(cfg.train.seed))  # what no init would start from
    assert (
        abs(float(packed_next_token_loss(fresh, jnp.asarray(stack_lm_batch(first)))) - want) > 1e-3
    )

    # killed after its step-2 checkpoint: the same workdir without the step-3 checkpoint (the
    # resume trims metrics.jsonl to the restored step)
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "3")
    log = tmp_path / "resumed" / "metrics.jsonl"
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    for line in lines[:2]:  # lines a resume from step 2 keeps (a run from scratch rewrites them)
        line["kept"] = True
    log.write_text("".join(json.dumps(x) + "\n" for x in lines))
    train_lm(cfg, tmp_path / "resumed", progress=False)  # model, optimizer and data iterator
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x.get("kept") for x in lines] == [True, True, None]
    assert [x["loss"] for x in lines] == straight
