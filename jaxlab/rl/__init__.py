"""RL for LLMs: policy losses and their aggregation (GRPO, DAPO, Dr. GRPO, ΔL), advantages, KL.

Pure functions, composable under ``jit`` / ``vmap`` / ``grad`` / ``shard_map``. Variants are chosen
by name from the registries below.
"""

from jaxlab.registry import Registry as Registry
from jaxlab.rl.advantages import ADVANTAGE_ESTIMATORS as ADVANTAGE_ESTIMATORS
from jaxlab.rl.advantages import batch_advantages as batch_advantages
from jaxlab.rl.advantages import compute_advantages as compute_advantages
from jaxlab.rl.advantages import grpo_advantages as grpo_advantages
from jaxlab.rl.advantages import rloo_advantages as rloo_advantages
from jaxlab.rl.aggregation import AGGREGATION_MODES as AGGREGATION_MODES
from jaxlab.rl.aggregation import aggregate_loss as aggregate_loss
from jaxlab.rl.aggregation import aggregate_terms as aggregate_terms
from jaxlab.rl.aggregation import delta_l_weights as delta_l_weights
from jaxlab.rl.aggregation import loss_normalizer as loss_normalizer
from jaxlab.rl.losses import KL_ESTIMATORS as KL_ESTIMATORS
from jaxlab.rl.losses import POLICY_LOSSES as POLICY_LOSSES
from jaxlab.rl.losses import entropy_from_logits as entropy_from_logits
from jaxlab.rl.losses import importance_ratio as importance_ratio
from jaxlab.rl.losses import kl_penalty as kl_penalty
from jaxlab.rl.losses import masked_mean as masked_mean
from jaxlab.rl.losses import policy_loss as policy_loss
from jaxlab.rl.losses import token_logprobs as token_logprobs
