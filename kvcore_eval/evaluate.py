"""`kvcore-eval eval`: a thin front to lm-eval's `simple_evaluate` with kvcore's model and tasks registered."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from kvcore_eval.config import EvalConfig, split_paths
from kvcore_eval.lm_tasks import task_manager
from kvcore_eval.models import resolve_device
from kvcore_eval.outputs import atomic_write_text

logger = logging.getLogger(__name__)


def run_lm_eval(
    config: EvalConfig, log_samples: bool = False, metadata: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run lm-eval once; returns its results dict (and writes it to config.output when set). `metadata` reaches the
    tasks as lm-eval's --metadata does."""
    import lm_eval

    import kvcore_eval.wrapper  # noqa: F401  registers kvcore_hf

    model = "kvcore_hf" if config.truncation.calibration is not None else "hf"
    results = lm_eval.simple_evaluate(
        model=model,
        model_args=config.model_args(),
        tasks=[t.strip() for t in config.tasks.split(",") if t.strip()],
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
