"""`kvcore-eval compare a.json b.json`: two lm-eval results files side by side, metric by metric, each column named by
the model and the plan that made it (read from the results' own config), not by its file name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvcore_eval.outputs import read_json


def load_results(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        found = sorted(path.rglob("results_*.json"))
        raise ValueError(
            f"{path} is a folder, not a results file: pass the results_*.json lm-eval wrote"
            + (f" (in it: {found[0]}{' and others' if len(found) > 1 else ''})" if found else "")
        )
    if not path.is_file():
        raise FileNotFoundError(f"results file {path} does not exist")
    results = read_json(path, "lm-eval results file (pass the results_*.json lm-eval writes, not a samples file)")
    if not isinstance(results, dict) or "results" not in results:
        raise ValueError(
            f"{path} is not an lm-eval results file (no 'results' key): pass the results_*.json lm-eval writes"
        )
    return results


def compare(path_a: str | Path, path_b: str | Path) -> list[dict[str, Any]]:
    """One row per (task, metric) present in both: a, b, b - a and (b - a) / a."""
    a, b = load_results(path_a), load_results(path_b)
    if set(a["results"]) != set(b["results"]):
        raise ValueError(
            f"{path_a} and {path_b} cover different tasks ({sorted(a['results'])} vs {sorted(b['results'])}): "
            "compare runs of the same task set"
        )
    rows = []
    for task in sorted(a["results"]):
        for key, value_a in sorted(a["results"][task].items()):
            value_b = b["results"][task].get(key)
            if "stderr" in key or not isinstance(value_a, (int, float)) or not isinstance(value_b, (int, float)):
                continue
            delta = value_b - value_a
            rows.append(
                {
                    "task": task,
                    "metric": key.split(",")[0],
                    "a": value_a,
                    "b": value_b,
                    "delta": delta,
                    "relative": delta / value_a if value_a else float("nan"),
                }
            )
    return rows


def describe_run(results: dict[str, Any]) -> str:
    """What made a results file, as a column label: the model's name and the cache it ran with (kvcore_hf's plan and
    cache share, or the full cache of `hf`)."""
    config = results.get("config") or {}
    args = config.get("model_args") or {}
    if isinstance(args, str):  # lm-eval records the command line's "k=v,k=v" string
        args = dict(item.split("=", 1) for item in args.split(",") if "=" in item)
    pretrained = str(args.get("pretrained", "")) or "model"
    name = Path(str(args.get("gguf_file") or pretrained)).name or pretrained
    kvcore = config.get("kvcore")
    if not kvcore:
        return f"{name} · {config.get('model', 'hf')} (full cache)"
    truncation = kvcore.get("truncation") or {}
    shown = [
        f"{key}={truncation[key]}"
        for key in ("basis", "key_rank", "value_rank", "rank_budget", "budget_method", "latent_bits", "truncate")
        if truncation.get(key) is not None
        and not (key == "basis" and truncation[key] == "data")
        and not (key == "truncate" and truncation[key] == "both")
        and not (key == "budget_method" and truncation.get("rank_budget") is None)
    ]
    ratio = (kvcore.get("cache_bytes_per_token") or {}).get("ratio")
    share = f", {100 * ratio:.1f} % cache" if ratio is not None else ""
    return f"{name} · kvcore_hf {' '.join(shown)}{share}"


def labels(path_a: str | Path, path_b: str | Path) -> tuple[str, str]:
    """Column labels of two results files: what made each; the file names are added where that is the same."""
    a, b = describe_run(load_results(path_a)), describe_run(load_results(path_b))
    if a == b:
        return f"{a} ({Path(path_a).name})", f"{b} ({Path(path_b).name})"
    return a, b


def to_markdown(rows: list[dict[str, Any]], label_a: str, label_b: str) -> str:
    lines = [f"| task | metric | {label_a} | {label_b} | delta | relative |", "|---|---|---:|---:|---:|---:|"]
    lines += [
        f"| {r['task']} | {r['metric']} | {r['a']:.4f} | {r['b']:.4f} | {r['delta']:+.4f} | {r['relative']:+.2%} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"
