"""`kvcore-eval eval`: a thin front to lm-eval's `simple_evaluate` with kvcore's model and tasks registered.

Every input is checked before the model loads: the --output file, and each scored document's continuation against
the model's context. The results are never lost to a late write: the command prints lm-eval's table first, and a
results file that cannot be written (a full disk) is kept in the system's temporary folder, named in the error.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lm_eval

import kvcore_eval.harness.wrapper  # noqa: F401  registers kvcore_hf
from kvcore_eval import outputs
from kvcore_eval.config import EvalConfig, split_paths, task_list
from kvcore_eval.harness.lm_tasks import (
    check_continuations_fit,
    check_declared_metrics,
    leaf_tasks,
    load_as_evaluated,
    task_manager,
)
from kvcore_eval.model import models
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
    results = evaluate(config, log_samples, metadata)
    if config.output:
        save_results(results, Path(config.output))
    return results


def evaluate(config: EvalConfig, log_samples: bool = False, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """lm-eval's results of one run, every input checked before the model loads; nothing written."""
    if config.output:  # before the evaluation, not after it
        check_output_file(Path(config.output), "--output", _is_results_file)
    manager = task_manager(config.data_dir, split_paths(config.include_path), metadata)
    check_documents_fit(config, manager)
    model = "kvcore_hf" if config.truncation.runs_kvcore else "hf"
    return lm_eval.simple_evaluate(
        model=model,
        model_args=config.model_args(),
        tasks=task_list(config.tasks),
        batch_size=config.batch_size,
        device=resolve_device(config.device),
        limit=config.limit,
        log_samples=log_samples,
        task_manager=manager,
    )


def check_documents_fit(config: EvalConfig, manager) -> None:
    """Before the model loads: every metric a task's process_results returns is declared, and each scored
    loglikelihood document's continuation fits the model's context (its config and tokenizer read, not its
    weights)."""
    model_id, gguf_file = models.gguf_location(config.model, config.gguf_file)
    tokenizer = models.load_tokenizer(model_id, None, gguf_file)
    max_length = models.context_length(models.load_config(model_id, None, gguf_file), tokenizer)
    for instance in leaf_tasks(load_as_evaluated(manager, task_list(config.tasks))):
        check_declared_metrics(instance)
        check_continuations_fit(instance, config.limit, tokenizer, max_length, config.model)


def save_results(results: dict[str, Any], path: Path) -> None:
    """lm-eval's results JSON at `path`, atomically. Where it cannot be written (a full disk, a folder made
    read-only meanwhile), the results are kept in the system's temporary folder and the error names that file."""
    text = json.dumps(results, indent=2, default=str) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    except OSError as err:
        reason = "no space left on the device" if isinstance(err, outputs.DiskFullError) else err.strerror or err
        raise type(err)(
            f"could not write --output {path} ({reason}); the results {outputs.keep_elsewhere(text, path)}"
        ) from err
    logger.info("results written to %s", path)
