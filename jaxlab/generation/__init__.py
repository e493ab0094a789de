"""Generation: jitted prefill + decode over a KV cache, and sampling."""

from jaxlab.generation.engine import Completion as Completion
from jaxlab.generation.engine import Engine as Engine
from jaxlab.generation.generate import GenerationResult as GenerationResult
from jaxlab.generation.generate import decoding_model as decoding_model
from jaxlab.generation.generate import generate as generate
from jaxlab.generation.generate import generate_tokens as generate_tokens
from jaxlab.generation.sampling import filter_logits as filter_logits
from jaxlab.generation.sampling import sample_tokens as sample_tokens
