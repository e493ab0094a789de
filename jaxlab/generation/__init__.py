"""Generation: one core of jitted prefill / decode steps with per-row sampling, used by
:func:`generate` (a batch of prompts) and :class:`Engine` (continuous batching)."""

from jaxlab.generation.engine import Completion as Completion
from jaxlab.generation.engine import Delta as Delta
from jaxlab.generation.engine import Engine as Engine
from jaxlab.generation.generate import GenerationResult as GenerationResult
from jaxlab.generation.generate import TokenResult as TokenResult
from jaxlab.generation.generate import decoding_model as decoding_model
from jaxlab.generation.generate import generate as generate
from jaxlab.generation.generate import generate_rows as generate_rows
from jaxlab.generation.generate import generate_tokens as generate_tokens
from jaxlab.generation.params import MAX_LOGPROBS as MAX_LOGPROBS
from jaxlab.generation.params import SamplingParams as SamplingParams
from jaxlab.generation.sampling import filter_logits as filter_logits
from jaxlab.generation.sampling import sample_tokens as sample_tokens
