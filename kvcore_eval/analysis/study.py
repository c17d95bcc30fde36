"""A sweep's findings: ND-PPL tables, NER↔ND-PPL correlations by scope, and their figures.

The same numbers tell different stories at different scopes, so every correlation is reported with its scope
(across tasks at one rank; across the layers of one task; across layers with keys and values pooled; across the
scored documents, each with its own NER and its own ND-PPL), with
Pearson r, Spearman ρ, both p-values and n. Figures use matplotlib's object API (`Figure`): no pyplot state,
no backend switch in the user's process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kvcore_eval import metrics, outputs
from kvcore_eval.compression.methods import BASES

KINDS = ("key", "value")


def summarize(
    tasks: list[str],
    baseline: dict[str, float],
    perplexity: dict[str, dict[str, float]],
    ner: dict[str, dict[str, float]],
    design: dict[str, Any],
) -> dict[str, Any]:
    """ND-PPL per task and rank (ranks as strings), and NER↔ND-PPL across tasks at each rank."""
    ranks = list(perplexity)
    nd_ppl = {task: {rank: metrics.nd_ppl(perplexity[rank][task], baseline[task]) for rank in ranks} for task in tasks}
    across_tasks = {
        rank: {
            kind: metrics.correlation([ner[t][kind] for t in tasks], [nd_ppl[t][rank] for t in tasks]) for kind in KINDS
        }
        for rank in ranks
    }
    return {
        "design": design,
        "tasks": tasks,
        "ranks": ranks,
        "baseline_perplexity": baseline,
        "perplexity": perplexity,
        "nd_ppl": nd_ppl,
        "ner": ner,
        "correlation": {"across_tasks": across_tasks},
    }


def summarize_layers(
    nd_ppl: dict[str, dict[str, list[float]]],
    layer_ner: dict[str, dict[str, list[float]]],
    residual: dict[str, dict[str, list[float]]],
    rank: float,
) -> dict[str, Any]:
    """Per task: each layer's ND-PPL when only it is truncated, and its correlation with the layer's NER and with
    its residual energy at that rank, across layers (K, V) and across layers with K and V pooled."""
    correlations = {}
    tables = {"ner": layer_ner, "residual": residual, "nd_ppl": nd_ppl}
    for task in nd_ppl:
        scopes = {
            kind: {
                "ner": metrics.correlation(layer_ner[task][kind], nd_ppl[task][kind]),
                "residual_energy": metrics.correlation(residual[task][kind], nd_ppl[task][kind]),
            }
            for kind in KINDS
        }
        pooled = {name: table[task]["key"] + table[task]["value"] for name, table in tables.items()}
        scopes["key_and_value"] = {
            "ner": metrics.correlation(pooled["ner"], pooled["nd_ppl"]),
            "residual_energy": metrics.correlation(pooled["residual"], pooled["nd_ppl"]),
        }
        correlations[task] = scopes
    return {"rank": rank, "nd_ppl": nd_ppl, "ner": layer_ner, "residual_energy": residual, "correlation": correlations}


def document_nd_ppl(truncated: dict[str, float], full: dict[str, float]) -> dict[str, float]:
    """doc_id -> that document's ND-PPL: its own perplexity under the truncation against its own full-cache one."""
    if truncated.keys() != full.keys():
        raise ValueError("per-document values of different documents: rerun both points on the same documents")
    return {doc: metrics.nd_ppl(truncated[doc], full[doc]) for doc in full}


def mean_document_ner(row: dict[str, Any]) -> dict[str, float]:
    """A document's NER averaged over layers, for keys and for values."""
    return {kind: float(np.mean(row[kind])) for kind in KINDS}


def across_documents(rows: list[dict[str, Any]], nd_ppl: dict[str, float]) -> dict[str, dict[str, float]]:
    """Correlation of each document's mean NER with its own ND-PPL, one point per document (K and V)."""
    ner = [mean_document_ner(row) for row in rows]
    deltas = [nd_ppl[str(row["doc_id"])] for row in rows]
    return {kind: metrics.correlation([n[kind] for n in ner], deltas) for kind in KINDS}


def summarize_documents(
    documents: dict[str, list[dict[str, Any]]], per_document: dict[str, dict[str, dict[str, float]]]
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, Any]]]:
    """Sample-wise: per task, each scored document's mean NER and its ND-PPL at each rank; and, at each rank, the
    correlation across documents, per task and with every task's documents pooled."""
    table = {
        task: [
            {
                "doc_id": row["doc_id"],
                "tokens": row["tokens"],
                **{f"ner_{kind}": value for kind, value in mean_document_ner(row).items()},
                "nd_ppl": {rank: per_document[rank][task][str(row["doc_id"])] for rank in per_document},
            }
            for row in rows
        ]
        for task, rows in documents.items()
    }
    correlations = {}
    for rank, by_task in per_document.items():
        scopes = {task: across_documents(documents[task], by_task[task]) for task in documents}
        if len(documents) > 1:
            pooled = [(row, by_task[task][str(row["doc_id"])]) for task in documents for row in documents[task]]
            ner = [mean_document_ner(row) for row, _ in pooled]
            scopes["all tasks"] = {
                kind: metrics.correlation([n[kind] for n in ner], [delta for _, delta in pooled]) for kind in KINDS
            }
        correlations[rank] = scopes
    return table, correlations


def documents_markdown(correlations: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines of the across-documents scope: per-document NER against ND-PPL, per task and pooled."""
    lines = [
        "",
        "Correlation of a document's own NER (mean over layers, from that document's Grams) with its own ND-PPL "
        "(byte perplexity of that document, truncated vs full), **across documents** (one point per document):",
        "",
        "| rank | documents of | keys | values |",
        "|---:|---|---|---|",
    ]
    for rank, scopes in correlations.items():
        lines += [
            f"| {rank} | {scope} | {format_correlation(c['key'])} | {format_correlation(c['value'])} |"
            for scope, c in scopes.items()
        ]
    return lines


def format_correlation(c: dict[str, float]) -> str:
    """r, ρ with their p-values and n of one correlation, or n/a when it is undefined."""
    if np.isnan(c["pearson"]):
        return f"n/a (n={c['n']})"
    if np.isnan(c["pearson_p"]):
        return f"r={c['pearson']:+.2f}, ρ={c['spearman']:+.2f}, n={c['n']} (too few points for a p-value)"
    return (
        f"r={c['pearson']:+.2f} ({format_p(c['pearson_p'])}), ρ={c['spearman']:+.2f} ({format_p(c['spearman_p'])}), "
        f"n={c['n']}"
    )


def format_p(p: float) -> str:
    """A p-value as printed: two significant digits, and never p=0 (a p-value below 1e-4 reads p<0.0001)."""
    return "p<0.0001" if p < 1e-4 else f"p={p:.2g}"


def model_line(design: dict[str, Any]) -> str:
    """The dtype the weights were loaded in, and the `--dtype` it was resolved from."""
    dtype = design.get("model_dtype")
    if dtype is None:  # a summary written before dtypes were recorded
        return f"Model dtype: `--dtype {design.get('dtype', 'float32')}`."
    option = "" if design.get("dtype") == dtype else f" (`--dtype {design.get('dtype')}`)"  # sweeps record it resolved
    return f"Model dtype: {dtype}{option}, on {design.get('model_device')}."


def to_markdown(summary: dict[str, Any]) -> str:
    """sweep.md: the design sentence, ND-PPL per task and rank, and the correlations by scope."""
    design = summary["design"]
    ranks = summary["ranks"]
    lines = [
        f"# Rank sweep: {design['model']}",
        "",
        model_line(design),
        "",
        design_sentence(design),
        "",
        "| task | NER K | NER V | PPL full | " + " | ".join(f"ND-PPL r={r}" for r in ranks) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(ranks),
    ]
    for task in summary["tasks"]:
        ner = summary["ner"][task]
        intervals = summary.get("nd_ppl_interval", {})
        cells = " | ".join(with_interval(summary["nd_ppl"][task][r], intervals.get(r, {}).get(task)) for r in ranks)
        lines.append(
            f"| {task} | {ner['key']:.3f} | {ner['value']:.3f} | {summary['baseline_perplexity'][task]:.3f} | {cells} |"
        )
    lines += [
        "",
        "Correlation of mean NER with ND-PPL, **across tasks** (one point per task):",
        "",
        "| rank | keys | values |",
        "|---:|---|---|",
    ]
    lines += [
        f"| {rank} | {format_correlation(c['key'])} | {format_correlation(c['value'])} |"
        for rank, c in summary["correlation"]["across_tasks"].items()
    ]
    if "across_documents" in summary["correlation"]:
        lines += documents_markdown(summary["correlation"]["across_documents"])
    return "\n".join(lines) + "\n"


def design_sentence(design: dict[str, Any]) -> str:
    """One sentence saying how the sweep's numbers were made (what truncates each task, the bits kept, the metric, the
    held-out data), derived from the sweep's configuration."""
    truncation, per_task = design["truncation"], design["basis_scope"] == "per-task"
    source = BASES[truncation.get("basis", "data")]
    if not source.calibrated:
        basis = f"each task truncated with {source.description} (`basis={source.name}`)"
    elif per_task:
        basis = f"each task truncated with {source.description} (`--basis-scope per-task`)"
    else:
        basis = f"every task truncated with the bases of `{truncation['calibration']}` (`--basis-scope shared`)"
    bits = truncation.get("latent_bits")
    stored = "kept dimensions stored in the model's dtype" if bits is None else f"kept dimensions stored in {bits} bits"
    kind = design.get("truncate", truncation["truncate"])  # the sweep's kind; the truncation's in older sweeps
    return (
        f"{basis}, truncating {kind} ({truncation['key_space']} keys), {stored}, "
        f"protocol {truncation.get('protocol', 'forward')}; "
        f"ND-PPL = (PPL_r − PPL_full) / PPL_full on {design.get('perplexity_metric', design['metric'])}, over the "
        f"first {design['num_samples']} "
        f"documents of each task. NER from each task's calibration on {design['calibration_tokens']} tokens of its "
        "documents after those: calibration and evaluation documents are disjoint"
        + ("." if per_task else "; the shared artifact's own data is whatever it was calibrated on.")
    )


def with_interval(value: float, interval: dict[str, float] | None) -> str:
    """An ND-PPL with its bootstrap interval, marked when the interval holds 0."""
    if not interval:
        return f"{value:.4f}"
    mark = " (within noise)" if interval["within_noise"] else ""
    return f"{value:.4f} [{interval['low']:.4f}, {interval['high']:.4f}]{mark}"


def per_layer_markdown(layers: dict[str, Any]) -> str:
    """per_layer.md: each layer's ND-PPL, NER and residual energy per task, and their correlations."""
    lines = [f"# Per-layer sensitivity: one layer truncated to rank {layers['rank']:g} of D, the rest full", ""]
    for task, table in layers["nd_ppl"].items():
        lines += [
            f"## {task}",
            "",
            "| layer | ND-PPL K | ND-PPL V | NER K | NER V | residual energy K | residual energy V |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        intervals = layers.get("nd_ppl_interval", {}).get(task, {})
        for layer in range(len(table["key"])):
            nd = [with_interval(table[k][layer], (intervals.get(k) or [None] * (layer + 1))[layer]) for k in KINDS]
            row = [layers["ner"][task][k][layer] for k in KINDS] + [
                layers["residual_energy"][task][k][layer] for k in KINDS
            ]
            lines.append(f"| {layer} | " + " | ".join(nd + [f"{v:.4f}" for v in row]) + " |")
        if intervals:
            noisy = sum(bool(i and i["within_noise"]) for values in intervals.values() for i in values)
            lines += [
                "",
                f"ND-PPL with its 95 % paired bootstrap interval over the {layers.get('num_samples')} scored "
                "documents; "
                f"**{noisy}** of {sum(len(v) for v in intervals.values())} lie within noise (the interval holds 0). "
                "Raise --num-samples or lower --per-layer-rank to lift them above it before spending a budget by "
                "them (budget_method=sensitivity).",
            ]
        lines += [
            "",
            "Correlation of a layer's ND-PPL with its NER and with its residual energy:",
            "",
            "| scope | with NER | with residual energy |",
            "|---|---|---|",
        ]
        names = {
            "key": "across layers, keys",
            "value": "across layers, values",
            "key_and_value": "across layers, K and V pooled",
        }
        for scope, name in names.items():
            c = layers["correlation"][task][scope]
            lines.append(f"| {name} | {format_correlation(c['ner'])} | {format_correlation(c['residual_energy'])} |")
        lines.append("")
    return "\n".join(lines)


def _figure(width: float, height: float, panels: int = 1, stacked: bool = False):
    """A matplotlib Figure (object API, no pyplot state) and its row of axes, or column when stacked."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=130, layout="constrained")
    grid = figure.subplots(panels, 1, squeeze=False)[:, 0] if stacked else figure.subplots(1, panels, squeeze=False)[0]
    return figure, grid


def _nd_ppl_scale(ax, values: list[float], label: str) -> None:
    """A linear y axis when the ND-PPLs span less than two decades; else symlog, with a labelled tick at every
    decade on both sides of 0 (ND-PPL can be negative: truncation can help), the linear part below the smallest."""
    import matplotlib.ticker

    magnitudes = np.abs([v for v in values if np.isfinite(v) and v != 0])
    if magnitudes.size == 0 or magnitudes.max() / magnitudes.min() < 100:
        ax.set_ylabel(label)
        return
    low, high = np.floor(np.log10(magnitudes.min())), np.ceil(np.log10(magnitudes.max()))
    decades = 10.0 ** np.arange(low, high + 1)
    negative = max((-v for v in values if v < 0), default=0.0)
    ticks = [0.0, *decades, *(-d for d in decades if negative and d <= 10 ** np.ceil(np.log10(negative)))]
    ax.set_yscale("symlog", linthresh=10.0**low)
    ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator(sorted(ticks)))
    ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_ylabel(f"{label} (symlog)")


def plot_nd_ppl(summary: dict[str, Any], path: Path) -> None:
    """nd_ppl.png: ND-PPL against the rank kept, one line per task."""
    figure, (ax,) = _figure(6.5, 4.2)
    ranks = [float(r) for r in summary["ranks"]]
    for task in summary["tasks"]:
        ax.plot(
            ranks,
            [summary["nd_ppl"][task][r] for r in summary["ranks"]],
            marker="o",
            ms=4,
            label=task.removeprefix("kvcore_"),
        )
    ax.set(xlabel="rank kept (fraction of D)", title=f"ND-PPL vs rank: {summary['design']['model_name']}")
    _nd_ppl_scale(ax, [v for task in summary["tasks"] for v in summary["nd_ppl"][task].values()], "ND-PPL")
    ax.set_xticks(ranks, [f"{r:g}" for r in ranks])  # the ranks measured, one tick each
    if len(ranks) == 1:
        ax.set_xlim(ranks[0] + 0.1, ranks[0] - 0.1)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8, ncol=2)
    outputs.atomic_save_figure(figure, path)


def plot_ner_vs_nd_ppl(summary: dict[str, Any], path: Path) -> None:
    """One panel per K and V at the lowest rank: a colour per task, r and ρ with p in the panel."""
    rank = summary["ranks"][-1]
    figure, axes = _figure(9, 4, panels=2)
    colors = {task: f"C{i % 10}" for i, task in enumerate(summary["tasks"])}
    for ax, kind in zip(axes, KINDS, strict=False):
        for task in summary["tasks"]:
            ax.scatter(
                summary["ner"][task][kind],
                summary["nd_ppl"][task][rank],
                s=40,
                color=colors[task],
                label=task.removeprefix("kvcore_"),
            )
        c = summary["correlation"]["across_tasks"][rank][kind]
        ax.set(  # the statistics in the title: nothing drawn inside the axes can cover a point
            xlabel=f"mean NER of {'keys' if kind == 'key' else 'values'} over layers",
            ylabel=f"ND-PPL at rank {rank}",
        )
        ax.set_title(f"{'Keys' if kind == 'key' else 'Values'}\n{format_correlation(c)}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.margins(0.15)
    figure.legend(*axes[0].get_legend_handles_labels(), frameon=False, fontsize=8, loc="outside right center")
    figure.suptitle(
        f"NER vs ND-PPL across tasks: {summary['design']['model_name']}, rank {rank} of D, "
        f"{summary['design']['basis_scope']} bases"
    )
    outputs.atomic_save_figure(figure, path)


def plot_per_layer(layers: dict[str, Any], path: Path) -> None:
    """per_layer.png: each layer's ND-PPL when truncated alone, keys and values, one panel per task."""
    tasks = list(layers["nd_ppl"])
    figure, axes = _figure(9, 2.2 + 2.4 * len(tasks), panels=len(tasks), stacked=True)  # a full-width row per task
    for ax, task in zip(axes, tasks, strict=False):
        count = len(layers["nd_ppl"][task]["key"])
        offsets = {"key": -0.2, "value": 0.2}
        for kind in KINDS:
            ax.bar(
                np.arange(count) + offsets[kind],
                layers["nd_ppl"][task][kind],
                width=0.4,
                label="keys" if kind == "key" else "values",
            )
        ax.set(xlabel="layer truncated alone", title=task, xlim=(-0.7, count - 0.3))
        _nd_ppl_scale(ax, [v for kind in KINDS for v in layers["nd_ppl"][task][kind]], "ND-PPL")
        ax.axhline(0, color="0.5", lw=0.8)
        ax.grid(alpha=0.3, axis="y")
    figure.legend(*axes[0].get_legend_handles_labels(), frameon=False, fontsize=8, loc="outside upper right")
    figure.suptitle(f"ND-PPL with one layer truncated at rank {layers['rank']:g} of D, the others at full rank")
    outputs.atomic_save_figure(figure, path)
