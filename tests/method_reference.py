"""Today's methods on the embedded model at fixed plans: the rows the codec refactor must leave as they were.

`python tests/method_reference.py` (run once on the code before the refactor, commit in its output) wrote
tests/data/method_rows.json; `test_codecs.py` recomputes the same rows and compares. Each row is one method at one
fixed plan (no search: a search would move with the bytes, which the refactor lowers by dropping the rotary tables),
scored through lm-eval on the first 4 documents of kvcore_alpaca, bases calibrated on the documents after them."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "examples" / "tiny-llama"
DATA = REPO / "examples" / "data"
PLANS = {  # method: the kvcore_hf options of its point (4 layers, D = 32)
    "uniform": {"key_rank": "16:16:16:16", "value_rank": "16:16:16:16"},
    "energy": {"rank_budget": 0.5, "budget_method": "energy"},
    "ner": {"rank_budget": 0.5, "budget_method": "ner"},
    "weights": {"basis": "weights", "key_rank": "16:16:16:16", "value_rank": "16:16:16:16"},
    "random": {"basis": "random", "key_rank": "16:16:16:16", "value_rank": "16:16:16:16"},
    "sequence": {"basis": "sequence", "key_rank": "16:16:16:16", "value_rank": "16:16:16:16"},
    "int8": {"key_rank": "full", "value_rank": "full", "latent_bits": 8},
    "int4": {"key_rank": "full", "value_rank": "full", "latent_bits": 4},
    "lowrank_int8": {"key_rank": "16:16:16:16", "value_rank": "16:16:16:16", "latent_bits": 8},
}


def method_rows(work: Path, plans: dict[str, dict] | None = None) -> list[dict]:
    """One row per method of `plans` (default PLANS): its byte perplexity, plan and measured bytes per token."""
    import lm_eval
    import torch

    from kvcore_eval.calibration.calibrate import calibrate
    from kvcore_eval.config import CalibrationConfig, TruncationConfig
    from kvcore_eval.harness.lm_tasks import ALL_RECORDS, task_manager
    from kvcore_eval.harness.wrapper import KVCoreHFLM

    artifact = calibrate(
        CalibrationConfig(
            model=str(MODEL),
            dataset="lm_eval:kvcore_alpaca",
            skip_docs=4,
            data_dir=str(DATA),
            out=str(work / "basis"),
            max_tokens=2000,
            seq_len=64,
            device="cpu",
        )
    )
    manager = task_manager(str(DATA), None, ALL_RECORDS)
    lm, rows = None, []
    for method, plan in (plans or PLANS).items():
        truncation = dataclasses.replace(TruncationConfig(), calibration=str(artifact), **plan)
        if lm is None:
            lm = KVCoreHFLM(pretrained=str(MODEL), batch_size=1, device="cpu", **dataclasses.asdict(truncation))
        else:
            lm.set_truncation(truncation)
        torch.manual_seed(0)
        results = lm_eval.simple_evaluate(model=lm, tasks=["kvcore_alpaca"], limit=4, task_manager=manager)
        measured = lm.kvcore_measured_bytes()
        rows.append(
            {
                "method": method,
                "byte_perplexity": results["results"]["kvcore_alpaca"]["byte_perplexity,none"],
                "rank_plan": lm.kvcore_plan.to_dict(),
                "bytes_per_token": measured["bytes_per_token"],
                "rope_bytes_per_token": sum(v for k, v in measured["parts_per_token"].items() if k.startswith("rope")),
            }
        )
    return rows


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as work:
        rows = method_rows(Path(work))
    out = REPO / "tests" / "data" / "method_rows.json"
    out.write_text(json.dumps({"made_by": sys.argv[1] if len(sys.argv) > 1 else "", "rows": rows}, indent=2) + "\n")
    print(out)
