"""`kvcore-eval table RUN...`: the paper's benchmark table from any number of calibrations.

Rows are datasets, columns models, each cell the mean NER over layers of keys / values (the paper's Table 1),
as markdown and JSON, plus one layer × dataset NER heatmap per model. Cells of one model compare only if their
calibrations were made alike: artifacts of one model that differ in token count, sequence length, dtype or key
space are refused, or with `--allow-mixed` kept and listed under the table. Rerunning rewrites the outputs
from the artifacts (nothing is computed that the artifacts do not hold).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from kvcore_eval import outputs
from kvcore_eval.analysis.report import layer_table, mean_ner, model_label
from kvcore_eval.calibration.artifact import load_calibration
from kvcore_eval.config import TableConfig

KIND = "table"
OWN_NAMES = ("config.json", "table.md", "table.json", "heatmaps")
ALIKE = ("tokens", "seq_len", "model_dtype")  # what cells of one model must share to be compared


def dataset_label(spec: str) -> str:
    """kvcore:alpaca -> alpaca, kvcore:visr:de -> visr:de, lm_eval:my_task -> my_task, a file -> its name."""
    for prefix in ("kvcore:", "lm_eval:"):
        if spec.startswith(prefix):
            return spec.removeprefix(prefix)
    return Path(spec).stem if spec.endswith((".jsonl", ".json", ".txt", ".parquet", ".csv")) else spec


def build_table(config: TableConfig) -> dict[str, Any]:
    key = f"key_{config.key_space}"
    cells: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)  # model -> dataset -> cell
    for run in config.runs:
        calibration = load_calibration(run)
        meta = calibration.metadata
        model, dataset = model_label(meta["model"]), dataset_label(meta["dataset"]["spec"])
        if dataset in cells[model]:
            raise ValueError(
                f"{run} and {cells[model][dataset]['run']} are both {model} on {dataset}: pass one of them"
            )
        table = layer_table(calibration)
        cells[model][dataset] = {
            "run": str(run),
            "key": mean_ner(table, key),
            "value": mean_ner(table, "value"),
            "layers_key": [s[key].ner for s in table],
            "layers_value": [s["value"].ner for s in table],
            **{name: meta.get(name) for name in ALIKE},
        }
    notes = _check_alike(cells, config.allow_mixed)
    datasets = sorted({d for per_model in cells.values() for d in per_model})
    return {
        "key_space": config.key_space,
        "models": sorted(cells),
        "datasets": datasets,
        "cells": cells,
        "notes": notes,
    }


def _check_alike(cells: dict[str, dict[str, dict[str, Any]]], allow_mixed: bool) -> list[str]:
    notes = []
    for model, per_dataset in cells.items():
        for name in ALIKE:
            seen = {str(cell[name]) for cell in per_dataset.values()}
            if len(seen) > 1:
                detail = ", ".join(f"{dataset}: {cell[name]}" for dataset, cell in sorted(per_dataset.items()))
                message = f"{model}: calibrations differ in {name} ({detail})"
                if not allow_mixed:
                    raise ValueError(
                        message
                        + ": recalibrate alike, or pass --allow-mixed to keep them and list this under the table"
                    )
                notes.append(message)
    return notes


def to_markdown(table: dict[str, Any]) -> str:
    space = "pre-RoPE" if table["key_space"] == "pre_rope" else "post-RoPE"
    lines = [
        f"# Average NER over layers, keys ({space}) / values",
        "",
        "| data | " + " | ".join(table["models"]) + " |",
        "|---|" + "---|" * len(table["models"]),
    ]
    for dataset in table["datasets"]:
        row = []
        for model in table["models"]:
            cell = table["cells"][model].get(dataset)
            row.append("" if cell is None else f"{cell['key']:.3f} / {cell['value']:.3f}")
        lines.append(f"| {dataset} | " + " | ".join(row) + " |")
    lines += ["", "Each cell: one calibration (`kvcore-eval calibrate`); per-layer NER in table.json and heatmaps/."]
    if table["notes"]:
        lines += ["", "**Mixed calibrations (kept with --allow-mixed):**", ""] + [
            f"- {note}" for note in table["notes"]
        ]
    return "\n".join(lines) + "\n"


KEY_SPACE_NAMES = {"pre_rope": "keys (pre-RoPE)", "post_rope": "keys (post-RoPE)"}


def plot_heatmap(model: str, per_dataset: dict[str, dict[str, Any]], path: Path, key_space: str) -> None:
    """Layer × dataset NER, one panel for keys (in `key_space`) and one for values, on a shared 0-1 colour scale."""
    from matplotlib.figure import Figure

    datasets = sorted(per_dataset)
    layers = len(next(iter(per_dataset.values()))["layers_key"])
    figure = Figure(
        figsize=(max(6.0, 1.1 * len(datasets) * 2 + 2), max(3.0, 0.22 * layers + 1.5)), dpi=130, layout="constrained"
    )
    axes = figure.subplots(1, 2, sharey=True)
    titles = (KEY_SPACE_NAMES[key_space], "values")
    for ax, kind, title in zip(axes, ("layers_key", "layers_value"), titles, strict=True):
        grid = np.array([per_dataset[d][kind] for d in datasets]).T  # (layers, datasets)
        image = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis", origin="lower")
        ax.set_xticks(range(len(datasets)), datasets, rotation=45, ha="right")
        ax.set(title=f"NER of {title}", xlabel="dataset")
    axes[0].set_ylabel("layer")
    figure.colorbar(image, ax=axes, label="normalized effective rank")
    figure.suptitle(model)
    outputs.atomic_save_figure(figure, path)


def write_table(config: TableConfig) -> dict[str, Path]:
    """Check the folder, build the table from the artifacts, write markdown, JSON and heatmaps."""
    from dataclasses import asdict

    out = Path(config.out)
    outputs.check_run_folder(out, KIND, OWN_NAMES)
    table = build_table(config)  # every artifact is read and checked before anything is written
    (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    outputs.write_config(out, KIND, asdict(config))
    paths = {"markdown": out / "table.md", "json": out / "table.json"}
    outputs.atomic_write_text(paths["markdown"], to_markdown(table))
    outputs.atomic_write_json(paths["json"], table)
    for model in table["models"]:
        path = out / "heatmaps" / f"{''.join(c if c.isalnum() or c in '-_.' else '_' for c in model)}.png"
        plot_heatmap(model, table["cells"][model], path, config.key_space)
        paths[f"heatmap {model}"] = path
    return paths
