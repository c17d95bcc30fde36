"""The spectral code's target (issue 26), read from two frontiers measured on the real model (the commands are in
benchmarks/README.md, "The spectral code's target"): at 2 bits per cached number, its byte ND-PPL at most half the best
other method's on held-out prose, and niah_single_1 at 1k at least 9/10.

    python benchmarks/spectral_target.py --prose runs/frontier-bits --niah runs/frontier-niah-bits

Prints one markdown table: per task, the spectral code's value at the budget, the best other method that fits the same
measured bytes, their ratio (perplexity tasks) and whether the target is met. It measures nothing itself: a frontier is
minutes to an hour of CPU, and its points are what the README reports.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvcore_eval.compression.methods import parse_budgets


def build_parser() -> argparse.ArgumentParser:
    """The command line (the docs test parses the commands the docs show with it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prose", required=True, help="output folder of the prose frontier (frontier.json)")
    parser.add_argument("--niah", default=None, help="output folder of the niah_single_1 frontier at 1k")
    parser.add_argument("--budget", default="2b", help="the budget the target is read at (default: 2b)")
    return parser


def target_rows(rows: list[dict], budget_text: str) -> list[dict]:
    """Per task: the spectral code at the budget and the best other row whose measured bytes fit it."""
    (budget,) = parse_budgets(budget_text)
    found = []
    for task in dict.fromkeys(r["task"] for r in rows):
        full = next(r for r in rows if r["task"] == task and r["method"] == "full")
        numbers = round(8 * full["bytes_per_token"] / full["bits_per_number"])
        limit = budget.bytes(full["bytes_per_token"], numbers) * (1 + 1e-9)
        fitting = [r for r in rows if r["task"] == task and r["method"] != "full" and r["bytes_per_token"] <= limit]
        better = (lambda r: r["value"]) if full["higher_is_better"] else (lambda r: -r["value"])
        spectral = [r for r in fitting if r["method"] == "spectral" and r["budget"] == budget.text]
        others = [r for r in fitting if not r["method"].startswith("spectral")]
        found.append(
            {
                "task": task,
                "higher_is_better": full["higher_is_better"],
                "spectral": spectral[0] if spectral else None,
                "best_other": max(others, key=better) if others else None,
            }
        )
    return found


def main() -> None:
    args = build_parser().parse_args()
    lines = [
        f"| task | spectral at {args.budget} | best other within {args.budget} | ratio | target | met |",
        "|---|---:|---|---:|---|:---:|",
    ]
    for folder, kind in ((args.prose, "prose"), (args.niah, "niah")):
        if folder is None:
            continue
        for row in target_rows(json.loads((Path(folder) / "frontier.json").read_text()), args.budget):
            spectral, other = row["spectral"], row["best_other"]
            if spectral is None:
                lines.append(f"| {row['task']} | not run | | | | |")
                continue
            other_text = "none fits" if other is None else f"{other['method']} {other['value']:.4f}"
            if kind == "prose":
                ratio = (
                    other["value"] / spectral["value"] if other is not None and spectral["value"] > 0 else float("nan")
                )
                met = other is None or spectral["value"] <= other["value"] / 2
                lines.append(
                    f"| {row['task']} | {spectral['value']:+.4f} | {other_text} | {ratio:.1f}x | ≤ half the best other "
                    f"| {'yes' if met else 'no'} |"
                )
            else:
                met = spectral["value"] >= 0.9
                lines.append(
                    f"| {row['task']} | {spectral['value']:.2f} | {other_text} | | ≥ 9/10 | {'yes' if met else 'no'} |"
                )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
