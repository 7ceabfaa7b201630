"""Imports point one way: the layer rules of ``core/`` and ``plugins/``, checked by parsing every file.

    pytest -q tests/test_layers.py

Each ``.py`` under ``core/``, ``plugins/`` and ``examples/plugin_template/`` is parsed with
``ast`` (nothing is imported). Module-level and function-level imports both count; imports
under ``if TYPE_CHECKING:`` do not (they never run). The rules:

(a) a plugin's production code (``plugins/<kind>/<name>/vlmr1_*/**.py`` and ``scripts/*.py``)
    imports from core only ``core.interfaces`` and ``core.hookspecs`` (exactly those modules);
(b) a plugin never imports another plugin's ``vlmr1_*`` package (tests included);
(c) core never imports a plugin (``vlmr1_*``);
(d) no import cycle among core modules;
(e) imports point down the layers of :data:`LAYERS` (every core module must have a layer);
(f) no app imports another app (``core.cli``, the apps' shared module, excepted), and nothing
    that is not an app imports one.

``test_every_rule_fires`` builds a small tree with one violation of each kind, so these tests
cannot pass by checking nothing.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: The only core modules a plugin may import.
FACADE = ("core.interfaces", "core.hookspecs")
#: Runnable apps (layer 4). ``core.cli`` is what the apps share: in the app layer, but not an app.
APPS = ("core.train", "core.evaluate", "core.sft", "core.serve", "core.merge_lora",
        "core.plugins.__main__", "core.config.__main__")
APP_SHARED = "core.cli"
#: (module prefix, layer), most specific first; a module's layer is that of its first match.
#: ``core.testing`` sits above everything but the apps: conformance suites may use any library layer.
LAYERS: tuple[tuple[str, float], ...] = (
    *((app, 4) for app in APPS),
    (APP_SHARED, 4),
    ("core.testing", 3.5),
    ("core.grpo", 3), ("core.supervised", 3), ("core.serving", 3),
    ("core.runtime", 2),
    ("core.config", 1), ("core.plugins", 1),
    ("core.interfaces", 0), ("core.hookspecs", 0),
)
LAYER_NAMES = {0: "plugin API", 1: "plugin host / config", 2: "runtime", 3: "engine / serving",
               3.5: "testing", 4: "apps"}


@dataclass(frozen=True)
class Import:
    """One import statement's target, as written and resolved to a module name."""

    module: str
    line: int


@dataclass(frozen=True)
class Violation:
    """A broken rule: which rule (a-f), where, and what."""

    rule: str
    where: str
    message: str

    def __str__(self) -> str:
        return f"({self.rule}) {self.where}: {self.message}"


# ---- parsing --------------------------------------------------------------------------------
def module_name(path: Path, base: Path) -> str:
    """``core/x/y.py`` -> ``core.x.y``; ``core/x/__init__.py`` -> ``core.x`` (``base`` holds the top package)."""
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node`` (any depth), skipping ``if TYPE_CHECKING:`` bodies."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield from _import_nodes(ast.Module(body=[other], type_ignores=[]))
            continue
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        yield from _import_nodes(child)


def imports_of(path: Path, module: str, known: set[str]) -> list[Import]:
    """The modules ``path`` (module ``module``) imports; ``from A import b`` is ``A.b`` when that is a module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            out.extend(Import(alias.name, node.lineno) for alias in node.names)
            continue
        base = node.module or ""
        if node.level:  # relative: resolve against this module's package
            anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join([*anchor, *([base] if base else [])])
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            out.append(Import(sub if sub in known else base, node.lineno))
    return list(dict.fromkeys(out))  # `from m import a, b` is one import of m


@dataclass
class Tree:
    """Every parsed file of one checkout: core modules and plugin files with their imports."""

    root: Path
    core: dict[str, tuple[Path, list[Import]]]
    plugins: list[tuple[Path, str, bool, list[Import]]]  # (file, own vlmr1_* package, production?, imports)


def plugin_dirs(root: Path) -> list[Path]:
    """``plugins/<kind>/<name>/`` folders, plus the plugin template and the model-family tutorial's
    plugin (they teach the rules)."""
    dirs = sorted(p.parent for p in root.glob("plugins/*/*/pyproject.toml"))
    examples = [root / "examples" / "plugin_template", root / "examples" / "families" / "mistral3"]
    return dirs + [d for d in examples if (d / "pyproject.toml").exists()]


def scan(root: Path) -> Tree:
    """Parse ``core/`` and every plugin of the checkout at ``root``."""
    files = {module_name(p, root): p for p in sorted((root / "core").rglob("*.py"))}
    known = set(files)
    core = {m: (p, imports_of(p, m, known)) for m, p in files.items()}
    plugins = []
    for pdir in plugin_dirs(root):
        own = sorted(p.name for p in pdir.glob("vlmr1_*") if p.is_dir())
        for path in sorted(pdir.rglob("*.py")):
            rel = path.relative_to(pdir)
            production = rel.parts[0] in own or (rel.parts[0] == "scripts" and len(rel.parts) == 2)
            mod_base = pdir if rel.parts[0] in own else path.parent
            plugins.append((path, own[0] if own else "", production,
                            imports_of(path, module_name(path, mod_base), known)))
    return Tree(root, core, plugins)


# ---- the rules ------------------------------------------------------------------------------
def _where(tree: Tree, path: Path, line: int) -> str:
    return f"{path.relative_to(tree.root)}:{line}"


def _is_core(module: str) -> bool:
    return module == "core" or module.startswith("core.")


def _top(module: str) -> str:
    return module.split(".")[0]


def plugin_violations(tree: Tree) -> list[Violation]:
    """Rules (a) and (b)."""
    out = []
    for path, own, production, imps in tree.plugins:
        for imp in imps:
            if production and _is_core(imp.module) and imp.module not in FACADE:
                out.append(Violation("a", _where(tree, path, imp.line),
                                     f"imports {imp.module}; a plugin may import only {' and '.join(FACADE)}"))
            top = _top(imp.module)
            if re.fullmatch(r"vlmr1_\w+", top) and top != own:
                out.append(Violation("b", _where(tree, path, imp.line),
                                     f"imports another plugin's package {top} (plugins never import each other; "
                                     "shared code belongs in core.interfaces)"))
    return out


def core_plugin_violations(tree: Tree) -> list[Violation]:
    """Rule (c)."""
    return [Violation("c", _where(tree, path, imp.line), f"{mod} imports the plugin package {imp.module}")
            for mod, (path, imps) in tree.core.items() for imp in imps if _top(imp.module).startswith("vlmr1_")]


def _resolve_core(module: str, known: set[str]) -> str | None:
    """The core module an import lands in (its longest known prefix); ``None`` outside core."""
    if not _is_core(module):
        return None
    parts = module.split(".")
    while parts and ".".join(parts) not in known:
        parts.pop()
    return ".".join(parts) or None


def core_edges(tree: Tree) -> dict[str, dict[str, int]]:
    """importer -> {imported core module: first line}, self-imports left out."""
    known = set(tree.core)
    edges: dict[str, dict[str, int]] = {m: {} for m in tree.core}
    for mod, (_path, imps) in tree.core.items():
        for imp in imps:
            target = _resolve_core(imp.module, known)
            if target and target != mod:
                edges[mod].setdefault(target, imp.line)
    return edges


def cycle_violations(tree: Tree) -> list[Violation]:
    """Rule (d): each strongly connected group of core modules (Tarjan), with one cycle spelt out."""
    edges = core_edges(tree)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    out = []
    for group in groups:
        path = _shortest_cycle(edges, group[0], set(group))
        hops = "".join(f"{a} (line {edges[a][b]}) -> " for a, b in zip(path, path[1:], strict=False))
        out.append(Violation("d", str(tree.core[group[0]][0].relative_to(tree.root)),
                             f"import cycle among {', '.join(group)}: {hops}{path[-1]}"))
    return out


def _shortest_cycle(edges: dict[str, dict[str, int]], start: str, members: set[str]) -> list[str]:
    """``[start, ..., start]``: the shortest way back to ``start`` inside ``members`` (breadth first)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w in members and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is in a strongly connected group but on no cycle")


def layer_of(module: str) -> float | None:
    """The layer of a core module (see :data:`LAYERS`); ``core`` itself is the plugin API's layer."""
    if module == "core":
        return 0
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return None


def layer_violations(tree: Tree) -> list[Violation]:
    """Rule (e): no import from a lower layer to a higher one; every core module has a layer."""
    out = []
    for mod, targets in core_edges(tree).items():
        path = tree.core[mod][0]
        mine = layer_of(mod)
        if mine is None:
            out.append(Violation("e", str(path.relative_to(tree.root)),
                                 f"{mod} has no layer: add it to LAYERS in tests/test_layers.py"))
            continue
        for target, line in targets.items():
            theirs = layer_of(target)
            if theirs is not None and theirs > mine and target not in APPS:  # importing an app: rule (f)
                out.append(Violation("e", _where(tree, path, line),
                                     f"{mod} ({LAYER_NAMES[mine]}) imports {target} ({LAYER_NAMES[theirs]}), "
                                     "a higher layer"))
    return out


def app_violations(tree: Tree) -> list[Violation]:
    """Rule (f): apps are leaves."""
    out = []
    for mod, targets in core_edges(tree).items():
        for target, line in targets.items():
            if target in APPS:
                what = "another app" if mod in APPS else "an app (nothing imports an app; move what it needs down)"
                out.append(Violation("f", _where(tree, tree.core[mod][0], line), f"{mod} imports {target}, {what}"))
    return out


def all_violations(root: Path) -> list[Violation]:
    """Every rule over the checkout at ``root``."""
    tree = scan(root)
    return [*plugin_violations(tree), *core_plugin_violations(tree), *cycle_violations(tree),
            *layer_violations(tree), *app_violations(tree)]


# ---- the real tree ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tree() -> Tree:
    return scan(ROOT)


def _report(violations: list[Violation]) -> str:
    return "\n".join(str(v) for v in violations)


def test_the_tree_is_scanned(tree):
    # Guards against a vacuous pass: the real tree has many modules, plugins and facade imports.
    assert len(tree.core) > 40 and len(tree.plugins) > 60
    facade_imports = [i for _p, _o, prod, imps in tree.plugins if prod for i in imps if i.module in FACADE]
    assert len(facade_imports) > 30


def test_plugins_import_only_the_facade_and_never_each_other(tree):
    assert not (v := plugin_violations(tree)), _report(v)


def test_core_imports_no_plugin(tree):
    assert not (v := core_plugin_violations(tree)), _report(v)


def test_core_has_no_import_cycles(tree):
    assert not (v := cycle_violations(tree)), _report(v)


def test_core_imports_point_down_the_layers(tree):
    assert not (v := layer_violations(tree)), _report(v)


def test_no_app_imports_an_app(tree):
    assert not (v := app_violations(tree)), _report(v)


# ---- the rules fire ---------------------------------------------------------------------------
FAKE_CORE = {
    "core/__init__.py": '__version__ = "0"\n',
    "core/hookspecs.py": "import pluggy\n",
    "core/interfaces/__init__.py": "from core.hookspecs import hookimpl\nfrom core.interfaces.base import Component\n",
    "core/interfaces/base.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from core.runtime import x\n",
    "core/plugins/__init__.py": "from core.plugins.host import PluginHost\n",
    "core/plugins/host.py": "from core import __version__\nfrom core.interfaces import Component\n",
    "core/runtime/__init__.py": "",
    "core/runtime/loader.py": "from core.plugins import PluginHost\n",
    "core/grpo/__init__.py": "",
    "core/grpo/trainer.py": "from core.runtime.loader import load\n",
    "core/cli.py": "from core.plugins import PluginHost\n",
    "core/train.py": "from core.cli import main\nfrom core.grpo.trainer import run\n",
    "core/evaluate.py": "from core import cli\n",
    "core/testing/__init__.py": "from core.grpo.trainer import run\n",
}
FAKE_PLUGINS = {
    "plugins/rewards/good/pyproject.toml": "",
    "plugins/rewards/good/vlmr1_good/__init__.py": "",
    "plugins/rewards/good/vlmr1_good/hooks.py": (
        "from core.hookspecs import hookimpl\nfrom core import hookspecs\nfrom vlmr1_good.rewards import R\n"),
    "plugins/rewards/good/vlmr1_good/rewards.py": "from core.interfaces import Reward\nfrom . import hooks\n",
    "plugins/rewards/good/scripts/run.py": "import core.interfaces\n",
    # Tests may use core.testing and the host.
    "plugins/rewards/good/tests/test_good.py": (
        "from core.testing import reward_batch\nfrom core.plugins import PluginHost\n"),
}
#: One violation per rule: (files to add, rule, text the message must contain).
BREAKS = [
    ({"plugins/rewards/good/vlmr1_good/rewards.py": "from core.interfaces.boxes import iou\n"},
     "a", "imports core.interfaces.boxes"),
    ({"plugins/rewards/good/vlmr1_good/rewards.py": "def f():\n    from core.plugins.builtin.rollout import x\n"},
     "a", "imports core.plugins.builtin.rollout"),
    ({"plugins/rewards/good/scripts/run.py": "from core import __version__\n"}, "a", "imports core;"),
    ({"plugins/rewards/good/vlmr1_good/sub/deep.py": "import core.grpo.trainer\n"}, "a", "imports core.grpo.trainer"),
    ({"plugins/rewards/good/vlmr1_good/rewards.py": "from vlmr1_other.x import y\n"}, "b", "vlmr1_other"),
    ({"plugins/rewards/good/tests/test_good.py": "import vlmr1_other\n"}, "b", "vlmr1_other"),
    ({"core/runtime/loader.py": "def f():\n    import vlmr1_qwen_vl\n"}, "c", "vlmr1_qwen_vl"),
    ({"core/plugins/host.py": "from core.plugins import registry\n",
      "core/plugins/registry.py": "def f():\n    from core.plugins.host import PluginHost\n"},
     "d", "core.plugins.host, core.plugins.registry: core.plugins.host (line 1) -> core.plugins.registry (line 2) "
     "-> core.plugins.host"),
    # (Upward imports of modules that import nothing: an upward import of the rest would also close a cycle.)
    ({"core/runtime/leaf.py": "", "core/interfaces/base.py": "from core.runtime.leaf import load\n"}, "e",
     "core.interfaces.base (plugin API) imports core.runtime.leaf (runtime)"),
    ({"core/testing/leaf.py": "", "core/runtime/loader.py": "def f():\n    from core.testing.leaf import check\n"},
     "e", "imports core.testing.leaf"),
    ({"core/grpo/trainer.py": "from core.cli import main\n"}, "e", "imports core.cli (apps)"),
    ({"core/metrics.py": ""}, "e", "core.metrics has no layer"),
    ({"core/evaluate.py": "from core.train import main\n"}, "f", "core.evaluate imports core.train, another app"),
    ({"core/testing/__init__.py": "from core import train\n"}, "f", "core.testing imports core.train, an app"),
]


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_a_clean_tree_has_no_violations(tmp_path):
    _write(tmp_path, {**FAKE_CORE, **FAKE_PLUGINS})
    assert all_violations(tmp_path) == []


@pytest.mark.parametrize(("files", "rule", "text"), BREAKS, ids=[f"{r}-{i}" for i, (_f, r, _t) in enumerate(BREAKS)])
def test_every_rule_fires(tmp_path, files, rule, text):
    _write(tmp_path, {**FAKE_CORE, **FAKE_PLUGINS, **files})
    found = all_violations(tmp_path)
    assert [v.rule for v in found] == [rule], _report(found)
    assert text in found[0].message, found[0]
