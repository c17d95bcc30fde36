"""Functions the kvcore_ruler YAMLs call: documents from kvcore_eval.harness.ruler; scoring is lm-eval's RULER's."""

from __future__ import annotations

from lm_eval.tasks.ruler.common_utils import aggregate_metrics, process_results

__all__ = ["aggregate_metrics", "process_results"]


def _dataset(task: str, **kwargs) -> dict:
    """custom_dataset: lm-eval passes --metadata (and, from the lm_eval command, the model args) as keywords."""
    import datasets

    from kvcore_eval.harness.ruler import documents

    return {"test": datasets.Dataset.from_list(documents(task, **kwargs), split=datasets.Split.TEST)}


def niah_single_2(**kwargs) -> dict:
    return _dataset("niah_single_2", **kwargs)


def niah_single_3(**kwargs) -> dict:
    return _dataset("niah_single_3", **kwargs)


def niah_multikey_1(**kwargs) -> dict:
    return _dataset("niah_multikey_1", **kwargs)


def niah_multiquery(**kwargs) -> dict:
    return _dataset("niah_multiquery", **kwargs)


def niah_multivalue(**kwargs) -> dict:
    return _dataset("niah_multivalue", **kwargs)


def longtext(haystack: str | None = None, doc_words: int | None = None, **_: object) -> dict:
    """custom_dataset of kvcore_longtext: non-overlapping runs of `doc_words` (1800) words of the haystack."""
    import datasets

    from kvcore_eval.harness.ruler import DEFAULT_DOC_WORDS, text_documents

    return {"test": datasets.Dataset.from_list(text_documents(haystack, doc_words or DEFAULT_DOC_WORDS))}
