"""`kvcore-eval sweep`: ND-PPL per task and rank, NER per task, and how well NER predicts ND-PPL; other tasks
(generation: RULER, kvcore_ruler, ...) by their own metric per rank, kind truncated and context length.

One model load: the model is loaded once and shared by every per-task calibration and by one `kvcore_hf`
whose rank plan is swapped between points (`KVCoreHFLM.set_truncation`).

Per task, lm-eval scores the first `num_samples` documents; the task's calibration reads only the documents
after them (`lm_eval:<task>`, `skip_docs`), so calibration and evaluation are disjoint, for kvcore's tasks and
for a user's own (`--include-path`) alike. That calibration gives the task's NER and, with `--basis-scope per-task`
(the default), the bases that truncate it; `--basis-scope shared` truncates every task with one `--calibration`.

Every finished point (`points/<task>/<name>.json`) and calibration (`calibrations/<task>/`) is reused by a rerun
after checking the settings that made it; other settings are an error. `--per-layer` adds each layer's ND-PPL
with only that layer truncated. Outputs: sweep.json/.md, nd_ppl.png, ner_vs_nd_ppl.png (+ per_layer.*).

A task whose metric is not a perplexity (`--metric task=metric`, else its own: `units.choose_metric`) is scored by that
metric at full rank (the baseline) and at each rank below it for each `--truncate` kind; a task that builds its
documents (RULER) runs at each length of `--metadata '{"max_seq_lengths": [...]}'`, each length its own points and
held-out calibration (`<task>@<length>`): a table in sweep.md and accuracy.png (context length x rank, a panel per
kind). `--position-buckets` adds, for rolling-perplexity tasks, ND-PPL by position in the context window
(`kvcore_eval.analysis.positions`): a table in sweep.md and position_nd_ppl.png. Every option is checked, the chosen
metric against each task's metric_list included, before the model loads. Finished points of an earlier run that this run
does not include are named in sweep.md and in a warning.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kvcore_eval import metrics, outputs
from kvcore_eval.analysis import accuracy, positions, study
from kvcore_eval.analysis.report import layer_table, mean_ner
from kvcore_eval.calibration import overlap
from kvcore_eval.calibration.artifact import load_calibration, read_metadata
from kvcore_eval.config import SweepConfig, split_paths
from kvcore_eval.experiments.session import (
    Session,
    layer_nd_ppl,
    nd_ppl_interval,
    open_units,
    point_truncation,
    record_config,
    run_point,
    task_calibration,
    task_document_ner,
    unit_manager,
    use_truncation,
)
from kvcore_eval.harness.lm_tasks import leaf_tasks, lm_eval_task_documents, load_as_evaluated
from kvcore_eval.harness.units import Unit, check_kinds
from kvcore_eval.model import models
from kvcore_eval.spaces import KEY_SPACES

logger = logging.getLogger(__name__)

KIND = "sweep"
OWN_NAMES = (
    "config.json",
    "calibrations",
    "points",
    "sweep.json",
    "sweep.md",
    "nd_ppl.png",
    "ner_vs_nd_ppl.png",
    "per_layer.json",
    "per_layer.md",
    "per_layer.png",
    "documents",
    "positions",
    "accuracy.png",
    "position_nd_ppl.png",
)


def open_sweep(config: SweepConfig) -> contextlib.AbstractContextManager[Session]:
    """The sweep's session (held while the sweep writes): its units, the kinds truncated and a shared basis's overlap
    checked first."""

    def check(units: list[Unit], manager_for: Callable[[int | None], Any]) -> None:
        check_kinds(config, units)
        if config.position_buckets:
            check_position_buckets(config)
        if config.basis_scope == "shared":
            read_metadata(config.truncation.calibration)  # an artifact is there, in a format this version reads
            if not config.allow_overlap:
                check_shared_overlap(config, units, manager_for)

    return open_units(config, KIND, OWN_NAMES, per_task=config.basis_scope == "per-task", check=check)


def check_position_buckets(config: SweepConfig) -> None:
    """--position-buckets against the context the model gets (its config and tokenizer read, not its weights): edges
    past it are named, and edges that all are refused (one bucket)."""
    model_id, gguf_file = models.gguf_location(config.model, config.gguf_file)
    context = models.context_length(
        models.load_config(model_id, None, gguf_file), models.load_tokenizer(model_id, None, gguf_file)
    )
    positions.check_edges(config.position_buckets, context)


def check_shared_overlap(config: SweepConfig, units: list[Unit], manager_for: Callable[[int | None], Any]) -> None:
    """Before any model loads: refuse a shared calibration that saw documents the sweep scores."""

    shared = config.truncation.calibration
    digests = load_calibration(shared, eigenvectors=False).document_digests
    if digests is None:
        logger.warning("%s records no document digests: its overlap with the scored documents is unknown", shared)
        return
    for unit in units:
        metadata = manager_for(unit.length).metadata  # as the evaluation hands it to the task
        scored = lm_eval_task_documents(unit.task, 0, config.data_dir, split_paths(config.include_path), metadata)
        seen, count = overlap.documents_seen(digests, itertools.islice(scored, config.num_samples))
        if seen:
            raise ValueError(
                f"--calibration {shared} saw {seen} of the {count} documents of {unit.name} the sweep scores: "
                "its numbers would be in-sample (optimistic). Use --basis-scope per-task, calibrate the shared basis "
                "on other documents, or pass --allow-overlap"
            )


def run_sweep(config: SweepConfig) -> dict[str, Any]:
    """The sweep, holding its output folder's lock from the claim to the last file."""
    with open_sweep(config) as session:
        return sweep_session(session)


def sweep_session(session: Session) -> dict[str, Any]:
    config, units = session.config, session.units
    calibrations = {name: task_calibration(session, name) for name in units}
    layers = models.kv_geometry(session.model.config).num_layers
    below_full = [rank for rank in config.rank_list() if rank < 1]
    rolling = rolling_tasks(session)
    session.progress.total = (
        len(session.tasks) * (1 + len(config.rank_list()) + (2 * layers if config.per_layer else 0))
        + (len(units) - len(session.tasks)) * (1 + len(config.truncate_kinds()) * len(below_full))
        # the position pass scores each rolling task again at full rank and at every rank
        + (len(rolling) * (1 + len(config.rank_list())) if config.position_buckets else 0)
    )
    basis = {
        name: Path(config.truncation.calibration) if config.basis_scope == "shared" else calibrations[name]
        for name in units
    }
    design = {
        **asdict(config),
        "model_name": Path(config.model).name or config.model,
        "model_dtype": session.model_dtype,
        "model_device": models.resolve_device(config.device),
        "basis_per_task": {name: str(path) for name, path in basis.items()},
        "perplexity_metric": perplexity_metric(units),
    }
    summary: dict[str, Any] = {"design": design}
    if session.tasks:
        summary, baseline_points, tables = perplexity_study(session, calibrations, basis, design)
    if accuracy_units := [unit for unit in units.values() if not unit.perplexity]:
        summary["accuracy"] = run_accuracy(session, accuracy_units, basis, design)
    if config.position_buckets:
        summary["positions"] = run_positions(session, basis)
    per_layer = config.per_layer and bool(session.tasks)
    write_summary(session, summary, final=not per_layer)
    if per_layer:
        summary["per_layer"] = run_per_layer(session, session.tasks, basis, baseline_points, tables, calibrations)
        write_summary(session, summary, final=True)  # the per-layer points are this run's too
    return summary


def perplexity_metric(units: dict[str, Unit]) -> str:
    """The metric of the ND-PPL study, as the design sentence names it."""
    chosen = {name: unit.metric for name, unit in units.items() if unit.perplexity}
    if len(set(chosen.values())) <= 1:
        return next(iter(chosen.values()), "")
    return "each task's own (" + ", ".join(f"{name}: {metric}" for name, metric in chosen.items()) + ")"


def perplexity_study(session: Session, calibrations: dict[str, Path], basis: dict[str, Path], design: dict[str, Any]):
    """ND-PPL per perplexity task and rank (one kind), NER, and their correlations across tasks and documents."""
    config, tasks = session.config, session.tasks
    (kind,) = config.truncate_kinds()  # check_kinds refuses several kinds with perplexity tasks
    baseline_points = {
        task: run_point(session, task, "baseline", point_truncation(session, basis[task], "full", "full", "both"))
        for task in tasks
    }
    baseline = {task: point["value"] for task, point in baseline_points.items()}
    perplexity, per_document, intervals = {}, {}, {}
    for rank in config.rank_list():
        points = {
            task: run_point(session, task, f"rank_{rank:g}", rank_truncation(session, basis[task], rank, kind))
            for task in tasks
        }
        perplexity[f"{rank:g}"] = {task: point["value"] for task, point in points.items()}
        intervals[f"{rank:g}"] = {task: nd_ppl_interval(point, baseline_points[task]) for task, point in points.items()}
        per_document[f"{rank:g}"] = {
            task: study.document_nd_ppl(point["per_document"], baseline_points[task]["per_document"])
            for task, point in points.items()
        }
    tables = {task: layer_table(load_calibration(calibrations[task])) for task in tasks}
    ner = {
        task: {
            "key": mean_ner(tables[task], KEY_SPACES[config.truncation.key_space]),
            "value": mean_ner(tables[task], "value"),
        }
        for task in tasks
    }
    summary = study.summarize(tasks, baseline, perplexity, ner, design)
    summary["nd_ppl_interval"] = intervals
    documents = {task: task_document_ner(session, task) for task in tasks}
    summary["documents"], summary["correlation"]["across_documents"] = study.summarize_documents(
        documents, per_document
    )
    return summary, baseline_points, tables


def rank_truncation(session: Session, basis: Path, rank: float, kind: str):
    """The truncation of `kind` (keys, values or both) at `rank` of D (1: full)."""
    spec = "full" if rank == 1 else str(rank)
    keys, values = kind in ("keys", "both"), kind in ("values", "both")
    return point_truncation(session, basis, spec if keys else None, spec if values else None, kind)


def run_accuracy(session: Session, units: list[Unit], basis: dict[str, Path], design: dict[str, Any]) -> dict:
    """Each unit's own metric at full rank (the baseline: kvcore_hf at full rank is `hf`) and at every rank below it
    for every --truncate kind."""

    config = session.config
    full = {
        u.name: run_point(session, u.name, "baseline", rank_truncation(session, basis[u.name], 1, "both"))
        for u in units
    }
    scores = {
        kind: {
            f"{rank:g}": {
                u.name: run_point(
                    session, u.name, f"{kind}_rank_{rank:g}", rank_truncation(session, basis[u.name], rank, kind)
                )["value"]
                for u in units
            }
            for rank in config.rank_list()
            if rank < 1
        }
        for kind in config.truncate_kinds()
    }
    rows = [{"name": u.name, "task": u.task, "length": u.length, "metric": u.metric} for u in units]
    return accuracy.summarize(rows, {name: point["value"] for name, point in full.items()}, scores, design)


def rolling_tasks(session: Session) -> list[str]:
    """The perplexity units scored by rolling perplexity (what --position-buckets splits by position)."""
    return [name for name in session.tasks if session.units[name].output_type == "loglikelihood_rolling"]


def run_positions(session: Session, basis: dict[str, Path]) -> dict[str, Any]:
    """ND-PPL by position bucket for each rolling perplexity task, at each rank of the study's kind."""
    config = session.config
    (kind,) = config.truncate_kinds()
    rolling = rolling_tasks(session)
    tables = {}
    for name in rolling:
        base = point_positions(session, name, "baseline", rank_truncation(session, basis[name], 1, "both"))
        ranks = {
            f"{rank:g}": point_positions(
                session, name, f"rank_{rank:g}", rank_truncation(session, basis[name], rank, kind)
            )
            for rank in config.rank_list()
        }
        tables[name] = positions.summarize(base, ranks)
    return {"truncate": kind, "key_space": config.truncation.key_space, "tasks": tables}


def point_positions(session: Session, task: str, name: str, truncation) -> dict[str, Any]:
    """A rolling task's log-likelihood by position bucket over its scored documents under `truncation`, checked to
    sum back to the point's own (lm-eval's) log-likelihood; saved in positions/<task>/<name>.json, reused when made
    with the same settings."""

    point = outputs.read_json(session.out / "points" / task / f"{name}.json", "sweep point")  # the study's
    path = session.out / "positions" / task / f"{name}.json"
    lm = use_truncation(session, truncation)
    edges = positions.parse_edges(session.config.position_buckets, lm.max_length)
    settings = {**point["settings"], "edges": edges, "max_length": lm.max_length}
    saved = outputs.read_derived(path, "position table") if path.exists() else None
    if isinstance(saved, dict) and saved.get("settings") == settings:
        session.progress.point_done(task, f"{name} by position", None)
        return saved["positions"]
    started = time.monotonic()
    unit = session.units[task]
    (instance,) = leaf_tasks(load_as_evaluated(unit_manager(session, unit), [unit.task]))
    texts = [instance.doc_to_target(doc) for doc in itertools.islice(instance.eval_docs, session.config.num_samples)]
    buckets = positions.score_documents(lm, texts, edges)
    total = sum(bucket["loglikelihood"] for bucket in buckets.values())
    expected = sum(ll for ll, _ in (point["per_document_loglikelihood"] or {}).values())
    if point["per_document_loglikelihood"] is None or not math.isclose(total, expected, rel_tol=1e-4, abs_tol=1e-3):
        raise RuntimeError(
            f"{task} {name}: the position buckets sum to a log-likelihood of {total:.4f}, lm-eval's rolling "
            f"perplexity to {expected:.4f}: the windows differ from lm-eval's, so no position table is written"
        )
    result = {"edges": edges, "max_length": lm.max_length, "documents": len(texts), "buckets": buckets}
    path.parent.mkdir(parents=True, exist_ok=True)
    outputs.atomic_write_json(path, {"settings": settings, "positions": result})
    session.progress.point_done(task, f"{name} by position", started)
    return result


def left_out_points(session: Session) -> list[str]:
    """Finished points in the output folder (of an earlier run) that this run neither read nor wrote."""
    folder = session.out / "points"
    found = sorted(folder.glob("*/*.json")) if folder.is_dir() else []
    return [str(path.relative_to(session.out)) for path in found if path not in session.used]


def write_summary(session: Session, summary: dict[str, Any], final: bool = True) -> None:
    """sweep.json, sweep.md and the figures of what the run holds; finished points it left out are named (and,
    once the run is done, `final`, logged)."""

    out = session.out
    summary["left_out"] = left_out_points(session)
    design = summary["design"]
    title = f"# Sweep: {design['model']}\n\n{study.model_line(design)}\n"
    sections = [study.to_markdown(summary)] if session.tasks else [title]
    if session.tasks:
        study.plot_nd_ppl(summary, out / "nd_ppl.png")
        study.plot_ner_vs_nd_ppl(summary, out / "ner_vs_nd_ppl.png")
    if "accuracy" in summary:
        sections.append(accuracy.to_markdown(summary["accuracy"]))
        accuracy.plot_heatmap(summary["accuracy"], out / "accuracy.png")
    if "positions" in summary:
        table = positions.to_markdown(summary["positions"]).splitlines()
        sections.append("\n".join("#" + line if line.startswith("#") else line for line in table) + "\n")
        positions.plot(summary["positions"], out / "position_nd_ppl.png")
    if left := summary["left_out"]:
        shown = ", ".join(left[:12]) + (f" and {len(left) - 12} more" if len(left) > 12 else "")
        line = (
            f"{len(left)} finished point(s) of an earlier run in {out} are not in these tables (other ranks, kinds, "
            f"tasks or lengths than this run's): {shown}. Rerun with those settings to include them."
        )
        if final:
            logger.warning(line)
        sections.append(f"**Left out:** {line}\n")
    outputs.atomic_write_json(out / "sweep.json", summary)
    outputs.atomic_write_text(out / "sweep.md", "\n".join(sections))
    record_config(out, session.config, KIND)  # the settings of the tables it now holds


def task_residual_energy(own: Path, basis: Path, space: str, rank: int, layers: int) -> list[float]:
    """Per layer, the fraction of the task's own energy tr(G_t) outside the basis used: Σ_{i>r} λ_i of its own
    spectrum when the basis is its own; (tr G_t − tr P_rᵀ G_t P_r) / tr G_t under another (--basis shared)."""

    task = load_calibration(own, eigenvectors=Path(own) != Path(basis))
    if Path(own) == Path(basis):
        return [metrics.residual_energy(task.eigenvalues[space][layer].numpy(), rank) for layer in range(layers)]
    shared = load_calibration(basis, eigenvectors=False)
    return [
        metrics.residual_energy_under(
            task.eigenvalues[space][layer].numpy(),
            task.eigenvectors[space][layer].numpy(),
            shared.basis(space, layer, rank, "layer").numpy(),
        )
        for layer in range(layers)
    ]


def run_per_layer(
    session: Session,
    tasks: list[str],
    basis: dict[str, Path],
    baseline_points: dict[str, dict[str, Any]],
    tables,
    calibrations: dict[str, Path],
) -> dict[str, Any]:
    """Each layer's ND-PPL with only that layer's keys (then values) truncated to `per_layer_rank` of D, beside the
    layer's NER and residual energy on the task's own data (its own calibration's Gram) under the basis used."""

    config = session.config
    nd_ppl, layer_ner, residual, intervals = {}, {}, {}, {}
    for task in tasks:
        calibration = load_calibration(basis[task], eigenvectors=False)
        width, layers = calibration.geometry.width, calibration.geometry.num_layers
        rank = max(1, round(config.per_layer_rank * width))
        spaces = {"key": KEY_SPACES[config.truncation.key_space], "value": "value"}
        records: dict[str, dict[str, Any]] = {}

        def evaluate(name: str, truncation, task: str = task, records=records) -> float:
            records[name] = run_point(session, task, name, truncation)
            return records[name]["value"]

        nd_ppl[task] = layer_nd_ppl(session, basis[task], rank, layers, baseline_points[task]["value"], evaluate)
        intervals[task] = {
            kind: [
                nd_ppl_interval(records[f"layer{layer}_{kind}_{rank}"], baseline_points[task])
                for layer in range(layers)
            ]
            for kind in ("key", "value")
        }
        layer_ner[task] = {kind: [stats[space].ner for stats in tables[task]] for kind, space in spaces.items()}
        residual[task] = {
            kind: task_residual_energy(calibrations[task], basis[task], space, rank, layers)
            for kind, space in spaces.items()
        }
    layers_summary = study.summarize_layers(nd_ppl, layer_ner, residual, config.per_layer_rank)
    layers_summary["key_space"] = config.truncation.key_space
    layers_summary["nd_ppl_interval"] = intervals
    layers_summary["num_samples"] = config.num_samples
    for task, kinds in intervals.items():
        noisy = sum(bool(i and i["within_noise"]) for values in kinds.values() for i in values)
        if noisy:
            logger.warning(
                "%s: %d of %d single-layer ND-PPLs lie within noise (their 95%% paired bootstrap interval over %d "
                "documents holds 0): raise --num-samples or lower --per-layer-rank to lift them above it before "
                "spending a budget by them (budget_method=sensitivity)",
                task,
                noisy,
                sum(len(values) for values in kinds.values()),
                config.num_samples,
            )
    outputs.atomic_write_json(session.out / "per_layer.json", layers_summary)
    outputs.atomic_write_text(session.out / "per_layer.md", study.per_layer_markdown(layers_summary))
    study.plot_per_layer(layers_summary, session.out / "per_layer.png")
    return layers_summary
