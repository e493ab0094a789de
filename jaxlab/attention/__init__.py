"""Attention: the dense entry point used by the models, and (later) sparse and ring attention."""

from jaxlab.attention.dense import attention as attention
from jaxlab.attention.dense import attention_implementations as attention_implementations
from jaxlab.attention.dense import grouped_attention as grouped_attention
from jaxlab.attention.dense import register_attention as register_attention
