"""Calibration/evaluation overlap: which scored documents the calibration saw.

A calibration records one digest per document it read (`digests`: the document's full text, and its prompt
where the source separates prompt and response). A document's text is normalized first (Unicode NFC, every run of
whitespace collapsed to one space, ends stripped), then hashed (the first 8 bytes of its sha256, as a signed
int64, so that the digests fit a safetensors tensor). Every document the packing pulled counts as read, even one
cut short by --max-tokens: overlap is over-reported, never under-reported.

`kvcore_hf` sees each request lm-eval sends (the `Instance`, with its task and document id) before it runs, and
counts a scored document as seen when one of its texts (context + continuation, as lm-eval scores them, or the
context alone; a rolling request's whole text) has the digest of a calibrated document or of its prompt. This is
an exact-document test after normalization: a document that only contains a calibrated one (a few-shot context)
is not detected.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Iterator
from typing import Any

_WHITESPACE = re.compile(r"\s+")
NORMALIZATION = "NFC, whitespace runs collapsed to one space, stripped; sha256, first 8 bytes as int64"


def normalize(text: str) -> str:
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def digest(text: str) -> int:
    """The int64 digest of a text's normalized form; 0 for a text that normalizes to nothing (never a match)."""
    normal = normalize(text)
    if not normal:
        return 0
    return int.from_bytes(hashlib.sha256(normal.encode("utf-8")).digest()[:8], "little", signed=True) or 1


class DocumentLog:
    """The digests of the documents a calibration reads, in reading order: (document digest, prompt digest)."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int]] = []

    def texts(self, documents: Iterable[tuple[str, str]]) -> Iterator[str]:
        """prompt + response of each (prompt, response), logged as it is pulled."""
        for prompt, response in documents:
            self.rows.append((digest(prompt + response), digest(prompt)))
            yield prompt + response

    def fingerprint(self, count: int | None = None) -> str:
        """sha256 of the first `count` documents' digests: the identity of the data read so far."""
        rows = self.rows if count is None else self.rows[:count]
        return hashlib.sha256(repr(rows).encode()).hexdigest()[:16]

    def tensor(self):
        """(documents, 2) int64: document digest, prompt digest (0: no separate prompt)."""
        import torch

        return torch.tensor(self.rows, dtype=torch.int64).reshape(-1, 2)


def request_texts(request_type: str, arguments: tuple) -> list[str]:
    """The texts of one lm-eval request that may equal a calibrated document (or its prompt)."""
    if request_type == "loglikelihood":
        context, continuation = arguments[0], arguments[1]
        return [context + continuation, context]
    return [arguments[0]]  # loglikelihood_rolling: the text; generate_until: the context


class OverlapCounter:
    """Per task, which scored documents (by doc_id) the calibration saw."""

    def __init__(self, digests) -> None:  # digests: (documents, 2) int64 tensor, or None (an artifact without them)
        self.known = None if digests is None else {int(d) for d in digests.reshape(-1).tolist() if int(d) != 0}
        self.documents: dict[str, dict[Any, bool]] = {}

    def add(self, requests: Iterable[Any]) -> dict[str, dict[str, float]]:
        """Count a batch of lm-eval Instances; returns the summary of the tasks they belong to."""
        tasks = set()
        for request in requests:
            task = request.task_name or "(unnamed)"
            tasks.add(task)
            seen = self.known is not None and any(
                digest(text) in self.known for text in request_texts(request.request_type, request.args)
            )
            documents = self.documents.setdefault(task, {})
            documents[request.doc_id] = documents.get(request.doc_id, False) or seen
        return {task: summary for task, summary in self.summary().items() if task in tasks}

    def merge(self, documents: dict[str, dict[Any, bool]]) -> None:
        """Add another counter's documents (another process's share of the same tasks): a document is seen if either
        saw it."""
        for task, others in documents.items():
            mine = self.documents.setdefault(task, {})
            for doc_id, seen in others.items():
                mine[doc_id] = mine.get(doc_id, False) or seen

    def summary(self) -> dict[str, dict[str, float]]:
        """task -> {scored, seen, fraction}; fraction None when the artifact recorded no digests (unknown)."""
        return {
            task: {
                "scored": len(documents),
                "seen": sum(documents.values()) if self.known is not None else None,
                "fraction": (sum(documents.values()) / len(documents)) if self.known is not None else None,
            }
            for task, documents in self.documents.items()
        }


def documents_seen(digests, documents: Iterable[tuple[str, str]]) -> tuple[int, int]:
    """(seen, scored) of (prompt, response) documents scored as loglikelihood requests, before any model loads."""
    counter = OverlapCounter(digests)
    seen = scored = 0
    for prompt, response in documents:
        scored += 1
        seen += any(digest(text) in (counter.known or ()) for text in (prompt + response, prompt))
    return seen, scored
