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

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvcore_eval import metrics, outputs
from kvcore_eval.analysis import study
from kvcore_eval.config import CalibrationConfig, SweepConfig, identity, identity_differences, split_paths
from kvcore_eval.harness.units import Unit, check_kinds, task_units
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
# Every record of a kvcore task, in its seeded order: the sweep scores the first num_samples (--limit) and
# calibrates on the rest.
TASK_METADATA = {"num_samples": None}
# Fields of a sweep's configuration that choose which points run, not what a point's number is.
# metric, metadata and gen_kwargs change numbers: the part each point depends on is in its own settings.
POINT_SELECTORS = (
    "tasks",
    "ranks",
    "per_layer",
    "per_layer_rank",
    "truncate",
    "metric",
    "metadata",
    "gen_kwargs",
    "position_buckets",
)


@dataclass
class Progress:
    """Which point of how many, with the time left estimated from the points computed so far (reused ones cost
    nothing and are not counted in the estimate)."""

    total: int = 0  # 0: not known (the frontier's search)
    done: int = 0
    computed: int = 0
    seconds: float = 0.0

    def point_done(self, task: str, name: str, started: float | None) -> None:
        self.done += 1
        if started is not None:
            self.computed += 1
            self.seconds += time.monotonic() - started
        left = max(self.total - self.done, 0)
        estimate = f"; about {left * self.seconds / self.computed / 60:.1f} min left" if self.computed and left else ""
        how = "reused" if started is None else f"{time.monotonic() - started:.0f} s"
        of = f" of {self.total}" if self.total else ""
        logger.info("sweep point %d%s done: %s, %s (%s)%s", self.done, of, task, name, how, estimate)


@dataclass
class Session:
    """What one sweep or frontier loads once."""

    config: Any  # SweepConfig or FrontierConfig: a TaskScoringConfig with out and tasks
    out: Path
    model: Any
    tokenizer: Any
    tasks: list[str]  # names of the perplexity units (the ND-PPL study's tasks)
    selectors: tuple[str, ...] = POINT_SELECTORS  # config fields that choose points, not a point's number
    lm: Any = None  # KVCoreHFLM, built on first use
    progress: Progress = field(default_factory=Progress)
    units: dict[str, Unit] = field(default_factory=dict)  # every task at every length, by name
    task_metadata: dict[str, Any] = field(default_factory=dict)  # what every task is handed (`open_units`)
    used: set[Path] = field(default_factory=set)  # the points this run read or wrote
    loaded: dict[str, Any] = field(default_factory=dict)  # unit name -> its lm-eval task, built once (`loaded_task`)


def unit_metadata(session: Session, unit: Unit) -> dict[str, Any]:
    """What lm-eval hands the unit's task: every record, the model's tokenizer, --metadata and the unit's length."""
    length = {"max_seq_lengths": [unit.length]} if unit.length is not None else {}
    return {**session.task_metadata, **length}


def point_metadata(session: Session, unit: Unit) -> dict[str, Any]:
    """The part of a unit's task metadata that the run's identity does not hold already: --metadata (without its
    max_seq_lengths) and the unit's own length."""
    length = {"max_seq_lengths": [unit.length]} if unit.length is not None else {}
    return {**session.config.task_metadata(), **length}


def unit_manager(session: Session, unit: Unit):
    """The TaskManager that loads the unit's task as it is scored (its metadata: tokenizer, --metadata, length)."""
    from kvcore_eval.harness.lm_tasks import task_manager

    return task_manager(session.config.data_dir, split_paths(session.config.include_path), unit_metadata(session, unit))


def loaded_task(session: Session, unit: Unit):
    """The unit's lm-eval task, built once per run: a generated task (RULER) draws its documents when it loads (500
    of them), so every point reuses one build, loaded under the seeds simple_evaluate sets (the same documents)."""
    from kvcore_eval.calibration.data import leaf_tasks
    from kvcore_eval.harness.lm_tasks import load_as_evaluated

    if unit.name not in session.loaded:
        (session.loaded[unit.name],) = leaf_tasks(load_as_evaluated(unit_manager(session, unit), [unit.task]))
    return session.loaded[unit.name]


def task_calibration(session: Session, task: str) -> Path:
    """The task's own calibration on its held-out documents (reused when made with the same settings); `task` is a
    unit name (a RULER task at one length is calibrated on documents of that length)."""
    from kvcore_eval.calibration import artifact
    from kvcore_eval.calibration.calibrate import calibrate

    config = session.config
    unit = session.units[task]
    # what the scoring hands the task beyond what calibrate adds itself (every record, the model's tokenizer)
    metadata = point_metadata(session, unit)
    wanted = CalibrationConfig(
        model=config.model,
        gguf_file=config.gguf_file,
        dataset=f"lm_eval:{unit.task}",
        skip_docs=config.num_samples,
        metadata=json.dumps(metadata, sort_keys=True) if metadata else None,
        include_path=config.include_path,
        data_dir=config.data_dir,
        max_tokens=config.calibration_tokens,
        # a task at a context length is calibrated in windows of that length: its bases see keys at every position
        # it is scored at (a 4k document cut in 256-token windows never shows position 300)
        seq_len=max(config.seq_len, unit.length or 0),
        device=config.device,
        dtype=config.dtype,
        out=str(session.out / "calibrations" / task),
    )
    out = Path(wanted.out)
    if (out / artifact.METADATA_FILE).exists():
        made = outputs.read_json(out / outputs.CONFIG_FILE, "calibration settings")
        wanted_identity = identity(wanted)
        if differences := identity_differences({k: made.get(k) for k in wanted_identity}, wanted_identity):
            raise ValueError(
                f"{out} was calibrated with other settings ({'; '.join(differences)}): "
                "use another --out, or delete that folder to recalibrate"
            )
        return out
    wanted.resume = (out / "checkpoint").exists()
    return calibrate(wanted, model=session.model, tokenizer=session.tokenizer)


def _truncation(session: Session, basis: Path, key_rank: Any, value_rank: Any, truncate: str):
    """One point's truncation: the sweep's shared options with this point's basis and ranks."""
    return dataclasses.replace(
        session.config.truncation,
        calibration=str(basis),
        key_rank=key_rank,
        value_rank=value_rank,
        truncate=truncate,
        overlap="warn" if session.config.allow_overlap else "refuse",
    )


def point_settings(session: Session, task: str, truncation, documents: list[int] | None, metric: str) -> dict[str, Any]:
    """Everything that changes a point's number: a saved point is reused only when all of it is equal."""
    from kvcore_eval.calibration.artifact import read_metadata

    unit = session.units[task]
    settings = {
        "task": unit.task,
        "sweep": identity(session.config, exclude=session.selectors),
        "truncation": identity(truncation),
        "basis_sha256": read_metadata(truncation.calibration)["basis_sha256"],
        "documents": documents,
        "metric": metric,
    }
    # what else sets the unit's number
    settings.update({"length": unit.length} if unit.length is not None else {})
    settings.update({"metadata": metadata} if (metadata := session.config.task_metadata()) else {})
    settings.update({"gen_kwargs": gen} if unit.generation and (gen := session.config.gen_kwargs) else {})
    if truncation.sensitivity is not None:  # the table's content, not its path, sets the plan
        from kvcore_eval.model.models import file_sha256

        settings["sensitivity_sha256"] = file_sha256(str(truncation.sensitivity))
    return settings


def evaluate_point(
    session: Session, task: str, name: str, truncation, documents: list[int] | None = None, metric: str | None = None
) -> float:
    """`metric` (default: the unit's own) of one task under one truncation; see `run_point`."""
    return run_point(session, task, name, truncation, documents, metric)["value"]


def use_truncation(session: Session, truncation) -> Any:
    """The session's one KVCoreHFLM (built on first use) with `truncation` in place."""
    from kvcore_eval.harness.wrapper import KVCoreHFLM

    if session.lm is None:
        session.lm = KVCoreHFLM(
            pretrained=session.model,
            tokenizer=session.tokenizer,
            batch_size=session.config.batch_size,
            **asdict(truncation),
        )
    else:
        session.lm.set_truncation(truncation)
    return session.lm


def run_point(
    session: Session, task: str, name: str, truncation, documents: list[int] | None = None, metric: str | None = None
) -> dict[str, Any]:
    """One task under one truncation, over its first num_samples documents (or the lm-eval doc ids `documents`):
    the metric, every metric, each document's own value and the cache's bytes per token. A finished point of the
    same settings is reused; other settings are an error."""
    import lm_eval

    from kvcore_eval.harness.documents import per_document_counts, per_document_values

    config = session.config
    unit = session.units[task]
    metric = metric or unit.metric
    path = session.out / "points" / task / f"{name}.json"
    session.used.add(path)
    # the plan the truncation resolves to is part of the identity: a budget spent by other rules is another point
    settings = {
        **point_settings(session, task, truncation, documents, metric),
        "rank_plan": use_truncation(session, truncation).kvcore_plan.to_dict(),
    }
    if path.exists():
        saved = outputs.read_json(path, "sweep point")
        if differences := identity_differences(saved["settings"], settings):
            raise ValueError(
                f"{path} was run with other settings ({'; '.join(differences)}): use another --out, "
                "or delete it to rerun"
            )
        session.progress.point_done(task, name, None)
        return saved
    started = time.monotonic()
    scored = unit.task  # the lm-eval task
    chosen = {"samples": {scored: documents}} if documents is not None else {"limit": config.num_samples}
    if unit.generation and config.gen_kwargs:
        chosen["gen_kwargs"] = config.gen_kwargs
    tasks = [loaded_task(session, unit)] if unit.generation else [scored]
    results = lm_eval.simple_evaluate(
        model=session.lm, tasks=tasks, task_manager=unit_manager(session, unit), log_samples=True, **chosen
    )
    values = {key.split(",")[0]: value for key, value in results["results"][scored].items()}
    if metric not in values:
        raise ValueError(
            f"{task} reports no {metric!r} (it reports {', '.join(sorted(values))}): pass another --metric"
        )
    samples = results["samples"][scored]
    record = {
        "settings": settings,
        "value": float(values[metric]),
        "rank_plan": session.lm.kvcore_plan.to_dict(),
        "metrics": values,
        "per_document": {str(k): v for k, v in per_document_values(samples, metric).items()},
        "per_document_weight": {str(k): v for k, v in (per_document_counts(samples, metric) or {}).items()},
        "per_document_loglikelihood": document_loglikelihoods(samples, metric),
        "cache_bytes_per_token": session.lm.kvcore_cache_bytes,
        # what the evaluation's caches held, per cached position (kvcore_hf's measurement, where it has one)
        "measured_cache_bytes": getattr(session.lm, "kvcore_measured_bytes", lambda: None)(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    record["calibration_overlap"] = session.lm.get_model_info()["kvcore"]["calibration_overlap"].get(scored)
    outputs.atomic_write_json(path, record)
    session.progress.point_done(task, name, started)
    return record


def document_loglikelihoods(samples: list[dict[str, Any]], metric: str) -> dict[str, list[float]] | None:
    """doc_id -> [loglikelihood, count] of a weighted-perplexity metric (what a paired bootstrap resamples); None for
    other metrics (`documents.WEIGHTED_PERPLEXITIES`)."""
    from kvcore_eval.harness.documents import WEIGHTED_PERPLEXITIES

    if metric not in WEIGHTED_PERPLEXITIES:
        return None
    pairs = {str(s["doc_id"]): s[metric] for s in samples}
    if not all(isinstance(v, list | tuple) and len(v) == 2 for v in pairs.values()):
        return None
    return {doc: [float(ll), float(count)] for doc, (ll, count) in sorted(pairs.items(), key=lambda i: int(i[0]))}


def nd_ppl_interval(point: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float] | None:
    """The paired bootstrap interval over documents of a point's ND-PPL against its baseline (None for points
    written without per-document log-likelihoods, a metric that is not a weighted perplexity, or one document: its
    resamples are all that document, an interval of zero width that would read as certainty)."""
    truncated, full = point.get("per_document_loglikelihood"), baseline.get("per_document_loglikelihood")
    if truncated is None or full is None or len(full) < 2:
        return None
    return metrics.paired_bootstrap_nd_ppl(truncated, full)


def claim_and_load(config, kind: str, own_names: tuple[str, ...]) -> tuple[Path, Any]:
    """After every check: claim the output folder (config.json), then load the model."""
    from kvcore_eval.model import models

    out = Path(config.out)
    outputs.check_run_folder(out, kind, own_names)
    out.mkdir(parents=True, exist_ok=True)
    outputs.write_config(out, kind, asdict(config))
    model_id, gguf_file = models.gguf_location(config.model, config.gguf_file)
    model = models.load_causal_lm(model_id, None, models.resolve_device(config.device), config.dtype, gguf_file)
    return out, model


def open_units(
    config,
    kind: str = KIND,
    own_names: tuple[str, ...] = OWN_NAMES,
    selectors: tuple[str, ...] = POINT_SELECTORS,
    per_task: bool = True,
    check: Callable[[list[Unit], Callable[[int | None], Any]], None] | None = None,
) -> Session:
    """A session over the units of `config.tasks` (each task at each length, with its metric), every option checked
    against the tasks (metrics in their metric_list, document counts where each task is calibrated on its own held-out
    documents: `per_task`, and `check(units, manager_for)`) before the output folder is claimed or the model loads.
    Only the tokenizer loads first: tasks that build their documents (RULER) need it. `config` is a
    TaskScoringConfig with an `out` and `tasks`; `selectors` are its fields that choose which points run rather than
    what a point's number is."""
    from kvcore_eval.harness.lm_tasks import task_manager, tokenizer_metadata
    from kvcore_eval.model import models

    model_id, gguf_file = models.gguf_location(config.model, config.gguf_file)
    tokenizer = models.load_tokenizer(model_id, None, gguf_file)
    # what `lm_eval --model_args pretrained=... --metadata ...` hands every task, as in calibrate
    metadata = {**TASK_METADATA, **tokenizer_metadata(model_id, gguf_file, tokenizer), **config.task_metadata()}

    def manager_for(length: int | None):
        lengths = {"max_seq_lengths": [length]} if length is not None else {}
        return task_manager(config.data_dir, split_paths(config.include_path), {**metadata, **lengths})

    units = task_units(config, manager_for, per_task)
    if check is not None:
        check(list(units.values()), manager_for)
    out, model = claim_and_load(config, kind, own_names)
    perplexity = [name for name, unit in units.items() if unit.perplexity]
    session = Session(config, out, model, tokenizer, perplexity, selectors)
    session.units, session.task_metadata = units, metadata
    return session


def open_sweep(config: SweepConfig) -> Session:
    """The sweep's session: its units, the kinds truncated and a shared basis's overlap checked first."""

    def check(units: list[Unit], manager_for: Callable[[int | None], Any]) -> None:
        check_kinds(config, units)
        if config.basis_scope == "shared":
            from kvcore_eval.calibration.artifact import read_metadata

            read_metadata(config.truncation.calibration)  # an artifact is there, in a format this version reads
            if not config.allow_overlap:
                check_shared_overlap(config, units, manager_for)

    return open_units(config, per_task=config.basis_scope == "per-task", check=check)


def check_shared_overlap(config: SweepConfig, units: list[Unit], manager_for: Callable[[int | None], Any]) -> None:
    """Before any model loads: refuse a shared calibration that saw documents the sweep scores."""
    import itertools

    from kvcore_eval.calibration import data, overlap
    from kvcore_eval.calibration.artifact import load_calibration

    shared = config.truncation.calibration
    digests = load_calibration(shared, eigenvectors=False).document_digests
    if digests is None:
        logger.warning("%s records no document digests: its overlap with the scored documents is unknown", shared)
        return
    for unit in units:
        metadata = manager_for(unit.length).metadata  # as the evaluation hands it to the task
        scored = data.lm_eval_task_documents(unit.task, 0, config.data_dir, split_paths(config.include_path), metadata)
        seen, count = overlap.documents_seen(digests, itertools.islice(scored, config.num_samples))
        if seen:
            raise ValueError(
                f"--calibration {shared} saw {seen} of the {count} documents of {unit.name} the sweep scores: "
                "its numbers would be in-sample (optimistic). Use --basis-scope per-task, calibrate the shared basis "
                "on other documents, or pass --allow-overlap"
            )


def task_document_ner(session: Session, task: str) -> list[dict[str, Any]]:
    """Each scored document's own NER per layer (K in config.key_space, V), saved in documents/<task>.json and
    reused when made with the same settings."""
    import itertools

    from kvcore_eval.calibration.data import lm_eval_task_documents
    from kvcore_eval.harness.documents import document_ner

    config = session.config
    path = session.out / "documents" / f"{task}.json"
    settings = {"task": task, "run": identity(config, exclude=session.selectors)}
    unit = session.units[task]
    if metadata := point_metadata(session, unit):
        settings["metadata"] = metadata
    if path.exists():
        saved = outputs.read_json(path, "per-document NER")
        if saved["settings"] == settings:
            return saved["documents"]
    scored = lm_eval_task_documents(
        unit.task, 0, config.data_dir, split_paths(config.include_path), unit_metadata(session, unit)
    )
    texts = [prompt + response for prompt, response in itertools.islice(scored, config.num_samples)]
    rows = [
        {"doc_id": doc_id, **row}
        for doc_id, row in enumerate(document_ner(session.model, session.tokenizer, texts, config.truncation.key_space))
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    outputs.atomic_write_json(path, {"settings": settings, "documents": rows})
    return rows


def run_sweep(config: SweepConfig) -> dict[str, Any]:
    from kvcore_eval.model import models

    session = open_sweep(config)
    units = session.units
    calibrations = {name: task_calibration(session, name) for name in units}
    layers = models.kv_geometry(session.model.config).num_layers
    below_full = [rank for rank in config.rank_list() if rank < 1]
    session.progress.total = len(session.tasks) * (
        1 + len(config.rank_list()) + (2 * layers if config.per_layer else 0)
    ) + (len(units) - len(session.tasks)) * (1 + len(config.truncate_kinds()) * len(below_full))
    basis = {
        name: Path(config.truncation.calibration) if config.basis_scope == "shared" else calibrations[name]
        for name in units
    }
    design = {
        **asdict(config),
        "model_name": Path(config.model).name or config.model,
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
    from kvcore_eval.analysis.report import layer_table, mean_ner
    from kvcore_eval.calibration.artifact import load_calibration

    config, tasks = session.config, session.tasks
    (kind,) = config.truncate_kinds()  # check_kinds refuses several kinds with perplexity tasks
    baseline_points = {
        task: run_point(session, task, "baseline", _truncation(session, basis[task], "full", "full", "both"))
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
    return _truncation(session, basis, spec if keys else None, spec if values else None, kind)


def run_accuracy(session: Session, units: list[Unit], basis: dict[str, Path], design: dict[str, Any]) -> dict:
    """Each unit's own metric at full rank (the baseline: kvcore_hf at full rank is `hf`) and at every rank below it
    for every --truncate kind."""
    from kvcore_eval.analysis import accuracy

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


def run_positions(session: Session, basis: dict[str, Path]) -> dict[str, Any]:
    """ND-PPL by position bucket for each rolling perplexity task, at each rank of the study's kind."""
    from kvcore_eval.analysis import positions

    config = session.config
    (kind,) = config.truncate_kinds()
    rolling = [name for name in session.tasks if session.units[name].output_type == "loglikelihood_rolling"]
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
    import itertools
    import math

    from kvcore_eval.analysis import positions
    from kvcore_eval.calibration.data import leaf_tasks
    from kvcore_eval.harness.lm_tasks import load_as_evaluated

    point = outputs.read_json(session.out / "points" / task / f"{name}.json", "sweep point")  # the study's
    path = session.out / "positions" / task / f"{name}.json"
    lm = use_truncation(session, truncation)
    edges = positions.parse_edges(session.config.position_buckets, lm.max_length)
    settings = {**point["settings"], "edges": edges, "max_length": lm.max_length}
    if path.exists() and (saved := outputs.read_json(path, "position table"))["settings"] == settings:
        return saved["positions"]
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
    return result


def left_out_points(session: Session) -> list[str]:
    """Finished points in the output folder (of an earlier run) that this run neither read nor wrote."""
    folder = session.out / "points"
    found = sorted(folder.glob("*/*.json")) if folder.is_dir() else []
    return [str(path.relative_to(session.out)) for path in found if path not in session.used]


def write_summary(session: Session, summary: dict[str, Any], final: bool = True) -> None:
    """sweep.json, sweep.md and the figures of what the run holds; finished points it left out are named (and,
    once the run is done, `final`, logged)."""
    from kvcore_eval.analysis import accuracy, positions

    out = session.out
    summary["left_out"] = left_out_points(session)
    sections = [study.to_markdown(summary)] if session.tasks else [f"# Sweep: {summary['design']['model']}\n"]
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


def layer_nd_ppl(
    session: Session,
    basis: Path,
    rank: int,
    num_layers: int,
    baseline: float,
    evaluate: Callable[[str, Any], float],
) -> dict[str, list[float]]:
    """Per kind ("key", "value"): each layer's ND-PPL with only that layer's keys (values) truncated to `rank`
    dimensions; `evaluate(name, truncation)` gives the perplexity (the sweep: lm-eval on the scored documents)."""
    width = load_width(basis)
    nd_ppl = {}
    for kind in ("key", "value"):
        values = []
        for layer in range(num_layers):
            ranks = ":".join(str(rank if i == layer else width) for i in range(num_layers))
            truncation = _truncation(
                session,
                basis,
                ranks if kind == "key" else None,
                ranks if kind == "value" else None,
                "keys" if kind == "key" else "values",
            )
            values.append(metrics.nd_ppl(evaluate(f"layer{layer}_{kind}_{rank}", truncation), baseline))
        nd_ppl[kind] = values
    return nd_ppl


def load_width(basis: Path) -> int:
    from kvcore_eval.calibration.artifact import read_metadata
    from kvcore_eval.model.models import KVGeometry

    return KVGeometry(**read_metadata(basis)["model"]["geometry"]).width


def task_residual_energy(own: Path, basis: Path, space: str, rank: int, layers: int) -> list[float]:
    """Per layer, the fraction of the task's own energy tr(G_t) outside the basis used: Σ_{i>r} λ_i of its own
    spectrum when the basis is its own; (tr G_t − tr P_rᵀ G_t P_r) / tr G_t under another (--basis shared)."""
    from kvcore_eval.calibration.artifact import load_calibration

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
    from kvcore_eval.calibration.artifact import load_calibration

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
