"""The character-level tokenizer for tiny models in tests and demos (it lives in
:mod:`jaxlab.tokenization`; re-exported here for test code)."""

from jaxlab.tokenization import CHAR_SPECIALS as SPECIALS
from jaxlab.tokenization import CHARS, char_tokenizer

__all__ = ["char_tokenizer", "SPECIALS", "CHARS"]
