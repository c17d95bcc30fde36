"""Data sources: one registry for calibration (`--dataset kvcore:alpaca`) and for the lm-eval tasks.

A source names a public Hugging Face dataset and a prompt format; each record becomes (prompt, response).
Any source can be read from a local JSON/JSONL file instead: `<data_dir>/<source>.jsonl`, where data_dir
comes from lm-eval's `--metadata '{"data_dir": ...}'` or the `KVCORE_DATA_DIR` environment variable.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "KVCORE_DATA_DIR"
LOCAL_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet", ".csv")


@dataclass(frozen=True)
class DataSource:
    """A public dataset, the split read, and how a record becomes (prompt, response)."""

    name: str
    hub_id: str
    split: str
    prompt_format: str
    description: str
    data_dir: str | None = None  # sub-folder of the hub repository, where the data is not at its root


SOURCES: dict[str, DataSource] = {
    source.name: source
    for source in (
        DataSource("alpaca", "tatsu-lab/alpaca", "train", "alpaca", "Stanford Alpaca, 52K general instructions"),
        DataSource("medalpaca", "medalpaca/medical_meadow_medical_flashcards", "train", "alpaca", "MedAlpaca medical flashcards, 34K Q/A"),
        DataSource("codealpaca", "sahil2801/CodeAlpaca-20k", "train", "alpaca", "CodeAlpaca-20k code instructions"),
        DataSource("wizardcoder", "nickrosh/Evol-Instruct-Code-80k-v1", "train", "alpaca", "Evol-Instruct code data (WizardCoder's recipe)"),
        DataSource("functioncall", "glaiveai/glaive-function-calling-v2", "train", "functioncall", "Glaive function-calling conversations"),
        DataSource("visr", "puar-playground/VisR-Bench", "train", "question", "VisR-Bench multilingual questions (text only)", data_dir="Multilingual"),
    )
}

# VisR-Bench question languages: code -> name as the records spell it.
VISR_LANGUAGES: dict[str, str] = {
    "en": "English", "de": "German", "it": "Italian", "sv": "Swedish", "es": "Spanish", "ja": "Japanese",
    "ar": "Arabic", "fr": "French", "nl": "Dutch", "pt": "Portuguese", "fi": "Finnish", "da": "Danish",
    "cs": "Czech", "hu": "Hungarian", "sl": "Slovenian", "hr": "Croatian",
}

_ALPACA_HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"


def _require(record: dict[str, Any], field: str, origin: str) -> str:
    if field not in record:
        raise KeyError(f"{origin}: record has no field {field!r} (fields: {', '.join(sorted(record))})")
    return str(record[field] or "")


def format_record(record: dict[str, Any], prompt_format: str, origin: str = "dataset") -> tuple[str, str]:
    """(prompt, response) of one record in the named format."""
    if prompt_format == "alpaca":
        instruction, response = _require(record, "instruction", origin), _require(record, "output", origin)
        extra = str(record.get("input") or "")
        body = f"### Instruction:\n{instruction}\n\n" + (f"### Input:\n{extra}\n\n" if extra else "")
        return f"{_ALPACA_HEADER}{body}### Response:\n", response
    if prompt_format == "functioncall":
        return _require(record, "system", origin).strip() + "\n\n", _require(record, "chat", origin).strip()
    if prompt_format == "question":
        return "", _require(record, "question", origin)
    if prompt_format.startswith("field:"):
        return "", _require(record, prompt_format.removeprefix("field:"), origin)
    raise ValueError(f"unknown prompt format {prompt_format!r}: use alpaca, functioncall, question or field:NAME")


def resolve_source(name: str) -> DataSource:
    if name not in SOURCES:
        raise ValueError(f"unknown data source {name!r}; known: {', '.join(sorted(SOURCES))}")
    return SOURCES[name]


def _local_file(path: Path) -> Path | None:
    if path.is_file():
        return path
    for suffix in LOCAL_SUFFIXES:
        if path.with_suffix(suffix).is_file():
            return path.with_suffix(suffix)
    return None


def read_json_records(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a local .jsonl (one object per line) or .json (a list of objects); errors name the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            if path.suffix == ".json":
                records = json.load(f)
                if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
                    raise ValueError(f"{path} is not a JSON list of objects: write one object per record")
                yield from records
                return
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg}, column {err.colno}): fix or remove that line") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}, line {number}: a JSON {type(record).__name__}, not an object: write one object per line")
                yield record
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} cannot be decoded): convert it, "
                         f"for example `iconv -f latin1 -t utf-8 {path.name}`") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno}): fix the file") from None


def load_records(path_or_id: str, split: str = "train", data_dir: str | None = None, streaming: bool = False) -> Iterable[dict[str, Any]]:
    """Records of a local file (.jsonl/.json read here, .txt/.parquet/.csv through `datasets`) or of a hub dataset."""
    import datasets

    local = Path(path_or_id)
    if local.suffix in LOCAL_SUFFIXES:
        if not local.is_file():
            raise FileNotFoundError(f"dataset file {local} does not exist")
        if local.suffix in (".jsonl", ".json"):
            return read_json_records(local)
        builder = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}[local.suffix]
        return datasets.load_dataset(builder, data_files=str(local), split="train", streaming=streaming)
    try:
        return datasets.load_dataset(path_or_id, data_dir=data_dir, split=split, streaming=streaming)
    except ConnectionError as err:
        raise ConnectionError(
            f"could not reach the Hugging Face hub for {path_or_id!r} ({err}); pass a local .jsonl file, or set "
            f"{DATA_DIR_ENV} to a folder holding <source>.jsonl files"
        ) from err


def source_records(source: DataSource, data_dir: str | os.PathLike | None = None, streaming: bool = False) -> Iterable[dict[str, Any]]:
    """Records of a registered source: `<data_dir>/<name>.jsonl` when that file exists, else the hub."""
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV)
    if data_dir:
        local = _local_file(Path(data_dir) / source.name)
        if local is None:
            raise FileNotFoundError(
                f"data_dir {data_dir} has no {source.name}.jsonl (or .json/.parquet/.csv); add it, or unset "
                f"data_dir/{DATA_DIR_ENV} to read {source.hub_id} from the hub"
            )
        logger.info("reading %s from %s", source.name, local)
        return load_records(str(local), streaming=streaming)
    return load_records(source.hub_id, source.split, source.data_dir, streaming=streaming)


def iter_texts(dataset: str, split: str = "train", prompt_format: str | None = None, text_field: str | None = None,
               data_dir: str | None = None) -> Iterator[str]:
    """Texts for calibration, each prompt + response, from `kvcore:<source>[:<language>]` (the task registry),
    a local file or a hub id."""
    if dataset.startswith("kvcore:"):
        source_name, _, language = dataset.removeprefix("kvcore:").partition(":")
        prompt_format = prompt_format or (f"field:{text_field}" if text_field else None)
        pairs = source_pairs(resolve_source(source_name), language or None, data_dir, streaming=True, prompt_format=prompt_format)
    else:
        prompt_format = prompt_format or f"field:{text_field or 'text'}"
        pairs = (format_record(record, prompt_format, dataset) for record in load_records(dataset, split, streaming=True))
    for prompt, response in pairs:
        yield prompt + response


def pack_sequences(texts: Iterable[str], tokenizer, seq_len: int, max_tokens: int) -> Iterator[list[int]]:
    """Tokenize texts, join them with EOS, and cut the stream into sequences of `seq_len` tokens.

    Stops after `max_tokens` tokens; the last sequence may be shorter (it is never padded)."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    buffer: list[int] = []
    emitted = 0
    for text in texts:
        buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + separator)
        while len(buffer) >= seq_len and emitted + seq_len <= max_tokens:
            yield buffer[:seq_len]
            buffer, emitted = buffer[seq_len:], emitted + seq_len
        if emitted + seq_len > max_tokens:
            break
    tail = buffer[: max(0, min(len(buffer), max_tokens - emitted, seq_len))]
    if tail:
        yield tail


def _language_matches(record_language: str, language: str) -> bool:
    wanted = {language.lower(), VISR_LANGUAGES[language].lower()}
    return str(record_language).strip().lower() in wanted


def source_pairs(source: DataSource, language: str | None = None, data_dir: str | None = None,
                 streaming: bool = False, prompt_format: str | None = None) -> Iterator[tuple[str, str]]:
    """(prompt, response) of a registered source's records in its prompt format (or `prompt_format`),
    only those in `language` when given (VisR-Bench)."""
    if language is not None and language not in VISR_LANGUAGES:
        raise ValueError(f"unknown language {language!r}; VisR-Bench languages: {', '.join(sorted(VISR_LANGUAGES))}")
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV)
    origin = str(Path(data_dir) / source.name) if data_dir else source.hub_id
    for record in source_records(source, data_dir=data_dir, streaming=streaming):
        if language is None or _language_matches(_require(record, "language", origin), language):
            yield format_record(record, prompt_format or source.prompt_format, origin)


def task_dataset(source_name: str, language: str | None = None, data_dir: str | None = None,
                 num_samples: int | None = None, seed: int = 1234):
    """A `datasets.Dataset` of {prompt, response} for an lm-eval task; a seeded subset when num_samples is set."""
    import datasets

    source = resolve_source(source_name)
    rows = [{"prompt": prompt, "response": response} for prompt, response in source_pairs(source, language, data_dir)]
    if not rows:
        raise ValueError(f"{source.name} has no records" + (f" in language {language!r}" if language else ""))
    dataset = datasets.Dataset.from_list(rows)
    if num_samples is not None and num_samples < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(num_samples))
    return dataset
