"""Import graph of the project: no cycles, and the layering between models, training and inference.

Every ``.py`` file of ``calico_jax``, ``convert`` and ``train.py`` is parsed with ``ast`` (nothing is
imported). *Every* import statement counts, at module level and inside functions, classes or
``try`` blocks: a function-level import hides an edge from the module header but still couples the
two modules (and is the usual way a cycle gets papered over). Relative imports are resolved, and
``from pkg import name`` becomes an edge to ``pkg.name`` when that is a project module, else to ``pkg``.
An edge names the most specific module only (not the parent packages Python also runs), so a
package ``__init__`` that re-exports a submodule does not make a cycle with every child.

Layering is checked on direct imports, so each violation names the statement to change.
Dynamic imports (``importlib.import_module("calico_jax.models.llama")`` in the model / converter
registries) are not edges: they are strings, resolved at run time.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
from collections import deque
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("calico_jax", "convert")
SCRIPTS = ("train.py",)
# Top-level names whose imports are edges even without a walked file (``tests`` is not walked).
EXTERNAL_TOPS = ("tests",)

# The floors, bottom up: core (config base, filesystem, tokens, pre-processing) <- models <- data, checkpoints,
# parallel <- train <- plans; inference sits beside train and never imports it.
CORE_FORBIDDEN = ("calico_jax.models", "calico_jax.data", "calico_jax.train", "calico_jax.inference",
                  "calico_jax.plans", "calico_jax.checkpoints", "calico_jax.parallel", "calico_jax.eval", "convert")
MODEL_FORBIDDEN = ("calico_jax.data", "calico_jax.train", "calico_jax.inference", "calico_jax.plans",
                   "calico_jax.checkpoints", "calico_jax.eval", "convert")
INFERENCE = ("calico_jax.inference", "calico_jax.eval")
INFERENCE_FORBIDDEN = ("calico_jax.train", "calico_jax.plans", "calico_jax.checkpoints.training")
# The middle floors: data, checkpoints and parallel sit below training; training sits below plans and commands.
MIDDLE_FORBIDDEN = ("calico_jax.train", "calico_jax.plans", "calico_jax.inference", "calico_jax.eval")
TRAIN_FORBIDDEN = ("calico_jax.plans", "calico_jax.inference")


@dataclasses.dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    file: str
    line: int
    scope: str  # "module" or the enclosing function, e.g. "load_model"

    def where(self) -> str:
        at = "" if self.scope == "module" else f", in {self.scope}()"
        return f"{self.file}:{self.line}{at}"


# ----------------------------------------------------------------------------- collecting edges
def module_index(root: Path, packages=PACKAGES, scripts=SCRIPTS) -> dict[str, Path]:
    """module name -> file, for every .py file of the packages and the top-level scripts."""
    index = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            index[".".join(parts)] = path
    for script in scripts:
        if (root / script).exists():
            index[Path(script).stem] = root / script
    return index


def _within(name: str, prefix: str) -> bool:
    """``name`` is ``prefix`` or one of its submodules (``a.bc`` is not inside ``a.b``)."""
    return name == prefix or name.startswith(prefix + ".")


def _resolve(name: str, index: dict[str, Path], tops: set[str]) -> str | None:
    """The project module an absolute dotted name refers to (longest known prefix), or None."""
    if name.split(".")[0] not in tops:
        return None
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in index:
            return candidate
    return parts[0]  # e.g. ``tests`` without a tests/ folder: still an edge to report


def _base_package(module: str, path: Path, level: int) -> str:
    """The package a relative import of ``level`` dots starts from."""
    parts = module.split(".")
    if path.name != "__init__.py":
        parts = parts[:-1]  # a plain module's package is its parent
    return ".".join(parts[:len(parts) - (level - 1)])


def _targets(node: ast.AST, module: str, path: Path) -> list[str]:
    """Absolute dotted names an import node may refer to, most specific first per imported name."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        pkg = _base_package(module, path, node.level)
        base = f"{pkg}.{base}" if node.module else pkg
    # ``from pkg import name``: name may be a submodule (an edge to it) or an attribute of pkg.
    return [f"{base}.{alias.name}" if alias.name != "*" else base for alias in node.names]


class _ImportVisitor(ast.NodeVisitor):
    """Collects (target, line, enclosing function) for every import, at any depth."""

    def __init__(self):
        self.found: list[tuple[ast.AST, str]] = []
        self._scope: list[str] = []

    def _function(self, node):
        self._scope.append(node.name)
        self.generic_visit(node)
        self._scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_Import(self, node):
        self.found.append((node, ".".join(self._scope) or "module"))

    visit_ImportFrom = visit_Import


def collect_edges(root: Path, packages=PACKAGES, scripts=SCRIPTS) -> list[Edge]:
    index = module_index(root, packages, scripts)
    # ``tests`` is not walked, only indexed so that ``from tests.helpers import x`` names tests.helpers.
    known = {**module_index(root, [t for t in EXTERNAL_TOPS if (root / t).is_dir()], ()), **index}
    tops = {m.split(".")[0] for m in index} | set(EXTERNAL_TOPS)
    edges = []
    for module, path in index.items():
        visitor = _ImportVisitor()
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        for node, scope in visitor.found:
            for target in _targets(node, module, path):
                dst = _resolve(target, known, tops)
                if dst is not None and dst != module:
                    edges.append(Edge(module, dst, str(path.relative_to(root)), node.lineno, scope))
    return edges


def graph(edges: Iterable[Edge]) -> dict[str, dict[str, Edge]]:
    """src -> {dst: first edge}; one representative statement per module pair is enough to report."""
    g: dict[str, dict[str, Edge]] = {}
    for e in edges:
        g.setdefault(e.src, {}).setdefault(e.dst, e)
    return g


# ----------------------------------------------------------------------------- cycles
def strongly_connected(g: dict[str, dict[str, Edge]]) -> list[list[str]]:
    """Tarjan's SCCs (iterative: no recursion limit), only those with more than one module."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    work = []  # explicit DFS stack of (node, iterator over its remaining children)

    def enter(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        work.append((node, iter(sorted(g.get(node, {})))))

    for start in sorted(set(g) | {d for dsts in g.values() for d in dsts}):
        if start in index:
            continue
        enter(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        comp.append(top)
                        if top == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif child not in index:
                enter(child)
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return sorted(out)


def shortest_path(g: dict[str, dict[str, Edge]], src: str, dst: str, allowed: set[str] | None = None) -> list[str]:
    """BFS path src -> ... -> dst (inclusive), through ``allowed`` modules only; [] if none."""
    prev, queue = {src: None}, deque([src])
    while queue:
        node = queue.popleft()
        for nxt in sorted(g.get(node, {})):
            if allowed is not None and nxt not in allowed:
                continue
            if nxt == dst:
                path = [dst, node]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return path[::-1]
            if nxt not in prev:
                prev[nxt] = node
                queue.append(nxt)
    return []


def find_cycles(g: dict[str, dict[str, Edge]]) -> list[list[str]]:
    """Per SCC, the shortest cycle through each member, deduplicated: every module of every cycle
    appears in at least one short, readable chain (enumerating all simple cycles can explode)."""
    cycles, seen = [], set()
    for comp in strongly_connected(g):
        for node in comp:
            cycle = shortest_path(g, node, node, set(comp))
            key = frozenset(zip(cycle, cycle[1:]))
            if cycle and key not in seen:
                seen.add(key)
                cycles.append(cycle)
    return cycles


def format_chain(g: dict[str, dict[str, Edge]], chain: list[str]) -> str:
    hops = [f"{a} -> {b}  [{g[a][b].where()}]" for a, b in zip(chain, chain[1:])]
    return " -> ".join(chain) + "\n      " + "\n      ".join(hops)


# ----------------------------------------------------------------------------- layering
def layering_violations(edges: Iterable[Edge]) -> list[str]:
    """Direct imports that break the layering; each line names the statement."""
    rules = [  # (who, may not import, why)
        (lambda m: _within(m, "calico_jax.core"), CORE_FORBIDDEN, "the ground floor imports no other floor"),
        (lambda m: _within(m, "calico_jax.models"), MODEL_FORBIDDEN,
         "models import none of data, losses, training, inference or IO"),
        (lambda m: any(_within(m, p) for p in INFERENCE), INFERENCE_FORBIDDEN, "inference must not need training"),
        (lambda m: any(_within(m, p) for p in ("calico_jax.data", "calico_jax.checkpoints", "calico_jax.parallel")),
         MIDDLE_FORBIDDEN, "data, checkpoints and parallel sit below training and inference"),
        (lambda m: _within(m, "calico_jax.train"), TRAIN_FORBIDDEN, "training sits below plans and commands"),
        (lambda m: _within(m, "calico_jax"), ("tests",), "the library must not depend on its tests"),
    ]
    out = set()
    for e in edges:
        for is_src, forbidden, why in rules:
            if is_src(e.src) and any(_within(e.dst, f) for f in forbidden):
                out.add(f"{e.src} -> {e.dst}  [{e.where()}]  ({why})")
    return sorted(out)


# ----------------------------------------------------------------------------- private names
PRIVATE_SCOPE = (*PACKAGES, "bench")   # tests/ may reach into a private name it unit-tests; the library may not
PRIVATE_IMPORTS_ALLOWED: set[tuple[str, str]] = set()   # (importer, private name): none


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(root: Path, packages=PRIVATE_SCOPE, scripts=SCRIPTS) -> list[tuple[str, str, str]]:
    """(module, "owner.name", "file:line") for every ``from owner import _name`` and every ``owner._name`` attribute
    read (``owner`` a project module bound by an import in the file, at any depth) into another module."""
    index = module_index(root, packages, scripts)
    tops = {m.split(".")[0] for m in index}
    out = []
    for module, path in index.items():
        tree, bound, where = ast.parse(path.read_text(), filename=str(path)), {}, str(path.relative_to(root))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if _resolve(a.name, index, tops) is not None:   # ``import a.b`` binds ``a``; ``as x`` binds a.b
                        bound[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom):
                for a, target in zip(node.names, _targets(node, module, path)):
                    dst = _resolve(target, index, tops)
                    if dst == target:
                        bound[a.asname or a.name] = dst
                    elif dst not in (None, module) and _private(a.name):
                        out.append((module, f"{dst}.{a.name}", f"{where}:{node.lineno}"))
        for node in ast.walk(tree):
            chain, v = [], getattr(node, "value", None)
            while isinstance(v, ast.Attribute):
                chain, v = [v.attr, *chain], v.value
            owner = ".".join([bound.get(getattr(v, "id", None), ""), *chain])
            if isinstance(node, ast.Attribute) and _private(node.attr) and owner in index and owner != module:
                out.append((module, f"{owner}.{node.attr}", f"{where}:{node.lineno}"))
    return sorted(set(out))


# ----------------------------------------------------------------------------- tests
@functools.lru_cache(maxsize=1)
def project_edges() -> tuple[Edge, ...]:
    # A cached function, not a fixture: pytest would print the whole edge list in every failure.
    return tuple(collect_edges(ROOT))


def test_walks_the_project():
    index = module_index(ROOT)
    assert {"calico_jax", "calico_jax.models.calico", "convert", "train"} <= set(index)
    assert any(e.src == "calico_jax.models.calico" and e.dst == "calico_jax.models.layers" for e in project_edges())


MAX_LINES = 400   # the project's rule: one concept per module, none over 400 lines


def test_no_module_over_400_lines():
    files = [*(p for d in (*PACKAGES, "bench", "configs", "tests") for p in (ROOT / d).rglob("*.py")),
             *(ROOT / s for s in SCRIPTS)]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert len(files) > 100 and not long, f"modules over {MAX_LINES} lines (split them by concept): {long}"


def test_no_import_cycles():
    g = graph(project_edges())
    cycles = find_cycles(g)
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join("  " + format_chain(g, c) for c in cycles)


def test_layering():
    bad = layering_violations(project_edges())
    assert not bad, f"{len(bad)} layering violation(s):\n" + "\n".join("  " + b for b in bad)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_detector_on_a_synthetic_package(tmp_path):
    """A fake package with a module-level/function-level cycle, relative imports, ``from pkg import
    submodule``, an attribute import and forbidden edges: the detector must see exactly those."""
    _write(tmp_path, {
        "calico_jax/__init__.py": "from calico_jax.models.layers import dense\n",
        "calico_jax/models/layers.py": "import os\ndef dense():\n    pass\n",
        # a -> b at module level (relative), b -> a hidden inside a function
        "calico_jax/a.py": "from . import b\n",
        "calico_jax/b.py": "import json\n\ndef f():\n    from calico_jax.a import thing\n",
        "calico_jax/models/__init__.py": "",
        # ``from ..models import layers`` is a submodule; ``from calico_jax import dense`` an attribute
        "calico_jax/models/m.py": ("from ..models import layers\nfrom calico_jax import dense\n"
                                   "class M:\n    def load(self):\n        import calico_jax.train.loop\n"),
        "calico_jax/train/__init__.py": "",
        "calico_jax/train/loop.py": "try:\n    from tests.helpers import x\nexcept ImportError:\n    pass\n",
        "calico_jax/inference/predictor.py": "from calico_jax.train import loop\n",
        "convert/__init__.py": "",
        "train.py": "def main():\n    from calico_jax.train.loop import run\n",
        "tests/__init__.py": "", "tests/helpers.py": "import calico_jax\n",  # indexed, never walked
    })
    edges = collect_edges(tmp_path)
    pairs = {(e.src, e.dst) for e in edges}
    assert pairs == {
        ("calico_jax", "calico_jax.models.layers"), ("calico_jax.a", "calico_jax.b"), ("calico_jax.b", "calico_jax.a"),
        ("calico_jax.models.m", "calico_jax.models.layers"), ("calico_jax.models.m", "calico_jax"),
        ("calico_jax.models.m", "calico_jax.train.loop"), ("calico_jax.train.loop", "tests.helpers"),
        ("calico_jax.inference.predictor", "calico_jax.train.loop"), ("train", "calico_jax.train.loop")}
    hidden = next(e for e in edges if e.src == "calico_jax.b")
    assert (hidden.scope, hidden.line, hidden.where()) == ("f", 4, "calico_jax/b.py:4, in f()")
    nested = next(e for e in edges if e.dst == "calico_jax.train.loop" and e.src == "calico_jax.models.m")
    assert nested.scope == "load"  # a method counts as function level too

    g = graph(edges)
    assert find_cycles(g) == [["calico_jax.a", "calico_jax.b", "calico_jax.a"]]
    assert format_chain(g, find_cycles(g)[0]).startswith("calico_jax.a -> calico_jax.b -> calico_jax.a")
    bad = layering_violations(edges)
    assert [b.split("  ")[0] for b in bad] == [
        "calico_jax.inference.predictor -> calico_jax.train.loop", "calico_jax.models.m -> calico_jax.train.loop",
        "calico_jax.train.loop -> tests.helpers"]


def test_cycle_finder_reports_each_member():
    """Two cycles sharing a module (a<->b, b<->c) are one SCC; both short chains must be reported."""
    e = lambda s, d: Edge(s, d, f"{s}.py", 1, "module")  # noqa: E731
    g = graph([e("a", "b"), e("b", "a"), e("b", "c"), e("c", "b"), e("c", "d")])
    assert strongly_connected(g) == [["a", "b", "c"]]
    assert find_cycles(g) == [["a", "b", "a"], ["c", "b", "c"]]  # b -> a -> b is a rotation of the first



def test_no_private_imports():
    bad = [u for u in private_uses(ROOT) if u[:2] not in PRIVATE_IMPORTS_ALLOWED]
    assert not bad, (f"{len(bad)} use(s) of another module's private name (make it public where it is shared, or "
                     "move it to the module that owns it):\n" + "\n".join(f"  {w}: {m} uses {n}" for m, n, w in bad))


def test_private_finder_on_a_synthetic_package(tmp_path):
    _write(tmp_path, {
        "calico_jax/__init__.py": "", "calico_jax/a.py": "_x = 1\n\ndef _f():\n    return _x\n",
        "calico_jax/b.py": ("from calico_jax.a import _f, __doc__\nfrom . import a\nimport calico_jax.a as al\n"
                            "import calico_jax.a\ndef g(self):\n    import os\n"
                            "    return a._x, al._f, self._y, os._exit, a.public\ncalico_jax.a._x\n"),
    })
    assert private_uses(tmp_path) == [("calico_jax.b", "calico_jax.a._f", "calico_jax/b.py:1"),
                                      ("calico_jax.b", "calico_jax.a._f", "calico_jax/b.py:7"),
                                      ("calico_jax.b", "calico_jax.a._x", "calico_jax/b.py:7"),
                                      ("calico_jax.b", "calico_jax.a._x", "calico_jax/b.py:8")]
