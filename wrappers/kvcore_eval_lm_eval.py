"""Make the plain `lm_eval` command see `--model kvcore_hf` and our tasks, with nothing heavy at interpreter start.

lm-eval 0.4.13 has no plugin entry points: its registry knows a model only if something registered it.
The wheel installs this file as the top-level module `kvcore_eval_lm_eval` and `kvcore_eval_lm_eval.pth`,
whose one line calls `install()` at interpreter start. That imports nothing but this module (not the
`kvcore_eval` package, which would then be pinned to the installed copy even in a source checkout) and
adds an import hook: once `lm_eval.models` has registered lm-eval's
own models, it registers `kvcore_hf` as a lazy target ("module:Class", lm-eval's own mechanism), so the
wrapper (torch, transformers) is imported only when a run asks for `kvcore_hf`.

Tasks: a regular install copies them into `lm_eval/tasks/kvcore`. An editable install (a source checkout)
copies nothing; once `lm_eval.tasks.manager` executes, its `TaskManager` also indexes the checkout's `tasks/`,
so edits are seen without reinstalling. A stopgap until lm-eval discovers tasks by entry point (PR #4015).
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec, PathFinder
from pathlib import Path

MODEL_NAME = "kvcore_hf"
WRAPPER_TARGET = "kvcore_eval.harness.wrapper:KVCoreHFLM"
TASK_MARKER = "_kvcore_perplexity.yaml"  # a file every copy of our tasks folder holds


def register(module=None) -> None:
    """Register `kvcore_hf` in lm-eval's model registry (idempotent)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=WRAPPER_TARGET)


def source_tasks_dir() -> Path | None:
    """The checkout's tasks/ when kvcore_eval is installed editable and lm-eval holds no copy of our tasks."""
    lm_eval = importlib.util.find_spec("lm_eval")
    if (
        lm_eval is not None
        and lm_eval.origin
        and (Path(lm_eval.origin).parent / "tasks" / "kvcore" / TASK_MARKER).is_file()
    ):
        return None  # a regular install: lm-eval indexes its copy
    spec = importlib.util.find_spec("kvcore_eval")
    if spec is None or spec.origin is None:
        return None
    tasks = Path(spec.origin).resolve().parents[1] / "tasks"
    return tasks if (tasks / TASK_MARKER).is_file() else None


def include_source_tasks(module) -> None:
    """Make every TaskManager also index the checkout's tasks/ (editable installs only; idempotent)."""
    manager = module.TaskManager
    original = manager.__init__
    if getattr(original, "_kvcore_wrapped", False) or (tasks := source_tasks_dir()) is None:
        return
    signature = inspect.signature(original)

    def __init__(*args, **kwargs) -> None:
        bound = signature.bind(*args, **kwargs)
        given = bound.arguments.get("include_path")
        paths = [] if given is None else list(given) if isinstance(given, (list, tuple)) else [given]
        if not any(Path(p).resolve() == tasks for p in paths):
            bound.arguments["include_path"] = [tasks, *paths]  # the user's own paths still come last and win
        original(*bound.args, **bound.kwargs)

    __init__._kvcore_wrapped = True
    manager.__init__ = __init__


_AFTER_IMPORT = {"lm_eval.models": register, "lm_eval.tasks.manager": include_source_tasks}


class _RunAfterImport(MetaPathFinder):
    """Finds the watched lm-eval modules as the path finder would, and runs our step right after each executes."""

    def find_spec(self, fullname: str, path=None, target=None) -> ModuleSpec | None:
        if fullname not in _AFTER_IMPORT:
            return None
        spec = PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def execute_then_run(module) -> None:
            execute(module)
            _AFTER_IMPORT[fullname](module)

        spec.loader.exec_module = execute_then_run
        return spec


def install() -> None:
    """Called from the .pth file at interpreter start."""
    for name, step in _AFTER_IMPORT.items():
        if name in sys.modules:
            step(sys.modules[name])
    if not any(isinstance(finder, _RunAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RunAfterImport())
