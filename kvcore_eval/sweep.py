"""`kvcore-eval sweep`: ND-PPL per task and rank, NER per task, and how well NER predicts ND-PPL.

Each point (the baseline, then each rank) is one lm-eval run saved as `points/<name>.json`; a rerun skips
finished points, so an interrupted sweep resumes. Each task's NER comes from a calibration on that task's
own data (`ner/<task>/`, reused when present). Outputs: sweep.json, sweep.md, nd_ppl.png, ner_vs_nd_ppl.png.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from kvcore_eval import metrics
from kvcore_eval.config import CalibrationConfig, EvalConfig, SweepConfig

logger = logging.getLogger(__name__)


def task_source(task: str) -> str:
    """The calibration dataset of a kvcore task: kvcore_alpaca -> kvcore:alpaca, kvcore_visr_de -> kvcore:visr:de."""
    name = task.removeprefix("kvcore_")
    if name.startswith("visr_"):
        return f"kvcore:visr:{name.removeprefix('visr_')}"
    return f"kvcore:{name}"


def _point(config: SweepConfig, name: str, eval_config: EvalConfig) -> dict[str, float]:
    """task -> config.metric at one sweep point; a finished point of the same settings is reused."""
    path = Path(config.out) / "points" / f"{name}.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved["eval_config"] != asdict(eval_config):
            raise ValueError(f"{path} was run with other settings ({saved['eval_config']}): use another --out, or delete it to rerun")
        logger.info("sweep point %s already done, reusing %s", name, path)
    else:
        from kvcore_eval.evaluate import run_lm_eval

        results = run_lm_eval(eval_config)
        metrics_by_task = {task: {key.split(",")[0]: value for key, value in values.items() if isinstance(value, (int, float))}
                           for task, values in results["results"].items() if task not in results.get("groups", {})}
        saved = {"eval_config": asdict(eval_config), "metrics": metrics_by_task, "kvcore": results["config"].get("kvcore")}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(saved, indent=2) + "\n")
    values = {task: float(metrics[config.metric]) for task, metrics in saved["metrics"].items() if config.metric in metrics}
    if not values:
        raise ValueError(f"tasks {config.tasks} report no {config.metric!r}: sweep kvcore perplexity tasks, or pass another --metric")
    return values


def _task_ner(config: SweepConfig, task: str) -> dict[str, float]:
    """Mean-over-layers NER of keys (config.key_space) and values on the task's own data."""
    from kvcore_eval.artifact import METADATA_FILE, load_calibration
    from kvcore_eval.calibrate import calibrate
    from kvcore_eval.report import layer_table, mean_ner

    out = Path(config.out) / "ner" / task
    if not (out / METADATA_FILE).exists():
        calibrate(CalibrationConfig(model=config.model, dataset=task_source(task), out=str(out), data_dir=config.data_dir,
                                    max_tokens=config.ner_tokens, seq_len=config.seq_len, device=config.device,
                                    dtype=config.dtype, resume=(out / "checkpoint").exists()))
    table = layer_table(load_calibration(out))
    return {"key": mean_ner(table, f"key_{config.key_space}"), "value": mean_ner(table, "value")}


def run_sweep(config: SweepConfig) -> dict[str, Any]:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    base = EvalConfig(model=config.model, tasks=config.tasks, data_dir=config.data_dir, limit=config.limit,
                      batch_size=config.batch_size, device=config.device, dtype=config.dtype)
    baseline = _point(config, "baseline", base)
    truncated = {}
    for rank in config.rank_list():
        spec = "full" if rank == 1 else str(rank)
        keys = spec if config.truncate in ("keys", "both") else None
        values = spec if config.truncate in ("values", "both") else None
        point = replace(base, calibration=config.calibration, key_rank=keys, value_rank=values, key_space=config.key_space, truncate=config.truncate)
        truncated[rank] = _point(config, f"rank_{rank:g}", point)
    ner = {task: _task_ner(config, task) for task in baseline}
    summary = summarize(baseline, truncated, ner)
    (out / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "sweep.md").write_text(to_markdown(summary, config))
    plot(summary, out)
    return summary


def summarize(baseline: dict[str, float], truncated: dict[float, dict[str, float]], ner: dict[str, dict[str, float]]) -> dict[str, Any]:
    """ND-PPL per task and rank, and Pearson/Spearman of NER against ND-PPL across tasks at each rank."""
    tasks = sorted(baseline)
    nd_ppl = {task: {f"{rank:g}": metrics.nd_ppl(truncated[rank][task], baseline[task]) for rank in truncated} for task in tasks}
    correlation = {}
    for rank in truncated:
        deltas = [nd_ppl[task][f"{rank:g}"] for task in tasks]
        correlation[f"{rank:g}"] = {
            kind: {"pearson": metrics.pearson([ner[t][kind] for t in tasks], deltas), "spearman": metrics.spearman([ner[t][kind] for t in tasks], deltas)}
            for kind in ("key", "value")
        }
    return {"tasks": tasks, "ranks": [f"{r:g}" for r in truncated], "baseline_perplexity": baseline,
            "perplexity": {f"{r:g}": v for r, v in truncated.items()}, "nd_ppl": nd_ppl, "ner": ner, "correlation": correlation}


def _cell(value: float) -> str:
    return "n/a" if value is None or np.isnan(value) else f"{value:+.3f}"


def to_markdown(summary: dict[str, Any], config: SweepConfig) -> str:
    ranks = summary["ranks"]
    lines = [f"# Rank sweep: {config.model}", "", f"Bases from `{config.calibration}`, truncating {config.truncate} "
             f"({config.key_space} keys); ND-PPL = (PPL_r - PPL_full) / PPL_full on {config.metric}.", "",
             "| task | NER K | NER V | PPL full | " + " | ".join(f"ND-PPL r={r}" for r in ranks) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(ranks)]
    for task in summary["tasks"]:
        ner = summary["ner"][task]
        cells = " | ".join(f"{summary['nd_ppl'][task][r]:.4f}" for r in ranks)
        lines.append(f"| {task} | {ner['key']:.3f} | {ner['value']:.3f} | {summary['baseline_perplexity'][task]:.3f} | {cells} |")
    lines += ["", "Correlation of NER with ND-PPL across tasks:", "", "| rank | K Pearson | K Spearman | V Pearson | V Spearman |", "|---:|---:|---:|---:|---:|"]
    for rank, corr in summary["correlation"].items():
        lines.append(f"| {rank} | {_cell(corr['key']['pearson'])} | {_cell(corr['key']['spearman'])} | {_cell(corr['value']['pearson'])} | {_cell(corr['value']['spearman'])} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = [float(r) for r in summary["ranks"]]
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    for task in summary["tasks"]:
        ax.plot(ranks, [summary["nd_ppl"][task][f"{r:g}"] for r in ranks], marker="o", ms=3, label=task)
    ax.set(xlabel="rank (fraction of D)", ylabel="ND-PPL (symlog)", title="ND-PPL vs rank")
    ax.set_yscale("symlog", linthresh=0.01)  # ND-PPL spans orders of magnitude as rank falls
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "nd_ppl.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    lowest = summary["ranks"][-1]
    for kind, marker in (("key", "o"), ("value", "s")):
        xs = [summary["ner"][t][kind] for t in summary["tasks"]]
        ys = [summary["nd_ppl"][t][lowest] for t in summary["tasks"]]
        ax.scatter(xs, ys, marker=marker, label=f"{kind} NER")
        for task, x, y in zip(summary["tasks"], xs, ys):
            ax.annotate(task.removeprefix("kvcore_"), (x, y), fontsize=6, alpha=0.7)
    ax.set(xlabel="mean NER over layers", ylabel=f"ND-PPL at rank {lowest} (symlog)", title="NER vs ND-PPL")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(out / "ner_vs_nd_ppl.png")
    plt.close(fig)
