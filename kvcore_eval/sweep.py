"""`kvcore-eval sweep`: ND-PPL per task and rank, NER per task, and how well NER predicts ND-PPL.

One model load: the model is loaded once and shared by every per-task calibration and by one `kvcore_hf`
whose rank plan is swapped between points (`KVCoreHFLM.set_truncation`).

Per task, lm-eval scores the first `num_samples` documents; the task's calibration reads only the documents
after them (`lm_eval:<task>`, `skip_docs`), so calibration and evaluation are disjoint, for kvcore's tasks and
for a user's own (`--include-path`) alike. That calibration gives the task's NER and, with `--basis-scope per-task`
(the default), the bases that truncate it; `--basis-scope shared` truncates every task with one `--calibration`.

Every finished point (`points/<task>/<name>.json`) and calibration (`calibrations/<task>/`) is reused by a rerun
after checking the settings that made it; other settings are an error. `--per-layer` adds each layer's ND-PPL
with only that layer truncated. Outputs: sweep.json/.md, nd_ppl.png, ner_vs_nd_ppl.png (+ per_layer.*).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvcore_eval import metrics, outputs, study
from kvcore_eval.config import CalibrationConfig, SweepConfig, identity, identity_differences, split_paths
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
)
# Every record of a kvcore task, in its seeded order: the sweep scores the first num_samples (--limit) and
# calibrates on the rest.
TASK_METADATA = {"num_samples": None}
# Fields of a sweep's configuration that choose which points run, not what a point's number is.
POINT_SELECTORS = ("tasks", "ranks", "per_layer", "per_layer_rank")


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
    """What one sweep loads once."""

    config: SweepConfig
    out: Path
    manager: Any  # lm-eval TaskManager
    model: Any
    tokenizer: Any
    tasks: list[str]  # the leaf perplexity tasks of config.tasks
    selectors: tuple[str, ...] = POINT_SELECTORS  # config fields that choose points, not a point's number
    lm: Any = None  # KVCoreHFLM, built on first use
    progress: Progress = field(default_factory=Progress)


def perplexity_tasks(config: SweepConfig, manager) -> list[str]:
    """The leaf tasks of `config.tasks`; generation tasks are refused before anything runs."""
    from kvcore_eval.data import leaf_tasks

    names = [t.strip() for t in config.tasks.split(",") if t.strip()]
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"--tasks {', '.join(unknown)}: not a task or group lm-eval knows; pass its folder with --include-path"
        )
    tasks = list(leaf_tasks(manager.load_task_or_group(names)))
    if generating := [t.config.task for t in tasks if t.config.output_type == "generate_until"]:
        raise ValueError(
            f"--tasks {', '.join(generating)}: generation tasks have no perplexity; the sweep needs perplexity tasks "
            "(kvcore_alpaca, ...). Score generations with lm_eval and `kvcore-eval judge`"
        )
    found = sorted({t.config.task for t in tasks})
    for task in found:  # each names folders under --out (calibrations/<task>, points/<task>)
        outputs.check_path_component(task, "task name")
    return found


def task_calibration(session: Session, task: str) -> Path:
    """The task's own calibration on its held-out documents (reused when made with the same settings)."""
    from kvcore_eval import artifact
    from kvcore_eval.calibrate import calibrate

    config = session.config
    wanted = CalibrationConfig(
        model=config.model,
        gguf_file=config.gguf_file,
        dataset=f"lm_eval:{task}",
        skip_docs=config.num_samples,
        include_path=config.include_path,
        data_dir=config.data_dir,
        max_tokens=config.calibration_tokens,
        seq_len=config.seq_len,
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
    from kvcore_eval.artifact import read_metadata

    settings = {
        "task": task,
        "sweep": identity(session.config, exclude=session.selectors),
        "truncation": identity(truncation),
        "basis_sha256": read_metadata(truncation.calibration)["basis_sha256"],
        "documents": documents,
        "metric": metric,
    }
    if truncation.sensitivity is not None:  # the table's content, not its path, sets the plan
        from kvcore_eval.models import file_sha256

        settings["sensitivity_sha256"] = file_sha256(str(truncation.sensitivity))
    return settings


def evaluate_point(
    session: Session, task: str, name: str, truncation, documents: list[int] | None = None, metric: str | None = None
) -> float:
    """`metric` (default config.metric) of one task under one truncation; see `run_point`."""
    return run_point(session, task, name, truncation, documents, metric)["value"]


def use_truncation(session: Session, truncation) -> Any:
    """The session's one KVCoreHFLM (built on first use) with `truncation` in place."""
    from kvcore_eval.wrapper import KVCoreHFLM

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

    from kvcore_eval.documents import per_document_counts, per_document_values

    config = session.config
    metric = metric or config.metric
    path = session.out / "points" / task / f"{name}.json"
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
    chosen = {"samples": {task: documents}} if documents is not None else {"limit": config.num_samples}
    results = lm_eval.simple_evaluate(
        model=session.lm, tasks=[task], task_manager=session.manager, log_samples=True, **chosen
    )
    values = {key.split(",")[0]: value for key, value in results["results"][task].items()}
    if metric not in values:
        raise ValueError(
            f"{task} reports no {metric!r} (it reports {', '.join(sorted(values))}): pass another --metric"
        )
    samples = results["samples"][task]
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
    record["calibration_overlap"] = session.lm.get_model_info()["kvcore"]["calibration_overlap"].get(task)
    outputs.atomic_write_json(path, record)
    session.progress.point_done(task, name, started)
    return record


def document_loglikelihoods(samples: list[dict[str, Any]], metric: str) -> dict[str, list[float]] | None:
    """doc_id -> [loglikelihood, count] of a weighted-perplexity metric (what a paired bootstrap resamples); None for
    other metrics."""
    pairs = {str(s["doc_id"]): s[metric] for s in samples}
    if not all(isinstance(v, list | tuple) and len(v) == 2 for v in pairs.values()):
        return None
    return {doc: [float(ll), float(count)] for doc, (ll, count) in sorted(pairs.items(), key=lambda i: int(i[0]))}


def nd_ppl_interval(point: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float] | None:
    """The paired bootstrap interval over documents of a point's ND-PPL against its baseline (None for points
    written without per-document log-likelihoods, or a metric that is not a weighted perplexity)."""
    truncated, full = point.get("per_document_loglikelihood"), baseline.get("per_document_loglikelihood")
    if truncated is None or full is None:
        return None
    return metrics.paired_bootstrap_nd_ppl(truncated, full)


def open_session(
    config,
    kind: str = KIND,
    own_names: tuple[str, ...] = OWN_NAMES,
    check: Callable[[Any, list[str]], None] | None = None,
    selectors: tuple[str, ...] = POINT_SELECTORS,
) -> Session:
    """Check everything that needs no model (and `check(manager, tasks)`), claim the output folder, then load the
    model once. `config` is a SweepConfig or a config with the same fields (the frontier's); `selectors` are its
    fields that choose which points run rather than what a point's number is."""
    from kvcore_eval import models
    from kvcore_eval.lm_tasks import task_manager

    out = Path(config.out)
    manager = task_manager(config.data_dir, split_paths(config.include_path), TASK_METADATA)
    tasks = perplexity_tasks(config, manager)  # refuses unknown and generation tasks before any output
    if getattr(config, "basis_scope", None) == "shared" and not config.allow_overlap:
        check_shared_overlap(config, tasks)
    if check is not None:
        check(manager, tasks)
    outputs.check_run_folder(out, kind, own_names)
    out.mkdir(parents=True, exist_ok=True)
    outputs.write_config(out, kind, asdict(config))
    model_id, gguf_file = models.gguf_location(config.model, config.gguf_file)
    model = models.load_causal_lm(model_id, None, models.resolve_device(config.device), config.dtype, gguf_file)
    tokenizer = models.load_tokenizer(model_id, None, gguf_file)
    return Session(config, out, manager, model, tokenizer, tasks, selectors)


def check_shared_overlap(config: SweepConfig, tasks: list[str]) -> None:
    """Before any model loads: refuse a shared calibration that saw documents the sweep scores."""
    import itertools

    from kvcore_eval import data, overlap
    from kvcore_eval.artifact import load_calibration

    shared = config.truncation.calibration
    digests = load_calibration(shared, eigenvectors=False).document_digests
    if digests is None:
        logger.warning("%s records no document digests: its overlap with the scored documents is unknown", shared)
        return
    for task in tasks:
        scored = data.lm_eval_task_documents(task, 0, config.data_dir, split_paths(config.include_path))
        seen, count = overlap.documents_seen(digests, itertools.islice(scored, config.num_samples))
        if seen:
            raise ValueError(
                f"--calibration {shared} saw {seen} of the {count} documents of {task} the sweep scores: "
                "its ND-PPL would be in-sample (optimistic). Use --basis-scope per-task, calibrate the shared basis on "
                "other documents, or pass --allow-overlap"
            )


def task_document_ner(session: Session, task: str) -> list[dict[str, Any]]:
    """Each scored document's own NER per layer (K in config.key_space, V), saved in documents/<task>.json and
    reused when made with the same settings."""
    import itertools

    from kvcore_eval.data import lm_eval_task_documents
    from kvcore_eval.documents import document_ner

    config = session.config
    path = session.out / "documents" / f"{task}.json"
    settings = {"task": task, "run": identity(config, exclude=session.selectors)}
    if path.exists():
        saved = outputs.read_json(path, "per-document NER")
        if saved["settings"] == settings:
            return saved["documents"]
    scored = lm_eval_task_documents(task, 0, config.data_dir, split_paths(config.include_path))
    texts = [prompt + response for prompt, response in itertools.islice(scored, config.num_samples)]
    rows = [
        {"doc_id": doc_id, **row}
        for doc_id, row in enumerate(document_ner(session.model, session.tokenizer, texts, config.truncation.key_space))
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    outputs.atomic_write_json(path, {"settings": settings, "documents": rows})
    return rows


def run_sweep(config: SweepConfig) -> dict[str, Any]:
    from kvcore_eval import models
    from kvcore_eval.artifact import load_calibration
    from kvcore_eval.report import layer_table, mean_ner

    session = open_session(config)
    tasks = session.tasks
    calibrations = {task: task_calibration(session, task) for task in tasks}
    layers = models.kv_geometry(session.model.config).num_layers
    session.progress.total = len(tasks) * (1 + len(config.rank_list()) + (2 * layers if config.per_layer else 0))
    basis = {
        task: Path(config.truncation.calibration) if config.basis_scope == "shared" else calibrations[task]
        for task in tasks
    }
    baseline_points = {
        task: run_point(session, task, "baseline", _truncation(session, basis[task], "full", "full", "both"))
        for task in tasks
    }
    baseline = {task: point["value"] for task, point in baseline_points.items()}
    truncation = config.truncation
    keys, values = truncation.truncates_keys, truncation.truncates_values
    perplexity, per_document, intervals = {}, {}, {}
    for rank in config.rank_list():
        spec = "full" if rank == 1 else str(rank)
        points = {
            task: run_point(
                session,
                task,
                f"rank_{rank:g}",
                _truncation(
                    session, basis[task], spec if keys else None, spec if values else None, truncation.truncate
                ),
            )
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
    design = {
        **asdict(config),
        "model_name": Path(config.model).name or config.model,
        "basis_per_task": {task: str(path) for task, path in basis.items()},
    }
    summary = study.summarize(tasks, baseline, perplexity, ner, design)
    summary["nd_ppl_interval"] = intervals
    documents = {task: task_document_ner(session, task) for task in tasks}
    summary["documents"], summary["correlation"]["across_documents"] = study.summarize_documents(
        documents, per_document
    )
    outputs.atomic_write_json(session.out / "sweep.json", summary)
    outputs.atomic_write_text(session.out / "sweep.md", study.to_markdown(summary))
    study.plot_nd_ppl(summary, session.out / "nd_ppl.png")
    study.plot_ner_vs_nd_ppl(summary, session.out / "ner_vs_nd_ppl.png")
    if config.per_layer:
        summary["per_layer"] = run_per_layer(session, tasks, basis, baseline_points, tables, calibrations)
    return summary


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
    from kvcore_eval.artifact import read_metadata
    from kvcore_eval.models import KVGeometry

    return KVGeometry(**read_metadata(basis)["model"]["geometry"]).width


def task_residual_energy(own: Path, basis: Path, space: str, rank: int, layers: int) -> list[float]:
    """Per layer, the fraction of the task's own energy tr(G_t) outside the basis used: Σ_{i>r} λ_i of its own
    spectrum when the basis is its own; (tr G_t − tr P_rᵀ G_t P_r) / tr G_t under another (--basis shared)."""
    from kvcore_eval.artifact import load_calibration

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
    from kvcore_eval.artifact import load_calibration

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
