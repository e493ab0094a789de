"""Epistemic verbalization and the information of reasoning traces.

Public interface (others build on these names):

Markers (:mod:`jaxlab.analysis.markers`)
  ``count_epistemic(text, convention="substring" | "word_boundary") -> int``,
  ``count_epistemic_by_word``, ``epistemic_stats`` (per response / per problem / per 1k tokens),
  ``marker_spans``, ``epistemic_token_mask(tokenizer, token_ids)``, ``expand_surface_forms``,
  ``single_token_surface_ids``; word lists ``SUBSTRING_WORDS`` (10), ``WORD_BOUNDARY_WORDS`` (13).
Self-information (:mod:`jaxlab.analysis.information`)
  ``token_logprobs``, ``self_information_from_logits``, ``cumulative_information``,
  ``split_information``, ``segment_information_gain``, ``stagnation_onset``,
  ``trace_information -> [TraceInformation]``.
Answer sufficiency (:mod:`jaxlab.analysis.sufficiency`)
  ``answer_sufficiency -> SufficiencyCurve`` (log p(y* | s_t), H(Y | s_t) at checkpoints).
MI (:mod:`jaxlab.analysis.mi`)
  ``hsic_normalized_cca``, ``mi_curve``, ``trace_mi``.
Interventions (:mod:`jaxlab.analysis.interventions`)
  ``suppression_logit_bias``, ``induction_prompt``, ``wait_message``, ``run_intervention``,
  ``wilson_interval``.
Training traces (:mod:`jaxlab.analysis.traces`)
  ``write_trace(problem, style)`` for styles ``procedural`` / ``epistemic`` / ``synonym``,
  ``trace_dataset``, ``write_sft_jsonl``; the checks ``column_check``, ``is_hard``.
"""

from jaxlab.analysis.information import TraceInformation as TraceInformation
from jaxlab.analysis.information import cumulative_information as cumulative_information
from jaxlab.analysis.information import last_hidden_states as last_hidden_states
from jaxlab.analysis.information import line_segments as line_segments
from jaxlab.analysis.information import segment_information_gain as segment_information_gain
from jaxlab.analysis.information import (
    self_information_from_logits as self_information_from_logits,
)
from jaxlab.analysis.information import split_information as split_information
from jaxlab.analysis.information import stagnation_onset as stagnation_onset
from jaxlab.analysis.information import token_logprobs as token_logprobs
from jaxlab.analysis.information import trace_information as trace_information
from jaxlab.analysis.information import window_segments as window_segments
from jaxlab.analysis.interventions import INTERVENTIONS as INTERVENTIONS
from jaxlab.analysis.interventions import InterventionResult as InterventionResult
from jaxlab.analysis.interventions import induction_prompt as induction_prompt
from jaxlab.analysis.interventions import run_intervention as run_intervention
from jaxlab.analysis.interventions import suppression_logit_bias as suppression_logit_bias
from jaxlab.analysis.interventions import wait_message as wait_message
from jaxlab.analysis.interventions import wilson_interval as wilson_interval
from jaxlab.analysis.markers import CONVENTIONS as CONVENTIONS
from jaxlab.analysis.markers import EPISTEMIC_WORDS as EPISTEMIC_WORDS
from jaxlab.analysis.markers import SUBSTRING_WORDS as SUBSTRING_WORDS
from jaxlab.analysis.markers import WORD_BOUNDARY_WORDS as WORD_BOUNDARY_WORDS
from jaxlab.analysis.markers import EpistemicStats as EpistemicStats
from jaxlab.analysis.markers import count_epistemic as count_epistemic
from jaxlab.analysis.markers import count_epistemic_by_word as count_epistemic_by_word
from jaxlab.analysis.markers import epistemic_stats as epistemic_stats
from jaxlab.analysis.markers import epistemic_token_mask as epistemic_token_mask
from jaxlab.analysis.markers import expand_surface_forms as expand_surface_forms
from jaxlab.analysis.markers import marker_spans as marker_spans
from jaxlab.analysis.markers import single_token_surface_ids as single_token_surface_ids
from jaxlab.analysis.markers import token_char_offsets as token_char_offsets
from jaxlab.analysis.mi import hsic_normalized_cca as hsic_normalized_cca
from jaxlab.analysis.mi import mi_curve as mi_curve
from jaxlab.analysis.mi import trace_mi as trace_mi
from jaxlab.analysis.sufficiency import SufficiencyCurve as SufficiencyCurve
from jaxlab.analysis.sufficiency import answer_sufficiency as answer_sufficiency
from jaxlab.analysis.sufficiency import checkpoint_positions as checkpoint_positions
from jaxlab.analysis.sufficiency import empirical_entropy as empirical_entropy
from jaxlab.analysis.traces import TRACE_STYLES as TRACE_STYLES
from jaxlab.analysis.traces import trace_dataset as trace_dataset
from jaxlab.analysis.traces import write_sft_jsonl as write_sft_jsonl
from jaxlab.analysis.traces import write_trace as write_trace
