"""`kvcore-eval eval`: a thin front to lm-eval's `simple_evaluate` with kvcore's model and tasks registered."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lm_eval

import kvcore_eval.harness.wrapper  # noqa: F401  registers kvcore_hf
from kvcore_eval.config import EvalConfig, split_paths, task_list
from kvcore_eval.harness.lm_tasks import task_manager
from kvcore_eval.model.models import resolve_device
from kvcore_eval.outputs import atomic_write_text, check_output_file

logger = logging.getLogger(__name__)


def _is_results_file(path: Path) -> bool:
    """An lm-eval results JSON (what --output writes), which a rerun may replace."""
    try:
        return isinstance(results := json.loads(path.read_text(encoding="utf-8")), dict) and "results" in results
    except (ValueError, UnicodeDecodeError):
        return False


def run_lm_eval(
    config: EvalConfig, log_samples: bool = False, metadata: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run lm-eval once; returns its results dict (and writes it to config.output when set). `metadata` reaches the
    tasks as lm-eval's --metadata does."""
    if config.output:  # before the evaluation, not after it
        check_output_file(Path(config.output), "--output", _is_results_file)
    model = "kvcore_hf" if config.truncation.runs_kvcore else "hf"
    results = lm_eval.simple_evaluate(
        model=model,
        model_args=config.model_args(),
        tasks=task_list(config.tasks),
        batch_size=config.batch_size,
        device=resolve_device(config.device),
        limit=config.limit,
        log_samples=log_samples,
        task_manager=task_manager(config.data_dir, split_paths(config.include_path), metadata),
    )
    if config.output:
        Path(config.output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(config.output), json.dumps(results, indent=2, default=str) + "\n")
        logger.info("results written to %s", config.output)
    return results
