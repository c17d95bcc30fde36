"""`kvcore-eval eval`: a thin front to lm-eval's `simple_evaluate` with kvcore's model and tasks registered."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

from kvcore_eval.config import EvalConfig, split_paths
from kvcore_eval.outputs import atomic_write_text

logger = logging.getLogger(__name__)

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


def task_manager(data_dir: str | None = None, include_path: list[str] | None = None, metadata: dict[str, Any] | None = None):
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


def run_lm_eval(config: EvalConfig, log_samples: bool = False, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run lm-eval once; returns its results dict (and writes it to config.output when set). `metadata` reaches the
    tasks as lm-eval's --metadata does."""
    import lm_eval

    import kvcore_eval.wrapper  # noqa: F401  registers kvcore_hf

    model = "kvcore_hf" if config.calibration is not None else "hf"
    results = lm_eval.simple_evaluate(
        model=model, model_args=config.model_args(), tasks=[t.strip() for t in config.tasks.split(",") if t.strip()],
        batch_size=config.batch_size, device=config.device, limit=config.limit, log_samples=log_samples,
        task_manager=task_manager(config.data_dir, split_paths(config.include_path), metadata),
    )
    if config.output:
        Path(config.output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(config.output), json.dumps(results, indent=2, default=str) + "\n")
        logger.info("results written to %s", config.output)
    return results
