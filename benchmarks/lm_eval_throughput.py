"""lm-eval throughput: the same loglikelihood task through `hf` and `kvcore_hf` (full rank, and rank 0.25 with
attention over the reconstruction and over the latents), same batch size, requests/s side by side in one run.

Each model is loaded before the clock starts; what is timed is `simple_evaluate` on the task. The candidates share
one model instance (each sets its attention implementation before its turn) and are timed interleaved over rounds
(hf, kvcore..., then the reverse order, ...): requests/s is the median over rounds, the ratio to hf the median
(min-max) of the per-round ratios.

    python benchmarks/lm_eval_throughput.py                       # SmolLM2-135M where installed, on examples/real-text
    python benchmarks/lm_eval_throughput.py --model examples/tiny-llama --data-dir examples/data
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import SMOLLM2_GGUF, add_timing_arguments, interleave, paired_ratio, smollm2_folder

REPO = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    """The command line (the docs test parses the commands the docs show with it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default=None, help="model folder (default: SmolLM2-135M where installed, else examples/tiny-llama)"
    )
    parser.add_argument("--data-dir", default=str(REPO / "examples" / "real-text"))
    parser.add_argument("--task", default="kvcore_alpaca")
    parser.add_argument("--batch-size", type=int, default=4)
    add_timing_arguments(parser, rounds=3)
    return parser


def main() -> None:
    args = build_parser().parse_args()

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from kvcore_eval.calibration.calibrate import calibrate
    from kvcore_eval.compression import latent
    from kvcore_eval.config import CalibrationConfig
    from kvcore_eval.harness.lm_tasks import task_manager
    from kvcore_eval.harness.wrapper import KVCoreHFLM
    from kvcore_eval.model.models import gguf_location, load_causal_lm, load_tokenizer

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
    original = model.config._attn_implementation
    lms = {name: build() for name, build in candidates.items()}
    results = {}

    def evaluate(name: str) -> float:
        """Requests/s of one evaluation; the model runs the attention this candidate set up."""
        lm = lms[name]
        latent_attention = getattr(lm, "_latent", False)
        model.set_attn_implementation(latent.NAME if latent_attention else original)
        start = time.perf_counter()
        results[name] = lm_eval.simple_evaluate(model=lm, tasks=[args.task], task_manager=manager)
        elapsed = time.perf_counter() - start
        return results[name]["n-samples"][args.task]["effective"] / elapsed

    speeds = interleave({name: (lambda n=name: evaluate(n)) for name in lms}, args.rounds)
    print(f"model: {model_path}; task {args.task} on {args.data_dir}, batch size {args.batch_size}")
    print(f"timing: {args.rounds} interleaved rounds after a warm-up evaluation of each")
    print("| model | requests/s | vs hf | byte perplexity |")
    print("|---|---:|---:|---:|")
    for name in lms:
        perplexity = results[name]["results"][args.task]["byte_perplexity,none"]
        ratio = paired_ratio(speeds[name], speeds["hf"])
        print(f"| {name} | {statistics.median(speeds[name]):,.2f} | {ratio} | {perplexity:.4f} |")


if __name__ == "__main__":
    main()
