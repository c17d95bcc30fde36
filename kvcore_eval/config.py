"""Run configurations: plain dataclasses validated in __post_init__; the CLI is a view of them.

Kept free of heavy imports so that `kvcore-eval --help` starts fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MODEL_DTYPES = ("float32", "bfloat16", "float16")
# Shorter sequences put every token near the start of its context: they measure little of a KV cache.
MIN_SEQ_LEN = 32


@dataclass
class CalibrationConfig:
    """What `kvcore-eval calibrate` runs. Each field's `help` is its --help line."""

    model: str = field(metadata={"help": "Hugging Face hub id, local directory, or .gguf file of a causal LM"})
    dataset: str = field(
        metadata={
            "help": "kvcore:<source>[:<lang>] (alpaca, visr:de, ...), lm_eval:<task> (any lm-eval task's documents), a hub dataset id, or a local .jsonl/.json/.txt/.parquet file"
        }
    )
    out: str = field(metadata={"help": "output directory of the artifact (basis.safetensors + kvcore.json)"})
    revision: str | None = field(default=None, metadata={"help": "model revision (branch, tag or commit) on the hub"})
    gguf_file: str | None = field(
        default=None, metadata={"help": "GGUF file inside --model's folder or hub repo (dequantized on load)"}
    )
    split: str = field(default="train", metadata={"help": "dataset split (hub datasets)"})
    data_dir: str | None = field(
        default=None, metadata={"help": "folder of <source>.jsonl files read instead of the hub for kvcore:<source>"}
    )
    skip_docs: int = field(
        default=0,
        metadata={
            "help": "lm_eval:<task> only: documents skipped first (those an evaluation with --limit N scores), so calibration and evaluation are disjoint"
        },
    )
    include_path: str | None = field(
        default=None,
        metadata={"help": "lm_eval:<task> only: extra task folders, comma-separated (lm-eval's --include_path)"},
    )
    text_field: str | None = field(
        default=None, metadata={"help": "record field holding the text (default: text, or the source's prompt format)"}
    )
    prompt_format: str | None = field(
        default=None, metadata={"help": "alpaca | functioncall | question | field:NAME (default: the source's)"}
    )
    max_tokens: int = field(default=200_000, metadata={"help": "stop after this many tokens (over all processes)"})
    seq_len: int = field(default=512, metadata={"help": "tokens per packed sequence"})
    batch_size: int = field(default=4, metadata={"help": "sequences per forward pass"})
    device: str = field(
        default="auto", metadata={"help": "cpu, cuda, cuda:N, or auto (the accelerate process's device)"}
    )
    dtype: str = field(
        default="float32", metadata={"help": "model dtype: float32, bfloat16 or float16 (Grams are always float64)"}
    )
    checkpoint_every: int = field(default=100_000, metadata={"help": "tokens between checkpoints (per process)"})
    resume: bool = field(default=False, metadata={"help": "continue an interrupted run in --out"})
    overwrite: bool = field(default=False, metadata={"help": "replace whatever --out holds"})

    def __post_init__(self) -> None:
        if self.skip_docs < 0:
            raise ValueError(f"--skip-docs must be >= 0, got {self.skip_docs}")
        for name in ("max_tokens", "seq_len", "batch_size", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.seq_len < MIN_SEQ_LEN:
            raise ValueError(
                f"--seq-len {self.seq_len} is below the minimum of {MIN_SEQ_LEN} tokens: such short contexts say "
                "little about a KV cache; use 256 or more for real measurements"
            )
        if self.max_tokens < self.seq_len:
            raise ValueError(
                f"--max-tokens {self.max_tokens} is less than one sequence (--seq-len {self.seq_len}): raise it or lower --seq-len"
            )
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: choose one")
        if self.dtype not in MODEL_DTYPES:
            raise ValueError(f"--dtype must be one of {MODEL_DTYPES}, got {self.dtype!r}")


def split_paths(paths: str | None) -> list[str]:
    """Comma-separated folders (--include_path) as a list."""
    return [p.strip() for p in (paths or "").split(",") if p.strip()]


@dataclass
class EvalConfig:
    """What `kvcore-eval eval` runs: one lm-eval evaluation, with kvcore_hf, or plain hf without --calibration."""

    model: str = field(metadata={"help": "Hugging Face hub id or local directory (lm-eval's pretrained=)"})
    tasks: str = field(metadata={"help": "comma-separated lm-eval tasks or groups, e.g. kvcore_domains"})
    calibration: str | None = field(
        default=None, metadata={"help": "artifact directory; without it the plain `hf` model runs (the baseline)"}
    )
    key_rank: str | None = field(default=None, metadata={"help": "int, fraction of D, or per-layer list a:b:c"})
    value_rank: str | None = field(default=None, metadata={"help": "int, fraction of D, or per-layer list a:b:c"})
    rank_budget: float | None = field(
        default=None, metadata={"help": "fraction of the cache memory kept, spread over layers"}
    )
    key_space: str = field(default="pre_rope", metadata={"help": "pre_rope or post_rope"})
    granularity: str = field(default="layer", metadata={"help": "layer or head"})
    truncate: str = field(default="both", metadata={"help": "keys, values or both"})
    data_dir: str | None = field(
        default=None, metadata={"help": "folder of <source>.jsonl files read instead of the hub"}
    )
    include_path: str | None = field(
        default=None, metadata={"help": "extra lm-eval task folders, comma-separated (lm-eval's --include_path)"}
    )
    limit: int | None = field(default=None, metadata={"help": "documents per task (lm-eval --limit)"})
    batch_size: int = field(default=1, metadata={"help": "lm-eval batch size"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:N"})
    dtype: str = field(default="float32", metadata={"help": "model dtype"})
    output: str | None = field(default=None, metadata={"help": "write lm-eval's results JSON here"})
    allow_overlap: bool = field(
        default=False,
        metadata={
            "help": "score documents the calibration saw (in-sample: optimistic ND-PPL); refused by default, and the "
            "fraction is always in the results (config.kvcore.calibration_overlap)"
        },
    )

    def __post_init__(self) -> None:
        if self.dtype not in MODEL_DTYPES:
            raise ValueError(f"--dtype must be one of {MODEL_DTYPES}, got {self.dtype!r}")
        if self.calibration is None and any(v is not None for v in (self.key_rank, self.value_rank, self.rank_budget)):
            raise ValueError("ranks given without --calibration: pass the artifact directory the ranks refer to")

    def model_args(self) -> dict:
        """lm-eval model_args: `hf`'s, plus kvcore_hf's when a calibration is given."""
        args = {"pretrained": self.model, "dtype": self.dtype}
        if self.calibration is not None:
            args.update(
                calibration=self.calibration,
                key_space=self.key_space,
                granularity=self.granularity,
                truncate=self.truncate,
                overlap="warn" if self.allow_overlap else "refuse",
            )
            args.update(
                {
                    k: v
                    for k, v in (
                        ("key_rank", self.key_rank),
                        ("value_rank", self.value_rank),
                        ("rank_budget", self.rank_budget),
                    )
                    if v is not None
                }
            )
        return args


BASIS_DESIGNS = ("per-task", "shared")


@dataclass
class SweepConfig:
    """What `kvcore-eval sweep` runs: ND-PPL per task and rank, NER per task, their correlation, with one model load."""

    model: str = field(metadata={"help": "Hugging Face hub id, local directory, or .gguf file"})
    out: str = field(
        metadata={
            "help": "output directory (finished points and calibrations are reused: an interrupted sweep resumes)"
        }
    )
    tasks: str = field(
        default="kvcore_domains",
        metadata={
            "help": "comma-separated lm-eval perplexity tasks or groups (kvcore's or yours, with --include-path)"
        },
    )
    basis: str = field(
        default="per-task",
        metadata={
            "help": "per-task: truncate each task with the calibration on its own (held-out) data; shared: with --calibration for every task"
        },
    )
    calibration: str | None = field(
        default=None, metadata={"help": "with --basis shared: the artifact whose bases truncate every task"}
    )
    ranks: str = field(default="1.0,0.75,0.5,0.25,0.125", metadata={"help": "comma-separated fractions of D in (0, 1]"})
    truncate: str = field(default="both", metadata={"help": "keys, values or both"})
    key_space: str = field(default="pre_rope", metadata={"help": "pre_rope or post_rope"})
    metric: str = field(
        default="byte_perplexity",
        metadata={"help": "perplexity metric ND-PPL is computed from (byte_perplexity: independent of the tokenizer)"},
    )
    num_samples: int = field(
        default=200,
        metadata={
            "help": "documents scored per task (the first in each task's order); each task's calibration reads only the documents after them"
        },
    )
    calibration_tokens: int = field(
        default=20_000,
        metadata={
            "help": "tokens of each task's held-out documents calibrated (its NER, and its bases with --basis per-task)"
        },
    )
    seq_len: int = field(default=256, metadata={"help": "sequence length of the per-task calibrations"})
    per_layer: bool = field(
        default=False,
        metadata={"help": "also measure each layer's ND-PPL with only that layer truncated (keys, then values)"},
    )
    per_layer_rank: float = field(
        default=0.25, metadata={"help": "fraction of D kept by the one truncated layer in --per-layer"}
    )
    data_dir: str | None = field(
        default=None, metadata={"help": "folder of <source>.jsonl files read instead of the hub"}
    )
    include_path: str | None = field(
        default=None, metadata={"help": "extra lm-eval task folders, comma-separated (lm-eval's --include_path)"}
    )
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside --model's folder or hub repo"})
    batch_size: int = field(default=1, metadata={"help": "lm-eval batch size"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:N"})
    dtype: str = field(default="float32", metadata={"help": "model dtype"})
    allow_overlap: bool = field(
        default=False,
        metadata={
            "help": "with --basis shared: score documents the shared calibration saw (in-sample: optimistic ND-PPL)"
        },
    )

    def __post_init__(self) -> None:
        self.rank_list()
        if self.dtype not in MODEL_DTYPES:
            raise ValueError(f"--dtype must be one of {MODEL_DTYPES}, got {self.dtype!r}")
        if self.basis not in BASIS_DESIGNS:
            raise ValueError(f"--basis {self.basis!r}: use per-task or shared")
        if self.basis == "shared" and self.calibration is None:
            raise ValueError(
                "--basis shared truncates every task with one artifact: pass --calibration <artifact folder>"
            )
        if self.basis == "per-task" and self.calibration is not None:
            raise ValueError(
                "--calibration is the shared basis: pass --basis shared with it, or drop it to truncate each task with its own calibration"
            )
        if self.num_samples < 1 or self.calibration_tokens < MIN_SEQ_LEN:
            raise ValueError(f"--num-samples must be >= 1 and --calibration-tokens >= {MIN_SEQ_LEN}")
        if self.seq_len < MIN_SEQ_LEN:
            raise ValueError(f"--seq-len {self.seq_len} is below the minimum of {MIN_SEQ_LEN} tokens")
        if not 0 < self.per_layer_rank < 1:
            raise ValueError(f"--per-layer-rank {self.per_layer_rank}: a fraction in (0, 1)")

    def rank_list(self) -> list[float]:
        try:
            ranks = [float(r) for r in self.ranks.split(",") if r.strip()]
        except ValueError as err:
            raise ValueError(f"--ranks {self.ranks!r} must be comma-separated fractions such as 1.0,0.5,0.25") from err
        if not ranks:
            raise ValueError("--ranks is empty: give fractions of D such as 1.0,0.5,0.25")
        if any(not 0 < r <= 1 for r in ranks):
            raise ValueError(f"--ranks {self.ranks!r}: every rank must be a fraction in (0, 1]")
        return sorted(set(ranks), reverse=True)
