"""Attention: the dense entry point used by the models; vertical-slash sparse and ring attention."""

from jaxlab.attention.dense import ATTENTION_IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from jaxlab.attention.dense import AttentionImplementation as AttentionImplementation
from jaxlab.attention.dense import attention as attention
from jaxlab.attention.dense import attention_implementations as attention_implementations
from jaxlab.attention.dense import grouped_attention as grouped_attention
from jaxlab.attention.dense import register_attention as register_attention
from jaxlab.attention.layouts import LAYOUTS as LAYOUTS
from jaxlab.attention.layouts import StepPlan as StepPlan
from jaxlab.attention.layouts import layout_blocks as layout_blocks
from jaxlab.attention.layouts import step_plan as step_plan
from jaxlab.attention.layouts import token_permutation as token_permutation
from jaxlab.attention.ring import RING_IMPLEMENTATIONS as RING_IMPLEMENTATIONS
from jaxlab.attention.ring import VERTICAL_MODES as VERTICAL_MODES
from jaxlab.attention.ring import RingConfig as RingConfig
from jaxlab.attention.ring import SparseConfig as SparseConfig
from jaxlab.attention.ring import ring_attention as ring_attention
from jaxlab.attention.sparse import VerticalSlashPattern as VerticalSlashPattern
from jaxlab.attention.sparse import pattern_from_budgets as pattern_from_budgets
from jaxlab.attention.sparse import sparse_attention_reference as sparse_attention_reference
from jaxlab.attention.sparse import sparse_mask as sparse_mask
from jaxlab.attention.sparse import vertical_slash_pattern as vertical_slash_pattern
