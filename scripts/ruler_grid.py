"""Accuracy of `hf` and `kvcore_hf` on long-context generation tasks, cell by cell, with one model load.

The README's RULER table on SmolLM2 (CPU) comes from this script. Each cell (task, context length, basis, truncated
kind, rank) scores the first `--limit` documents of the task generated at that length; finished cells are kept in
`<out>/cells/*.json` and skipped by a rerun, so the grid can be stopped and continued. Each task is built once per
length (RULER generates its documents at load) and shared by the cells that follow it. The baseline is lm-eval's own
`hf` model on the same weights; `kvcore_hf` cells swap rank plans on one loaded model.

    python scripts/ruler_grid.py --model $SMOL/SmolLM2-135M-Instruct.Q4_1.gguf --out runs/ruler-grid \\
        --prose runs/smol-prose --task-basis niah_single_1=runs/smol-niah1 \\
        --task-basis niah_single_1@4096=runs/smol-niah1-4k --cells cells.txt

`--cells` lists one cell a line: `task length basis kind rank` (basis: hf, prose or task; kind: keys, values, both;
rank: a fraction of D), run in the order given. `<out>/grid.md` (printed at the end) holds each finished cell's mean
score (RULER's, in [0, 1]) with its number of documents.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

logger = logging.getLogger("ruler_grid")


def parse_cells(path: Path) -> list[tuple[str, int, str, str, float]]:
    cells = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            task, length, basis, kind, rank = line.split()
            cells.append((task, int(length), basis, kind, float(rank)))
    return cells


def write_table(out: Path) -> str:
    """grid.md: mean score of every finished cell, a row per (task, length), a column per (basis, kind, rank)."""
    cells = [json.loads(path.read_text()) for path in sorted((out / "cells").glob("*.json"))]
    order = {"hf": 0, "prose": 1, "task": 2}
    columns = sorted({(c["basis"], c["kind"], c["rank"]) for c in cells}, key=lambda k: (order[k[0]], -k[2], k[1]))
    rows = sorted({(c["task"], c["length"]) for c in cells})
    found = {(c["task"], c["length"], c["basis"], c["kind"], c["rank"]): c for c in cells}
    names = ["hf" if b == "hf" else f"{b} {k} {r:g}" for b, k, r in columns]
    lines = ["| task | length | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(columns)]
    for task, length in rows:
        values = []
        for column in columns:
            cell = found.get((task, length, *column))
            values.append("" if cell is None else f"{cell['accuracy']:.2f} ({len(cell['answers'])})")
        lines.append(f"| {task} | {length} | " + " | ".join(values) + " |")
    table = "\n".join(lines) + "\n"
    (out / "grid.md").write_text(table)
    return table


def build_parser() -> argparse.ArgumentParser:
    """The command line (the docs test parses the commands the docs show with it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder or .gguf file")
    parser.add_argument("--out", required=True, help="output folder (cells/*.json, grid.md)")
    parser.add_argument("--prose", required=True, help="calibration artifact of English prose (basis `prose`)")
    parser.add_argument(
        "--task-basis",
        action="append",
        default=[],
        help="TASK=ARTIFACT or TASK@LENGTH=ARTIFACT (basis `task`; the one for the cell's length first)",
    )
    parser.add_argument("--cells", required=True, help="file of cells: task length basis kind rank")
    parser.add_argument("--limit", type=int, default=5, help="documents per cell (the first of the task)")
    parser.add_argument("--gen-kwargs", default="", help="lm-eval --gen_kwargs for every cell, e.g. max_gen_toks=16")
    parser.add_argument("--batch-size", type=int, default=1)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from kvcore_eval.config import TruncationConfig
    from kvcore_eval.harness.lm_tasks import leaf_tasks, load_as_evaluated, task_manager, tokenizer_metadata
    from kvcore_eval.harness.wrapper import KVCoreHFLM
    from kvcore_eval.model import models

    out = Path(args.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    task_basis = dict(item.split("=", 1) for item in args.task_basis)
    cells = parse_cells(Path(args.cells))
    model_id, gguf_file = models.gguf_location(args.model, None)
    model = models.load_causal_lm(model_id, None, "cpu", "float32", gguf_file)
    tokenizer = models.load_tokenizer(model_id, None, gguf_file)
    base_metadata = tokenizer_metadata(model_id, gguf_file, tokenizer)
    hf = kv = None
    built: dict[tuple[str, int], object] = {}  # RULER generates 500 documents per load: once per task and length
    for task, length, basis, kind, rank in cells:
        name = f"{task}_{length}_{basis}_{kind}_{rank:g}"
        path = out / "cells" / f"{name}.json"
        artifact = None
        if basis != "hf":
            artifact = args.prose if basis == "prose" else task_basis.get(f"{task}@{length}", task_basis.get(task))
            if artifact is None:
                raise SystemExit(f"cell {name}: no --task-basis {task}=ARTIFACT or {task}@{length}=ARTIFACT")
        if path.exists():  # reused only when it was scored the same way
            saved = json.loads(path.read_text())
            made = {key: saved[key] for key in ("artifact", "limit", "gen_kwargs")}
            if made != {"artifact": artifact, "limit": args.limit, "gen_kwargs": args.gen_kwargs}:
                raise SystemExit(f"{path} was scored with {made}: move it away, or use another --out")
            continue
        if (task, length) not in built:
            manager = task_manager(None, None, {**base_metadata, "max_seq_lengths": [length]})
            # under the seeds lm-eval's simple_evaluate sets before loading: the documents `lm_eval --tasks` scores
            # (RULER draws needles from the global RNGs), the same in every run and for every cell of this row
            (built_task,) = leaf_tasks(load_as_evaluated(manager, [task]))
            built = {(task, length): built_task}
        if basis == "hf":
            if hf is None:  # its own copy of the weights: kvcore_hf hooks the model it wraps
                own = models.load_causal_lm(model_id, None, "cpu", "float32", gguf_file)
                hf = HFLM(pretrained=own, tokenizer=tokenizer, batch_size=args.batch_size)
            lm = hf
        else:
            spec = f"{rank:g}" if rank < 1 else "full"
            truncation = TruncationConfig(
                calibration=artifact,
                key_rank=spec if kind in ("keys", "both") else None,
                value_rank=spec if kind in ("values", "both") else None,
                truncate=kind,
            )
            if kv is None:
                kv = KVCoreHFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, **vars(truncation))
            else:
                kv.set_truncation(truncation)
            lm = kv
        start = time.time()
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=[built[task, length]],
            limit=args.limit,
            gen_kwargs=args.gen_kwargs or None,
            log_samples=True,
        )
        values = {key.split(",")[0]: value for key, value in results["results"][task].items()}
        samples = results["samples"][task]
        record = {
            "task": task,
            "length": length,
            "basis": basis,
            "artifact": artifact,
            "kind": kind,
            "rank": rank,
            "limit": args.limit,
            "gen_kwargs": args.gen_kwargs,
            "accuracy": float(values[str(length)]),
            "seconds": round(time.time() - start, 1),
            "calibration_overlap": None if lm is hf else lm.get_model_info()["kvcore"]["calibration_overlap"].get(task),
            "answers": [
                {"target": s["target"], "response": s["filtered_resps"][0], "score": s[str(length)]} for s in samples
            ],
        }
        path.write_text(json.dumps(record, indent=1))
        logger.info("%s: %.2f (%.0f s)", name, record["accuracy"], record["seconds"])
        write_table(out)
    print(write_table(out))


if __name__ == "__main__":
    main()
