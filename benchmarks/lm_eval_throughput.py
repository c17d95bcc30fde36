"""lm-eval throughput: the same loglikelihood task through `hf` and `kvcore_hf` (full rank, and rank 0.25 with
attention over the reconstruction and over the latents), same batch size, requests/s side by side in one run.

Each model is loaded before the clock starts; what is timed is `simple_evaluate` on the task.

    python benchmarks/lm_eval_throughput.py                       # SmolLM2-135M where installed, on examples/real-text
    python benchmarks/lm_eval_throughput.py --model examples/tiny-llama --data-dir examples/data
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import SMOLLM2_GGUF, smollm2_folder

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default=None, help="model folder (default: SmolLM2-135M where installed, else examples/tiny-llama)"
    )
    parser.add_argument("--data-dir", default=str(REPO / "examples" / "real-text"))
    parser.add_argument("--task", default="kvcore_alpaca")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed evaluations per model (the best is reported)")
    args = parser.parse_args()

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from kvcore_eval.calibrate import calibrate
    from kvcore_eval.config import CalibrationConfig
    from kvcore_eval.lm_tasks import task_manager
    from kvcore_eval.models import gguf_location, load_causal_lm, load_tokenizer
    from kvcore_eval.wrapper import KVCoreHFLM

    folder = smollm2_folder()
    model_path = args.model or (str(Path(folder) / SMOLLM2_GGUF) if folder else str(REPO / "examples" / "tiny-llama"))
    model_id, gguf_file = gguf_location(model_path, None)
    model, tokenizer = (
        load_causal_lm(model_id, None, "cpu", "float32", gguf_file),
        load_tokenizer(model_id, None, gguf_file),
    )
    artifact = calibrate(
        CalibrationConfig(
            model=model_path,
            dataset=f"kvcore:{args.task.removeprefix('kvcore_')}",
            data_dir=args.data_dir,
            out=str(Path(tempfile.mkdtemp()) / "artifact"),
            max_tokens=1024,
            seq_len=128,
            device="cpu",
        ),
        model=model,
        tokenizer=tokenizer,
    )
    common = dict(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    candidates = {
        "hf": lambda: HFLM(**common),
        "kvcore_hf full rank": lambda: KVCoreHFLM(
            calibration=str(artifact), key_rank="full", value_rank="full", **common
        ),
    }
    for key_space in ("pre_rope", "post_rope"):
        for attention in ("reconstruct", "latent"):
            candidates[f"kvcore_hf 0.25 {key_space}, {attention}"] = lambda k=key_space, a=attention: KVCoreHFLM(
                calibration=str(artifact), key_rank=0.25, value_rank=0.25, key_space=k, attention=a, **common
            )
    manager = task_manager(args.data_dir)
    rows = []
    for name, build in candidates.items():
        lm = build()
        best, requests = float("inf"), 0
        for _ in range(args.repeats):
            start = time.perf_counter()
            results = lm_eval.simple_evaluate(model=lm, tasks=[args.task], task_manager=manager)
            best = min(best, time.perf_counter() - start)
            requests = results["n-samples"][args.task]["effective"]
        rows.append((name, requests / best, results["results"][args.task]["byte_perplexity,none"]))
    print(
        f"model: {model_path}; task {args.task} on {args.data_dir}, batch size {args.batch_size}, best of {args.repeats}"
    )
    print("| model | requests/s | vs hf | byte perplexity |")
    print("|---|---:|---:|---:|")
    for name, speed, perplexity in rows:
        print(f"| {name} | {speed:,.2f} | {speed / rows[0][1]:.2f} | {perplexity:.4f} |")


if __name__ == "__main__":
    main()
