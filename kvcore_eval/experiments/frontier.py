"""`kvcore-eval frontier`: quality against measured bytes per token, every method at equal bytes, one model load.

A method (`compression.methods`) is one codec: a basis and bits per latent channel. Low rank keeps the top r
directions of a basis at the model's dtype (or int8) and drops the rest; intN keeps every dimension at N bits with no
basis; `rotation` first applies a seeded randomized Hadamard transform; `spectral` gives each eigen-channel of the
calibrated basis its bits by reverse water-filling. For each budget (a fraction of the full cache's bytes per token, or
bits per cached number: `4b`) each method's one free knob (a rank, a total of dimensions, a budget in bits) is set by
bisection to the largest value whose **measured** bytes per token (what a `LowRankCache` really holds after a probe
forward over `seq_len` held-out tokens: latents or codes, scales, rotary positions, per-sequence bases) stay within
the budget. A row reports the bytes per token the evaluation's own caches held over the scored documents, and the
same in bits per cached number (the unit that reads the same on every dtype). A method without a knob (intN,
rotations) is one point at its measured bytes, whatever the budget.

Every row also measures how far its code sits from the limit: the relative squared error of the keys and values the
scored documents put in the cache (each layer's own, as read back; keys in the space the plan codes them), against the
Gaussian rate–distortion bound of the calibrated spectra at the same bits (`waterfill.joint_rd_bound`), in dB.

Each task is scored on its first `num_samples` documents and calibrated on the documents after them, as in `sweep`
(both stand on `experiments.session`). A perplexity task is scored by ND-PPL; any other by its own metric (`--metric
task=metric`, else the first of its metric_list), generation included: a task that builds its documents for a length
(RULER, kvcore_ruler) runs at each length of `--metadata '{"max_seq_lengths": [...]}'` as its own frontier
(`<task>@<length>`), calibrated in windows of that length on held-out documents of that length, with `--gen-kwargs`
part of its points' identity. The `sensitivity` allocation needs each layer's ND-PPL when truncated alone: measured
here on held-out text (never the scored documents) as the token perplexity of one direct forward per layer and kind,
or read from `--sensitivity` (the per_layer.json of `sweep --per-layer`). Outputs: frontier.json (one row per task,
method and budget), frontier.md, frontier.png (quality, and distortion against the bound, by bits per number). Each
ND-PPL carries its 95 % paired bootstrap interval over the scored documents against the full cache (within noise when
it holds 0), another metric the bootstrap standard error of its mean. Every option, each method's constraints
included, is checked before the model loads; a rerun with fewer tasks, budgets or methods names the finished points
it leaves out.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kvcore_eval import metrics, outputs
from kvcore_eval.analysis import study
from kvcore_eval.analysis.study import format_correlation, model_line, with_interval
from kvcore_eval.calibration.artifact import load_calibration, read_metadata
from kvcore_eval.calibration.data import iter_texts, pack_sequences
from kvcore_eval.compression import latent, waterfill
from kvcore_eval.compression.methods import METHODS, Budget, full_cache, truncation_for
from kvcore_eval.compression.rank_plan import measured_sensitivity
from kvcore_eval.config import FrontierConfig, split_paths
from kvcore_eval.experiments.session import (
    layer_nd_ppl,
    nd_ppl_interval,
    open_units,
    record_config,
    run_point,
    task_calibration,
    task_document_ner,
    unit_metadata,
    use_truncation,
)
from kvcore_eval.model import models
from kvcore_eval.spaces import KEY_SPACES

logger = logging.getLogger(__name__)

KIND = "frontier"
OWN_NAMES = (
    "config.json",
    "calibrations",
    "points",
    "documents",
    "sensitivity",
    "frontier.json",
    "frontier.md",
    "frontier.png",
)


# --- placing a method at a budget -------------------------------------------------------------------------------


def largest_within(bytes_of, low: int, high: int, target: float) -> int:
    """The largest knob in [low, high] whose bytes stay <= target (bytes grow with the knob); `low` if none does.

    Interpolation search: bytes are close to affine in the knob, so a guess from the two bracketing probes and a
    check of its neighbour usually settle it in four probes (each probe is a forward of the model)."""
    if bytes_of(high) <= target:  # first: no truncation at all sheds the rotary tables, so the top may fit alone
        return high
    if bytes_of(low) > target:
        return low
    while high - low > 1:  # bytes_of(low) <= target < bytes_of(high)
        share = (target - bytes_of(low)) / (bytes_of(high) - bytes_of(low))
        guess = min(max(low + int(share * (high - low)), low + 1), high - 1)
        if bytes_of(guess) <= target:
            low = guess
            if bytes_of(guess + 1) > target:
                high = guess + 1
        else:
            high = guess
            if bytes_of(guess - 1) <= target:
                low = guess - 1
    return low


def probe_bytes(lm, probe_ids) -> float:
    """Bytes per token the current cache of `lm` holds after one forward over `probe_ids` (1, tokens)."""

    cache = lm.new_cache()
    with torch.no_grad(), latent.active(cache):
        lm.model(probe_ids.to(lm.device), cache=cache, use_cache=True)
    return sum(lm.held_bytes(cache).values()) / probe_ids.numel()


# --- the run ----------------------------------------------------------------------------------------------------


@dataclass
class TaskPlan:
    """One task's fixed inputs: its bases, geometry, metric, probe tokens and baseline point."""

    name: str
    basis: Path
    geometry: Any
    metric: str
    perplexity: bool
    higher_is_better: bool
    probe: Any  # (1, tokens) held-out token ids
    baseline: dict[str, Any]
    full_bytes: float
    spectra: list[Any]  # the calibrated eigenvalues of every layer's keys (in the key space) and values: the bound's
    model_bits: int  # bits of one number of the full cache (the model's dtype)
    sensitivity: Path | None = None
    documents: list[dict[str, Any]] = field(default_factory=list)

    @property
    def numbers(self) -> int:
        """Numbers a full cache holds per token: keys and values of every layer, D each."""
        return 2 * self.geometry.num_layers * self.geometry.width


def held_out_ids(session, name: str, tokens: int):
    """(sequences, seq_len) token ids of the unit's held-out text (the documents after the scored ones, as the task
    builds them at the unit's length) in sequences of --seq-len, or of the unit's context length where that is
    longer: full sequences only, unless the text is shorter than one."""

    config, unit = session.config, session.units[name]
    seq_len = max(config.seq_len, unit.length or 0)
    texts = iter_texts(
        f"lm_eval:{unit.task}",
        data_dir=config.data_dir,
        skip_docs=config.num_samples,
        include_path=split_paths(config.include_path),
        metadata=unit_metadata(session, unit),
    )
    sequences = list(pack_sequences(texts, session.tokenizer, seq_len, max(tokens, seq_len)))
    full = [s for s in sequences if len(s) == seq_len]
    return torch.tensor(full or sequences[:1])


def held_out_perplexity(session, truncation, ids) -> float:
    """Token perplexity of `ids` (sequences, seq) under `truncation`: one direct forward, every next token scored."""

    use_truncation(session, truncation)
    cache = session.lm.new_cache()
    with torch.no_grad(), latent.active(cache):
        logits = session.lm.model(ids.to(session.lm.device), cache=cache, use_cache=True).logits  # (seqs, seq, vocab)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten().to(logits.device)
    )
    return math.exp(float(loss))


def _measure_sensitivity(session, plan: TaskPlan) -> Path:
    """Each layer's ND-PPL truncated alone (keys, then values), on held-out text: token perplexity of up to
    `sensitivity_tokens` tokens of the documents after the scored ones, by a direct forward (2 x layers + 1 of
    them; lm-eval's per-document overhead x 60 layers would dominate the frontier). A per_layer.json."""
    config = session.config
    path = session.out / "sensitivity" / f"{plan.name}.json"
    ids = held_out_ids(session, plan.name, config.sensitivity_tokens)
    settings = {
        "key_space": config.truncation.key_space,
        "rank": config.sensitivity_rank,
        "tokens": int(ids.numel()),
        "basis_sha256": read_metadata(plan.basis)["basis_sha256"],
        "measure": "token perplexity of held-out text (the documents after the scored ones), direct forward",
    }
    if path.exists() and ((outputs.read_derived(path, "sensitivity table") or {}).get("settings") == settings):
        return path
    baseline = held_out_perplexity(session, full_cache(config.truncation, plan.basis), ids)
    rank = max(1, round(config.sensitivity_rank * plan.geometry.width))
    nd_ppl = layer_nd_ppl(
        session,
        plan.basis,
        rank,
        plan.geometry.num_layers,
        baseline,
        lambda _, truncation: held_out_perplexity(session, truncation, ids),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    table = {
        "settings": settings,
        "key_space": config.truncation.key_space,
        "rank": config.sensitivity_rank,
        "nd_ppl": {plan.name: nd_ppl},
    }
    outputs.atomic_write_json(path, table)
    return path


def _prepare_task(session, task: str) -> TaskPlan:

    config = session.config
    basis = task_calibration(session, task)
    geometry = models.KVGeometry(**read_metadata(basis)["model"]["geometry"])
    unit = session.units[task]
    full = full_cache(config.truncation, basis)
    use_truncation(session, full).kvcore_measure_error = True  # every point measures its squared error
    baseline = run_point(session, task, "baseline", full)
    probe = held_out_ids(session, task, config.seq_len)[:1]
    full_bytes = probe_bytes(use_truncation(session, full), probe)
    eigenvalues = load_calibration(basis, eigenvectors=False).eigenvalues
    spectra = [
        eigenvalues[space][layer].numpy()
        for space in (KEY_SPACES[config.truncation.key_space], "value")
        for layer in range(geometry.num_layers)
    ]
    model_bits = 8 * torch.empty(0, dtype=session.model.dtype).element_size()
    plan = TaskPlan(
        task,
        basis,
        geometry,
        unit.metric,
        unit.perplexity,
        unit.higher_is_better,
        probe,
        baseline,
        full_bytes,
        spectra,
        model_bits,
    )
    if "sensitivity" in config.method_list():
        plan.sensitivity = Path(config.sensitivity) if config.sensitivity else _measure_sensitivity(session, plan)
    if plan.perplexity:
        plan.documents = task_document_ner(session, task)
    return plan


def _row(plan: TaskPlan, name: str, label: dict[str, Any], budget, knob, point, measured: float) -> dict[str, Any]:
    raw, base = point["value"], plan.baseline["value"]
    # bytes per token: what the evaluation's own caches held where kvcore_hf measures it, else the probe's
    evaluated_on_documents = bool(point.get("measured_cache_bytes"))
    evaluated = point["measured_cache_bytes"]["bytes_per_token"] if evaluated_on_documents else measured
    target = None if budget is None else budget.bytes(plan.full_bytes, plan.numbers)
    row = {
        "task": plan.name,
        "method": name,
        **label,
        "bits": label["bits"] or plan.model_bits,
        "budget": None if budget is None else budget.text,
        "budget_bytes": target,
        "knob": knob,
        "bytes_per_token": evaluated,
        "bits_per_number": 8 * evaluated / plan.numbers,
        "fraction_of_full": evaluated / plan.full_bytes,
        "within_budget": None if target is None else evaluated <= target * (1 + 1e-9),
        "probe_bytes_per_token": measured,
        "bytes_measured_on": "scored documents" if evaluated_on_documents else f"probe of {plan.probe.shape[1]} tokens",
        "metric": f"nd_ppl({plan.metric})" if plan.perplexity else plan.metric,
        "value": metrics.nd_ppl(raw, base) if plan.perplexity else raw,
        "raw": raw,
        "baseline_raw": base,
        "higher_is_better": False if plan.perplexity else plan.higher_is_better,
        "rank_plan": point["rank_plan"],
        **distance_from_bound(plan, point, evaluated),
    }
    row.update(uncertainty(plan, point))
    if plan.documents:
        deltas = study.document_nd_ppl(point["per_document"], plan.baseline["per_document"])
        row["across_documents"] = study.across_documents(plan.documents, deltas)
    return row


def distance_from_bound(plan: TaskPlan, point: dict[str, Any], bytes_per_token: float) -> dict[str, Any]:
    """The point's relative squared error of keys and values on the scored documents' own tokens (the mean over
    layers and kinds of ‖x − x̂‖² / ‖x‖², keys in the plan's key space), the Gaussian rate–distortion bound of the
    calibrated spectra at the same bits (`waterfill.joint_rd_bound`: every bit the point holds, scales and positions
    included, spent optimally over layers and channels) and their distance in dB. Nothing for the full cache or a
    point saved without errors."""
    errors = point.get("relative_errors")
    if not errors or plan.baseline is point:
        return {}
    measured = [e for kind in ("key", "value") for e in errors[kind] if e is not None]
    error = sum(measured) / len(measured)
    bound = waterfill.joint_rd_bound(plan.spectra, 8 * bytes_per_token)
    return {
        "relative_error": error,
        "bound": bound,
        "distance_db": 10 * math.log10(error / bound) if error > 0 and bound > 0 else None,
    }


def uncertainty(plan: TaskPlan, point: dict[str, Any]) -> dict[str, Any]:
    """A point's noise over documents: for ND-PPL, the 95 % paired bootstrap interval against the full cache on the
    same documents (the sweep's `nd_ppl_interval`; None for the baseline itself and for points saved without
    per-document log-likelihoods); for another metric, the bootstrap standard error of its mean over documents."""
    if not plan.perplexity:
        return {"stderr": metrics.bootstrap_stderr_of_mean(point["per_document"].values())}
    return {"nd_ppl_interval": None if point is plan.baseline else nd_ppl_interval(point, plan.baseline)}


def within_reach(session, truncation, geometry):
    """`truncation` in place on the session's model, or, where its budget (met in bytes, overheads included) is below
    what one dimension per layer and kind already costs, that one-dimension plan: the point then reports its measured
    bytes, over the budget."""
    try:
        use_truncation(session, truncation)
        return truncation
    except ValueError as err:
        if not truncation.budgeted or "cannot be met" not in str(err):
            raise
    ones = ":".join(["1"] * geometry.num_layers)
    floor = replace(
        truncation,
        rank_budget=None,
        bits=None,
        budget_method="energy",
        sensitivity=None,
        key_rank=ones,
        value_rank=ones,
    )
    use_truncation(session, floor)
    return floor


def method_rows(session, plan: TaskPlan, name: str, budgets: list[Budget]) -> list[dict[str, Any]]:
    """One row per budget (one row in all for a method without a knob), each at its measured bytes."""
    config, method = session.config, METHODS[name]
    memo: dict[int | None, float] = {}

    def bytes_of(knob: int | None) -> float:
        if knob not in memo:
            truncation = truncation_for(config.truncation, method, knob, plan.basis, plan.geometry, plan.sensitivity)
            within_reach(session, truncation, plan.geometry)
            memo[knob] = probe_bytes(session.lm, plan.probe)
        return memo[knob]

    knobs = method.knob_range(plan.geometry)
    placed = (
        [(None, None)]
        if knobs is None
        else [(b, largest_within(bytes_of, *knobs, b.bytes(plan.full_bytes, plan.numbers))) for b in budgets]
    )
    rows = []
    for budget, knob in placed:
        measured = bytes_of(knob)
        truncation = within_reach(
            session,
            truncation_for(config.truncation, method, knob, plan.basis, plan.geometry, plan.sensitivity),
            plan.geometry,
        )
        point_name = f"{name}/{'full' if knob is None else knob}"
        point = run_point(session, plan.name, point_name, truncation, metric=plan.metric)
        rows.append({**_row(plan, name, method.label(), budget, knob, point, measured), "point": point_name})
    return rows


def pareto(rows: list[dict[str, Any]]) -> list[bool]:
    """Whether each row is on the front of its task: no other row has fewer or equal bytes and better or equal
    quality, one of them strictly."""

    def quality(row):
        return row["value"] if row["higher_is_better"] else -row["value"]

    flags = []
    for row in rows:
        dominated = any(
            other is not row
            and other["task"] == row["task"]
            and other["bytes_per_token"] <= row["bytes_per_token"]
            and quality(other) >= quality(row)
            and (other["bytes_per_token"] < row["bytes_per_token"] or quality(other) > quality(row))
            for other in rows
        )
        flags.append(not dominated)
    return flags


def check_sensitivity_file(config: FrontierConfig) -> None:
    """Before the model loads: --sensitivity is a per_layer.json of this key space and this model's layer count (the
    model's config is read, not its weights)."""
    model_id, gguf_file = models.gguf_location(config.model, config.gguf_file)
    layers = models.kv_geometry(models.load_config(model_id, None, gguf_file)).num_layers
    plan = replace(config.truncation, sensitivity=config.sensitivity, budget_method="sensitivity", rank_budget=0.5)
    try:
        measured_sensitivity(plan, [KEY_SPACES[config.truncation.key_space], "value"], layers)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"--sensitivity: {err}"
            if isinstance(err, ValueError)
            else f"--sensitivity {config.sensitivity}: not the per_layer.json of `kvcore-eval sweep "
            f"--per-layer` ({err!r})"
        ) from err


def left_out(out: Path, rows: list[dict[str, Any]]) -> list[str]:
    """The finished points in `out` this run's rows do not report: rows of the previous frontier.json whose task,
    method and budget are not among them, then saved points (points/<task>/<name>.json) no row of either refers to
    (an earlier run interrupted before its frontier.json)."""
    path = out / "frontier.json"
    previous = (outputs.read_derived(path, "previous frontier") or []) if path.exists() else []
    previous = [r for r in previous if isinstance(r, dict) and {"task", "method", "budget"} <= set(r)]
    placed = {(r["task"], r["method"], r["budget"]) for r in rows}
    referred = {(r["task"], r.get("point")) for r in [*rows, *previous]}
    dropped = [
        f"{r['task']} {r['method']}" + ("" if r["budget"] is None else f" at budget {r['budget']}")
        for r in previous
        if (r["task"], r["method"], r["budget"]) not in placed
    ]
    points = out / "points"
    for saved in sorted(set(points.glob("*/**/*.json"))):
        task, *name = saved.relative_to(points).with_suffix("").parts
        if (task, "/".join(name)) not in referred:
            dropped.append(f"{task} point {'/'.join(name)} (points/{saved.relative_to(points)})")
    return dropped


def run_frontier(config: FrontierConfig) -> list[dict[str, Any]]:
    """The frontier, holding its output folder's lock from the claim to the last file."""

    def check(units, manager_for) -> None:
        if config.sensitivity is not None and "sensitivity" in config.method_list():
            check_sensitivity_file(config)

    with open_units(config, KIND, OWN_NAMES, check=check) as session:
        return frontier_session(session)


def frontier_session(session) -> list[dict[str, Any]]:
    config = session.config
    rows, bounds = [], {}
    for task in session.units:
        plan = _prepare_task(session, task)
        bounds[task] = bound_curve(plan)
        label = {"basis": "none", "allocation": "full", "bits": None}
        rows.append({**_row(plan, "full", label, None, None, plan.baseline, plan.full_bytes), "point": "baseline"})
        for name in tqdm(config.method_list(), desc=f"frontier {task}", unit="method"):
            rows += method_rows(session, plan, name, config.budget_list())
    for row, front in zip(rows, pareto(rows), strict=True):
        row["pareto"] = front
    warn_noise(rows)
    dropped = left_out(session.out, rows)
    if dropped:
        logger.warning(
            "this frontier leaves out %d finished points of an earlier run into %s (fewer --tasks, --budgets or "
            "--methods): %s; they stay in points/, and a rerun that asks for them again reuses them",
            len(dropped),
            session.out,
            "; ".join(dropped),
        )
    outputs.atomic_write_json(session.out / "frontier.json", rows)
    outputs.atomic_write_text(session.out / "frontier.md", to_markdown(rows, config, dropped, session.model_dtype))
    plot_frontier(rows, config, session.out / "frontier.png", bounds)
    record_config(session.out, config, KIND)  # the settings of the frontier it now holds
    return rows


# --- reporting --------------------------------------------------------------------------------------------------


def within_noise(row: dict[str, Any]) -> bool:
    return bool((row.get("nd_ppl_interval") or {}).get("within_noise"))


def warn_noise(rows: list[dict[str, Any]]) -> None:
    for task in dict.fromkeys(row["task"] for row in rows):
        noisy = [r for r in rows if r["task"] == task and within_noise(r)]
        if noisy:
            logger.warning(
                "%s: %d of %d frontier points have an ND-PPL within noise (their 95%% paired bootstrap interval over "
                "%d documents holds 0): %s; raise --num-samples to tell them from the full cache",
                task,
                len(noisy),
                sum(r["task"] == task and r["method"] != "full" for r in rows),
                noisy[0]["nd_ppl_interval"]["n"],
                ", ".join(r["point"] for r in noisy),
            )


def winners(rows: list[dict[str, Any]], budgets: list[Budget]) -> dict[str, dict[str, dict[str, Any] | None]]:
    """task -> budget (as given) -> the best row whose measured bytes fit that budget (the full cache never does)."""
    best: dict[str, dict[str, dict[str, Any] | None]] = {}
    for task in dict.fromkeys(row["task"] for row in rows):
        full = next(r for r in rows if r["task"] == task and r["method"] == "full")
        numbers = round(8 * full["bytes_per_token"] / full["bits_per_number"])
        best[task] = {}
        for budget in budgets:
            target = budget.bytes(full["bytes_per_token"], numbers)
            fitting = [
                r
                for r in rows
                if r["task"] == task and r["method"] != "full" and r["bytes_per_token"] <= target * (1 + 1e-9)
            ]
            key = (lambda r: r["value"]) if fitting and fitting[0]["higher_is_better"] else (lambda r: -r["value"])
            best[task][budget.text] = max(fitting, key=key) if fitting else None
    return best


def to_markdown(
    rows: list[dict[str, Any]], config: FrontierConfig, dropped: list[str] | None = None, model_dtype: str | None = None
) -> str:

    budgets = config.budget_list()
    lines = [
        f"# Bytes–quality frontier: {Path(config.model).name or config.model}",
        "",
        f"**Protocol: {config.truncation.protocol}**: " + PROTOCOLS[config.truncation.protocol],
        model_line(
            {"model_dtype": model_dtype, "dtype": config.dtype, "model_device": models.resolve_device(config.device)}
        ),
        "",
        f"Each task scored on its first {config.num_samples} documents; its data bases from "
        f"{config.calibration_tokens} tokens of its documents after those (disjoint). Bytes per token measured from "
        f"what the cache holds after a probe over {config.seq_len} held-out tokens (a task at a context length: that "
        "length); a budget is a fraction of the full cache's bytes, or bits per cached number (`2b`). *bits/number*: "
        "the bytes per token in bits over the numbers a full cache holds (2 x layers x D), scales, rotary positions "
        "and per-sequence bases included: the unit that reads the same on every dtype. *vs bound*: the relative "
        "squared error of the keys and values the scored documents put in the cache (mean over layers and kinds; keys "
        f"{config.truncation.key_space.replace('_', '-')}) against the Gaussian rate–distortion bound of the "
        "calibrated spectra at the same bits, in dB above it. "
        "★: on the task's Pareto front (no other row has as few bytes and as good a quality, one strictly). "
        "ND-PPL in brackets: its 95 % paired bootstrap interval over the scored documents against the full cache on "
        "the same documents, *within noise* when it holds 0; another metric: ± its bootstrap standard error. "
        "*(over)*: the scored documents' caches held more than the budget the probe placed the point within (per-"
        "sequence costs amortize over another length)."
        + (f" Generation with `--gen-kwargs {config.gen_kwargs}`." if config.gen_kwargs else "")
        + (
            " A task that builds its documents for a length (`<task>@<length>`) is calibrated in windows of that "
            "length; its sensitivity, where measured, is the token perplexity of its held-out prompts."
            if config.context_lengths()
            else ""
        ),
        "",
    ]
    if dropped:
        lines += [
            f"**Left out**: {len(dropped)} finished points of an earlier run into this folder are not in this "
            f"frontier (fewer --tasks, --budgets or --methods; they stay in points/): {'; '.join(dropped)}.",
            "",
        ]
    order = {name: index for index, name in enumerate(["full", *config.method_list()])}
    for task in dict.fromkeys(row["task"] for row in rows):
        task_rows = sorted(
            (r for r in rows if r["task"] == task),
            key=lambda r: (order.get(r["method"], len(order)), -r["bytes_per_token"]),
        )
        full = next(r for r in task_rows if r["method"] == "full")
        lines += [
            f"## {task}",
            "",
            f"Full cache: {full['metric'].removeprefix('nd_ppl(').removesuffix(')')} {full['baseline_raw']:.4f} on the "
            f"scored documents ({full['bytes_per_token']:.0f} bytes per token).",
            "",
            "| method | basis | allocation | bits | budget | bytes/token | bits/number | % of full | "
            + metric_label(task_rows[0]["metric"])
            + " | vs bound | front |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|:---:|",
        ]
        for r in task_rows:
            distance = "" if r.get("distance_db") is None else f"+{r['distance_db']:.1f} dB"
            lines.append(
                f"| {r['method']} | {r['basis']} | {r['allocation']} | {r['bits']} | {r['budget'] or '-'} | "
                f"{r['bytes_per_token']:.0f} | {r['bits_per_number']:.2f} | "
                f"{100 * r['fraction_of_full']:.1f}{over_budget(r)} | {_quality(r, with_interval)} | {distance} | "
                f"{'★' if r['pareto'] else ''} |"
            )
        lines += ["", "Best method within each budget (measured bytes):", ""]
        for budget, row in winners(rows, budgets)[task].items():
            lines.append(
                f"- {budget}: "
                + (
                    "none fits"
                    if row is None
                    else f"**{row['method']}** ({metric_label(row['metric'])} {row['value']:.4f})"
                )
            )
        documented = [r for r in task_rows if "across_documents" in r and r["method"] != "full"]
        if documented:
            lines += [
                "",
                "Per-document NER (mean over layers, each document's own Grams) vs that document's ND-PPL, "
                "**across documents**:",
                "",
                "| method | budget | keys | values |",
                "|---|---:|---|---|",
            ]
            for r in documented:
                budget = r["budget"] or "-"
                c = r["across_documents"]
                lines.append(
                    f"| {r['method']} | {budget} | {format_correlation(c['key'])} | {format_correlation(c['value'])} |"
                )
        lines.append("")
    return "\n".join(lines)


def over_budget(row: dict[str, Any]) -> str:
    return " *(over)*" if row.get("within_budget") is False else ""


def metric_label(metric: str) -> str:
    """A metric as a reader knows it: RULER names its score by the context length."""
    return f"score ({metric}-token context)" if metric.isdigit() else metric


def _quality(row: dict[str, Any], with_interval) -> str:
    if "stderr" in row:
        return f"{row['value']:.4f} ± {row['stderr']:.4f}"
    return with_interval(row["value"], row.get("nd_ppl_interval"))


PROTOCOLS = {
    "forward": "every forward reads what the cache stores, the prompt's prefill included (the KV-CoRE paper's ND-PPL "
    "protocol: the harshest).",
    "after_prefill": "each forward attends exactly to its own tokens and through the compressed cache to earlier "
    "ones, as deployed caches run: a loglikelihood request prefills its context, then scores its continuation; a "
    "generation decodes its answer through the compressed prompt.",
}
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "h")  # one per method, so that lines that meet stay apart


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-4)


BOUND_BITS = tuple(x / 4 for x in range(1, 65))  # bits per number where the bound curve is drawn: 0.25 to 16


def bound_curve(plan: TaskPlan) -> list[tuple[float, float]]:
    """(bits per number, the Gaussian rate–distortion bound of the task's calibrated spectra there)."""
    return [(bits, waterfill.joint_rd_bound(plan.spectra, bits * plan.numbers)) for bits in BOUND_BITS]


def plot_frontier(
    rows: list[dict[str, Any]], config: FrontierConfig, path: Path, bounds: dict[str, list[tuple[float, float]]]
) -> None:
    """Per task, against bits per cached number: the quality (top; one line per method, the Pareto front as a black
    step line, points that coincide ringed), and the relative squared error of the stored keys and values with the
    rate–distortion bound of the calibrated spectra (bottom)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(row["task"] for row in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "full"))
    palette = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    figure = Figure(figsize=(6.5 * len(tasks), 8.4), dpi=130, layout="constrained")
    grid = figure.subplots(2, len(tasks), squeeze=False)
    for (ax, low), task in zip(zip(grid[0], grid[1], strict=True), tasks, strict=True):
        task_rows = [r for r in rows if r["task"] == task]
        full = next(r for r in task_rows if r["method"] == "full")
        numbers = round(8 * full["bytes_per_token"] / full["bits_per_number"])
        drawn: list[tuple[float, float]] = []
        for index, name in enumerate(m for m in methods if any(r["method"] == m for r in task_rows)):
            points = sorted((r for r in task_rows if r["method"] == name), key=lambda r: r["bits_per_number"])
            hue = index if palette.N == 10 else (2 * index) % 20 + (2 * index) // 20  # tab20: every hue, then shades
            style = {"marker": MARKERS[index % len(MARKERS)], "ms": 4, "lw": 1.2, "color": palette(hue % palette.N)}
            ax.plot([r["bits_per_number"] for r in points], [r["value"] for r in points], label=name, **style)
            for r in points:  # a point on top of earlier ones gets a ring, larger for each one under it
                under = sum(
                    math.isclose(r["bits_per_number"], x, rel_tol=1e-3) and _close(r["value"], y) for x, y in drawn
                )
                if under:
                    ax.scatter(
                        r["bits_per_number"],
                        r["value"],
                        s=40 + 50 * under,
                        facecolors="none",
                        edgecolors=style["color"],
                    )
                drawn.append((r["bits_per_number"], r["value"]))
            measured = [r for r in points if r.get("relative_error")]
            low.plot([r["bits_per_number"] for r in measured], [r["relative_error"] for r in measured], **style)
        front = sorted((r for r in task_rows if r["pareto"]), key=lambda r: r["bits_per_number"])
        ax.step(
            [r["bits_per_number"] for r in front],
            [r["value"] for r in front],
            where="post",
            color="black",
            lw=1,
            ls="--",
            label="Pareto front",
        )
        ax.scatter(
            [r["bits_per_number"] for r in front],
            [r["value"] for r in front],
            s=90,
            facecolors="none",
            edgecolors="black",
            zorder=3,
        )
        # the methods' range of bits (the full cache is the reference, a line, not a point far to the right)
        compressed = [r["bits_per_number"] for r in task_rows if r["method"] != "full"] or [full["bits_per_number"]]
        right = 1.08 * max(compressed)
        ax.axhline(full["value"], color="0.3", lw=0.8, label=f"full cache ({full['bits_per_number']:g} bits)")
        curve = [(b, d) for b, d in bounds.get(task, []) if b <= right]
        low.plot([b for b, _ in curve], [d for _, d in curve], color="black", lw=1.5, label="rate–distortion bound")
        errors = [r["relative_error"] for r in task_rows if r.get("relative_error")]
        if errors:  # down to a decade and a half below the smallest measured error, not the bound's far tail
            low.set_ylim(bottom=min(errors) / 30)
        for budget in config.budget_list():
            bits = 8 * budget.bytes(full["bytes_per_token"], numbers) / numbers
            for axis in (ax, low):
                axis.axvline(bits, color="0.6", lw=0.8, ls=":")
        if full["higher_is_better"] is False:
            ax.set_yscale("symlog", linthresh=0.01)  # ND-PPL spans orders of magnitude
            ax.set_ylim(bottom=min(0.0, *(r["value"] for r in task_rows)))
        ax.set(xlabel="bits per cached number (measured)", ylabel=metric_label(full["metric"]), title=task)
        ax.set_xlim(0, right)
        low.set(
            xlabel="bits per cached number (measured)",
            ylabel="relative squared error of K and V",
            yscale="log",
            xlim=(0, right),
        )
        for axis in (ax, low):
            axis.grid(alpha=0.3)
    grid[0][-1].legend(frameon=False, fontsize=8, ncol=2)
    grid[1][-1].legend(frameon=False, fontsize=8)
    figure.suptitle(f"Bytes–quality frontier: {Path(config.model).name or config.model} (dotted: budgets)")
    outputs.atomic_save_figure(figure, path)
