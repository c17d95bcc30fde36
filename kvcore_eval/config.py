"""Run configurations: dataclasses validated in __post_init__, each option declared once.

A field is the only place an option's name, type (a `Literal` lists its allowed values), default and help
live: the CLI (`cli.add_dataclass_arguments`), kvcore_hf's model_args (`from_options`) and lm-eval's YAML read
it. A larger configuration embeds a smaller one as a field (`EvalConfig.truncation`) instead of re-listing its
options, and a variant is `dataclasses.replace(base, ...)`. `identity` derives what a run's numbers depend on
from the whole configuration, minus the fields declared with `identity=False`. A field added after runs were first
written (`added=True`) comes with the default that reproduces them, and is left out of the identity at that default:
the points, calibrations and folders written before it existed are still the same work.

Kept free of heavy imports so that `kvcore-eval --help` starts fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from kvcore_eval.analysis.positions import parse_edges
from kvcore_eval.compression.methods import (
    BASES,
    DEFAULT_METHODS,
    METHOD_FIELDS,
    METHODS,
    Budget,
    check_basis,
    check_batch_size,
    parse_budgets,
    truncation_for,
    uses_budget_allocation,
)
from kvcore_eval.compression.peers import check_backend
from kvcore_eval.metrics import PERPLEXITY_METRICS, WEIGHTED_PERPLEXITIES
from kvcore_eval.model.models import gguf_location, load_config, resolve_dtype_name
from kvcore_eval.spaces import DEFAULT_KEY_SPACE, Granularity, KeySpace, Truncate

ModelDtype = Literal["auto", "float32", "bfloat16", "float16"]
BudgetMethod = Literal["energy", "ner", "sensitivity", "uniform", "waterfill"]
Basis = Literal["data", "weights", "random", "sequence", "rotation", "identity"]
Quantizer = Literal["absmax", "minmax", "midrise"]
Protocol = Literal["forward", "after_prefill"]
Peer = Literal["quanto", "hqq"]
Weighting = Literal["relative", "absolute"]
LATENT_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16)
Attention = Literal["reconstruct", "latent"]
OverlapPolicy = Literal["warn", "refuse"]
BasisScope = Literal["per-task", "shared"]
RankSpec = int | float | str | list[int] | None
# Shorter sequences put every token near the start of its context: they measure little of a KV cache.
MIN_SEQ_LEN = 32


def option(
    default: Any = dataclasses.MISSING, *, help: str, identity: bool = True, added: bool = False, **metadata: Any
) -> Any:
    """A configuration field. `identity=False`: the field cannot change a number (paths, resume flags...).
    `added=True`: a field added after runs were written, its default what they did (in the identity only when set
    otherwise). Extra metadata: `cli_skip` (names of an embedded configuration's fields the CLI does not offer)."""
    metadata = {"help": help, "identity": identity, "added": added, **metadata}
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_type(config_class: type, name: str) -> Any:
    """The declared type of a field, without `| None` (`int | None` -> int, a Literal stays a Literal)."""
    hint = typing.get_type_hints(config_class)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def choices(config_class: type, name: str) -> tuple[str, ...] | None:
    """The allowed values of a Literal-typed field, else None."""
    kind = field_type(config_class, name)
    return typing.get_args(kind) if typing.get_origin(kind) is Literal else None


def check_choices(config: Any) -> None:
    """Every Literal-typed field holds one of its allowed values."""
    for field in dataclasses.fields(config):
        allowed = choices(type(config), field.name)
        value = getattr(config, field.name)
        if allowed and value is not None and value not in allowed:
            listed = ", ".join(allowed[:-1]) + f" or {allowed[-1]}"
            raise ValueError(f"{field.name}={value!r}: use {listed}")


def identity(config: Any, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """What a run's numbers depend on: every field (embedded configurations nested) but those declared with
    `identity=False`, those in `exclude` (fields that select work rather than change it) and the `added` ones at their
    default."""
    out = {}
    for field in dataclasses.fields(config):
        if not field.metadata.get("identity", True) or field.name in exclude:
            continue
        value = getattr(config, field.name)
        if field.metadata.get("added") and value == field.default:
            continue
        out[field.name] = identity(value) if dataclasses.is_dataclass(value) else value
    return out


def identity_differences(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The fields (dotted for nested ones) whose values differ between two identities, with both values."""
    differences = []
    for name in sorted(set(saved) | set(current)):
        # an `added` field left out is at its default, whichever side left it out
        a, b = saved.get(name, ADDED_DEFAULTS.get(name)), current.get(name, ADDED_DEFAULTS.get(name))
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            differences += identity_differences(a, b, f"{prefix}{name}.")
        elif a != b:
            differences.append(f"{prefix}{name}: {a!r} then, {b!r} now")
    return differences


def _coerce(config_class: type, name: str, value: Any) -> Any:
    """A model_arg's value (lm-eval passes strings, bools and numbers) as the field's declared type."""
    kind = field_type(config_class, name)
    if value is None or not isinstance(value, str):
        return float(value) if kind is float and isinstance(value, int) and not isinstance(value, bool) else value
    if kind is bool:
        if value.strip().lower() in ("true", "1", "yes"):
            return True
        if value.strip().lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"{name}={value!r} is not a boolean: write {name}=true or {name}=false")
    if kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            raise ValueError(f"{name}={value!r} is not a number: give a {kind.__name__}") from None
    return value


def split_options(config_class: type, options: Mapping[str, Any], others: set[str]) -> tuple[dict, dict]:
    """Split keyword options into `config_class`'s fields and the rest (the names in `others` and anything else).
    A name that is neither but is close to one of `config_class`'s fields is refused with the likely spelling."""
    names = {field.name for field in dataclasses.fields(config_class)}
    own = {k: _coerce(config_class, k, v) for k, v in options.items() if k in names}
    rest = {k: v for k, v in options.items() if k not in names}
    for name in rest:
        if name not in others and (close := difflib.get_close_matches(name, names, n=1, cutoff=0.75)):
            raise ValueError(f"unknown option {name}={rest[name]!r}: did you mean {close[0]}=?")
    return own, rest


@dataclass
class TruncationConfig:
    """What `kvcore_hf` truncates: its model_args beyond lm-eval's `hf` ones, checked before any weights load."""

    # Paths are not identities: what reuses a result keys it on the files' content (basis_sha256, sensitivity_sha256),
    # so a moved or copied run folder is reused, and an artifact rewritten in place is not.
    calibration: str | None = option(None, help="artifact directory written by `kvcore-eval calibrate`", identity=False)
    key_rank: RankSpec = option(None, help="int, fraction of the width, full, or per-layer list a:b:c")
    value_rank: RankSpec = option(None, help="int, fraction of the width, full, or per-layer list a:b:c")
    rank_budget: float | None = option(
        None, help="fraction of the truncated cache memory kept, spread over layers by the calibration"
    )
    budget_method: BudgetMethod = option(
        "energy",
        help="energy: keep the largest normalized eigenvalues across layers; ner: ranks proportional to NER; "
        "sensitivity: proportional to each layer's measured ND-PPL (needs sensitivity=); uniform: one rank for all, "
        "the largest that fits; waterfill: bits per latent channel by reverse water-filling on the spectrum (the "
        "spectral code). The budget is in bytes and includes rotary positions or tables and quantization scales",
    )
    bits: float | None = option(
        None,
        help="a budget in bits per cached number of the kinds truncated, scales and rotary positions included (e.g. "
        "2 with budget_method=waterfill); an alternative to rank_budget that reads the same on every dtype",
    )
    weighting: Weighting = option(
        "relative",
        help="what budget_method=waterfill minimizes: relative: the sum of each layer's relative squared error (layers "
        "count alike whatever their scale); absolute: the squared error summed over layers",
    )
    key_space: KeySpace = option(
        DEFAULT_KEY_SPACE, help="pre_rope (the paper's K = X·W_k) or post_rope (the cached keys)"
    )
    granularity: Granularity = option("layer", help="layer: one basis over all KV heads; head: one basis per head")
    truncate: Truncate = option("both", help="keys, values or both")
    allow_mismatch: bool = option(False, help="use an artifact calibrated on another model or revision (loud warning)")
    sensitivity: str | None = option(
        None,
        help="per_layer.json of `kvcore-eval sweep --per-layer`, read by budget_method=sensitivity",
        identity=False,
    )
    attention: Attention = option(
        "reconstruct",
        help="reconstruct: attention gets K·P·Pᵀ; latent: attends over the stored latents (r numbers a token, not D)",
    )
    overlap: OverlapPolicy = option(
        "warn",
        help="scored documents the calibration saw: warn (log loudly, record the fraction) or refuse",
        identity=False,
    )
    protocol: Protocol = option(
        "forward",
        help="when the cache compresses: forward (every forward reads what the cache stores, the prompt's prefill "
        "included: the paper's ND-PPL protocol); after_prefill (as deployed caches do: a forward attends exactly to "
        "its own tokens and through the compressed cache to earlier ones; loglikelihood prefills the context, then "
        "scores the continuation in a second forward; needs batch_size=1)",
        added=True,
    )
    prefill_chunk: int | None = option(
        None,
        help="with protocol=after_prefill: feed inputs in chunks of this many tokens, each attending exactly within "
        "itself and through the compressed cache to the chunks before it (rolling perplexity needs it: a window "
        "scored in one forward attends exactly)",
        added=True,
    )
    peer: Peer | None = option(
        None,
        help="run transformers' own QuantizedCache instead (quanto: 2 or 4 bits; hqq: 1, 2, 3, 4 or 8; latent_bits= "
        "gives them; basis=identity; protocol=after_prefill): the quantized caches users already run",
        added=True,
    )
    residual_length: int = option(128, help="peer=: the last tokens QuantizedCache keeps in full precision", added=True)
    basis: Basis = option(
        "data",
        help="data: calibrated (calibration=); weights: SVD of [W_k | b_k], [W_v | b_v] (data-free); random: seeded "
        "random orthonormal (basis_seed=); sequence: each sequence's own prefill SVD, stored in the cache; rotation: "
        "seeded randomized Hadamard per KV head, kept whole (with latent_bits: TurboQuant's and QuaRot's first "
        "stage); identity: the states as they are (with latent_bits: a plain quantized cache)",
    )
    basis_seed: int = option(0, help="seed of basis=random and basis=rotation")
    latent_bits: int | None = option(
        None,
        help="bits of every stored number: 16: a 16-bit float; 1 to 8: integer codes per token and group of 32 "
        "channels with float16 scales, packed; unset: the model's dtype",
    )
    quantizer: Quantizer | None = option(
        None,
        help="integer codes: absmax (symmetric, 2^b - 1 levels; the default at 8 and 4 bits), minmax (asymmetric, "
        "every level, a scale and a zero-point a group: KIVI's), midrise (every level, one scale a group; the "
        "default at other widths and for budget_method=waterfill)",
    )

    def __post_init__(self) -> None:
        check_choices(self)
        if self.latent_bits is not None and self.latent_bits not in LATENT_BITS:
            raise ValueError(
                f"latent_bits={self.latent_bits}: use 1 to 8 or 16, or leave it unset for the model's dtype"
            )
        if self.scheme == "absmax" and self.latent_bits == 1:
            raise ValueError(
                "latent_bits=1 with quantizer=absmax has one level (zero): use quantizer=minmax or midrise"
            )
        if (self.budget_method == "sensitivity") != (self.sensitivity is not None):
            raise ValueError(
                "budget_method=sensitivity and sensitivity=<per_layer.json of `kvcore-eval sweep --per-layer`> "
                "go together"
            )
        for name, kind, truncated in (
            ("key_rank", "keys", self.truncates_keys),
            ("value_rank", "values", self.truncates_values),
        ):
            if getattr(self, name) is not None and not truncated:
                raise ValueError(
                    f"{name}={getattr(self, name)} with truncate={self.truncate} truncates nothing: "
                    f"pass truncate=both (or truncate={kind}), or drop {name}"
                )
        self._check_budget()
        check_basis(self)
        self._check_protocol()

    def _check_protocol(self) -> None:
        if self.protocol == "after_prefill" and self.attention == "latent":
            raise ValueError(
                "protocol=after_prefill with attention=latent: latent attention reads only what the cache stores, so "
                "a forward cannot attend exactly to its own tokens: use attention=reconstruct"
            )
        if self.prefill_chunk is not None and (self.protocol != "after_prefill" or self.prefill_chunk < 1):
            raise ValueError(
                f"prefill_chunk={self.prefill_chunk}: chunks are what protocol=after_prefill feeds one forward each; "
                "give a positive number of tokens with protocol=after_prefill, or drop it"
            )
        if self.peer is not None:
            if self.protocol != "after_prefill":
                raise ValueError(
                    f"peer={self.peer}: transformers' QuantizedCache attends exactly within each forward and quantizes "
                    "what it stores, so it runs under protocol=after_prefill: pass protocol=after_prefill"
                )
            if self.basis != "identity" or self.budgeted or self.ranks_given:
                raise ValueError(
                    f"peer={self.peer} quantizes the states as they are: use basis=identity, no ranks or budget, and "
                    "give its bits with latent_bits="
                )
        if self.residual_length < 1:
            raise ValueError(f"residual_length={self.residual_length} must be a positive number of tokens")

    def _check_budget(self) -> None:
        if self.rank_budget is not None and self.bits is not None:
            raise ValueError("rank_budget and bits both given: each is a budget, pass one or the other")
        if self.budgeted:
            if given := self.ranks_given:
                raise ValueError(
                    f"{'rank_budget' if self.bits is None else 'bits'} and {given[0]} both given: a budget sets every "
                    "rank, pass one or the other"
                )
            if self.rank_budget is not None and not 0 < float(self.rank_budget) <= 1:
                raise ValueError(f"rank_budget={self.rank_budget} must be a fraction in (0, 1]")
            if self.bits is not None and not 0 < float(self.bits) <= 32:
                raise ValueError(f"bits={self.bits} must be a number of bits per cached number in (0, 32]")
            if self.granularity != "layer":
                raise ValueError(
                    "rank_budget is planned over layer spectra: use granularity=layer, or give key_rank/value_rank"
                )
        if self.budget_method == "waterfill" and self.budgeted and self.latent_bits is not None:
            raise ValueError(
                "budget_method=waterfill chooses the bits of every latent channel itself: drop latent_bits"
            )

    @property
    def scheme(self) -> str:
        """The integer code in use: `quantizer`, else absmax at 8 and 4 bits (today's int8 and int4) and midrise at
        every other width and for waterfill allocations."""
        if self.quantizer is not None:
            return self.quantizer
        if self.budget_method == "waterfill" and self.budgeted:
            return "midrise"
        return "absmax" if self.latent_bits in (None, 8, 4, 16) else "midrise"

    @property
    def budgeted(self) -> bool:
        """Whether a budget (rank_budget or bits) sets the ranks and bits."""
        return self.rank_budget is not None or self.bits is not None

    @property
    def runs_kvcore(self) -> bool:
        """Whether these options ask for kvcore_hf at all (a calibration, or a basis that needs none)."""
        return self.calibration is not None or not BASES[self.basis].calibrated

    @property
    def ranks_given(self) -> list[str]:
        return [name for name in ("key_rank", "value_rank") if getattr(self, name) is not None]

    @property
    def truncates_keys(self) -> bool:
        return self.truncate in ("keys", "both")

    @property
    def truncates_values(self) -> bool:
        return self.truncate in ("values", "both")

    def check_runnable(self) -> None:
        """What kvcore_hf needs beyond a consistent configuration: bases (an artifact for basis=data) and something
        to truncate or quantize."""
        source = BASES[self.basis]
        if self.calibration is None and source.calibrated:
            raise ValueError(
                "kvcore_hf needs calibration=<artifact folder> (written by `kvcore-eval calibrate`), or a data-free "
                "basis=weights|random|sequence|rotation|identity; for the uncompressed baseline use --model hf"
            )
        if self.peer is not None:
            check_backend(self.peer, self.latent_bits)
        if (source.whole or not source.projects) and self.latent_bits is None:
            raise ValueError(
                f"basis={self.basis} keeps every dimension: give the bits of its codes with latent_bits= (e.g. 4), "
                "or there is nothing to compress"
            )
        if source.projects and not source.whole and not self.budgeted and not self.ranks_given:
            raise ValueError(
                "no truncation asked for: pass key_rank=, value_rank= (e.g. 0.25), rank_budget= or bits= "
                "(basis=identity,latent_bits=8 is the plain int8 cache)"
            )


@dataclass(kw_only=True)
class ModelConfig:
    """The model a run loads and where its data and tasks come from: declared once, for every run that loads a model
    (calibrate, eval, sweep, frontier)."""

    model: str = option(help="Hugging Face hub id, local directory, or .gguf file of a causal LM")
    gguf_file: str | None = option(None, help="GGUF file inside --model's folder or hub repo (dequantized on load)")
    data_dir: str | None = option(
        None, help="folder of <source>.jsonl files read instead of the hub (kvcore's datasets and tasks)"
    )
    include_path: str | None = option(
        None, help="extra lm-eval task folders, comma-separated (lm-eval's --include_path)"
    )
    device: str = option(
        "auto",
        help="cpu, cuda, cuda:N, or auto (cuda when available, else cpu; under accelerate or torchrun, the "
        "process's own device)",
    )
    dtype: ModelDtype = option(
        "auto",
        help="model dtype: auto is the model's own on a GPU (as lm-eval's hf) and float32 on the CPU (where bfloat16 "
        "is slow), resolved once at load and recorded in every table and result (Grams are always float64)",
    )


@dataclass(kw_only=True)
class CalibrationConfig(ModelConfig):
    """What `kvcore-eval calibrate` runs. Each field's `help` is its --help line."""

    dataset: str = option(
        help="kvcore:<source>[:<lang>] (alpaca, visr:de, ...), lm_eval:<task> (any lm-eval task's documents), "
        "a hub dataset id, or a local .jsonl/.json/.txt/.parquet file"
    )
    out: str = option(help="output directory of the artifact (basis.safetensors + kvcore.json)", identity=False)
    revision: str | None = option(None, help="model revision (branch, tag or commit) on the hub")
    split: str = option("train", help="dataset split (hub datasets)")
    data_dir: str | None = option(
        None, help="folder of <source>.jsonl files read instead of the hub for kvcore:<source>"
    )
    skip_docs: int = option(
        0,
        help="lm_eval:<task> only: documents skipped first (those an evaluation with --limit N scores), "
        "so calibration and evaluation are disjoint",
    )
    metadata: str | None = option(
        None,
        help="lm_eval:<task> only: lm-eval's --metadata JSON for the task, e.g. '{\"max_seq_lengths\": [1024]}' "
        "for RULER (the model's tokenizer is passed as lm_eval passes it)",
    )
    text_field: str | None = option(None, help="record field holding the text (default: text, or the source's format)")
    prompt_format: str | None = option(
        None, help="alpaca | functioncall | question | field:NAME (default: the source's)"
    )
    max_tokens: int = option(200_000, help="stop after this many tokens (over all processes)")
    seq_len: int = option(512, help="tokens per packed sequence")
    batch_size: int = option(4, help="sequences per forward pass")
    checkpoint_every: int = option(100_000, help="tokens between checkpoints (per process)", identity=False)
    resume: bool = option(False, help="continue an interrupted run in --out", identity=False)
    overwrite: bool = option(False, help="replace whatever --out holds", identity=False)

    def __post_init__(self) -> None:
        check_choices(self)
        parse_metadata(self.metadata)
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
                f"--max-tokens {self.max_tokens} is less than one sequence (--seq-len {self.seq_len}): "
                "raise it or lower --seq-len"
            )
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: choose one")


def parse_metadata(metadata: str | None) -> dict:
    """--metadata as a dict: a JSON object, as lm-eval's --metadata takes it."""
    if not metadata:
        return {}
    try:
        parsed = json.loads(metadata)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"--metadata {metadata!r} is not valid JSON ({err.msg}): pass an object such as "
            "'{\"max_seq_lengths\": [1024]}'"
        ) from None
    if not isinstance(parsed, dict):
        raise ValueError(f"--metadata {metadata!r} is a JSON {type(parsed).__name__}: pass a JSON object")
    return parsed


def task_list(tasks: str) -> list[str]:
    """--tasks as a list of names; none at all (`--tasks ","`) is refused before anything loads."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise ValueError(f"--tasks {tasks!r} names no task: give comma-separated lm-eval tasks, e.g. kvcore_domains")
    return names


def split_paths(paths: str | None) -> list[str]:
    """Comma-separated folders (--include_path) as a list."""
    return [p.strip() for p in (paths or "").split(",") if p.strip()]


@dataclass(kw_only=True)
class LMEvalRunConfig(ModelConfig):
    """The model and task-loading options of every lm-eval run the CLI makes (eval, sweep, frontier)."""

    batch_size: int = option(1, help="lm-eval batch size")


@dataclass(kw_only=True)
class TaskScoringConfig(LMEvalRunConfig):
    """What a run that scores lm-eval tasks point by point (sweep, frontier) scores them by: the metric, what each
    task is handed (--metadata, --gen-kwargs), the documents scored and each task's held-out calibration."""

    metric: str = option(
        "byte_perplexity",
        help="the perplexity metric of ND-PPL (byte_perplexity: independent of the tokenizer), and task=metric pairs, "
        "comma-separated, for any task's own metric; a task without one is scored by the metric named by its "
        "context length where its metric_list names lengths (RULER), else by the first of its metric_list",
    )
    metadata: str | None = option(
        None,
        help="lm-eval's --metadata JSON for every task; its max_seq_lengths (e.g. [1024, 2048]) runs generation "
        "tasks that build their documents (RULER, kvcore_ruler) at each length, each its own points and held-out "
        "calibration",
    )
    gen_kwargs: str | None = option(
        None, help="lm-eval's --gen_kwargs for generation tasks, e.g. max_gen_toks=16 (part of their points' identity)"
    )
    num_samples: int = option(
        200,
        help="documents scored per task (the first in each task's order); "
        "each task's calibration reads only the documents after them",
    )
    calibration_tokens: int = option(
        20_000,
        help="tokens of each task's held-out documents calibrated (its own bases and NER)",
    )
    seq_len: int = option(
        256,
        help="sequence length of each task's held-out calibration (a task at a context length: at least that "
        "length) and of the frontier's bytes-per-token probe",
    )

    def check_scoring(self) -> None:
        """The checks of these options, before anything loads."""
        task_list(getattr(self, "tasks", ""))
        self.metric_choice()
        if self.gen_kwargs is not None and any("=" not in item for item in self.gen_kwargs.split(",")):
            raise ValueError(f"--gen-kwargs {self.gen_kwargs!r}: give key=value pairs, e.g. max_gen_toks=16")
        if self.num_samples < 1 or self.calibration_tokens < MIN_SEQ_LEN:
            raise ValueError(f"--num-samples must be >= 1 and --calibration-tokens >= {MIN_SEQ_LEN}")
        if self.seq_len < MIN_SEQ_LEN:
            raise ValueError(f"--seq-len {self.seq_len} is below the minimum of {MIN_SEQ_LEN} tokens")
        if self.context_lengths() and self.calibration_tokens < max(self.context_lengths()):
            raise ValueError(
                f"--calibration-tokens {self.calibration_tokens} is less than one window of the longest context "
                f"length ({max(self.context_lengths())}; each length is calibrated in windows of that length): raise it"
            )

    def metric_choice(self) -> tuple[str, dict[str, str]]:
        """(the perplexity tasks' metric, {task: its own metric}) from --metric."""
        items = [item.strip() for item in self.metric.split(",") if item.strip()]
        bare = [item for item in items if "=" not in item]
        pairs = [item.split("=", 1) for item in items if "=" in item]
        if len(bare) > 1 or any(not task.strip() or not name.strip() for task, name in pairs):
            raise ValueError(
                f"--metric {self.metric!r}: give one perplexity metric and task=metric pairs, e.g. "
                "byte_perplexity,niah_single_1=1024"
            )
        for task, name in pairs:  # a perplexity's log is not a perplexity: its "ND-PPL" would be another number
            if name.strip() in PERPLEXITY_METRICS and name.strip() not in WEIGHTED_PERPLEXITIES:
                raise ValueError(
                    f"--metric {task.strip()}={name.strip()}: {name.strip()} is the log of a perplexity, not a "
                    f"perplexity, and ND-PPL is a perplexity's relative change: use {task.strip()}=byte_perplexity "
                    "(or word_perplexity)"
                )
        if bare and bare[0] not in WEIGHTED_PERPLEXITIES:
            raise ValueError(
                f"--metric {bare[0]}: a bare metric is the perplexity of ND-PPL ({', '.join(WEIGHTED_PERPLEXITIES)}); "
                f"score a task by another metric with task={bare[0]}"
            )
        return (bare[0] if bare else "byte_perplexity"), {task.strip(): name.strip() for task, name in pairs}

    def task_metadata(self) -> dict[str, Any]:
        """--metadata without max_seq_lengths (each length is its own set of points)."""
        return {k: v for k, v in parse_metadata(self.metadata).items() if k != "max_seq_lengths"}

    def context_lengths(self) -> list[int]:
        """--metadata's max_seq_lengths, in increasing order ([] when not given)."""
        lengths = parse_metadata(self.metadata).get("max_seq_lengths", [])
        if not isinstance(lengths, list) or not all(isinstance(n, int) and n >= MIN_SEQ_LEN for n in lengths):
            raise ValueError(
                f"--metadata max_seq_lengths {lengths!r}: give a list of token counts of at least {MIN_SEQ_LEN}, "
                "e.g. [1024, 2048]"
            )
        return sorted(set(lengths))


@dataclass(kw_only=True)
class EvalConfig(LMEvalRunConfig):
    """What `kvcore-eval eval` runs: one lm-eval evaluation, with kvcore_hf, or plain hf without --calibration."""

    tasks: str = option(help="comma-separated lm-eval tasks or groups, e.g. kvcore_domains")
    truncation: TruncationConfig = option(
        TruncationConfig,
        help="kvcore_hf's options; without --calibration the plain `hf` model runs (the baseline)",
        cli_skip=("overlap",),  # --allow-overlap says it
    )
    limit: int | None = option(None, help="documents per task (lm-eval --limit)")
    output: str | None = option(None, help="write lm-eval's results JSON here", identity=False)
    allow_overlap: bool = option(
        False,
        help="score documents the calibration saw (in-sample: optimistic ND-PPL); refused by default, and the "
        "fraction is always in the results (config.kvcore.calibration_overlap)",
        identity=False,
    )

    def __post_init__(self) -> None:
        check_choices(self)
        task_list(self.tasks)
        if self.limit is not None and self.limit < 1:
            raise ValueError(
                f"--limit {self.limit} scores no document: give a positive number of documents per task, or drop "
                "--limit to score them all"
            )
        truncation = self.truncation
        if not truncation.runs_kvcore and (truncation.ranks_given or truncation.rank_budget is not None):
            raise ValueError(
                "ranks given without --calibration: pass the artifact directory the ranks refer to, or a data-free "
                "--basis weights|random|sequence"
            )
        if truncation.runs_kvcore:
            truncation.check_runnable()

    def model_args(self) -> dict[str, Any]:
        """lm-eval model_args: `hf`'s, plus kvcore_hf's (every option not left at None) with a calibration. `--dtype
        auto` is resolved here (lm-eval's own `auto` would load bfloat16 weights on the CPU too)."""
        pretrained, gguf_file = gguf_location(self.model, self.gguf_file)
        dtype = resolve_dtype_name(self.dtype, self.device, lambda: load_config(pretrained, None, gguf_file))
        args = {"pretrained": pretrained, "dtype": dtype}
        if gguf_file is not None:
            args["gguf_file"] = gguf_file
        if self.truncation.runs_kvcore:
            args.update({k: v for k, v in dataclasses.asdict(self.truncation).items() if v is not None})
            args["overlap"] = "warn" if self.allow_overlap else "refuse"
        return args


# TruncationConfig fields each point of a sweep or a frontier sets itself (overlap: from --allow-overlap), and the
# kind truncated (the sweep's own --truncate lists kinds, each its own points); their command lines do not offer them.
PER_POINT = ("key_rank", "value_rank", "rank_budget", "budget_method", "sensitivity", "overlap")
PER_POINT_KIND = (*PER_POINT, "truncate")
KINDS_TRUNCATED = ("keys", "values", "both")


@dataclass(kw_only=True)
class SweepConfig(TaskScoringConfig):
    """What `kvcore-eval sweep` runs: ND-PPL per task and rank, NER per task, their correlation; other tasks
    (generation: RULER, ...) by their own metric per rank, kind and context length; one model load."""

    # Fields that choose which points run, not what a point's number is. metric, metadata and gen_kwargs change
    # numbers: the part each point depends on is in its own settings.
    selectors: ClassVar[tuple[str, ...]] = (
        "tasks",
        "ranks",
        "per_layer",
        "per_layer_rank",
        "truncate",
        "metric",
        "metadata",
        "gen_kwargs",
        "position_buckets",
    )

    out: str = option(
        help="output directory (finished points and calibrations are reused: an interrupted sweep resumes)",
        identity=False,
    )
    tasks: str = option(
        "kvcore_domains",
        help="comma-separated lm-eval tasks or groups (kvcore's or yours, with --include-path): perplexity tasks "
        "give ND-PPL, others (generation: RULER, ...) their own metric",
    )
    basis_scope: BasisScope = option(
        "per-task",
        help="per-task: truncate each task with the calibration on its own (held-out) data; "
        "shared: truncate every task with --calibration",
    )
    truncation: TruncationConfig = option(
        TruncationConfig,
        help="the truncation every point shares; the sweep sets the ranks and the kind truncated",
        cli_skip=PER_POINT_KIND,
    )
    ranks: str = option("1.0,0.75,0.5,0.25,0.125", help="comma-separated fractions of D in (0, 1]")
    truncate: str = option(
        "both",
        help="keys, values or both, or several comma-separated (each kind its own points; perplexity tasks' "
        "ND-PPL study takes one)",
    )
    position_buckets: str | None = option(
        None,
        help="rolling-perplexity tasks: also ND-PPL by position in the context window, in buckets with these inner "
        "edges (e.g. 256,512,1024; 'default': 256, 512, 1k, 2k, ... below the model's max length)",
    )
    per_layer: bool = option(
        False, help="also measure each layer's ND-PPL with only that layer truncated (keys, then values)"
    )
    per_layer_rank: float = option(0.25, help="fraction of D kept by the one truncated layer in --per-layer")
    allow_overlap: bool = option(
        False,
        help="with --basis-scope shared: score documents the shared calibration saw (in-sample: optimistic ND-PPL)",
        identity=False,
    )

    def __post_init__(self) -> None:
        check_choices(self)
        self.rank_list()
        if given := [
            name for name in PER_POINT_KIND if getattr(self.truncation, name) != getattr(TruncationConfig, name)
        ]:
            raise ValueError(
                f"the sweep sets {', '.join(given)} itself at each point: leave them out (kinds: --truncate)"
            )
        self.truncate_kinds()
        self.check_scoring()
        if self.position_buckets is not None:
            parse_edges(self.position_buckets, 1 << 30)
        shared = self.truncation.calibration is not None
        if self.basis_scope == "shared" and not shared:
            raise ValueError(
                "--basis-scope shared truncates every task with one artifact: pass --calibration <artifact folder>"
            )
        if self.basis_scope == "per-task" and shared:
            raise ValueError(
                "--calibration is the shared basis: pass --basis-scope shared with it, or drop it to truncate each "
                "task with its own calibration"
            )
        if not 0 < self.per_layer_rank < 1:
            raise ValueError(f"--per-layer-rank {self.per_layer_rank}: a fraction in (0, 1)")

    def truncate_kinds(self) -> list[str]:
        """The kinds truncated, each its own points: keys, values and/or both."""
        kinds = list(dict.fromkeys(k.strip() for k in self.truncate.split(",") if k.strip()))
        if not kinds or any(k not in KINDS_TRUNCATED for k in kinds):
            raise ValueError(f"--truncate {self.truncate!r}: use keys, values or both, or several comma-separated")
        return kinds

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


@dataclass(kw_only=True)
class FrontierConfig(TaskScoringConfig):
    """What `kvcore-eval frontier` runs: every method at each budget of measured bytes per token, one model load."""

    # The bases are always each task's own held-out calibration: a scored document is never calibrated on.
    allow_overlap: ClassVar[bool] = False
    # Fields that choose which points run, not what a point's number is (a point's own settings say the rest).
    # metadata and gen_kwargs change numbers: the part each point depends on is in its own settings.
    selectors: ClassVar[tuple[str, ...]] = (
        "tasks",
        "budgets",
        "methods",
        "sensitivity",
        "sensitivity_tokens",
        "sensitivity_rank",
        "metadata",
        "gen_kwargs",
    )

    out: str = option(
        help="output directory (finished points are reused: an interrupted frontier resumes)", identity=False
    )
    tasks: str = option(
        "kvcore_domains",
        help="comma-separated lm-eval tasks or groups (perplexity tasks: ND-PPL; others, generation included: their "
        "own metric, at each --metadata max_seq_lengths where they build documents for a length)",
    )
    budgets: str = option(
        "4b,3b,2b,1.5b",
        help="comma-separated budgets of measured bytes per token: fractions of the full cache in (0, 1) (0.25), or "
        "bits per cached number with a b (2b: the same on every dtype, scales and rotary positions included)",
    )
    methods: str = option(
        ",".join(DEFAULT_METHODS),
        help=f"comma-separated, of: {', '.join(METHODS)} (default: {', '.join(DEFAULT_METHODS)})",
    )
    truncation: TruncationConfig = option(
        TruncationConfig,
        help="the options every point shares (key space, granularity, attention); the frontier sets the rest",
        cli_skip=(*PER_POINT_KIND, *METHOD_FIELDS),
    )
    sensitivity: str | None = option(
        None,
        help="per_layer.json of `sweep --per-layer` for the sensitivity method "
        "(default: measured here on held-out text)",
    )
    sensitivity_tokens: int = option(
        1024, help="held-out tokens (documents after the scored ones) the per-layer sensitivity is measured on"
    )
    sensitivity_rank: float = option(
        0.25, help="fraction of D the one truncated layer keeps when sensitivity is measured"
    )

    def __post_init__(self) -> None:
        check_choices(self)
        self.check_scoring()
        self.budget_list()
        if given := [
            name
            for name in (*PER_POINT_KIND, *METHOD_FIELDS)
            if getattr(self.truncation, name) != getattr(TruncationConfig, name)
        ]:
            raise ValueError(f"the frontier sets {', '.join(given)} itself at each point: leave them out")
        if not self.method_list():
            raise ValueError(
                f"--methods {self.methods!r} names no method: give comma-separated methods, of: {', '.join(METHODS)}"
            )
        unknown = [m for m in self.method_list() if m not in METHODS]
        if unknown:
            raise ValueError(f"--methods {', '.join(unknown)}: unknown; choose from {', '.join(METHODS)}")
        for name in self.method_list():  # each method's own kvcore_hf options and constraints, as its points set them
            try:
                knob = (METHODS[name].knob_range(_SOME_GEOMETRY) or (None,))[0]  # any knob the method takes
                truncation = truncation_for(
                    self.truncation, METHODS[name], knob, Path("bases"), _SOME_GEOMETRY, "sensitivity.json"
                )
                check_batch_size(truncation, self.batch_size)
            except ValueError as err:
                raise ValueError(f"--methods {name} cannot run with these options: {err}") from err
        budgeted = [m for m in self.method_list() if uses_budget_allocation(METHODS[m])]
        if budgeted and self.truncation.granularity != "layer":
            raise ValueError(
                f"--methods {', '.join(budgeted)} spend a budget over layer spectra: use --granularity layer"
            )
        if self.sensitivity_tokens < MIN_SEQ_LEN or not 0 < self.sensitivity_rank < 1:
            raise ValueError(
                f"--sensitivity-tokens must be >= {MIN_SEQ_LEN} and --sensitivity-rank a fraction in (0, 1), got "
                f"{self.sensitivity_tokens} and {self.sensitivity_rank}"
            )
        if self.sensitivity is not None and not Path(self.sensitivity).is_file():
            raise ValueError(
                f"--sensitivity {self.sensitivity}: no such file; pass the per_layer.json of `kvcore-eval sweep "
                "--per-layer`, or drop it to measure the sensitivity here"
            )

    def budget_list(self) -> list[Budget]:
        """The budgets, largest first within each unit (fractions, then bits)."""
        return parse_budgets(self.budgets)

    def method_list(self) -> list[str]:
        return list(dict.fromkeys(m.strip() for m in self.methods.split(",") if m.strip()))


# Any geometry will do to build each method's TruncationConfig before the model loads (its checks need no shapes).
_SOME_GEOMETRY = type("Geometry", (), {"num_layers": 2, "width": 2})


@dataclass
class TableConfig:
    """What `kvcore-eval table` builds. Each field's `help` is its --help line."""

    runs: list[str] = option(help="calibration artifact folders (any number of models x datasets)")
    out: str = option("table", help="output folder: table.md, table.json, heatmaps/<model>.png", identity=False)
    key_space: KeySpace = option(DEFAULT_KEY_SPACE, help="pre_rope (the paper's) or post_rope keys")
    allow_mixed: bool = option(
        False, help="keep artifacts of one model calibrated differently, and list the differences"
    )

    def __post_init__(self) -> None:
        check_choices(self)
        if not self.runs:
            raise ValueError("give at least one calibration folder")


@dataclass
class JudgeConfig:
    """Where the judge lives and how hard to try. Each field's `help` is its --help line."""

    model: str = option(help="judge model name on the server, e.g. gpt-4o-mini")
    base_url: str | None = option(
        None, help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (default: OpenAI)"
    )
    api_key_env: str = option("OPENAI_API_KEY", help="environment variable holding the API key")
    cache_path: str = option("~/.cache/kvcore-eval/judge.sqlite", help="sqlite file caching every judgement")
    max_concurrency: int = option(4, help="requests in flight at once")
    max_retries: int = option(5, help="HTTP retries (exponential backoff) on 429, 5xx and timeouts")
    timeout: float = option(60.0, help="seconds per request")
    seed: int | None = option(0, help="sampling seed sent to servers that take one")

    def __post_init__(self) -> None:
        if self.max_concurrency < 1 or self.max_retries < 0 or self.timeout <= 0:
            raise ValueError("max_concurrency must be >= 1, max_retries >= 0 and timeout > 0")
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"judge base URL {self.base_url!r} has no scheme: write it as http://{self.base_url} (or https://)"
            )

    @classmethod
    def from_env(cls) -> JudgeConfig:
        """The judge of lm-eval `_gen` tasks: each field from KVCORE_JUDGE_<FIELD> (KVCORE_JUDGE_MODEL,
        KVCORE_JUDGE_BASE_URL, ...)."""
        hints = typing.get_type_hints(cls)
        settings: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            value = os.environ.get(env_name(f.name))
            if value:
                kind = next((t for t in typing.get_args(hints[f.name]) if t is not type(None)), hints[f.name])
                settings[f.name] = kind(value)
        if "model" not in settings:
            raise ValueError(
                f"GPT-score needs a judge: set {env_name('model')} (and {env_name('base_url')} for a non-OpenAI server)"
            )
        return cls(**settings)


def env_name(field_name: str) -> str:
    """The environment variable that sets a JudgeConfig field inside lm-eval (KVCORE_JUDGE_<FIELD>)."""
    return f"KVCORE_JUDGE_{field_name.upper()}"


# Each `added` field's default: what an identity that leaves the field out means (`identity_differences`).
ADDED_DEFAULTS = {
    field.name: field.default
    for config_class in list(globals().values())
    if isinstance(config_class, type) and dataclasses.is_dataclass(config_class)
    for field in dataclasses.fields(config_class)
    if field.metadata.get("added")
}
