"""A sweep's tasks scored by their own metric (generation: RULER, kvcore_ruler, ...): the metric per truncated kind,
rank and context length, as a table and as heatmaps (context length x rank, one panel per kind). Figures use
matplotlib's object API (`Figure`): no pyplot state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kvcore_eval import outputs


def summarize(
    units: list[dict[str, Any]],
    baseline: dict[str, float],
    scores: dict[str, dict[str, dict[str, float]]],
    design: dict[str, Any],
) -> dict[str, Any]:
    """`units`: name, task, length, metric of each; `baseline`: name -> the metric at full rank; `scores`: kind ->
    rank (below full, as a string) -> name -> the metric."""
    return {
        "units": units,
        "kinds": list(scores),
        "ranks": sorted({rank for by_rank in scores.values() for rank in by_rank}, key=float, reverse=True),
        "baseline": baseline,
        "scores": scores,
        "design": {
            key: design[key]
            for key in ("model", "model_name", "num_samples", "basis_scope", "gen_kwargs", "truncation")
            if key in design
        },
    }


def _by_task(result: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """task -> its units, shortest context first."""
    tasks: dict[str, list[dict[str, Any]]] = {}
    for unit in result["units"]:
        tasks.setdefault(unit["task"], []).append(unit)
    return {task: sorted(units, key=lambda u: u["length"] or 0) for task, units in tasks.items()}


def _length(unit: dict[str, Any]) -> str:
    return str(unit["length"]) if unit["length"] is not None else "its documents"


def to_markdown(result: dict[str, Any]) -> str:
    """A table per task: a row per kind and rank (the full-rank baseline first), a column per context length."""
    design = result["design"]
    bases = (
        "each task's own calibration on its held-out documents (those after the scored ones, at the same length)"
        if design.get("basis_scope") == "per-task"
        else f"`{design.get('truncation', {}).get('calibration')}`"
    )
    gen = f"; `--gen-kwargs {design['gen_kwargs']}`" if design.get("gen_kwargs") else ""
    lines = [
        "## Tasks scored by their own metric",
        "",
        f"Each cell: the task's metric over its first {design.get('num_samples')} documents, truncated with {bases}"
        f"{gen}. Full rank is the baseline (`kvcore_hf` at full rank generates what `hf` generates).",
    ]
    for task, units in _by_task(result).items():
        lines += [
            "",
            f"### {task} (metric: {metric_label(units)})",
            "",
            "| truncated | rank | " + " | ".join(_length(u) for u in units) + " |",
            "|---|---:|" + "---:|" * len(units),
            "| none (baseline) | full | " + " | ".join(f"{result['baseline'][u['name']]:.3f}" for u in units) + " |",
        ]
        for kind in result["kinds"]:
            for rank in result["ranks"]:
                cells = [f"{result['scores'][kind][rank][u['name']]:.3f}" for u in units]
                lines.append(f"| {kind} | {rank} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def grid(result: dict[str, Any], task: str, kind: str) -> np.ndarray:
    """(lengths, 1 + ranks): the task's metric at each context length, full rank first, then each rank below it."""
    units = _by_task(result)[task]
    return np.array(
        [
            [result["baseline"][u["name"]]] + [result["scores"][kind][rank][u["name"]] for rank in result["ranks"]]
            for u in units
        ],
        dtype=float,
    )


def metric_label(units: list[dict[str, Any]]) -> str:
    metrics = sorted({u["metric"] for u in units})
    return "named by the context length" if all(m.isdigit() for m in metrics) else ", ".join(metrics)


def plot_heatmap(result: dict[str, Any], path: Path) -> None:
    """accuracy.png: a row of panels per task, one panel per kind truncated; rows are context lengths, columns the
    rank kept (full first), the colour and the number in each cell the task's metric."""
    from matplotlib.figure import Figure

    tasks, kinds = list(_by_task(result)), result["kinds"]
    columns = ["full", *result["ranks"]]
    title = f"{result['design'].get('model_name', '')}: task metric by context length and rank"
    # wide enough for the longest title at its font size (about 0.075 inch a character at 9 pt): none is clipped
    width = max(2.0 + 0.6 * len(columns) * len(kinds), 0.075 * max(len(title), *map(len, tasks)) + 0.5)
    figure = Figure(figsize=(width, 0.5 + 2.0 * len(tasks)), dpi=130, layout="constrained")
    for subfigure, task in zip(figure.subfigures(len(tasks), 1, squeeze=False)[:, 0], tasks, strict=True):
        units = _by_task(result)[task]
        grids = {kind: grid(result, task, kind) for kind in kinds}
        low = min(0.0, min(float(np.nanmin(g)) for g in grids.values()))
        high = max(float(np.nanmax(g)) for g in grids.values())
        high = high if high > low else low + 1.0
        axes = subfigure.subplots(1, len(kinds), squeeze=False)[0]
        image = None
        for ax, kind in zip(axes, kinds, strict=True):
            values = grids[kind]
            image = ax.imshow(values, vmin=low, vmax=high, cmap="viridis", aspect="auto")
            for (i, j), value in np.ndenumerate(values):
                dark = (value - low) / (high - low) < 0.6
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w" if dark else "k")
            ax.set_xticks(range(len(columns)), columns, fontsize=7)
            ax.set_yticks(range(len(units)), [_length(u) for u in units], fontsize=7)
            ax.set_xlabel("rank kept (fraction of D)", fontsize=8)
            ax.set_title(f"{kind} truncated", fontsize=8)
        axes[0].set_ylabel("context length (tokens)", fontsize=8)
        subfigure.colorbar(image, ax=list(axes), shrink=0.9).set_label(f"metric: {metric_label(units)}", fontsize=7)
        subfigure.suptitle(task, fontsize=9)
    figure.suptitle(title, fontsize=9)
    outputs.atomic_save_figure(figure, path)
