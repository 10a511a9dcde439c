"""The package's layers (docs/architecture.md): core < adapters/ < distributed < finetune/, no import cycles, a
light import.

The import graph is read from the source with `ast` (every `import` / `from ... import`, at module level or
inside a function: a deferred import is still a dependency). Edges follow Python's own rules: importing
`a.b.c` also runs the package `a.b`'s `__init__`, so that package is an edge too — unless the importer lives
inside it (a package's own modules may import each other through it). The root `lowrank_ext/__init__.py` is
the facade that re-exports every layer; it is not part of any layer and nothing may import it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "lowrank_ext"
PKG = "lowrank_ext"
CORE = ("_extension", "_build_config", "_atomic", "nf4", "ops", "nn", "optim", "_reference")
UPPER = ("adapters", "distributed", "hf", "finetune")  # in this order: each may import core and the ones before it
HEAVY = ("transformers", "peft", "bitsandbytes", "matplotlib", "safetensors")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imported_names(path: Path, modules: dict[str, Path]) -> set[str]:
    """lowrank_ext modules `path` imports, with the packages Python runs on the way (see the docstring)."""
    me = module_name(path)
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = me.split(".") if is_pkg else me.split(".")[:-1]
                mod = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in modules]
            found.update(subs)
            if len(subs) < len(node.names):  # a name defined in `mod` itself
                found.add(mod)
    edges: set[str] = set()
    for name in found:
        if name == PKG:  # the facade itself
            edges.add(PKG)
            continue
        if not name.startswith(PKG + "."):
            continue
        parts = name.split(".")
        for i in range(2, len(parts) + 1):  # the module and every package above it, below the root
            target = ".".join(parts[:i])
            inside = me == target or me.startswith(target + ".")
            if target in modules and target != me and (i == len(parts) or not inside):
                edges.add(target)
    return edges


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {m: imported_names(p, modules) for m, p in modules.items()}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "facade"
    top = parts[1]
    if top in ("__main__",):
        return "entry"
    if top in UPPER:
        return top
    assert top in CORE, f"{module}: not in any layer of docs/architecture.md (core {CORE}, {UPPER})"
    return "core"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None. Iterative DFS, three colours."""
    colour = dict.fromkeys(graph, 0)
    for start in sorted(graph):
        if colour[start]:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                colour[node] = 2
                stack.pop()
                path.pop()
                continue
            if colour.get(nxt, 2) == 1:
                return path[path.index(nxt):] + [nxt]
            if colour.get(nxt) == 0:
                colour[nxt] = 1
                path.append(nxt)
                stack.append((nxt, iter(sorted(graph[nxt]))))
    return None


def test_graph_sees_the_package():
    graph = import_graph()
    # the reader must see real edges, or every check below passes vacuously
    assert "lowrank_ext.nf4" in graph["lowrank_ext.ops.linear"]
    assert "lowrank_ext.adapters.injector" in graph["lowrank_ext.adapters.management"]
    assert "lowrank_ext.ops" in graph["lowrank_ext.nn.lora"]
    assert {"lowrank_ext.adapters", "lowrank_ext.distributed", "lowrank_ext.finetune"} <= set(graph)
    assert "lowrank_ext.distributed" in graph["lowrank_ext.finetune.parallel"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_catches_a_cycle_through_a_package_init():
    # nf4 -> ops.nf4 runs ops/__init__, which imports ops.linear, which imports nf4: the cycle this layout removed
    modules = {m: Path() for m in ("lowrank_ext.nf4", "lowrank_ext.ops", "lowrank_ext.ops.nf4",
                                   "lowrank_ext.ops.linear")}
    graph = {"lowrank_ext.nf4": {"lowrank_ext.ops.nf4", "lowrank_ext.ops"},
             "lowrank_ext.ops": {"lowrank_ext.ops.nf4", "lowrank_ext.ops.linear"},
             "lowrank_ext.ops.nf4": set(), "lowrank_ext.ops.linear": {"lowrank_ext.nf4"}}
    assert find_cycle({m: graph[m] for m in modules}) is not None


def test_layers_import_only_downwards():
    allowed = {"core": {"core"}, "adapters": {"core", "adapters"},
               "distributed": {"core", "adapters", "distributed"},
               "hf": {"core", "adapters", "distributed", "hf"},
               "finetune": {"core", "adapters", "distributed", "hf", "finetune"},
               "entry": {"finetune"}, "facade": {"core", "adapters", "distributed", "finetune"}}
    bad = []
    for mod, deps in import_graph().items():
        for dep in deps:
            if layer_of(dep) not in allowed[layer_of(mod)]:
                bad.append(f"{mod} ({layer_of(mod)}) imports {dep} ({layer_of(dep)})")
    assert not bad, "\n".join(bad)


def test_core_imports_only_torch_numpy_and_stdlib():
    graph_modules = all_modules()
    bad = []
    for mod, path in graph_modules.items():
        if layer_of(mod) != "core":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            for n in names:
                top = n.split(".")[0]
                if top in HEAVY:
                    bad.append(f"{mod} imports {n}")
    assert not bad, "\n".join(bad)


def test_import_is_light():
    code = ("import sys, lowrank_ext; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import lowrank_ext loaded: {out.stdout.strip()}"


@pytest.mark.parametrize("old,new", [("config", "lowrank_ext.adapters.config"),
                                     ("train", "lowrank_ext.finetune.trainer"),
                                     ("rank_alloc", "lowrank_ext.finetune.rank_allocation")])
def test_moved_modules_still_reachable(old, new):
    import lowrank_ext

    with pytest.warns(DeprecationWarning, match=f"lowrank_ext.{old} moved to {new}"):
        mod = getattr(lowrank_ext, old)
    assert mod is sys.modules[new]
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        lowrank_ext.no_such_name  # noqa: B018
