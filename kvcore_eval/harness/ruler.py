"""RULER's essay-haystack needle tasks over local text: the documents of lm-eval's `niah_single_2/3`,
`niah_multikey_1`, `niah_multiquery` and `niah_multivalue` without the hub (the `kvcore_ruler` task group).

lm-eval's essay tasks read Paul Graham's essays from the hub and fit them with a 500-word step, so their documents
miss the requested length by up to ~700 tokens. Here the haystack is local text (a file or a folder of .txt files,
`--metadata '{"haystack": "path"}'`, by default the short essays this package ships in `kvcore_eval/haystack/`) and
each document is fitted word by word. What is reused from lm-eval by import: the prompt template, the needle
sentence, the depths, the key vocabulary (`lm_eval.tasks.ruler.niah_utils` / `prepare_niah`) and the scoring
(`common_utils`). What is ours: the sentence splitter (a regular expression, not nltk's punkt, whose data would
need a download), a private random generator per document (lm-eval's generators draw from the global `random`),
and the length fitting.

A document, as in RULER: the haystack's first n words (cycled when the text is shorter), split into sentences,
needles inserted between sentences at depths drawn from RULER's 40 depths, wrapped in the template. Its `length`
is RULER's: tokens of the input plus `tokens_to_generate` (128); n is the largest for which length <= the requested
`max_seq_length`, so every document is within a few tokens of it. Deterministic for (seed, task, length, index).
"""

from __future__ import annotations

import functools
import random
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HAYSTACK_DIR = Path(__file__).parent / "haystack"
TOKENS_TO_GENERATE = 128  # RULER's: a document's length counts the answer's budget
DEFAULT_SEED = 42  # RULER's RANDOM_SEED
DEFAULT_NUM_SAMPLES = 500  # RULER's, per length
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


@dataclass(frozen=True)
class NeedleKind:
    """One RULER needle task: what its keys and values are and how many of each."""

    type_needle_k: str = "words"
    type_needle_v: str = "numbers"
    num_needle_k: int = 1
    num_needle_v: int = 1
    num_needle_q: int = 1


# The settings of lm-eval's niah_utils for its essay tasks.
KINDS: dict[str, NeedleKind] = {
    "niah_single_2": NeedleKind(),
    "niah_single_3": NeedleKind(type_needle_v="uuids"),
    "niah_multikey_1": NeedleKind(num_needle_k=4),
    "niah_multivalue": NeedleKind(num_needle_v=4),
    "niah_multiquery": NeedleKind(num_needle_q=4),
}


def haystack_words(path: str | Path | None = None) -> list[str]:
    """The words of the haystack text: a .txt file, or every .txt file of a folder in name order."""
    path = Path(path) if path else HAYSTACK_DIR
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ValueError(f"haystack folder {path} holds no .txt files: add some, or pass a text file")
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(f"haystack {path} does not exist: pass a text file or a folder of .txt files")
    words = " ".join(f.read_text(encoding="utf-8") for f in files).split()
    if len(words) < 100:
        raise ValueError(f"haystack {path} has {len(words)} words: give at least a few pages of text")
    return words


def split_sentences(text: str) -> list[str]:
    """Sentences at ., ! or ? followed by space and a capital or digit (no abbreviation list)."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def _value(rng: random.Random, kind: str, words: list[str]) -> str:
    """A needle key or value in RULER's formats: a 7-digit number, an adjective-noun word, a uuid4."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return rng.choice(words)
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"needle type {kind!r}: use numbers, words or uuids")


@functools.cache
def _ruler_parts() -> tuple[str, str, list[int], list[str]]:
    """lm-eval's template, needle sentence, depths and key words (importing them builds lm-eval's word list once)."""
    from lm_eval.tasks.ruler import niah_utils, prepare_niah

    return niah_utils.TEMPLATE, prepare_niah.NEEDLE, [int(d) for d in prepare_niah.DEPTHS], prepare_niah.WORDS


def _needles(rng: random.Random, kind: NeedleKind, words: list[str]) -> tuple[list[str], list[str], str, int]:
    """(needle sentences in insertion order, answers, query, number of answers) of one document."""
    _, needle, _, _ = _ruler_parts()
    num_k = max(kind.num_needle_k, kind.num_needle_q)
    keys, values, sentences = [], [], []
    for _ in range(num_k):
        keys.append(_value(rng, kind.type_needle_k, words))
        values.append([_value(rng, kind.type_needle_v, words) for _ in range(kind.num_needle_v)])
        sentences += [needle.format(type_needle_v=kind.type_needle_v, key=keys[-1], value=v) for v in values[-1]]
    rng.shuffle(sentences)
    queried = rng.sample(range(num_k), kind.num_needle_q)
    queries = [keys[i] for i in queried]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    return sentences, [a for i in queried for a in values[i]], query, kind.num_needle_q * kind.num_needle_v


def _prompt(words_used: list[str], needles: list[str], depths: list[int], query: str, kind: NeedleKind, one: bool):
    template, _, _, _ = _ruler_parts()
    sentences = split_sentences(" ".join(words_used))
    cuts = [0] + sorted(int(len(sentences) * d / 100) for d in depths) + [len(sentences)]
    parts = []
    for i in range(1, len(cuts)):
        parts.append(" ".join(sentences[cuts[i - 1] : cuts[i]]))
        if i - 1 < len(needles):
            parts.append(needles[i - 1])
    type_v = kind.type_needle_v
    if one:  # RULER's singular wording when exactly one value is asked for
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
        type_v = type_v[:-1]
    return template.format(type_needle_v=type_v, context=" ".join(p for p in parts if p), query=query), type_v


def largest_fitting(fits, hint: int) -> int:
    """The largest n >= 0 with fits(n), for fits monotone (true up to some n, false after); searched outward from
    `hint` in doubling steps, then bisected. fits(0) is assumed."""
    step, hint = 8, max(hint, 1)
    if fits(hint):
        low, high = hint, hint + step
        while fits(high):
            low, high, step = high, high + 2 * step, 2 * step
    else:
        high, low = hint, max(hint - step, 0)
        while low > 0 and not fits(low):
            high, low, step = low, max(low - 2 * step, 0), 2 * step
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def build_document(
    task: str,
    index: int,
    max_seq_length: int,
    words: list[str],
    count_tokens,
    seed: int = DEFAULT_SEED,
    hint: int = 0,
) -> dict[str, Any]:
    """One document of `task` with as many haystack words as fit `max_seq_length` (RULER's fields and length);
    `hint` is a guess of that number of words (the previous document's) that speeds up the search."""
    kind = KINDS[task]
    _, _, all_depths, key_words = _ruler_parts()
    rng = random.Random(f"kvcore_ruler/{seed}/{task}/{max_seq_length}/{index}")
    needles, answers, query, num_answers = _needles(rng, kind, key_words)
    depths = rng.sample(all_depths, len(needles))
    budget = max_seq_length - TOKENS_TO_GENERATE

    def prompt(n: int) -> tuple[str, str]:
        used = [words[i % len(words)] for i in range(n)]
        return _prompt(used, needles, depths, query, kind, num_answers == 1)

    low = largest_fitting(lambda n: count_tokens(prompt(n)[0]) <= budget, hint)
    text, type_v = prompt(low)
    length = count_tokens(text) + TOKENS_TO_GENERATE
    if low == 0 or length > max_seq_length:
        raise ValueError(
            f"{task}: no haystack fits max_seq_length={max_seq_length} beside the template, the needles and "
            f"{TOKENS_TO_GENERATE} generated tokens: raise max_seq_lengths"
        )
    plural = "are" if num_answers > 1 else "is"
    return {
        "index": index,
        "input": text,
        "outputs": answers,
        "length": length,
        "max_length": max_seq_length,
        "gen_prefix": f"The special magic {type_v} for {query} mentioned in the provided text {plural}",
        "haystack_words": low,
    }


@functools.cache
def _tokenizer(name: str, gguf_file: str | None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, gguf_file=gguf_file)


def tokenizer_from(kwargs: dict[str, Any]):
    """The tokenizer a task sizes its documents with: `tokenizer=` (metadata or model_args), else `pretrained=`
    with its `gguf_file=` (lm-eval's RULER reads a GGUF's folder and fails; this reads the file)."""
    if isinstance(kwargs.get("tokenizer"), str) and kwargs["tokenizer"]:
        return _tokenizer(kwargs["tokenizer"], None)
    if isinstance(kwargs.get("pretrained"), str) and kwargs["pretrained"]:
        return _tokenizer(kwargs["pretrained"], kwargs.get("gguf_file") or None)
    raise ValueError(
        "kvcore_ruler tasks size their documents with the model's tokenizer: run them with --model_args "
        'pretrained=... (lm_eval passes it on), or pass --metadata \'{"tokenizer": "<folder or hub id>"}\''
    )


def documents(task: str, **kwargs) -> list[dict[str, Any]]:
    """Every document of `task` for lm-eval's custom_dataset: `num_samples` (500) per length of `max_seq_lengths`
    ([4096]), from `haystack` (default: the shipped essays), for `seed` (42)."""
    tokenizer = tokenizer_from(kwargs)
    lengths = kwargs.get("max_seq_lengths") or [4096]
    words = haystack_words(kwargs.get("haystack"))
    seed = int(kwargs.get("seed", DEFAULT_SEED))
    count = int(kwargs.get("num_samples") or DEFAULT_NUM_SAMPLES)

    def count_tokens(text: str) -> int:
        return len(tokenizer(text).input_ids)

    docs: list[dict[str, Any]] = []
    for length in lengths:
        hint = 0
        for index in range(count):
            docs.append(build_document(task, index, int(length), words, count_tokens, seed, hint))
            hint = docs[-1]["haystack_words"]
    return docs


DEFAULT_DOC_WORDS = 1800  # about 2,000 tokens of English for most tokenizers


def text_documents(haystack: str | Path | None = None, doc_words: int = DEFAULT_DOC_WORDS) -> list[dict[str, str]]:
    """Long documents for rolling perplexity (`kvcore_longtext`): consecutive, non-overlapping runs of `doc_words`
    words of the haystack text (a shorter remainder is dropped), so that documents never share text."""
    words = haystack_words(haystack)
    doc_words = int(doc_words)
    if doc_words < 1 or len(words) < doc_words:
        raise ValueError(
            f"the haystack has {len(words)} words, fewer than doc_words={doc_words}: add text or lower doc_words"
        )
    return [{"text": " ".join(words[i : i + doc_words])} for i in range(0, len(words) - doc_words + 1, doc_words)]
