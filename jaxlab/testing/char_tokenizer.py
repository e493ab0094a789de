"""A character-level tokenizer (a real HF fast tokenizer) for tiny models in tests and demos."""

from __future__ import annotations

import string

from jaxlab.tokenization import Tokenizer

__all__ = ["char_tokenizer"]

SPECIALS = ["<pad>", "<eos>", "<unk>"]
CHARS = list(string.digits + string.ascii_letters + " .,:;!?'\"+-*/=()<>[]_\n")


def char_tokenizer() -> Tokenizer:
    """One token per character (digits, letters, punctuation, space, newline); ids 0-2 are
    ``<pad>``, ``<eos>``, ``<unk>``. Vocabulary size: ``len(SPECIALS) + len(CHARS)``."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    raw.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    hf.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    return Tokenizer(hf)
