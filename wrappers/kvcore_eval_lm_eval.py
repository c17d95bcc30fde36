"""Make the plain `lm_eval` command see `--model kvcore_hf`, with nothing heavy at interpreter start.

lm-eval 0.4.13 has no plugin entry points: its registry knows a model only if something registered it.
The wheel installs this file as the top-level module `kvcore_eval_lm_eval` and `kvcore_eval_lm_eval.pth`,
whose one line calls `install()` at interpreter start. That imports nothing but this module (not the
`kvcore_eval` package, which would then be pinned to the installed copy even in a source checkout) and
adds an import hook: once `lm_eval.models` has registered lm-eval's
own models, it registers `kvcore_hf` as a lazy target ("module:Class", lm-eval's own mechanism), so the
wrapper (torch, transformers) is imported only when a run asks for `kvcore_hf`.
"""

from __future__ import annotations

import sys
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec, PathFinder

MODEL_NAME = "kvcore_hf"
WRAPPER_TARGET = "kvcore_eval.wrapper:KVCoreHFLM"
_WATCHED_MODULE = "lm_eval.models"


def register() -> None:
    """Register `kvcore_hf` in lm-eval's model registry (idempotent)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=WRAPPER_TARGET)


class _RegisterAfterImport(MetaPathFinder):
    """Finds `lm_eval.models` as the path finder would, and registers our model right after it executes."""

    def find_spec(self, fullname: str, path=None, target=None) -> ModuleSpec | None:
        if fullname != _WATCHED_MODULE:
            return None
        spec = PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def execute_then_register(module) -> None:
            execute(module)
            register()

        spec.loader.exec_module = execute_then_register
        return spec


def install() -> None:
    """Called from the .pth file at interpreter start."""
    if _WATCHED_MODULE in sys.modules:
        register()
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
