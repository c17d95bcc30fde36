"""The package's shape: packages that show the pipeline, no import cycle, no first-party import hidden in a function
without saying why, and an import of the package that loads nothing heavy."""

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "kvcore_eval"
PIPELINE = ("model", "calibration", "compression", "harness", "analysis", "experiments")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports(path: Path, known: set[str]) -> list[tuple[str, ast.stmt, bool]]:
    """(first-party module imported, the statement, whether it sits inside a function) of one file."""
    tree = ast.parse(path.read_text())
    nested = {id(node) for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef) for node in ast.walk(fn)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [
                f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                for alias in node.names
            ]
        else:
            continue
        for name in names:
            if name in known:
                found.append((name, node, id(node) in nested))
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {
        name: {target for target, _, _ in imports(path, known) if target != name and not target.endswith("__init__")}
        for name, path in found.items()
    }


def test_modules_live_in_the_packages_of_the_pipeline():
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert top == ["__init__", "__main__", "cli", "config", "metrics", "outputs", "spaces"]
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()) == sorted(PIPELINE)


def test_no_import_cycle_between_first_party_modules():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycle = stack[stack.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*stack, target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_a_first_party_import_inside_a_function_says_why():
    found = modules()
    unexplained = []
    for name, path in found.items():
        lines = path.read_text().splitlines()
        for target, node, inside in imports(path, set(found)):
            if inside and "# lazy:" not in lines[node.lineno - 1] and "# lazy:" not in lines[node.lineno - 2]:
                unexplained.append(f"{name}:{node.lineno} imports {target}")
    assert not unexplained, "first-party imports inside functions without a '# lazy: <why>' comment: " + ", ".join(
        unexplained
    )


def test_importing_the_package_and_its_configuration_loads_nothing_heavy():
    code = (
        "import sys, kvcore_eval, kvcore_eval.config, kvcore_eval.cli; "
        "print(sorted(m for m in ('torch', 'transformers', 'lm_eval', 'datasets') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.split() == ["[]"]


def test_the_pipeline_packages_import():
    code = "import " + ", ".join(f"kvcore_eval.{p}" for p in PIPELINE) + ", kvcore_eval.experiments.session"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
