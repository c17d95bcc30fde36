"""`kvcore-eval report`: per-layer NER, effective rank and energy ranks of an artifact, and its compressibility in bits
(the Gaussian rate–distortion bound of each layer's spectrum at 1, 2 and 4 bits a number, and the coding gain a code
that knows the spectrum has over one that does not), as markdown, JSON and PNG."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kvcore_eval import metrics, outputs
from kvcore_eval.calibration.artifact import Calibration, load_calibration
from kvcore_eval.compression import waterfill
from kvcore_eval.spaces import SPACES

logger = logging.getLogger(__name__)

ENERGY_FRACTIONS = (0.90, 0.95, 0.99)
BOUND_BITS = (1, 2, 4)  # bits a number at which each layer's rate–distortion bound is reported


@dataclass
class SpaceStats:
    """Compressibility of one layer in one space (key_pre_rope, key_post_rope or value)."""

    ner: float
    effective_rank: float
    rank_90: int
    rank_95: int
    rank_99: int
    head_ner_mean: float  # mean NER of the per-head spectra (head granularity)
    coding_gain_db: float  # arithmetic over geometric mean of the eigenvalues: what knowing the spectrum saves
    bound_1: float  # the least relative squared error at 1 bit a number (Gaussian rate–distortion bound)
    bound_2: float
    bound_4: float


def space_stats(eigenvalues: np.ndarray, head_eigenvalues: np.ndarray) -> SpaceStats:
    """eigenvalues: (D,); head_eigenvalues: (kv_heads, head_dim)."""
    singular = metrics.singular_values(eigenvalues)
    ranks = [metrics.energy_rank(eigenvalues, f) for f in ENERGY_FRACTIONS]
    head_ner = float(np.mean([metrics.normalized_effective_rank(metrics.singular_values(h)) for h in head_eigenvalues]))
    bounds = [waterfill.rd_bound(eigenvalues, bits * len(eigenvalues)) for bits in BOUND_BITS]
    return SpaceStats(
        metrics.normalized_effective_rank(singular),
        metrics.effective_rank(singular),
        *ranks,
        head_ner,
        waterfill.coding_gain_db(eigenvalues),
        *bounds,
    )


def model_path(model: dict) -> str:
    """The model as it was given: the hub id or folder, or the .gguf file inside its folder."""
    return str(Path(model["model_id"]) / model["gguf"]["file"]) if model.get("gguf") else model["model_id"]


def model_label(model: dict) -> str:
    """A model as people name it: the folder or hub id's last part, and the GGUF file where there is one."""
    name = Path(model["model_id"]).name or model["model_id"]
    return f"{name} ({model['gguf']['file']})" if model.get("gguf") else name


def layer_table(calibration: Calibration) -> list[dict[str, SpaceStats]]:
    """One dict per layer: space -> SpaceStats."""
    return [
        {
            space: space_stats(
                calibration.eigenvalues[space][layer].numpy(), calibration.head_eigenvalues[space][layer].numpy()
            )
            for space in SPACES
        }
        for layer in range(calibration.geometry.num_layers)
    ]


def mean_ner(table: list[dict[str, SpaceStats]], space: str) -> float:
    """NER averaged over layers: the paper's per-model, per-dataset number."""
    return float(np.mean([stats[space].ner for stats in table]))


def to_markdown(calibration: Calibration, table: list[dict[str, SpaceStats]]) -> str:
    meta = calibration.metadata
    width = calibration.geometry.width
    lines = [
        f"# KV-CoRE report: {model_path(meta['model'])} on {meta['dataset']['spec']}",
        "",
        f"{meta['tokens']} tokens (of {meta.get('tokens_requested', meta['tokens'])} asked for), {len(table)} layers, "
        f"D = {width} (kv_heads x head_dim = "
        f"{calibration.geometry.kv_heads} x {calibration.geometry.head_dim}).",
        "",
        "Compressibility in bits: *bound* is the least relative squared error any code reaches at 1, 2 and 4 bits a "
        "number (the Gaussian rate–distortion bound of the layer's spectrum, by reverse water-filling), *gain* the "
        "coding gain in dB a code that knows the spectrum has over one that does not (post-RoPE keys: report.json).",
        "",
        "| layer | NER K pre-RoPE | NER K post-RoPE | NER V | erank K pre | erank V | K pre r90/95/99 | V r90/95/99 "
        "| K pre bound 1/2/4 bits | K gain | V bound 1/2/4 bits | V gain |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for layer, stats in enumerate(table):
        k, kp, v = stats["key_pre_rope"], stats["key_post_rope"], stats["value"]
        lines.append(
            f"| {layer} | {k.ner:.3f} | {kp.ner:.3f} | {v.ner:.3f} | {k.effective_rank:.1f} | {v.effective_rank:.1f} "
            f"| {k.rank_90}/{k.rank_95}/{k.rank_99} | {v.rank_90}/{v.rank_95}/{v.rank_99} "
            f"| {_bounds(k)} | {k.coding_gain_db:.1f} | {_bounds(v)} | {v.coding_gain_db:.1f} |"
        )
    means = {space: mean_ner(table, space) for space in SPACES}
    lines.append(
        f"| **mean** | **{means['key_pre_rope']:.3f}** | **{means['key_post_rope']:.3f}** | "
        f"**{means['value']:.3f}** | | | | | | | | |"
    )
    return "\n".join(lines) + "\n"


def _bounds(stats: SpaceStats) -> str:
    return f"{stats.bound_1:.2g} / {stats.bound_2:.2g} / {stats.bound_4:.2g}"


def plot_ner(table: list[dict[str, SpaceStats]], title: str, path: Path) -> None:
    """NER per layer for each space, drawn on an explicit Figure (no pyplot state, no backend switch)."""
    import matplotlib.ticker
    from matplotlib.figure import Figure

    layers = np.arange(len(table))
    fig = Figure(figsize=(7, 3.6), dpi=120, layout="constrained")
    ax = fig.subplots()
    styles = {
        "key_pre_rope": ("K (pre-RoPE)", "tab:blue", "-"),
        "key_post_rope": ("K (post-RoPE)", "tab:blue", ":"),
        "value": ("V", "tab:orange", "-"),
    }
    for space, (label, color, line) in styles.items():
        ax.plot(layers, [s[space].ner for s in table], line, marker="o", ms=3, color=color, label=label)
    ax.set(xlabel="layer", ylabel="normalized effective rank", ylim=(0, 1.02), title=title)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    outputs.atomic_save_figure(fig, path)


REPORT_KIND = "report"
REPORT_NAMES = (outputs.CONFIG_FILE, "report.md", "report.json", "ner.png")


def write_report(artifact_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write report.md, report.json and ner.png (default: into the artifact directory). Returns their paths.
    Another `out_dir` becomes a report folder: refused if it holds files kvcore-eval did not write."""
    calibration = load_calibration(artifact_dir)
    out = Path(out_dir or artifact_dir)
    if out.resolve() == Path(artifact_dir).resolve():
        outputs.check_writable(out, "the report goes into the artifact folder unless --out names another folder")
    else:
        outputs.check_run_folder(out, REPORT_KIND, REPORT_NAMES)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise outputs.unwritable(out, err, "it cannot be created for the report") from None
        outputs.check_writable(out, "the report goes there (--out)")
        outputs.write_config(out, REPORT_KIND, {"artifact": str(artifact_dir)})
    table = layer_table(calibration)
    paths = {"markdown": out / "report.md", "json": out / "report.json", "plot": out / "ner.png"}
    outputs.atomic_write_text(paths["markdown"], to_markdown(calibration, table))
    summary = {
        "model": calibration.metadata["model"]["model_id"],
        "model_path": model_path(calibration.metadata["model"]),
        "dataset": calibration.metadata["dataset"]["spec"],
        "tokens": calibration.metadata["tokens"],
        "tokens_requested": calibration.metadata.get("tokens_requested"),
        "mean_ner": {space: mean_ner(table, space) for space in SPACES},
        "layers": [{space: asdict(stats[space]) for space in SPACES} for stats in table],
    }
    outputs.atomic_write_json(paths["json"], summary)
    plot_ner(table, f"{model_label(calibration.metadata['model'])} on {summary['dataset']}", paths["plot"])
    logger.info("report written to %s", out)
    return paths
