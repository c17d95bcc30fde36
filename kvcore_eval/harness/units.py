"""What a sweep or a frontier scores: each task of --tasks at each context length (a unit), with the metric it is
scored by, checked against the task's own declarations (its metric_list, output type, document count) before any
output is touched or any model loads.

A task that builds its documents for a length (lm-eval's RULER, kvcore_ruler) is one unit per length of `--metadata
'{"max_seq_lengths": [...]}'`, named `<task>@<length>`, with its own points and held-out calibration; any other task
is one unit, named by the task. A unit whose metric is a perplexity belongs to the ND-PPL study; any other (a
generation task's own metric) to the accuracy table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvcore_eval import outputs
from kvcore_eval.config import SweepConfig, TaskScoringConfig, task_list
from kvcore_eval.harness.lm_tasks import check_declared_metrics, leaf_tasks, load_as_evaluated
from kvcore_eval.metrics import PERPLEXITY_METRICS


@dataclass(frozen=True)
class Unit:
    """One task at one context length (None: no length asked), scored by one metric: its own points and held-out
    calibration, under `name`."""

    task: str
    length: int | None
    output_type: str
    metric: str
    higher_is_better: bool = False  # of the metric itself (a perplexity's ND-PPL: lower is better)

    @property
    def name(self) -> str:
        return self.task if self.length is None else f"{self.task}@{self.length}"

    @property
    def perplexity(self) -> bool:
        """Whether it belongs to the ND-PPL study (its metric is a perplexity), rather than the accuracy table."""
        return self.metric in PERPLEXITY_METRICS

    @property
    def generation(self) -> bool:
        return self.output_type == "generate_until"


def metric_names(instance) -> list[str]:
    """The metrics a task declares (its metric_list), in order."""
    return [str(entry["metric"]) for entry in instance.config.metric_list or []]


def named_by_length(instance) -> bool:
    """Whether every metric of the task is named by a context length (RULER's, kvcore_ruler's): a task scored at
    each --metadata max_seq_lengths."""
    names = metric_names(instance)
    return bool(names) and all(name.isdigit() for name in names)


def choose_metric(config: TaskScoringConfig, instance, length: int | None) -> str:
    """The metric a task is scored by, checked against its metric_list without running it: `task=metric` of --metric;
    else, where every metric is named by a context length (RULER), the unit's length; else, for a perplexity task
    (rolling, or declaring a perplexity metric), --metric's perplexity metric; else the task's first metric."""
    task, names = instance.config.task, metric_names(instance)
    perplexity, pairs = config.metric_choice()
    if named_by_length(instance):
        if task in pairs:
            raise ValueError(
                f"--metric {task}={pairs[task]}: {task} names its metric by the context length; drop the pair "
                "and give the lengths with --metadata '{\"max_seq_lengths\": [...]}'"
            )
        if length is None:
            raise ValueError(
                f"{task} is scored at a context length: give the lengths with --metadata "
                "'{\"max_seq_lengths\": [1024, 2048]}'"
            )
        return str(length)
    if task in pairs:
        wanted = pairs[task]
    elif instance.config.output_type == "loglikelihood_rolling" or set(names) & set(PERPLEXITY_METRICS):
        wanted = perplexity  # a perplexity task: the ND-PPL study's metric
    elif names:
        return names[0]
    else:
        raise ValueError(f"{task} declares no metric: give it a metric_list")
    if wanted not in names:
        raise ValueError(
            f"--metric: {task} declares no {wanted!r} (its metric_list: {', '.join(names) or 'none'}): "
            f"pass {task}=<one of them>"
        )
    return wanted


def check_single_filter(instance) -> None:
    """A task scored through several filters (gsm8k: strict-match, flexible-extract) reports each metric once per
    filter under the same name: the sweep would keep one of them unlabeled, so it is refused."""
    filters = [entry.get("name") for entry in instance.config.filter_list or [] if isinstance(entry, dict)]
    if len(filters) > 1:
        raise ValueError(
            f"{instance.config.task} scores through {len(filters)} filters ({', '.join(map(str, filters))}): the "
            "sweep reports one metric per task; copy its YAML with one filter_list entry, pass it with --include-path"
        )


def task_units(
    config: TaskScoringConfig,
    manager_for: Callable[[int | None], Any],
    per_task: bool = True,
    check_task: Callable[[Any], None] | None = None,
) -> dict[str, Unit]:
    """The leaf tasks of `config.tasks` as units, each with its metric; a generation task at each --metadata
    max_seq_lengths (where given). Unknown tasks, metrics and document counts (`per_task`: each task calibrated on
    the documents after the scored ones), and whatever `check_task(lm-eval task)` refuses, are refused here, before
    any output is touched or any model loads."""
    names = task_list(config.tasks)
    lengths = config.context_lengths() or [None]
    if unknown := [name for name in names if name not in manager_for(None).all_tasks]:
        raise ValueError(
            f"--tasks {', '.join(unknown)}: not a task or group lm-eval knows; pass its folder with --include-path"
        )
    instances = {length: list(leaf_tasks(load_as_evaluated(manager_for(length), names))) for length in lengths}
    found = {i.config.task for i in instances[lengths[0]]}
    for task in sorted(found):  # each names folders under --out (calibrations/<task>, points/<task>)
        outputs.check_path_component(task, "task name")
    if stray := sorted(set(config.metric_choice()[1]) - found):
        raise ValueError(f"--metric {', '.join(stray)}=...: not among the tasks swept ({', '.join(sorted(found))})")
    units = {}
    for length in lengths:
        for instance in sorted(instances[length], key=lambda i: i.config.task):
            at_lengths = instance.config.output_type == "generate_until" and named_by_length(instance)
            if not at_lengths and length != lengths[0]:
                continue  # a task whose metric does not name a length (gsm8k, perplexity) is scored once
            unit_length = length if at_lengths else None
            check_single_filter(instance)
            check_declared_metrics(instance)
            if check_task is not None:
                check_task(instance)
            unit = Unit(instance.config.task, unit_length, instance.config.output_type, "")
            metric = choose_metric(config, instance, unit_length)
            unit = dataclasses.replace(unit, metric=metric, higher_is_better=higher_is_better(instance, metric))
            outputs.check_path_component(unit.name, "task name")  # with its length: <task>@<length>
            if per_task:
                check_document_count(config, unit, len(list(instance.eval_docs)))
            units[unit.name] = unit
    if config.gen_kwargs and not any(unit.generation for unit in units.values()):
        raise ValueError(f"--gen-kwargs {config.gen_kwargs}: none of --tasks generates; drop it")
    if config.context_lengths() and all(unit.length is None for unit in units.values()):
        raise ValueError(
            "--metadata max_seq_lengths: none of --tasks builds its documents for a length (RULER, kvcore_ruler); "
            "drop max_seq_lengths"
        )
    return units


def higher_is_better(instance, metric: str) -> bool:
    """Whether more of `metric` is better, as the task declares it (a metric named by a context length: as every
    such metric of the task is declared; RULER declares its lengths up to 128k, not each length it runs at). lm-eval
    lists an entry without higher_is_better, of a metric it does not know, as None: not declared, refused."""
    declared = instance.higher_is_better() or {}
    if metric in PERPLEXITY_METRICS:
        return False  # its ND-PPL is scored: lower is better
    if metric.isdigit() and named_by_length(instance) and metric not in declared:
        values = [declared.get(name) for name in metric_names(instance)]
    else:
        values = [declared.get(metric)]
    if not values or any(value is None for value in values):
        raise ValueError(
            f"{instance.config.task} does not say whether more {metric!r} is better: add higher_is_better to that "
            "metric in its metric_list"
        )
    if len(set(map(bool, values))) > 1:
        raise ValueError(
            f"{instance.config.task}'s metrics named by context lengths disagree on higher_is_better: make them agree"
        )
    return bool(values[0])


def check_document_count(config: TaskScoringConfig, unit: Unit, count: int) -> None:
    if count <= config.num_samples:
        raise ValueError(
            f"{unit.name} has {count} documents: the first --num-samples {config.num_samples} are scored and its "
            "calibration reads the documents after them; lower --num-samples"
        )


def check_kinds(config: SweepConfig, units: list[Unit]) -> None:
    perplexity = [unit.name for unit in units if unit.perplexity]
    if len(config.truncate_kinds()) > 1 and perplexity:
        raise ValueError(
            f"--truncate {config.truncate}: the ND-PPL study of {', '.join(perplexity)} takes one kind; run one sweep "
            "per kind, or sweep several kinds over tasks scored by their own metric"
        )
    if config.position_buckets and not any(u.perplexity and u.output_type == "loglikelihood_rolling" for u in units):
        raise ValueError(
            "--position-buckets needs a rolling-perplexity task (kvcore_longtext, ...): add one to --tasks or drop it"
        )
