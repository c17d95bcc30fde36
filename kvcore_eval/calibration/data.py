"""Data sources: one registry for calibration (`--dataset kvcore:alpaca`) and for the lm-eval tasks.

A source names a public dataset and a prompt format; each record becomes (prompt, response). Any source can
be read from local files instead: `<data_dir>/<source>.jsonl` (VisR-Bench: `<data_dir>/visr/<name>_QA.json`,
the repository's own layout), where data_dir comes from lm-eval's `--metadata '{"data_dir": ...}'` or the
`KVCORE_DATA_DIR` environment variable. Calibration can also read any lm-eval task's documents
(`--dataset lm_eval:<task>`), skipping the ones an evaluation scores.

VisR-Bench: the hub repository holds only page images; the questions are JSON files in the project's GitHub
repository (`QA/multilingual_QA.json`; English in `QA/{text,table,figure}_QA.json`), read at a pinned commit
(`VISR_COMMIT`; `KVCORE_VISR_URL` overrides the URL template) and cached under $KVCORE_CACHE_DIR (~/.cache/kvcore-eval).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvcore_eval import outputs
from kvcore_eval.harness.lm_tasks import lm_eval_task_documents

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
        DataSource(
            "medalpaca",
            "medalpaca/medical_meadow_medical_flashcards",
            "train",
            "alpaca",
            "MedAlpaca medical flashcards, 34K Q/A",
        ),
        DataSource("codealpaca", "sahil2801/CodeAlpaca-20k", "train", "alpaca", "CodeAlpaca-20k code instructions"),
        DataSource(
            "wizardcoder",
            "nickrosh/Evol-Instruct-Code-80k-v1",
            "train",
            "alpaca",
            "Evol-Instruct code data (WizardCoder's recipe)",
        ),
        DataSource(
            "functioncall",
            "glaiveai/glaive-function-calling-v2",
            "train",
            "functioncall",
            "Glaive function-calling conversations",
        ),
        DataSource(
            "visr",
            "puar-playground/VisR-Bench",
            "train",
            "question",
            "VisR-Bench questions (text only), from the project's QA files",
        ),
    )
}
GENERATION_FORMATS = {
    "functioncall": "functioncall_turn"
}  # a source's prompt format for its _gen task, where it differs

VISR_COMMIT = "3bae27906751be232abfe5b6f4a14aedd5acc298"
VISR_URL_ENV = "KVCORE_VISR_URL"
VISR_URL = "https://raw.githubusercontent.com/puar-playground/VisR-Bench/{commit}/QA/{file}"
VISR_FILES = {"multilingual": ("multilingual_QA.json",), "en": ("text_QA.json", "table_QA.json", "figure_QA.json")}

# VisR-Bench question languages: code -> name as the records spell it.
VISR_LANGUAGES: dict[str, str] = {
    "en": "English",
    "de": "German",
    "it": "Italian",
    "sv": "Swedish",
    "es": "Spanish",
    "ja": "Japanese",
    "ar": "Arabic",
    "fr": "French",
    "nl": "Dutch",
    "pt": "Portuguese",
    "fi": "Finnish",
    "da": "Danish",
    "cs": "Czech",
    "hu": "Hungarian",
    "sl": "Slovenian",
    "hr": "Croatian",
}

_ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)


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
    if prompt_format == "functioncall":  # the whole conversation, without the literal end-of-text markers
        return _require(record, "system", origin).strip() + "\n\n", _END_OF_TEXT.sub(
            "", _require(record, "chat", origin)
        ).strip()
    if prompt_format == "functioncall_turn":  # the system text and the first request; the reference is the first reply
        turns = chat_turns(_require(record, "chat", origin))
        user = next((text for role, text in turns if role == "USER"), "")
        reply = next((text for role, text in turns if role == "ASSISTANT"), "")
        return f"{_require(record, 'system', origin).strip()}\n\nUSER: {user}\n\n\nASSISTANT:", f" {reply}"
    if prompt_format == "question":
        return "", _require(record, "question", origin)
    if prompt_format.startswith("field:"):
        return "", _require(record, prompt_format.removeprefix("field:"), origin)
    raise ValueError(
        f"unknown prompt format {prompt_format!r}: use alpaca, functioncall, functioncall_turn, question or field:NAME"
    )


_END_OF_TEXT = re.compile(r"\s*<\|endoftext\|>")
_TURN = re.compile(r"(USER|ASSISTANT|FUNCTION RESPONSE):\s*")


def chat_turns(chat: str) -> list[tuple[str, str]]:
    """Glaive's `chat` as (role, text) turns, end-of-text markers removed."""
    parts = _TURN.split(chat)
    return [(role, _END_OF_TEXT.sub("", text).strip()) for role, text in zip(parts[1::2], parts[2::2], strict=False)]


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
                for number, record in enumerate(records, 1):
                    check_text(record, f"{path}, record {number}")
                yield from records
                return
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"{path}, line {number}: not valid JSON ({err.msg}, column {err.colno}): "
                        "fix or remove that line"
                    ) from None
                if not isinstance(record, dict):
                    raise ValueError(
                        f"{path}, line {number}: a JSON {type(record).__name__}, not an object: "
                        "write one object per line"
                    )
                if "\\u" in line:  # only an escape can put a lone surrogate in decoded UTF-8
                    check_text(record, f"{path}, line {number}")
                yield record
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} cannot be decoded): convert it, "
            f"for example `iconv -f latin1 -t utf-8 {path.name}`"
        ) from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno}): fix the file") from None


def check_text(record: dict[str, Any], where: str) -> None:
    """A record's strings are text: a lone surrogate (an escape such as \\ud800 with no pair) is no character, and
    fails every encoder later, far from its file; it is named here, with the record's file and line."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        lone = err.object[err.start : err.end].encode("unicode_escape").decode()
        raise ValueError(
            f"{where}: holds a lone surrogate ({lone}, half of a UTF-16 pair), which is not text: fix or remove it"
        ) from None


def load_records(
    path_or_id: str, split: str = "train", data_dir: str | None = None, streaming: bool = False
) -> Iterable[dict[str, Any]]:
    """Records of a local file (.jsonl/.json read here, .txt/.parquet/.csv through `datasets`) or of a hub dataset."""
    import datasets

    local = Path(path_or_id)
    if local.suffix in LOCAL_SUFFIXES:
        if not local.is_file():
            raise FileNotFoundError(f"dataset file {local} does not exist")
        if local.suffix in (".jsonl", ".json"):
            return read_json_records(local)
        builder = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}[
            local.suffix
        ]
        return datasets.load_dataset(builder, data_files=str(local), split="train", streaming=streaming)
    try:
        return datasets.load_dataset(path_or_id, data_dir=data_dir, split=split, streaming=streaming)
    except ConnectionError as err:
        raise ConnectionError(
            f"could not reach the Hugging Face hub for {path_or_id!r} ({err}); pass a local .jsonl file, or set "
            f"{DATA_DIR_ENV} to a folder holding <source>.jsonl files"
        ) from err


def visr_documents(name: str, data_dir: str | None) -> list[dict[str, Any]]:
    """One VisR-Bench QA file: `<data_dir>/visr/<name>` when data_dir is set, else the pinned GitHub file (cached)."""
    if data_dir:
        path = Path(data_dir) / "visr" / name
        if not path.is_file():
            raise FileNotFoundError(
                f"data_dir {data_dir} has no visr/{name} (VisR-Bench's QA/{name}); add it, or unset "
                f"data_dir/{DATA_DIR_ENV} to read it from GitHub"
            )
        return list(read_json_records(path))
    import hashlib

    url = os.environ.get(VISR_URL_ENV, VISR_URL).format(commit=VISR_COMMIT, file=name)
    cache = outputs.cache_dir("visr", hashlib.sha256(url.encode()).hexdigest()[:16], name)
    if not cache.is_file():
        import urllib.request

        try:
            with urllib.request.urlopen(url, timeout=120) as response:
                text = response.read().decode("utf-8")
        except OSError as err:
            raise ConnectionError(
                f"could not download VisR-Bench's {name} from {url} ({err}): set {VISR_URL_ENV} to a reachable "
                f"copy, or {DATA_DIR_ENV} to a folder holding visr/{name}"
            ) from err
        cache.parent.mkdir(parents=True, exist_ok=True)
        outputs.atomic_write_text(cache, text)
    return list(read_json_records(cache))


def flatten_visr(document: dict[str, Any], default_language: str | None) -> Iterator[dict[str, Any]]:
    """A document's questions as flat records {question, answer, language}: `qa_list` (current layout) or
    `QA.questions` with `question_in_detected_language` (older files)."""
    for qa in document.get("qa_list") or []:
        yield {
            "question": qa.get("question") or qa.get("question_in_detected_language") or "",
            "answer": qa.get("answer") or "",
            "language": qa.get("detected_language") or document.get("detected_language") or default_language,
        }
    old = document.get("QA")
    if isinstance(old, dict):
        for qa in old.get("questions") or []:
            yield {
                "question": qa.get("question_in_detected_language") or qa.get("question") or "",
                "answer": qa.get("answer_in_detected_language") or "",
                "language": old.get("detected_language") or default_language,
            }


def visr_records(language: str | None, data_dir: str | None) -> Iterator[dict[str, Any]]:
    """Flat VisR-Bench records: English from the English QA files, every other language from the multilingual one."""
    english = language == "en"
    for name in VISR_FILES["en" if english else "multilingual"]:
        for document in visr_documents(name, data_dir):
            yield from flatten_visr(document, "English" if english else None)


def source_records(
    source: DataSource, data_dir: str | os.PathLike | None = None, streaming: bool = False
) -> Iterable[dict[str, Any]]:
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


def iter_documents(
    dataset: str,
    split: str = "train",
    prompt_format: str | None = None,
    text_field: str | None = None,
    data_dir: str | None = None,
    skip_docs: int = 0,
    include_path: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Iterator[tuple[str, str]]:
    """(prompt, response) documents for calibration from `kvcore:<source>[:<language>]` (the task registry),
    `lm_eval:<task>` (an lm-eval task's documents after the first `skip_docs`; `metadata` is lm-eval's --metadata,
    which generated tasks such as RULER read), a local file or a hub id. The prompt is empty where the data does
    not separate one."""
    if dataset.startswith("lm_eval:"):
        yield from lm_eval_task_documents(dataset.removeprefix("lm_eval:"), skip_docs, data_dir, include_path, metadata)
        return
    if dataset.startswith("kvcore:"):
        source_name, _, language = dataset.removeprefix("kvcore:").partition(":")
        prompt_format = prompt_format or (f"field:{text_field}" if text_field else None)
        yield from source_pairs(
            resolve_source(source_name), language or None, data_dir, streaming=True, prompt_format=prompt_format
        )
        return
    prompt_format = prompt_format or f"field:{text_field or 'text'}"
    for record in load_records(dataset, split, streaming=True):
        yield format_record(record, prompt_format, dataset)


def iter_texts(*args, **kwargs) -> Iterator[str]:
    """Each document of `iter_documents` as one text, prompt + response."""
    for prompt, response in iter_documents(*args, **kwargs):
        yield prompt + response


TOKENIZATION = (
    "each document as lm-eval's HFLM encodes it (add_bos_token unset: the tokenizer's own special tokens, "
    "none when the text already starts with BOS), documents joined by EOS and packed"
)


def encode_as_lm_eval(tokenizer, text: str) -> list[int]:
    """A document's tokens as lm-eval's HFLM.tok_encode gives them with add_bos_token unset: the tokenizer's default
    special tokens (a BOS where the tokenizer adds one), none when the text already starts with the BOS text."""
    bos = tokenizer.decode([tokenizer.bos_token_id]) if tokenizer.bos_token_id is not None else None
    add_special = not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=add_special)["input_ids"]


def adds_bos(tokenizer) -> bool:
    """Whether a document's tokens start with BOS (the attention-sink token of the evaluation too)."""
    ids = encode_as_lm_eval(tokenizer, "a")
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def pack_sequences(texts: Iterable[str], tokenizer, seq_len: int, max_tokens: int) -> Iterator[list[int]]:
    """Tokenize texts, join them with EOS, and cut the stream into sequences of `seq_len` tokens.

    Stops after `max_tokens` tokens; the last sequence may be shorter (it is never padded). A text is read only
    while the tokens so far fall short of `max_tokens`, so the full sequences are a prefix of those of any larger
    `max_tokens`, and a run ends short of `max_tokens` only when the texts ran out."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    buffer: list[int] = []
    emitted = 0
    for text in texts:
        buffer.extend(encode_as_lm_eval(tokenizer, text) + separator)
        while len(buffer) >= seq_len and emitted + seq_len <= max_tokens:
            yield buffer[:seq_len]
            buffer, emitted = buffer[seq_len:], emitted + seq_len
        if emitted + len(buffer) >= max_tokens:
            break
    tail = buffer[: max(0, min(len(buffer), max_tokens - emitted, seq_len))]
    if tail:
        yield tail


def _language_matches(record_language: str, language: str) -> bool:
    wanted = {language.lower(), VISR_LANGUAGES[language].lower()}
    return str(record_language).strip().lower() in wanted


def source_pairs(
    source: DataSource,
    language: str | None = None,
    data_dir: str | None = None,
    streaming: bool = False,
    prompt_format: str | None = None,
) -> Iterator[tuple[str, str]]:
    """(prompt, response) of a registered source's records in its prompt format (or `prompt_format`),
    only those in `language` when given (VisR-Bench)."""
    if language is not None and language not in VISR_LANGUAGES:
        raise ValueError(f"unknown language {language!r}; VisR-Bench languages: {', '.join(sorted(VISR_LANGUAGES))}")
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV)
    origin = str(Path(data_dir) / source.name) if data_dir else source.hub_id
    if source.name == "visr":
        records: Iterable[dict[str, Any]] = visr_records(language, data_dir)
    else:
        records = source_records(source, data_dir=data_dir, streaming=streaming)
    found: set[str] = set()
    for record in records:
        if language is not None:
            found.add(str(record.get("language")))
            if not _language_matches(_require(record, "language", origin), language):
                continue
        yield format_record(record, prompt_format or source.prompt_format, origin)
    if language is not None and not any(_language_matches(name, language) for name in found):
        raise ValueError(
            f"{source.name} has no records in language {language!r} ({VISR_LANGUAGES[language]}); languages "
            f"present: {', '.join(sorted(found)) or 'none'}"
        )


def split_indices(count: int, num_samples: int | None, seed: int) -> list[int]:
    """A seeded order of `count` records; the first `num_samples` (all when None) are the evaluated subset."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(count).tolist()
    return order if num_samples is None else order[:num_samples]


def task_dataset(
    source_name: str,
    language: str | None = None,
    data_dir: str | None = None,
    num_samples: int | None = None,
    seed: int = 1234,
    generation: bool = False,
):
    """A `datasets.Dataset` of {prompt, response} for an lm-eval task: the records in a seeded order, the first
    `num_samples` of them when set. `generation` uses the source's _gen prompt format where it has one."""
    import datasets

    source = resolve_source(source_name)
    prompt_format = GENERATION_FORMATS.get(source.prompt_format) if generation else None
    rows = [
        {"prompt": prompt, "response": response}
        for prompt, response in source_pairs(source, language, data_dir, prompt_format=prompt_format)
    ]
    if not rows:
        raise ValueError(f"{source.name} has no records: check its data (data_dir or the hub)")
    num_samples = None if num_samples is None else int(num_samples)
    return datasets.Dataset.from_list([rows[i] for i in split_indices(len(rows), num_samples, seed)])
