"""Agent runtime with PASTE's pattern-aware speculative tool execution.

- :mod:`~jaxlab.agents.tools`: tools with declared effects (``read_only`` / ``idempotent`` /
  ``mutating``), canonical calls, the versioned state tools act on.
- :mod:`~jaxlab.agents.events`: the per-task event log.
- :mod:`~jaxlab.agents.latency`: injected log-normal tool latencies.
- :mod:`~jaxlab.agents.bfcl`: BFCL's multi-turn tasks and stateful tool classes (bfcl-eval).
- :mod:`~jaxlab.agents.search`, :mod:`~jaxlab.agents.sandbox`: BM25 search and page fetch over a
  local corpus; Python / shell in a subprocess with a timeout.
- :mod:`~jaxlab.agents.miner`: control-flow patterns and data-flow rules, predictors.
- :mod:`~jaxlab.agents.executor`: the tool scheduler and the speculative executor.
- :mod:`~jaxlab.agents.runtime`: the LLM -> tool -> LLM loop (in-process Engine or an
  OpenAI-compatible endpoint).
- :mod:`~jaxlab.agents.bench`: the replay benchmark (``python -m jaxlab agents bench``).
- :mod:`~jaxlab.agents.workloads`: the benchmark's workloads (BFCL; scripted research tasks).
"""

from jaxlab.agents.events import PENDING as PENDING
from jaxlab.agents.events import USER_TURN as USER_TURN
from jaxlab.agents.events import Event as Event
from jaxlab.agents.events import EventLog as EventLog
from jaxlab.agents.executor import SpeculationConfig as SpeculationConfig
from jaxlab.agents.executor import SpeculativeExecutor as SpeculativeExecutor
from jaxlab.agents.executor import ToolScheduler as ToolScheduler
from jaxlab.agents.latency import LATENCY_PROFILES as LATENCY_PROFILES
from jaxlab.agents.latency import LatencyModel as LatencyModel
from jaxlab.agents.latency import latency_profile as latency_profile
from jaxlab.agents.miner import BigramPredictor as BigramPredictor
from jaxlab.agents.miner import MinerConfig as MinerConfig
from jaxlab.agents.miner import OraclePredictor as OraclePredictor
from jaxlab.agents.miner import Pattern as Pattern
from jaxlab.agents.miner import PatternTable as PatternTable
from jaxlab.agents.miner import Prediction as Prediction
from jaxlab.agents.miner import Source as Source
from jaxlab.agents.miner import mine_patterns as mine_patterns
from jaxlab.agents.runtime import AgentResult as AgentResult
from jaxlab.agents.runtime import EngineLLM as EngineLLM
from jaxlab.agents.runtime import LLMReply as LLMReply
from jaxlab.agents.runtime import OpenAIChatLLM as OpenAIChatLLM
from jaxlab.agents.runtime import ReplayLLM as ReplayLLM
from jaxlab.agents.runtime import run_agent as run_agent
from jaxlab.agents.tools import Effect as Effect
from jaxlab.agents.tools import Tool as Tool
from jaxlab.agents.tools import ToolCall as ToolCall
from jaxlab.agents.tools import ToolCallError as ToolCallError
from jaxlab.agents.tools import ToolRegistry as ToolRegistry
from jaxlab.agents.tools import ToolState as ToolState
