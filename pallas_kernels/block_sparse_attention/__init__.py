"""Block-sparse + vertical-bar attention kernels (Pallas) and their plain-jnp twins."""

from pallas_kernels.block_sparse_attention.kernel import (
    block_sparse_attention_bwd as block_sparse_attention_bwd,
)
from pallas_kernels.block_sparse_attention.kernel import (
    block_sparse_attention_fwd as block_sparse_attention_fwd,
)
from pallas_kernels.block_sparse_attention.kernel import merge_partial as merge_partial
from pallas_kernels.block_sparse_attention.plan import StepPlan as StepPlan
from pallas_kernels.block_sparse_attention.plan import step_mask as step_mask
from pallas_kernels.block_sparse_attention.reference import (
    block_sparse_attention_bwd_reference as block_sparse_attention_bwd_reference,
)
from pallas_kernels.block_sparse_attention.reference import (
    block_sparse_attention_fwd_reference as block_sparse_attention_fwd_reference,
)
