"""BFCL multi-turn tasks and their stateful tools, from the ``bfcl-eval`` package.

The package (installed ``--no-deps``: its declared dependencies are heavy and unused here) ships
the Berkeley Function Calling Leaderboard's data files and the Python classes behind its
multi-turn tools: a file system (``GorillaFileSystem``), messaging, posting (``TwitterAPI``),
tickets, trading, travel booking, vehicle control and a math library. The files are located with
:func:`importlib.util.find_spec` (the package's top level is not imported); only the tool classes'
modules are imported, and they need nothing beyond the standard library (``MathAPI``: mpmath).

``multi_turn_base`` holds 200 tasks; each has user turns, an initial configuration per class
(loaded with the classes' ``_load_scenario``; their random generators are seeded there, so runs
are deterministic), and gold calls per turn
(``possible_answer/``: ``cd(folder='document')``-style strings, parsed with :mod:`ast`).

Every method is registered as a :class:`~jaxlab.agents.tools.Tool` on its class instance's state
(``state_key`` = the class name), with the effect given in :data:`EFFECTS` (what is not listed as
read-only or idempotent is mutating; ``get_outside_temperature_from_google`` draws from the
instance's generator, so it mutates). ``tests/test_agents_tools.py`` checks the read-only ones
against the state before and after every gold call of every task.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import json
from pathlib import Path
from typing import Any

from jaxlab.agents.latency import LatencyModel, latency_profile
from jaxlab.agents.tools import Effect, Tool, ToolCall, ToolRegistry, ToolState
from jaxlab.errors import UserError

__all__ = [
    "BFCLTask",
    "BFCL_PACKAGE",
    "EFFECTS",
    "bfcl_data_dir",
    "load_bfcl_tasks",
    "bfcl_tool_class",
    "bfcl_state",
    "bfcl_registry",
    "parse_gold_call",
]

BFCL_PACKAGE = "bfcl_eval"
_BACKEND = "bfcl_eval.eval_checker.multi_turn_eval.func_source_code"
CLASS_MODULES = {
    "GorillaFileSystem": "gorilla_file_system",
    "MathAPI": "math_api",
    "MessageAPI": "message_api",
    "TwitterAPI": "posting_api",
    "TicketAPI": "ticket_api",
    "TradingBot": "trading_bot",
    "TravelAPI": "travel_booking",
    "VehicleControlAPI": "vehicle_control",
}
FUNC_DOCS = {
    "GorillaFileSystem": "gorilla_file_system.json",
    "MathAPI": "math_api.json",
    "MessageAPI": "message_api.json",
    "TwitterAPI": "posting_api.json",
    "TicketAPI": "ticket_api.json",
    "TradingBot": "trading_bot.json",
    "TravelAPI": "travel_booking.json",
    "VehicleControlAPI": "vehicle_control.json",
}
STATELESS = {"MathAPI"}

_READ_ONLY = {
    "GorillaFileSystem": "cat diff du find grep ls pwd sort tail wc",
    "MathAPI": "absolute_value add divide imperial_si_conversion logarithm max_value mean "
    "min_value multiply percentage power round_number si_unit_conversion square_root "
    "standard_deviation subtract sum_values",
    "MessageAPI": "get_message_stats get_user_id list_users message_get_login_status "
    "search_messages view_messages_sent",
    "TwitterAPI": "get_tweet get_tweet_comments get_user_stats get_user_tweets "
    "list_all_following posting_get_login_status search_tweets",
    "TicketAPI": "get_ticket get_user_tickets ticket_get_login_status",
    "TradingBot": "filter_stocks_by_price get_account_info get_available_stocks "
    "get_current_time get_order_details get_order_history get_stock_info get_symbol_by_name "
    "get_transaction_history get_watchlist notify_price_change trading_get_login_status",
    "TravelAPI": "compute_exchange_rate get_all_credit_cards get_booking_history "
    "get_budget_fiscal_year get_credit_card_balance "
    "get_nearest_airport_by_city list_all_airports retrieve_invoice travel_get_login_status "
    "verify_traveler_information",
    "VehicleControlAPI": "check_tire_pressure displayCarStatus display_log estimate_distance "
    "estimate_drive_feasibility_by_mileage find_nearest_tire_shop gallon_to_liter "
    "get_current_speed get_outside_temperature_from_weather_com get_zipcode_based_on_city liter_to_gallon",
}
_IDEMPOTENT = {
    "TicketAPI": "logout ticket_login",
    "TradingBot": "trading_login trading_logout",
    # get_flight_cost caches the last quote (read by book_flight)
    "TravelAPI": "authenticate_travel get_flight_cost set_budget_limit",
    "TwitterAPI": "authenticate_twitter",
    "MessageAPI": "message_login",
    "VehicleControlAPI": "activateParkingBrake adjustClimateControl lockDoors setHeadlights "
    "set_navigation",
}


def _effects() -> dict[tuple[str, str], Effect]:
    table = {}
    for cls, names in _READ_ONLY.items():
        table.update({(cls, n): Effect.READ_ONLY for n in names.split()})
    for cls, names in _IDEMPOTENT.items():
        table.update({(cls, n): Effect.IDEMPOTENT for n in names.split()})
    return table


EFFECTS: dict[tuple[str, str], Effect] = _effects()
"""``(class, method) -> effect`` for the read-only and idempotent methods; the rest mutate."""


def bfcl_data_dir() -> Path:
    """The ``bfcl_eval/data`` folder, found without importing the package."""
    spec = importlib.util.find_spec(BFCL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the bfcl-eval package is not installed; `make test` installs it (or: pip install "
            "--no-deps bfcl-eval==2026.3.23)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not path.is_dir():
        raise UserError(f"bfcl-eval is installed but has no data folder at {path}")
    return path


@functools.cache
def bfcl_tool_class(name: str) -> type:
    """The tool class ``name`` (``"GorillaFileSystem"``, ...), imported from bfcl-eval."""
    if name not in CLASS_MODULES:
        raise UserError(f"unknown BFCL tool class {name!r}; known: {', '.join(CLASS_MODULES)}")
    bfcl_data_dir()
    module = importlib.import_module(f"{_BACKEND}.{CLASS_MODULES[name]}")
    return getattr(module, name)


@functools.cache
def _func_docs(cls: str) -> dict[str, dict[str, Any]]:
    path = bfcl_data_dir() / "multi_turn_func_doc" / FUNC_DOCS[cls]
    docs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {d["name"]: d for d in docs}


def parse_gold_call(text: str) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    """``"mv(source='a', destination='b')"`` -> ``("mv", (), {"source": "a", ...})``."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            raise ValueError("not a call of a plain name")
        args = tuple(ast.literal_eval(a) for a in node.args)
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except (SyntaxError, ValueError) as e:
        raise UserError(f"cannot parse the gold call {text!r}: {e}") from None
    return node.func.id, args, kwargs


@dataclasses.dataclass
class BFCLTask:
    """One multi-turn task: user turns, the classes' initial configuration and gold calls per
    turn (raw: name, positional arguments, keyword arguments)."""

    id: str
    turns: list[str]
    initial_config: dict[str, Any]
    involved_classes: list[str]
    excluded: list[str]
    gold: list[list[tuple[str, tuple[Any, ...], dict[str, Any]]]]

    @property
    def num_calls(self) -> int:
        return sum(len(t) for t in self.gold)

    def gold_calls(self, registry: ToolRegistry) -> list[list[ToolCall]]:
        """The gold calls per turn, in canonical form."""
        return [[registry.canonical(n, a, k) for n, a, k in turn] for turn in self.gold]


def load_bfcl_tasks(category: str = "multi_turn_base", limit: int | None = None) -> list[BFCLTask]:
    """The tasks of a multi-turn category with their gold calls."""
    data = bfcl_data_dir()
    qpath = data / f"BFCL_v4_{category}.json"
    apath = data / "possible_answer" / f"BFCL_v4_{category}.json"
    if not qpath.is_file() or not apath.is_file():
        raise UserError(f"no BFCL category {category!r} (looked for {qpath.name} and its answers)")
    answers = {}
    for line in apath.read_text().splitlines():
        if line.strip():
            d = json.loads(line)
            answers[d["id"]] = d["ground_truth"]
    tasks = []
    for line in qpath.read_text().splitlines():
        if not line.strip():
            continue
        d = json.loads(line)
        turns = [
            " ".join(m["content"] for m in turn if m["role"] == "user") for turn in d["question"]
        ]
        gold = [[parse_gold_call(c) for c in turn] for turn in answers[d["id"]]]
        tasks.append(
            BFCLTask(
                id=d["id"],
                turns=turns,
                initial_config=d.get("initial_config", {}),
                involved_classes=list(d["involved_classes"]),
                excluded=list(d.get("excluded_function", [])),
                gold=gold,
            )
        )
        if limit is not None and len(tasks) >= limit:
            break
    return tasks


def bfcl_state(task: BFCLTask) -> ToolState:
    """Fresh instances of the task's classes, loaded with its initial configuration."""
    import copy

    objects = {}
    for cls_name in task.involved_classes:
        obj = bfcl_tool_class(cls_name)()
        if cls_name not in STATELESS:
            obj._load_scenario(copy.deepcopy(task.initial_config.get(cls_name, {})))
        objects[cls_name] = obj
    return ToolState(objects)


def _latency_for(effect: Effect, latencies: dict[str, LatencyModel] | None) -> LatencyModel:
    key = "api_read" if effect is Effect.READ_ONLY else "api_write"
    if latencies is not None and key in latencies:
        return latencies[key]
    return latency_profile(key)


def bfcl_registry(task: BFCLTask, latencies: dict[str, LatencyModel] | None = None) -> ToolRegistry:
    """The task's tools: every public method of its classes, less its excluded functions.

    ``latencies`` maps ``"api_read"`` / ``"api_write"`` to the models of read-only and other
    calls (default: the named profiles, unscaled).
    """
    registry = ToolRegistry()
    for cls_name in task.involved_classes:
        cls = bfcl_tool_class(cls_name)
        docs = _func_docs(cls_name)
        for name, fn in inspect.getmembers(cls, inspect.isfunction):
            if name.startswith("_") or name in task.excluded:
                continue
            effect = EFFECTS.get((cls_name, name), Effect.MUTATING)
            doc = docs.get(name, {})
            params = dict(doc.get("parameters") or {"type": "object", "properties": {}})
            if params.get("type") == "dict":
                params["type"] = "object"
            registry.add(
                Tool(
                    name=name,
                    fn=fn,
                    effect=effect,
                    state_key=cls_name,
                    description=doc.get("description", ""),
                    parameters=params,
                    latency=_latency_for(effect, latencies),
                )
            )
    return registry
