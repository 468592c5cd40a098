"""The layout's rules, checked on the source: dependencies point one way (commands -> engine -> store ->
nn, data, tasks, decomp -> config, registry, task), layers and tasks know nothing of configs or the
backbone, imports sit at the top of modules, and no module outgrows a reader."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: the folders installed as rcm_nddr, rcm_nddr.tasks and rcm_nddr.decomp
PACKAGES = {"rcm_nddr": "rcm_nddr", "tasks": "rcm_nddr.tasks", "decomp": "rcm_nddr.decomp"}
#: rank of each layer under rcm_nddr: a module may import its own rank or lower ones only
RANKS = {"commands": 4, "engine": 3, "store": 2, "nn": 1, "data": 1, "tasks": 1, "decomp": 1, "objectives": 1}
#: optional or heavy packages a function may import where it needs them (submitit: only --executor slurm)
LAZY_PACKAGES = ("matplotlib", "docker", "torch.utils.tensorboard", "submitit")
MAX_LINES = 500
MAX_FUNCTION_IMPORTS = 20


def _modules() -> list[tuple[Path, str]]:
    out = []
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out.append((path, ".".join((package, *parts))))
    return out


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "rcm_nddr":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in RANKS else "base"


def _imports(tree: ast.AST) -> list[tuple[ast.AST, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node, node.module))
        elif isinstance(node, ast.Import):
            out.extend((node, alias.name) for alias in node.names)
    return out


def _function_imports(tree: ast.AST) -> list[tuple[ast.AST, str]]:
    inner = {}
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node, name in _imports(function):
                inner[id(node)] = (node, name)
    return list(inner.values())


MODULES = _modules()


def test_no_relative_imports_and_the_layers_import_downwards_only():
    problems = []
    for path, module in MODULES:
        if path.name == "__main__.py" or module == "rcm_nddr":  # entry points and the lazy facade
            continue
        tree = ast.parse(path.read_text())
        source = _layer(module)
        for node, target in _imports(tree):
            layer = _layer(target)
            if layer is not None and RANKS.get(layer, 0) > RANKS.get(source, 0):
                problems.append(f"{path.relative_to(REPO)}:{node.lineno}: {module} ({source}) imports {target}")
        relative = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0]
        problems += [f"{path.relative_to(REPO)}:{n.lineno}: relative import" for n in relative]
    assert problems == []


@pytest.mark.parametrize(
    ("layers", "forbidden", "why"),
    [
        (("nn", "data", "decomp"), "rcm_nddr.config", "layers know nothing of configs"),
        (("tasks",), "rcm_nddr.nn", "tasks know nothing of the backbone"),
        (("store",), "rcm_nddr.engine", "the store knows nothing of training"),
    ],
)
def test_separation(layers, forbidden, why):
    offending = [
        f"{path.relative_to(REPO)}:{node.lineno} imports {target}"
        for path, module in MODULES
        if _layer(module) in layers
        for node, target in _imports(ast.parse(path.read_text()))
        if target == forbidden or target.startswith(forbidden + ".")
    ]
    assert offending == [], why


def test_imports_inside_functions_are_few_and_for_optional_heavy_packages_only():
    found = [
        (path.relative_to(REPO), node.lineno, name)
        for path, _ in MODULES
        for node, name in _function_imports(ast.parse(path.read_text()))
    ]
    assert len(found) <= MAX_FUNCTION_IMPORTS
    assert [f for f in found if not f[2].startswith(LAZY_PACKAGES)] == []


def test_no_module_is_longer_than_a_reader_can_follow():
    lines = {str(path.relative_to(REPO)): len(path.read_text().splitlines()) for path, _ in MODULES}
    assert {name: n for name, n in lines.items() if n > MAX_LINES} == {}
