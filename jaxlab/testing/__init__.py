"""Helpers for tests and examples: tiny fixtures written in real file formats."""

from jaxlab.models.decoder import DecoderConfig

# A tiny decoder for generation tests: compiles in seconds, vocabulary ids 0-49.
TINY_DECODER = DecoderConfig(
    vocab_size=50,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=128,
)
