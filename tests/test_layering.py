"""The package's import graph flows one way: format <- model <- convert <- runtime <- eval/sweep/publish
<- cli (model: the decoder and family specs, which calibration in convert runs and the runtime
serves; it imports neither).

Read statically (ast), so lazy imports inside functions count too. A module may import its own
layer and any layer below; never a higher one, never a private name of another module, and the
graph has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kbitrt

ROOT = Path(kbitrt.__file__).parent
# Rank of each layer: an import must not go to a higher rank. eval, sweep and publish share a rank
# but sweep may use eval (it evaluates cells); eval and publish must not use sweep.
RANK = {"": 0, "errors": 0, "format": 1, "model": 2, "convert": 3, "runtime": 4, "eval": 5,
        "publish": 5, "sweep": 6, "serve": 5, "cli": 7}


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(ROOT.rglob("*.py")):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = _modules()


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path, module: str) -> list[tuple[str, list[str], int]]:
    """(imported kbitrt module, names taken from it, line) for every import in the file."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("kbitrt")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.startswith("kbitrt"):
            # `from kbitrt.pkg import module` is an edge to that module, not to the package
            subs = [a.name for a in node.names if f"{node.module}.{a.name}" in MODULES]
            out += [(f"{node.module}.{name}", [], node.lineno) for name in subs]
            names = [a.name for a in node.names if a.name not in subs]
            if names or not subs:
                out.append((node.module, names, node.lineno))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__" \
                and node.args and isinstance(node.args[0], ast.Constant) \
                and str(node.args[0].value).startswith("kbitrt"):
            out.append((node.args[0].value, [], node.lineno))
    return out


def test_imports_go_down_only():
    mods = _modules()
    bad = []
    for mod, path in mods.items():
        for target, _, line in _imports(path, mod):
            src, dst = _layer(mod), _layer(target)
            if dst not in RANK:
                bad.append(f"{path.name}:{line} imports {target}: unknown layer {dst!r}")
            elif src in RANK and RANK[dst] > RANK[src] and mod != "kbitrt":
                bad.append(f"{mod}:{line} imports {target} (layer {dst} is above {src})")
            elif src in ("eval", "publish") and dst in ("eval", "publish") and src != dst:
                bad.append(f"{mod}:{line} imports {target} (eval and publish are siblings)")
    assert not bad, "\n".join(bad)


def test_no_private_names_across_modules():
    bad = []
    for mod, path in _modules().items():
        for target, names, line in _imports(path, mod):
            if target != mod:
                bad += [f"{mod}:{line} imports {target}.{n}" for n in names
                        if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    mods = _modules()
    graph = {m: {t for t, _, _ in _imports(p, m) if t in mods and t != m} for m, p in mods.items()}
    # the package root only registers the transformers hook; it is where every import starts
    graph = {m: deps - {"kbitrt"} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, stack: list[str]) -> bool:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle.extend(stack[stack.index(d):] + [d] if d in stack else [m, d])
                return True
            if state.get(d) is None and visit(d, stack + [d]):
                return True
        state[m] = 2
        return False

    for m in sorted(graph):
        if state.get(m) is None and visit(m, [m]):
            break
    assert not cycle, " -> ".join(cycle)


def _module_aliases(tree: ast.AST, mods: dict[str, Path]) -> dict[str, str]:
    """Local name -> kbitrt module, for names an import binds to a module (`from kbitrt.format
    import blockwise`, `import kbitrt.format.dtypes as dt`)."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kbitrt"):
            for a in node.names:
                if f"{node.module}.{a.name}" in mods:
                    out[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            out.update({a.asname: a.name for a in node.names if a.asname and a.name in mods})
    return out


def test_no_private_attributes_of_other_modules():
    """`blockwise._blocks(...)` is a private import by another name."""
    mods = _modules()
    bad = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        aliases = _module_aliases(tree, mods)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in aliases and aliases[node.value.id] != mod \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                bad.append(f"{mod}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_private_attribute_check_can_fail(tmp_path):
    mods = _modules()
    tree = ast.parse("from kbitrt.format import blockwise\nblockwise._blocks(w, 64)\n")
    aliases = _module_aliases(tree, mods)
    assert aliases == {"blockwise": "kbitrt.format.blockwise"}
    hits = [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and getattr(n.value, "id", None) in aliases and n.attr.startswith("_")]
    assert hits == ["_blocks"]


def test_cycle_check_sees_from_package_import_module():
    """`from kbitrt.format import dtypes` is an edge to kbitrt.format.dtypes (the edge reading
    that missed format/config.py <-> format/dtypes.py and decoder.py <-> layer_stack.py)."""
    tree_path = ROOT / "format" / "config.py"
    targets = {t for t, _, _ in _imports(tree_path, "kbitrt.format.config")}
    assert "kbitrt.format.dtypes" in targets and "kbitrt.format" not in targets
