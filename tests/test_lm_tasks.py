"""lm_tasks.py: what is checked of an lm-eval task before any model loads."""

from __future__ import annotations

import shutil

import pytest
from conftest import EXAMPLE_DATA, EXAMPLE_MODEL, REPO

from kvcore_eval.harness.lm_tasks import check_declared_metrics, leaf_tasks, load_as_evaluated, task_manager

# kvcore_codealpaca's YAML copied as a user's own task whose metric_list lists only some of what process_results returns
PERPLEXITY_TASK = """task: {name}
custom_dataset: !function utils.load_perplexity_dataset
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{response}}}}"
target_delimiter: ""
process_results: !function utils.process_perplexity
metric_list:
{metrics}metadata:
  version: 1.0
  source: codealpaca
"""


def user_tasks(folder, **metric_lists) -> str:
    folder.mkdir(exist_ok=True)
    shutil.copy(REPO / "tasks" / "utils.py", folder / "utils.py")
    for name, metrics in metric_lists.items():
        listed = "".join(
            f"  - metric: {m}\n    aggregation: {m if m == 'bits_per_byte' else 'weighted_perplexity'}\n"
            f"    higher_is_better: false\n"
            for m in metrics
        )
        (folder / f"{name}.yaml").write_text(PERPLEXITY_TASK.format(name=name, metrics=listed))
    return str(folder)


def instance(folder: str, name: str):
    manager = task_manager(str(EXAMPLE_DATA), [folder], {"pretrained": str(EXAMPLE_MODEL)})
    (found,) = leaf_tasks(load_as_evaluated(manager, [name]))
    return found


def test_a_metric_process_results_returns_but_metric_list_omits_is_named(tmp_path):
    """process_results returns bits_per_byte as a (loglikelihood, bytes) pair; lm-eval averages an undeclared metric
    (a raw TypeError after the run): refused before, naming the task, the metric and the fix."""
    folder = user_tasks(
        tmp_path / "tasks",
        my_code=["word_perplexity", "byte_perplexity"],
        my_code_all=["word_perplexity", "byte_perplexity", "bits_per_byte"],
    )
    with pytest.raises(
        ValueError,
        match="my_code's process_results returns bits_per_byte, which its metric_list "
        "does not declare.*add bits_per_byte to the metric_list of its YAML",
    ):
        check_declared_metrics(instance(folder, "my_code"))
    check_declared_metrics(instance(folder, "my_code_all"))  # every metric declared: nothing to say


@pytest.mark.slow
def test_a_sweep_over_such_a_task_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    from kvcore_eval.config import SweepConfig
    from kvcore_eval.experiments.sweep import run_sweep
    from kvcore_eval.model import models

    loads = []
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: loads.append(a))
    folder = user_tasks(tmp_path / "tasks", my_code=["word_perplexity", "byte_perplexity"])
    out = tmp_path / "sweep"
    config = SweepConfig(
        model=str(EXAMPLE_MODEL),
        out=str(out),
        tasks="my_code",
        include_path=folder,
        data_dir=str(EXAMPLE_DATA),
        num_samples=2,
        calibration_tokens=600,
        seq_len=64,
    )
    with pytest.raises(ValueError, match="my_code's process_results returns bits_per_byte"):
        run_sweep(config)
    assert loads == [] and not out.exists()
