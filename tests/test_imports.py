"""Layering: no import cycle inside ``jaxlab`` / ``pallas_kernels``, and the kernels stand alone.

The imports of every module are read with ``ast`` (nothing is imported). An edge ``a -> b`` means that
module ``a`` names module ``b`` in an ``import`` statement: ``import x.y`` and ``from x import y``
give ``x.y`` when that is a module, else ``x`` (the package, for a name defined in its
``__init__``); relative imports are resolved against the importing module's package. Imports under
``if TYPE_CHECKING:`` never run and are left out.

Two graphs are checked, and both must be acyclic:

* module level: the statements that run when the module is imported (including those inside
  top-level ``if`` / ``try`` blocks). A cycle here makes the import order matter and breaks with
  "partially initialized module" errors.
* everything: module-level plus imports inside functions and methods. A deferred import does not
  fail at import time, but a cycle through one still means two modules depend on each other, which
  the one-way layering (models <- generation <- rl / serving; kernels below models) rules out.

A failure prints one shortest cycle per strongly connected component, one edge per line with the
file and line that makes it, and the component's other members.

``KNOWN_CYCLES`` lists deferred-import cycles that are being removed; the test fails on any other
cycle, and also when a listed one is gone (delete its entry then, so the list only shrinks).
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jaxlab", "pallas_kernels")

# deferred-import cycles being removed: members -> why it exists / what removes it
KNOWN_CYCLES: dict[frozenset[str], str] = {}


@dataclasses.dataclass(frozen=True)
class Edge:
    target: str
    path: str
    line: int
    deferred: bool  # inside a function or method


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of ``packages`` under ``root``."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module):
    """(node, deferred) for every import statement that can run, TYPE_CHECKING blocks left out."""

    def walk(node, deferred):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:
                    yield from walk(ast.Module(body=[sub], type_ignores=[]), deferred)
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, deferred
            inner = deferred or isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            )
            yield from walk(child, inner)

    yield from walk(tree, False)


def import_graph(root: Path, packages=PACKAGES) -> dict[str, list[Edge]]:
    """Module -> its import edges to other modules of ``packages``."""
    files = module_files(root, packages)
    graph: dict[str, list[Edge]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        here = (
            name if is_pkg else name.rpartition(".")[0]
        )  # the package relative imports start from
        tree = ast.parse(path.read_text(), filename=str(path))
        edges = []
        for node, deferred in _imports(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = here.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                for alias in node.names:
                    sub = f"{mod}.{alias.name}"
                    targets.append(sub if sub in files else mod)
            for target in targets:
                # ``import a.b.c`` where only ``a.b`` is ours (c a name): the longest known prefix
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.append(Edge(target, str(path.relative_to(root)), node.lineno, deferred))
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, list[Edge]], *, deferred: bool):
    """One shortest cycle per strongly connected component (Tarjan): ``[(cycle, component)]``, the
    cycle as ``[(module, edge), ...]`` with ``edge`` leading to the next module, the component as
    the frozenset of its modules. ``deferred=False`` ignores imports inside functions."""
    adj = {
        m: [e for e in edges if (deferred or not e.deferred) and e.target in graph]
        for m, edges in graph.items()
    }
    index, low, on_stack, stack, sccs, counter = {}, {}, set(), [], [], [0]

    def strongconnect(v):  # iterative Tarjan
        work = [(v, iter(adj[v]))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, it = work[-1]
            for e in it:
                w = e.target
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(adj[w])))
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    scc = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        scc.append(w)
                        if w == node:
                            break
                    if len(scc) > 1:
                        sccs.append(set(scc))

    for v in sorted(adj):
        if v not in index:
            strongconnect(v)

    cycles = []
    for scc in sccs:
        start = min(scc)
        # breadth-first from start back to start inside the component: a shortest cycle
        prev: dict[str, tuple[str, Edge]] = {}
        frontier, found = [start], None
        while frontier and found is None:
            nxt = []
            for m in frontier:
                for e in adj[m]:
                    if e.target not in scc:
                        continue
                    if e.target == start:
                        found = (m, e)
                        break
                    if e.target not in prev:
                        prev[e.target] = (m, e)
                        nxt.append(e.target)
                if found:
                    break
            frontier = nxt
        path = [found]
        while path[0][0] != start:
            path.insert(0, prev[path[0][0]])
        cycles.append((path, frozenset(scc)))
    return sorted(cycles, key=lambda c: c[0][0][0])


def format_cycles(cycles) -> str:
    lines = []
    for cycle, component in cycles:
        lines.append(" -> ".join([m for m, _ in cycle] + [cycle[0][0]]))
        for m, e in cycle:
            kind = "inside a function" if e.deferred else "module level"
            lines.append(f"    {m} -> {e.target}   ({e.path}:{e.line}, {kind})")
        others = sorted(component - {m for m, _ in cycle})
        if others:
            lines.append(f"    (the same cycle component also holds {', '.join(others)})")
    return "\n".join(lines)


def assert_no_cycles(graph, *, deferred: bool, known=()) -> None:
    """Fails on cycles whose component is not in ``known``, and on ``known`` ones that are gone."""
    cycles = find_cycles(graph, deferred=deferred)
    new = [c for c in cycles if c[1] not in known]
    gone = [sorted(k) for k in known if k not in {c[1] for c in cycles}]
    what = "imports (module level and inside functions)" if deferred else "module-level imports"
    if new:
        raise AssertionError(f"import cycles in {what}:\n{format_cycles(new)}")
    if gone:
        raise AssertionError(f"these known cycles are gone, delete them from KNOWN_CYCLES: {gone}")


# -- the project ---------------------------------------------------------------------------------


def test_no_import_cycle_at_module_level():
    assert_no_cycles(import_graph(ROOT), deferred=False)


def test_no_import_cycle_even_through_deferred_imports():
    assert_no_cycles(import_graph(ROOT), deferred=True, known=KNOWN_CYCLES)


def test_pallas_kernels_do_not_import_jaxlab():
    """The kernel package stands alone: its input type (StepPlan) lives with it."""
    graph = import_graph(ROOT)
    offenders = []
    for name, path in module_files(ROOT, ("pallas_kernels",)).items():
        tree = ast.parse(path.read_text())
        for node, _ in _imports(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
            )
            offenders += [
                f"{name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] == "jaxlab"
            ]
        offenders += [f"{name} -> {e.target}" for e in graph[name] if e.target.startswith("jaxlab")]
    assert not offenders, "\n".join(offenders)

    from jaxlab.attention import layouts
    from pallas_kernels.block_sparse_attention import plan

    assert layouts.StepPlan is plan.StepPlan and layouts.step_mask is plan.step_mask


def test_rl_trainer_does_not_import_test_helpers():
    graph = import_graph(ROOT)
    assert not [e for e in graph["jaxlab.rl.trainer"] if e.target.startswith("jaxlab.testing")]


# -- the checker itself --------------------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_cycle_finder_reports_a_module_level_cycle(tmp_path):
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "import os\nfrom pkg import b\n",
            "pkg/b.py": "from . import c\n",
            "pkg/c.py": "from pkg.a import thing\n",
            "pkg/d.py": "import pkg.a\n",  # depends on the cycle, is not part of it
        },
    )
    graph = import_graph(tmp_path, ("pkg",))
    assert [e.target for e in graph["pkg.a"]] == ["pkg.b"]  # os is not ours
    ((cycle, component),) = find_cycles(graph, deferred=False)
    assert [m for m, _ in cycle] == ["pkg.a", "pkg.b", "pkg.c"] and "pkg.d" not in component
    with pytest.raises(AssertionError) as err:
        assert_no_cycles(graph, deferred=False)
    message = str(err.value)
    assert "pkg.a -> pkg.b -> pkg.c -> pkg.a" in message
    assert "pkg.c -> pkg.a   (pkg/c.py:1, module level)" in message


def test_cycle_finder_separates_deferred_imports_and_skips_type_checking(tmp_path):
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.x import X\n",
            "pkg/x.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from pkg.y import Y\n"
                "class X:\n    def f(self):\n        from pkg import y\n        return y\n"
            ),
            "pkg/y.py": "from pkg import x\n",
            "pkg/z/__init__.py": "",
            "pkg/z/w.py": "from .. import y\nfrom ..z import w2\n",
            "pkg/z/w2.py": "def g():\n    from pkg.z.w import h\n",
        },
    )
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.x"] == [Edge("pkg.y", "pkg/x.py", 6, True)]  # TYPE_CHECKING left out
    assert [e.target for e in graph["pkg.z.w"]] == ["pkg.y", "pkg.z.w2"]
    assert find_cycles(graph, deferred=False) == []
    cycles = find_cycles(graph, deferred=True)
    assert [[m for m, _ in c] for c, _ in cycles] == [["pkg.x", "pkg.y"], ["pkg.z.w", "pkg.z.w2"]]
    assert "inside a function" in format_cycles(cycles)
    # a known cycle is tolerated; an unlisted one fails; a listed one that is gone fails too
    known = {frozenset({"pkg.x", "pkg.y"}), frozenset({"pkg.z.w", "pkg.z.w2"})}
    assert_no_cycles(graph, deferred=True, known=known)
    with pytest.raises(AssertionError, match=r"pkg\.z\.w -> pkg\.z\.w2 -> pkg\.z\.w"):
        assert_no_cycles(graph, deferred=True, known={frozenset({"pkg.x", "pkg.y"})})
    with pytest.raises(AssertionError, match=r"gone, delete them from KNOWN_CYCLES"):
        assert_no_cycles(graph, deferred=True, known={*known, frozenset({"pkg.a", "pkg.b"})})


def test_training_and_encoders_never_load_the_native_kernels():
    """Models know nothing of the native CPU kernels: building, running and training a decoder
    and an encoder imports no ``jaxlab.native`` (so never builds it); generation reaches them
    through ``jaxlab.native.decoding.prepare_for_decoding`` only."""
    import subprocess
    import sys

    code = """
import sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jaxlab.models import BertConfig, BertEncoder, Decoder, DecoderConfig
from jaxlab.train import DataConfig, OptimConfig, counting_dataset, make_optimizer, train_step
model = Decoder(DecoderConfig(vocab_size=64), rngs=nnx.Rngs(0))
opt = nnx.Optimizer(model, make_optimizer(OptimConfig(steps=2)), wrt=nnx.Param)
data = iter(counting_dataset(DataConfig(), vocab_size=64))
loss = train_step(model, opt, jnp.asarray(next(data)["tokens"]))
unrolled = Decoder(DecoderConfig(vocab_size=64, scan_layers=False), rngs=nnx.Rngs(0))
logits, cache = unrolled(jnp.ones((2, 3), jnp.int32), cache=unrolled.init_cache(2, 8))
bert = BertEncoder(BertConfig(), rngs=nnx.Rngs(0))
bert(jnp.ones((2, 5), jnp.int32), attention_mask=jnp.ones((2, 5), jnp.int32))
assert np.isfinite(float(loss)) and logits.shape == (2, 3, 64)
loaded = sorted(m for m in sys.modules if m.startswith("jaxlab.native"))
assert not loaded, loaded
from jaxlab.generation import generate_tokens
generate_tokens(unrolled, np.ones((1, 3), np.int32), np.ones((1, 3), np.int32),
                max_new_tokens=2, eos_ids=(), pad_id=0)
assert "jaxlab.native.decoding" in sys.modules  # generation is what reaches them
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
