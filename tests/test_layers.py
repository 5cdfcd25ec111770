"""The package's layering (docs/ARCHITECTURE.md): a module imports only from its own stage or the ones before it;
the pure-torch training modules never import Ray, MLflow or Optuna; config imports nothing of the project but
errors. Command-line entry points (``__main__.py``) may import anything. Read from the source with ast."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "crl_ray"
STAGES = [
    ("base", {"errors"}),
    ("config", {"config"}),
    ("data", {"assets", "data", "encoding", "generate"}),
    ("validation", {"checks", "cluster"}),
    ("training", {"losses", "model", "mining", "step", "train"}),
    ("evaluation", {"attacks", "judges", "probe", "capability", "objective", "evaluate"}),
    ("sweep", {"raylogs", "search", "tracking", "plots", "trial", "sweep"}),
    ("benchmarks", {"bench"}),
]
STAGE_OF = {module: i for i, (_, modules) in enumerate(STAGES) for module in modules}
PURE_TORCH = {"losses", "model", "mining", "step"}
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
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "resources" or path.name == "__main__.py" or rel.parts == ("__init__.py",):
            continue
        found.append((rel.parts[0].removesuffix(".py"), path))
    return found


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
            if name in PURE_TORCH and top in FORBIDDEN_IN_PURE:
                bad.append(f"{path.name}:{line} imports {module}")
            if name == "config" and top == "crl_ray" and module != "crl_ray.errors":
                bad.append(f"{path.name}:{line} imports {module}")
    assert bad == []
