"""One sweep's or frontier's session: what they load once and how they score a point, the machinery both stand on.

`open_units` checks every option against the tasks (metrics in their metric_list, document counts), claims the output
folder and loads the model once; `task_calibration` gives each unit its calibration on its held-out documents (those
after the scored ones); `run_point` scores one unit under one truncation through lm-eval with the session's one
`kvcore_hf` (its plan swapped by `use_truncation`), saving the point and reusing it when its settings are equal;
`nd_ppl_interval` is a point's paired bootstrap interval against its baseline; `task_document_ner` each scored
document's own NER; `layer_nd_ppl` each layer's ND-PPL truncated alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lm_eval

from kvcore_eval import metrics, outputs
from kvcore_eval.calibration import artifact
from kvcore_eval.calibration.artifact import read_metadata
from kvcore_eval.calibration.calibrate import calibrate
from kvcore_eval.compression import bases
from kvcore_eval.compression.methods import BASES
from kvcore_eval.config import ADDED_DEFAULTS, CalibrationConfig, identity, identity_differences, split_paths
from kvcore_eval.harness.documents import document_ner, per_document_counts, per_document_values
from kvcore_eval.harness.lm_tasks import (
    ALL_RECORDS,
    check_continuations_fit,
    leaf_tasks,
    lm_eval_task_documents,
    load_as_evaluated,
    task_manager,
    tokenizer_metadata,
    without_warning,
)
from kvcore_eval.harness.units import Unit, task_units
from kvcore_eval.harness.wrapper import KVCoreHFLM
from kvcore_eval.metrics import WEIGHTED_PERPLEXITIES
from kvcore_eval.model import models

logger = logging.getLogger(__name__)


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
        logger.info("point %d%s done: %s, %s (%s)%s", self.done, of, task, name, how, estimate)


@dataclass
class Session:
    """What one sweep or frontier loads once."""

    config: Any  # SweepConfig or FrontierConfig: a TaskScoringConfig with out and tasks
    out: Path
    model: Any
    tokenizer: Any
    tasks: list[str]  # names of the perplexity units (the ND-PPL study's tasks)
    lm: Any = None  # KVCoreHFLM, built on first use
    progress: Progress = field(default_factory=Progress)
    units: dict[str, Unit] = field(default_factory=dict)  # every task at every length, by name
    task_metadata: dict[str, Any] = field(default_factory=dict)  # what every task is handed (`open_units`)
    used: set[Path] = field(default_factory=set)  # the points this run read or wrote
    loaded: dict[str, Any] = field(default_factory=dict)  # unit name -> its lm-eval task, built once (`loaded_task`)

    @property
    def model_dtype(self) -> str:
        """The dtype the model loaded in: `--dtype` resolved (auto: the model's own on a GPU, float32 on the CPU)."""
        return models.dtype_name(self.model.dtype)


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
    return task_manager(session.config.data_dir, split_paths(session.config.include_path), unit_metadata(session, unit))


def loaded_task(session: Session, unit: Unit):
    """The unit's lm-eval task, built once per run: a generated task (RULER) draws its documents when it loads (500
    of them), so every point reuses one build, loaded under the seeds simple_evaluate sets (the same documents)."""
    if unit.name not in session.loaded:
        (session.loaded[unit.name],) = leaf_tasks(load_as_evaluated(unit_manager(session, unit), [unit.task]))
    return session.loaded[unit.name]


def task_calibration(session: Session, task: str) -> Path:
    """The task's own calibration on its held-out documents (reused when made with the same settings); `task` is a
    unit name (a RULER task at one length is calibrated on documents of that length)."""
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
        dtype=session.model_dtype,  # what --dtype resolved to: a calibration in another dtype is not reused
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


def point_truncation(session: Session, basis: Path, key_rank: Any, value_rank: Any, truncate: str):
    """One point's truncation: the sweep's shared options with this point's basis and ranks."""
    return dataclasses.replace(
        session.config.truncation,
        calibration=str(basis),
        key_rank=key_rank,
        value_rank=value_rank,
        truncate=truncate,
        overlap="warn" if session.config.allow_overlap else "refuse",
    )


@functools.cache
def seeded_basis_sha256(builder: str, geometry: models.KVGeometry, seed: int) -> str:
    """The content of a basis built from a seed (`BasisSource.seeded`), which no artifact records: a point made by a
    build that has since changed (a fix to how it is drawn) is then not taken for this one's."""
    built = getattr(bases, builder)(geometry, seed)
    digest = hashlib.sha256()
    for space in sorted(built.eigenvectors):
        digest.update(built.eigenvectors[space].contiguous().numpy().tobytes())
    return digest.hexdigest()


def point_settings(session: Session, task: str, truncation, documents: list[int] | None, metric: str) -> dict[str, Any]:
    """Everything that changes a point's number: a saved point is reused only when all of it is equal."""
    unit = session.units[task]
    settings = {
        "task": unit.task,
        "run": identity(session.config, exclude=session.config.selectors),
        "truncation": identity(truncation),
        "basis_sha256": read_metadata(truncation.calibration)["basis_sha256"],
        "documents": documents,
        "metric": metric,
    }
    # what else sets the unit's number
    settings.update({"length": unit.length} if unit.length is not None else {})
    settings.update({"metadata": metadata} if (metadata := session.config.task_metadata()) else {})
    settings.update({"gen_kwargs": gen} if unit.generation and (gen := session.config.gen_kwargs) else {})
    if (builder := BASES[truncation.basis].seeded) is not None:  # built by code, not read from an artifact
        geometry = models.kv_geometry(session.model.config)
        settings["seeded_basis_sha256"] = seeded_basis_sha256(builder, geometry, truncation.basis_seed)
    if truncation.sensitivity is not None:  # the table's content, not its path, sets the plan
        settings["sensitivity_sha256"] = models.file_sha256(str(truncation.sensitivity))
    return settings


def use_truncation(session: Session, truncation) -> Any:
    """The session's one KVCoreHFLM (built on first use) with `truncation` in place."""
    if session.lm is None:
        # lm-eval warns that a model object must not be launched via accelerate: one process here, nothing launched
        with without_warning("lm_eval.models.huggingface", "`pretrained` model kwarg is not of type `str`"):
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
    if path.exists() and (saved := reusable_point(path, settings)) is not None:
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
        "measured_cache_bytes": session.lm.kvcore_measured_bytes(),
        # the relative squared error of every key and value that entered them, per kind and layer (when measured)
        "relative_errors": session.lm.kvcore_relative_errors(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    record["calibration_overlap"] = session.lm.get_model_info()["kvcore"]["calibration_overlap"].get(scored)
    record[DIGEST] = outputs.content_digest(record)  # an edit by hand is told from the point as it was made
    outputs.atomic_write_json(path, record)
    session.progress.point_done(task, name, started)
    return record


DIGEST = "digest"  # a point's sha256 of the rest of its content


def reusable_point(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The finished point at `path`, made with `settings`; None where it is computed again: damaged (not JSON, not a
    point), or its content no longer matches its digest (edited by hand), each with a warning naming it. A point
    made with other settings is an error. A point of an earlier version, without a digest, is reused with a
    warning that it cannot be verified."""
    saved = outputs.read_derived(path, "point")
    if saved is None:
        return None
    if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict) or "value" not in saved:
        logger.warning("%s is not a point kvcore-eval wrote (no settings or value): it is computed again", path)
        return None
    digest = saved.pop(DIGEST, None)
    if digest is not None and digest != outputs.content_digest(saved):
        logger.warning(
            "%s does not match the digest of its content (edited after it was written?): it is computed again", path
        )
        return None
    if differences := identity_differences(saved["settings"], settings):
        raise ValueError(
            f"{path} was run with other settings ({'; '.join(differences)}): use another --out, or delete it to rerun"
        )
    if digest is None:
        logger.warning("%s carries no digest (written by an earlier kvcore-eval): reused without a check", path)
    return saved


def document_loglikelihoods(samples: list[dict[str, Any]], metric: str) -> dict[str, list[float]] | None:
    """doc_id -> [loglikelihood, count] of a weighted-perplexity metric (what a paired bootstrap resamples); None for
    other metrics (`documents.WEIGHTED_PERPLEXITIES`)."""
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


# What a run folder holds beyond its summary: finished work a rerun reuses, made with the settings in config.json.
RESULTS = ("points", "calibrations", "documents", "sensitivity", "positions")


def claim(config, kind: str, own_names: tuple[str, ...]) -> Path:
    """After every check, holding the folder's lock: refuse a folder whose finished work was made with other settings
    (nothing written), else claim it. config.json is written here only into a folder without finished work; a rerun
    writes it with its results (`record_config`), so a refused or interrupted rerun leaves it as it was."""
    out = Path(config.out)
    outputs.check_run_folder(out, kind, own_names)
    if any((out / name).is_dir() and any((out / name).iterdir()) for name in RESULTS):
        check_same_run(out, config, kind)
        outputs.check_writable(out, f"the {kind} writes its results there")
        return out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise outputs.unwritable(out, err, f"it cannot be created for the {kind}") from None
    outputs.check_writable(out, f"the {kind} writes its results there")
    record_config(out, config, kind)
    return out


def check_same_run(out: Path, config, kind: str) -> None:
    """The settings every finished point in `out` shares (config.json's, less the selectors) are this run's."""
    saved = outputs.read_json(out / outputs.CONFIG_FILE, f"{kind} settings")
    wanted = identity(config, exclude=config.selectors)
    if differences := identity_differences(same_keys(saved, wanted), wanted):
        raise ValueError(
            f"{out} holds the finished work of a {kind} with other settings ({'; '.join(differences)}); nothing was "
            f"changed there: use another --out, or delete {out} to start again"
        )


def same_keys(saved: Any, like: dict[str, Any]) -> dict[str, Any]:
    """`saved` (a config.json) with only the keys of `like` (an identity), nested configurations alike, and the
    `added` fields it set (`like` leaves one out at its default)."""
    saved = saved if isinstance(saved, dict) else {}
    kept = {
        key: same_keys(saved.get(key), value) if isinstance(value, dict) else saved.get(key)
        for key, value in like.items()
    }
    return kept | {key: value for key, value in saved.items() if key in ADDED_DEFAULTS and key not in like}


def record_config(out: Path, config, kind: str) -> None:
    outputs.write_config(out, kind, asdict(config))


@contextlib.contextmanager
def open_units(
    config,
    kind: str,
    own_names: tuple[str, ...],
    per_task: bool = True,
    check: Callable[[list[Unit], Callable[[int | None], Any]], None] | None = None,
) -> Iterator[Session]:
    """A session over the units of `config.tasks` (each task at each length, with its metric), every option checked
    against the tasks (metrics in their metric_list, document counts where each task is calibrated on its own held-out
    documents: `per_task`, and `check(units, manager_for)`) before the output folder is claimed or the model loads.
    Only the tokenizer loads first: tasks that build their documents (RULER) need it. `config` is a SweepConfig or a
    FrontierConfig (a TaskScoringConfig with `out`, `tasks` and `selectors`: its fields that choose which points run
    rather than what a point's number is). One writer per folder: the session holds `<out>.kvcore-lock`
    (`outputs.run_lock`) from the claim to its end, and a second run into the folder is refused, its holder named."""
    model_id, gguf_file = models.gguf_location(config.model, config.gguf_file)
    tokenizer = models.load_tokenizer(model_id, None, gguf_file)
    # what `lm_eval --model_args pretrained=... --metadata ...` hands every task, as in calibrate
    metadata = {**ALL_RECORDS, **tokenizer_metadata(model_id, gguf_file, tokenizer), **config.task_metadata()}

    def manager_for(length: int | None):
        lengths = {"max_seq_lengths": [length]} if length is not None else {}
        return task_manager(config.data_dir, split_paths(config.include_path), {**metadata, **lengths})

    model_config = models.load_config(model_id, None, gguf_file)
    max_length = models.context_length(model_config, tokenizer)
    # --dtype as the model will load, before the folder is checked: the dtype a run computes in is what its work is
    # (auto on the CPU is float32, and float32 work in the folder is that run's)
    config = dataclasses.replace(config, dtype=models.resolve_dtype_name(config.dtype, config.device, model_config))

    def fits(instance) -> None:  # the scored documents' continuations, against the context the model gets
        check_continuations_fit(instance, config.num_samples, tokenizer, max_length, config.model)

    units = task_units(config, manager_for, per_task, fits)
    if check is not None:
        check(list(units.values()), manager_for)
    with outputs.run_lock(Path(config.out).resolve()):  # two links to one folder share its lock
        out = claim(config, kind, own_names)
        model = models.load_causal_lm(model_id, None, models.resolve_device(config.device), config.dtype, gguf_file)
        perplexity = [name for name, unit in units.items() if unit.perplexity]
        session = Session(config, out, model, tokenizer, perplexity)
        session.units, session.task_metadata = units, metadata
        yield session


def task_document_ner(session: Session, task: str) -> list[dict[str, Any]]:
    """Each scored document's own NER per layer (K in config.key_space, V), saved in documents/<task>.json and
    reused when made with the same settings."""
    config = session.config
    path = session.out / "documents" / f"{task}.json"
    settings = {"task": task, "run": identity(config, exclude=session.config.selectors)}
    # a document longer than the context is read in windows of it (`document_ner`)
    settings["window"] = models.context_length(session.model.config, session.tokenizer)
    unit = session.units[task]
    if metadata := point_metadata(session, unit):
        settings["metadata"] = metadata
    if path.exists() and (saved := outputs.read_derived(path, "per-document NER")) is not None:
        if isinstance(saved, dict) and saved.get("settings") == settings:
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
            truncation = point_truncation(
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

    return models.KVGeometry(**read_metadata(basis)["model"]["geometry"]).width
