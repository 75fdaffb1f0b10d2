"""The house rules of utils/ (docs/architecture.md "Layout"), read from the source with ast, no import:
no import cycle (every import counts, also those inside functions), at most 8 modules directly in
utils/, an import inside a function only when marked `# deferred`, and each layer importing only the
layers below it. Each rule is also run against a small made-up tree to show it can fail."""
from __future__ import annotations

import ast
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_TOP_MODULES = 8   # utils/*.py besides __init__.py
DEFERRED = "# deferred"  # the mark of an import kept inside a function on purpose (import cost)

# Which layers each layer may import (a layer: a package under utils/, a module directly in utils/, or
# one named module where it sits below the rest of its package). The composition (services, app, main)
# may import anything. Keys and values are dotted names without the "utils." prefix; a module is judged
# by its longest matching key.
MAY_IMPORT: dict[str, set[str]] = {
    "errors": set(),
    "observer": set(),
    "hub.model_folder": {"errors"},
    "config": {"errors", "hub.model_folder"},
    "config.reload": {"errors", "config", "media"},  # applies re-read settings to the running services
    "media": {"errors", "config"},
    "engine": {"errors", "observer", "config", "serving.memory"},
    "engine.arrivals": set(),  # requests busy in Python: gunicorn's worker and the middleware count them
    "engine.grammar": {"errors"},  # what a constrained row must generate, and its matcher (no Flask)
    "families": {"errors", "config", "engine", "media", "serving.memory", "serving.quantized_cache",
                 "hub.model_folder"},  # what a checkpoint takes (read_capabilities)
    "serving.memory": {"errors", "config", "hub.model_folder"},
    "serving.bnb_cpu_layout": {"errors"},
    "serving.quantized_cache": {"errors", "config", "hub.model_folder", "families", "serving"},
    "serving": {"errors", "observer", "config", "hub.model_folder", "media", "engine", "families", "runtimes"},
    "runtimes": {"errors", "config", "engine", "families", "hub.model_folder", "serving.memory",
                 "serving.quantized_cache"},
    "jobs": {"errors", "observer", "config", "serving"},
    "hub": {"errors", "config", "hub"},
    "ops": {"errors", "config", "serving", "engine.arrivals"},
    # engine.grammar: response_format and forced tool calls become a Grammar (a schema's 400 before the lease)
    "api": {"errors", "config", "media", "families", "serving", "jobs", "ops", "hub.model_folder", "engine.grammar",
            "engine.arrivals"},
    "local_services": {"errors", "config", "media", "engine", "families", "serving", "ops", "runtimes"},
    "cluster": {"errors", "config", "media", "families", "serving", "ops", "hub", "local_services"},
    "download_model": {"hub"},
    "services": {"*"},
    "app": {"*"},
    "main": {"*"},
}


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for utils/ and the two entry points."""
    found = {}
    for path in sorted(root.glob("utils/**/*.py")) + [root / "app.py", root / "main.py"]:
        if path.is_file():
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:` (never run: annotations only)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool, str]]:
    """(imported module of ours, line, inside a function, source line) for every import in the file.
    `from pkg import sub` names the submodule; importing a.b.c from outside a also runs a's and a.b's
    __init__, so those count too."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    skip = _type_checking_only(tree)
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def ours(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    found = []
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            targets = [ours(alias.name) for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [ours(f"{base}.{alias.name}") if f"{base}.{alias.name}" in modules else ours(base)
                       for alias in node.names]
        for target in {t for t in targets if t}:
            chain = target.split(".")
            for depth in range(1, len(chain) + 1):  # the package inits that run first
                parent = ".".join(chain[:depth])
                if parent in modules and parent != name and not name.startswith(parent + "."):
                    found.append((parent, node.lineno, id(node) in in_function, lines[node.lineno - 1]))
    return found


def import_graph(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    """The graph of our modules, and the unmarked imports inside functions ("file:line: source")."""
    modules = module_files(root)
    graph: dict[str, set[str]] = defaultdict(set)
    unmarked = []
    for name, path in modules.items():
        graph.setdefault(name, set())
        source_lines = path.read_text().splitlines()
        for target, line, inside, _ in imports_of(name, path, modules):
            graph[name].add(target)
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(func):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        text = " ".join(source_lines[node.lineno - 1: node.end_lineno])
                        if DEFERRED not in text:
                            unmarked.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
    return graph, sorted(set(unmarked))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _layer(name: str) -> str:
    short = name.removeprefix("utils.")
    candidates = [key for key in MAY_IMPORT if short == key or short.startswith(key + ".")]
    if not candidates:
        raise AssertionError(f"{name}: no layer in MAY_IMPORT; add its package there (docs/architecture.md)")
    return max(candidates, key=len)


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for name, targets in sorted(graph.items()):
        if name == "utils":
            continue
        layer = _layer(name)
        allowed = MAY_IMPORT[layer]
        for target in sorted(targets):
            if target == "utils" or "*" in allowed or any(t.startswith(target + ".") for t in targets):
                continue  # a package's __init__ that runs on the way to the module imported: judged by that
            other = _layer(target)
            if other == layer or other.startswith(layer + ".") or layer.startswith(other + "."):
                continue  # inside one layer
            if not any(other == ok or other.startswith(ok + ".") for ok in allowed):
                bad.append(f"{name} ({layer}) imports {target} ({other})")
    return bad


def top_modules(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "utils").glob("*.py") if p.name != "__init__.py")


# ------------------------------------------------------------------------------------ the rules

@pytest.fixture(scope="module")
def tree():
    return import_graph(ROOT)


def test_no_import_cycle(tree):
    graph, _ = tree
    assert len(graph) > 50, "the walk found too few modules: is ROOT right?"
    assert cycles(graph) == []


def test_at_most_eight_modules_directly_in_utils():
    found = top_modules(ROOT)
    assert len(found) <= MAX_TOP_MODULES, f"{len(found)} modules directly in utils/: {found}; put new ones in a package"


def test_imports_inside_functions_are_marked_deferred(tree):
    _, unmarked = tree
    assert unmarked == [], ("an import inside a function must say why (`# deferred: torch`) or move to the "
                            "module top:\n" + "\n".join(unmarked))


def test_layers_import_downward_only(tree):
    graph, _ = tree
    assert layer_violations(graph) == []


# ------------------------------------------------------------------------------------ the rules can fail

def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text))
    return root


def test_the_checks_catch_a_cycle_an_unmarked_import_and_a_wrong_direction(tmp_path):
    root = _write(tmp_path, {
        "app.py": "import main\n",
        "main.py": "def run():\n    import app\n",                       # a cycle through a function
        "utils/__init__.py": "",
        "utils/errors.py": "from utils.api import routes\n",             # errors may import nothing
        "utils/api/__init__.py": "",
        "utils/api/routes.py": "from utils import errors\n\ndef f():\n    import torch  # deferred: torch\n",
        "utils/engine/__init__.py": "from utils.engine.rows import Row\n",
        "utils/engine/rows.py": "Row = 1\n",
        "utils/families/__init__.py": "",
        "utils/families/base.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import utils.api.routes\n"
                                  "def g():\n    from utils.engine.rows import Row\n",
    })
    graph, unmarked = import_graph(root)
    assert cycles(graph) == [["app", "main"], ["utils.api.routes", "utils.errors"]]
    assert unmarked == ["main.py:2: import app", "utils/families/base.py:5: from utils.engine.rows import Row"]
    assert "utils.engine" in graph["utils.families.base"]  # importing rows runs the engine package first
    assert "utils.api.routes" not in graph["utils.families.base"]  # TYPE_CHECKING: never run
    assert layer_violations(graph) == ["utils.errors (errors) imports utils.api.routes (api)"]


def test_the_count_catches_a_ninth_module(tmp_path):
    _write(tmp_path, {f"utils/m{i}.py": "" for i in range(MAX_TOP_MODULES + 1)} | {"utils/__init__.py": ""})
    assert len(top_modules(tmp_path)) == MAX_TOP_MODULES + 1 > MAX_TOP_MODULES


def missing_utils_imports(root: Path, scripts: list[Path]) -> list[str]:
    """`from utils.X import ...` / `import utils.X` in scripts outside utils/ naming no module of utils/.

    bench/ and tests/ are not in the import graph; a module the layout moved left a stale import in a
    bench script that only failed when someone ran it."""
    modules = module_files(root)
    missing = []
    for path in scripts:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                if (name == "utils" or name.startswith("utils.")) and name not in modules:
                    missing.append(f"{path.relative_to(root)}:{node.lineno}: {name}")
    return missing


def test_bench_and_test_scripts_import_only_existing_utils_modules():
    scripts = sorted(ROOT.glob("bench/**/*.py")) + sorted(ROOT.glob("tests/**/*.py"))
    assert len(scripts) > 20
    assert missing_utils_imports(ROOT, scripts) == []


def test_the_script_check_catches_a_stale_module(tmp_path):
    root = _write(tmp_path, {"utils/__init__.py": "", "utils/hub/__init__.py": "", "utils/hub/demo.py": "",
                             "bench/run.py": "from utils.hub.demo import x\nfrom utils.demo import y\n"})
    assert missing_utils_imports(root, [root / "bench" / "run.py"]) == ["bench/run.py:2: utils.demo"]
