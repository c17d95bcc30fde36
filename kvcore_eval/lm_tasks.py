"""lm-eval's TaskManager with kvcore's tasks: one copy of them (lm-eval's installed copy, else the checkout's
tasks/), the user's --include_path folders, and one index per process (building one reads every task lm-eval ships)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

TASK_MARKER = "_kvcore_perplexity.yaml"


def tasks_dir() -> Path:
    """Where lm-eval finds our tasks: its own copy (regular install), else the source checkout's tasks/."""
    import lm_eval

    installed = Path(lm_eval.__file__).parent / "tasks" / "kvcore"
    if (installed / TASK_MARKER).is_file():
        return installed
    source = Path(__file__).resolve().parents[1] / "tasks"
    if (source / TASK_MARKER).is_file():
        return source
    raise FileNotFoundError(f"kvcore's lm-eval tasks are neither in {installed} nor in {source}: reinstall kvcore-eval")


def task_manager(
    data_dir: str | None = None, include_path: list[str] | None = None, metadata: dict[str, Any] | None = None
):
    """lm-eval's TaskManager with exactly one copy of our tasks, plus the user's `include_path` folders; `metadata`
    (and data_dir) reach every task's custom_dataset, as lm-eval's --metadata does. Building one indexes every
    task lm-eval ships (seconds), so a process keeps one per set of arguments."""
    metadata = {**({"data_dir": data_dir} if data_dir else {}), **(metadata or {})}
    return _task_manager(tuple(include_path or ()), json.dumps(metadata, sort_keys=True))


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: tuple[str, ...], metadata_json: str):
    import lm_eval
    from lm_eval.tasks import TaskManager

    ours = tasks_dir()
    paths = ([] if ours.is_relative_to(Path(lm_eval.__file__).parent) else [str(ours)]) + list(include_path)
    return TaskManager(include_path=paths or None, metadata=json.loads(metadata_json) or None)
