"""The package's layering (docs/ARCHITECTURE.md): a module imports only from its own stage or the ones before it;
the pure-torch training modules never import Ray, MLflow or Optuna; config imports nothing of the project but
errors. Command-line entry points (``__main__.py``) may import anything. Read from the source with ast."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "crl_ray"
# the folders (or top-level modules) of crl_ray, in pipeline order
STAGES = [
    ("base", {"errors", "storage"}),
    ("config", {"config"}),
    ("data", {"data"}),
    ("validation", {"validate"}),
    ("training", {"training"}),
    ("evaluation", {"evaluate"}),
    ("sweep", {"sweep"}),
    ("benchmarks", {"bench"}),
]
STAGE_OF = {module: i for i, (_, modules) in enumerate(STAGES) for module in modules}
PURE_TORCH = {"training/losses.py", "training/model.py", "training/mining.py", "training/step.py",
              "training/reference.py"}
FORBIDDEN_IN_PURE = {"ray", "mlflow", "optuna"}


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every module name imported anywhere in the file (also inside functions), with its line."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node.lineno))
            if node.module == "crl_ray":
                out += [(f"crl_ray.{a.name}", node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
    return out


def _modules() -> list[tuple[str, Path]]:
    """(stage key, path) of every library module: command-line entry points (``__main__.py``, ``cli.py``) may
    import anything."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "resources" or path.name in ("__main__.py", "cli.py") or rel.parts == ("__init__.py",):
            continue
        found.append((rel.parts[0].removesuffix(".py"), path))
    return found


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def test_every_module_has_a_stage() -> None:
    assert {name for name, _ in _modules()} <= set(STAGE_OF), "add new modules to STAGES and docs/ARCHITECTURE.md"


def test_no_module_imports_a_later_stage() -> None:
    upward = []
    for name, path in _modules():
        for module, line in _imports(path):
            parts = module.split(".")
            later = len(parts) > 1 and parts[1] in STAGE_OF and STAGE_OF[parts[1]] > STAGE_OF[name]
            if parts[0] == "crl_ray" and later:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} ({STAGES[STAGE_OF[name]][0]}) imports {module} "
                              f"({STAGES[STAGE_OF[parts[1]]][0]})")
    assert upward == []


def test_training_maths_is_pure_torch_and_config_stands_alone() -> None:
    bad = []
    for name, path in _modules():
        for module, line in _imports(path):
            top = module.split(".")[0]
            rel = path.relative_to(PACKAGE).as_posix()
            if rel in PURE_TORCH and top in FORBIDDEN_IN_PURE:
                bad.append(f"{rel}:{line} imports {module}")
            if name == "config" and top == "crl_ray" and module != "crl_ray.errors" and \
                    not module.startswith("crl_ray.config"):
                bad.append(f"{rel}:{line} imports {module}")
    assert bad == []


def test_the_folders_are_the_pipeline() -> None:
    """No module of the old flat layout is left at the top (only the base modules and the stage folders)."""
    top = {p.name.removesuffix(".py") for p in PACKAGE.iterdir()
           if p.name not in ("__init__.py", "__pycache__", "resources") and not p.name.endswith(".egg-info")}
    assert top == set(STAGE_OF)
    for folder in ("config", "data", "training", "evaluate", "sweep", "bench"):
        assert (PACKAGE / folder / "__init__.py").is_file()


def test_no_import_cycle_between_library_modules() -> None:
    """The module import graph (every import, also inside functions; entry points excluded) has no cycle."""
    names = {_module_name(path): path for _, path in _modules()}
    graph = {}
    for name, path in names.items():
        targets = set()
        for module, _ in _imports(path):
            while module and module not in names:  # `from crl_ray.x import y`: module x (or its package)
                module = module.rpartition(".")[0]
            if module and module != name:
                targets.add(module)
        graph[name] = targets
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [node, nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert cycles == []
