"""Run configurations: plain dataclasses validated in __post_init__; the CLI is a view of them.

Kept free of heavy imports so that `kvcore-eval --help` starts fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MODEL_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class CalibrationConfig:
    """What `kvcore-eval calibrate` runs. Each field's `help` is its --help line."""

    model: str = field(metadata={"help": "Hugging Face hub id or local directory of a causal LM"})
    dataset: str = field(metadata={"help": "kvcore:<source> (alpaca, medalpaca, ...), a hub dataset id, or a local .jsonl/.json/.txt/.parquet file"})
    out: str = field(metadata={"help": "output directory of the artifact (basis.safetensors + kvcore.json)"})
    revision: str | None = field(default=None, metadata={"help": "model revision (branch, tag or commit) on the hub"})
    split: str = field(default="train", metadata={"help": "dataset split (hub datasets)"})
    text_field: str | None = field(default=None, metadata={"help": "record field holding the text (default: text, or the source's prompt format)"})
    prompt_format: str | None = field(default=None, metadata={"help": "alpaca | functioncall | question | field:NAME (default: the source's)"})
    max_tokens: int = field(default=200_000, metadata={"help": "stop after this many tokens (over all processes)"})
    seq_len: int = field(default=512, metadata={"help": "tokens per packed sequence"})
    batch_size: int = field(default=4, metadata={"help": "sequences per forward pass"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N, or auto (the accelerate process's device)"})
    dtype: str = field(default="float32", metadata={"help": "model dtype: float32, bfloat16 or float16 (Grams are always float64)"})
    checkpoint_every: int = field(default=100_000, metadata={"help": "tokens between checkpoints (per process)"})
    resume: bool = field(default=False, metadata={"help": "continue an interrupted run in --out"})
    overwrite: bool = field(default=False, metadata={"help": "replace whatever --out holds"})

    def __post_init__(self) -> None:
        for name in ("max_tokens", "seq_len", "batch_size", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.max_tokens < self.seq_len:
            raise ValueError(f"--max-tokens {self.max_tokens} is less than one sequence (--seq-len {self.seq_len}): raise it or lower --seq-len")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: choose one")
        if self.dtype not in MODEL_DTYPES:
            raise ValueError(f"--dtype must be one of {MODEL_DTYPES}, got {self.dtype!r}")
