"""``serve``: an OpenAI-compatible HTTP server over the continuous-batching Engine."""

from __future__ import annotations

import os

from jaxlab.cli._common import Command, registry_option
from jaxlab.errors import UserError

__all__ = ["COMMAND"]


def _run(args):
    from jaxlab.serving import serve

    defense = None
    if args.defense != "none":
        from jaxlab.security.defense import make_defense

        defense = make_defense(
            args.defense,
            compressor=args.compressor,
            guardrail_mode=args.guardrail_mode,
            guardrail_threshold=args.guardrail_threshold,
        )
    elif args.compressor:
        raise UserError("--compressor is for --defense securitylingua")
    serve(
        args.model,
        host=args.host,
        port=args.port,
        slots=args.slots,
        max_len=args.max_len,
        api_key=args.api_key or os.environ.get("JAXLAB_API_KEY") or None,
        max_queue=args.max_queue,
        prefix_cache=args.prefix_cache,
        model_name=args.served_model_name,
        access_log=args.access_log,
        defense=defense,
        warmup_prompt_len=args.warmup_prompt_len,
    )


def _args(p):
    p.add_argument(
        "--model", default="smollm2-135m-instruct", help="registered name, .gguf file or HF dir"
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="the model id clients send and /v1/models lists (default: --model as given)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (loopback; 0.0.0.0 exposes the server to the network)",
    )
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: a free one)")
    p.add_argument("--slots", type=int, default=16, help="sequences decoded together")
    p.add_argument(
        "--max-len",
        type=int,
        default=None,
        metavar="N",
        help="context of one request, prompt + completion tokens (default: the model's, at most "
        "2048); the KV cache holds slots x N positions",
    )
    p.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1 routes (or set $JAXLAB_API_KEY)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=256,
        metavar="N",
        help="sequences that may wait for a slot; beyond that requests get 429",
    )
    p.add_argument(
        "--prefix-cache",
        type=int,
        default=0,
        metavar="N",
        help="keep the KV of the last N finished sequences and reuse their prefixes (0: off)",
    )
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    p.add_argument(
        "--warmup-prompt-len",
        type=int,
        default=128,
        metavar="N",
        help="before serving, compile the prefill of 1 to --slots new prompts of up to N tokens, "
        "so that a burst of requests does not wait for a compile (0: compile on demand)",
    )
    registry_option(
        p,
        "--defense",
        "jaxlab.security.defense:DEFENSES",
        default="none",
        help="jailbreak defense of the chat and completions endpoints (docs/security.md); a "
        "request opts out with the header X-Jaxlab-Defense: off",
    )
    p.add_argument(
        "--guardrail-mode",
        choices=("logits", "generate"),
        default="logits",
        help="--defense guardrail: score p(unsafe) from the two label words' logits, or parse "
        "a few generated tokens",
    )
    p.add_argument(
        "--guardrail-threshold",
        type=float,
        default=0.5,
        help="--defense guardrail (logits): refuse when p(unsafe) exceeds this",
    )
    p.add_argument(
        "--compressor",
        default=None,
        metavar="DIR",
        help="the trained compressor of --defense securitylingua (security train --out DIR)",
    )


COMMAND = Command(
    "serve",
    "an OpenAI-compatible server (chat and text completions, streaming, tool calls)",
    _args,
    _run,
)
