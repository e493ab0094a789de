"""``demo``, ``generate``, ``chat`` and ``embed``: the pretrained models from the command line."""

from __future__ import annotations

import json
import sys
import time

from jaxlab.cli._common import (
    Command,
    add_overwrite_arg,
    check_outputs,
    positive_int,
    require_decoder,
)
from jaxlab.errors import UserError

__all__ = ["COMMANDS"]


# -- demo --------------------------------------------------------------------------------------------

# Sizes of the demo's PosIR and sky steps; the tests run the same steps with smaller ones.
DEMO_SIZES = {
    "posir_queries": 80,
    "smi_plates": 16,
    "smi_steps": (100, 80, 80),  # shift, shared, individual
}


def _run_demo(args):
    import jax

    from jaxlab.generation import generate
    from jaxlab.models import from_pretrained

    print(f"jaxlab demo on {jax.default_backend()} ({jax.device_count()} device(s))")
    t0 = time.perf_counter()
    model, tokenizer = from_pretrained(args.model)
    load_s = time.perf_counter() - t0
    require_decoder(model, args.model)
    cfg = model.config
    print(
        f"loaded {args.model}: {cfg.num_layers} layers, width {cfg.hidden_size}, "
        f"{cfg.num_heads}/{cfg.num_kv_heads} heads, vocab {cfg.vocab_size} in {load_s:.1f} s"
    )
    print(f"\nuser: {args.question}")
    t0 = time.perf_counter()
    out = generate(model, tokenizer, [args.question], max_new_tokens=args.max_new_tokens, chat=True)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()  # again, now compiled: the steady-state speed
    out = generate(model, tokenizer, [args.question], max_new_tokens=args.max_new_tokens, chat=True)
    gen_s = time.perf_counter() - t0
    n = int(out.lengths[0])
    print(f"assistant: {out.texts[0].strip()}\n")
    print(
        f"{n} tokens ({out.finish_reasons[0]}); first call {first_s:.1f} s including compilation, "
        f"then {gen_s:.2f} s = {n / gen_s:.1f} tokens/s (greedy, batch 1, float32)"
    )
    if not args.skip_rl:
        _demo_rl()
    if not args.skip_posir:
        _demo_posir()
    if not args.skip_sky:
        _demo_sky()


def _demo_posir():
    """PosIR on the built-in corpus (short documents): nDCG@10 of MiniLM by evidence position."""
    import numpy as np

    from jaxlab.models import from_pretrained
    from jaxlab.retrieval import builtin_dataset, evaluate_posir

    model, tokenizer = from_pretrained("all-minilm-l6-v2")
    data = builtin_dataset(DEMO_SIZES["posir_queries"], tokenizer, seed=0, lengths=((128, 512),))
    t0 = time.perf_counter()
    rep = evaluate_posir(data, model, tokenizer, strategy="truncate")
    thirds = np.array_split(np.argsort(data.relative_positions), 3)
    ndcg = np.asarray(rep["per_query"]["ndcg@10"])
    print(
        f"\nPosIR (built-in corpus, {len(data)} queries, all-MiniLM-L6-v2): nDCG@10 "
        f"{rep['ndcg@10']:.3f}, recall@10 {rep['recall@10']:.3f} in {time.perf_counter() - t0:.1f} s"
    )
    print(
        "  evidence in the first / middle / last third: "
        + " / ".join(f"{ndcg[t].mean():.3f}" for t in thirds)
    )


def _demo_sky():
    """Simulate a LAMOST plate, subtract its sky with Super Sky and with a quickly trained SMI."""
    from jaxlab.sky import (
        SMIConfig,
        estimate_sky,
        evaluate_sky,
        simulate_plate,
        train_smi,
        training_plates,
    )

    t0 = time.perf_counter()
    plate = simulate_plate(0)
    n_plates, (shift, shared, individual) = DEMO_SIZES["smi_plates"], DEMO_SIZES["smi_steps"]
    model, history = train_smi(
        training_plates(n_plates, 1000),
        SMIConfig(steps_shift=shift, steps_shared=shared, steps_individual=individual),
        progress=False,
    )
    print(
        f"\nsky: simulated {plate.n_fibers}-fibre plate ({int(plate.is_sky.sum())} sky fibres, "
        f"{plate.meta['SKYSRC']} night sky); SMI trained on {n_plates} plates in "
        f"{history['seconds']:.0f} s"
    )
    for name, method, smi in (("Super Sky", "supersky", None), ("SMI", "smi", model)):
        rep = evaluate_sky(plate, estimate_sky(plate, method, model=smi))
        err, chi2 = rep["sky_error_pct"], rep["chi2_per_pixel"]["all"]
        print(
            f"  {name:9s} sky error vs truth: blue {err['blue']:.2f} %, all {err['all']:.2f} %; "
            f"chi2/pixel {chi2:.3f}"
        )
    print(
        f"  ({time.perf_counter() - t0:.0f} s; `python -m jaxlab sky --help` for simulate / train / "
        "subtract / evaluate)"
    )


def _demo_rl():
    """A short RL run of both schedulers on a tiny character-level model: bubble ratio and reward."""
    import tempfile

    from jaxlab.config import load_config
    from jaxlab.rl.trainer import train_rl

    print("\nRL on a tiny model (toy_digits task), sync vs SortedRL rollouts:")
    rows = []
    for name in ("sync", "sorted"):
        cfg = load_config(f"rl/tiny_{name}", ["scheduler.num_prompts=32"])
        with tempfile.TemporaryDirectory() as tmp:
            rows.append((name, train_rl(cfg, tmp, progress=False)))
    print(
        f"{'scheduler':10s} {'bubble ratio':>13s} {'reward first/last quarter':>27s} {'updates':>8s}"
    )
    for name, s in rows:
        print(
            f"{name:10s} {s['bubble_ratio']:13.2f} {s['reward_first_quarter']:13.3f} -> "
            f"{s['reward_last_quarter']:.3f} {s['updates']:8d}"
        )


def _demo_args(p):
    p.add_argument(
        "--model", default="smollm2-135m-instruct", help="registered name, .gguf file or HF dir"
    )
    p.add_argument("--question", default="What is the capital of France?", help="the chat turn")
    p.add_argument("--max-new-tokens", type=int, default=48, help="length of the answer")
    p.add_argument("--skip-rl", action="store_true", help="skip the short RL run on a tiny model")
    p.add_argument("--skip-posir", action="store_true", help="skip the short PosIR evaluation")
    p.add_argument("--skip-sky", action="store_true", help="skip the short sky-subtraction step")


# -- generate ----------------------------------------------------------------------------------------


def _run_generate(args):
    from jaxlab.generation import SamplingParams, generate
    from jaxlab.models import from_pretrained

    try:  # bad settings fail before the model loads
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty,
            seed=args.seed,
            stop=tuple(args.stop),
            n=args.n,
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    model, tokenizer = from_pretrained(args.model)
    require_decoder(model, args.model)
    if tokenizer is None:
        raise UserError(f"{args.model} has no tokenizer to generate with")
    out = generate(model, tokenizer, args.prompt, params, chat=args.chat)
    several = len(args.prompt) > 1 or params.n > 1
    for row, text in enumerate(out.texts):
        i = int(out.prompt_index[row])
        prompt = args.prompt[i]
        if args.json:
            record = {
                "prompt": prompt,
                "text": text,
                "finish_reason": out.finish_reasons[row],
                "tokens": int(out.lengths[row]),
            }
            if params.n > 1:
                record["sample"] = row % params.n
            print(json.dumps(record, ensure_ascii=False))
            continue
        if several:
            sample = f", sample {row % params.n + 1}/{params.n}" if params.n > 1 else ""
            print(
                f"[{i + 1}/{len(args.prompt)}{sample}] prompt: "
                f"{json.dumps(prompt, ensure_ascii=False)}"
            )
        print(text)


def _generate_args(p):
    p.add_argument(
        "--model", default="smollm2-135m-instruct", help="registered name, .gguf file or HF dir"
    )
    p.add_argument(
        "--prompt", action="append", required=True, help="a prompt (repeatable: one batch)"
    )
    p.add_argument("--chat", action="store_true", help="render prompts with the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt")
    p.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy"
    )
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest; 0: all")
    p.add_argument(
        "--min-p",
        type=float,
        default=0.0,
        help="drop tokens below min-p x the top one's probability",
    )
    p.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="penalty on tokens seen (1: off)"
    )
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI presence penalty")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI frequency penalty")
    p.add_argument("-n", type=int, default=1, help="samples per prompt (they share one prefill)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop a prompt's generation at this text, which is cut off (repeatable)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per prompt: prompt, text, finish_reason, tokens",
    )


# -- chat --------------------------------------------------------------------------------------------


def _run_chat(args):
    from jaxlab.generation import SamplingParams, generate
    from jaxlab.models import from_pretrained

    try:  # bad settings fail before the model loads
        SamplingParams(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    model, tokenizer = from_pretrained(args.model)
    require_decoder(model, args.model)
    if tokenizer is None:
        raise UserError(f"{args.model} has no tokenizer to chat with")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.model}; an empty line or Ctrl-D ends the chat")
    while True:
        try:
            line = input("you: " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            if interactive:
                break
            continue
        messages.append({"role": "user", "content": line})
        print("assistant: ", end="", flush=True)
        out = generate(
            model,
            tokenizer,
            [messages],
            max_new_tokens=args.max_new_tokens,
            chat=True,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed + len(messages),
            stream=lambda text: print(text, end="", flush=True),
        )
        print(flush=True)
        messages.append({"role": "assistant", "content": out.texts[0].strip()})


def _chat_args(p):
    p.add_argument(
        "--model", default="smollm2-135m-instruct", help="registered name, .gguf file or HF dir"
    )
    p.add_argument(
        "--system", default=None, help="a system prompt (default: the chat template's own)"
    )
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens")
    p.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy"
    )
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (plus the turn number)")


# -- embed -------------------------------------------------------------------------------------------


def _run_embed(args):
    import numpy as np

    from jaxlab.models import BertEncoder, encode, from_pretrained

    if bool(args.text) == bool(args.input):
        raise UserError("embed needs --text (repeatable) or --input FILE, not both")
    if args.input:
        if not args.output:
            raise UserError("embed --input needs --output FILE.npy or FILE.parquet")
        if not args.output.endswith((".npy", ".parquet")):
            raise UserError(f"--output {args.output}: write a .npy or a .parquet file")
        check_outputs(args, args.output)
        ids, texts = _read_embed_input(args.input, args.field)  # checked before the model loads
    model, tokenizer = from_pretrained(args.model)
    if not isinstance(model, BertEncoder) or tokenizer is None:
        raise UserError(
            f"{args.model} is a {type(model).__name__}, not an encoder with a tokenizer; "
            "embed needs an encoder such as all-minilm-l6-v2"
        )
    kw = dict(
        batch_size=args.batch_size,
        max_length=args.max_length,
        prompt_name=args.prompt_name,
        prompt=args.prompt,
    )
    if not args.input:
        emb = encode(model, tokenizer, args.text, **kw)
        np.set_printoptions(precision=4, suppress=True)
        for text, e in zip(args.text, emb):
            print(f"{text!r}: dim {e.shape[0]}, |e| = {np.linalg.norm(e):.4f}, first 4 = {e[:4]}")
        if len(args.text) > 1:
            print("cosine similarities:")
            print(emb @ emb.T)
        return
    emb = encode(model, tokenizer, texts, progress=not args.quiet, **kw)
    if args.output.endswith(".npy"):
        np.save(args.output, emb)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        dim = emb.shape[1]
        column = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), dim)
        pq.write_table(pa.table({"id": ids, "text": texts, "embedding": column}), args.output)
    print(f"wrote {args.output}: {emb.shape[0]} embeddings of dimension {emb.shape[1]}")


def _read_embed_input(path: str, field: str) -> tuple[list[str], list[str]]:
    """(ids, texts) of a text / JSONL / parquet file: a record's ``id`` (or ``_id``) when it has
    one, else its 0-based position."""
    from jaxlab.data import record_texts

    ids, texts = [], []
    for _, record, text in record_texts(path, field=field):
        rid = record.get("id", record.get("_id", len(texts)))
        ids.append(str(rid))
        texts.append(text)
    if not texts:
        raise UserError(f"{path}: no texts to embed")
    return ids, texts


def _embed_args(p):
    p.add_argument(
        "--model",
        default="all-minilm-l6-v2",
        help="registered name or HF / sentence-transformers folder",
    )
    p.add_argument("--text", action="append", help="a text (repeatable): print its embedding")
    p.add_argument(
        "--input",
        help="texts to embed: .txt (one per line), .jsonl or .parquet (field --field)",
    )
    p.add_argument(
        "--output", help="embeddings to write: .npy [N, D] or .parquet (id, text, embedding)"
    )
    p.add_argument("--field", default="text", help="the text field of JSONL / parquet records")
    p.add_argument(
        "--prompt-name",
        help="one of the model's prompts (sentence-transformers' prompts, e.g. query, document)",
    )
    p.add_argument("--prompt", help="a prefix put before every text (instead of --prompt-name)")
    p.add_argument("--max-length", type=positive_int, help="tokens per text (default: the model's)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="texts per encoder call")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_overwrite_arg(p)


COMMANDS = [
    Command(
        "demo",
        "load SmolLM2-135M-Instruct and answer a chat question (what `make demo` runs)",
        _demo_args,
        _run_demo,
    ),
    Command("generate", "continue prompts with a decoder LM", _generate_args, _run_generate),
    Command(
        "chat",
        "an interactive chat that streams the reply as it is generated",
        _chat_args,
        _run_chat,
    ),
    Command(
        "embed",
        "sentence embeddings with an encoder (all-MiniLM-L6-v2 by default)",
        _embed_args,
        _run_embed,
    ),
]
