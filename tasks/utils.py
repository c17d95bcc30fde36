"""Functions the kvcore task YAMLs call (`!function utils.NAME`); the logic lives in kvcore_eval."""

from __future__ import annotations

import re


def load_perplexity_dataset(
    source: str,
    language: str | None = None,
    data_dir: str | None = None,
    num_samples: int | None = None,
    seed: int = 1234,
    **_: object,
) -> dict:
    """custom_dataset: lm-eval passes the YAML metadata (num_samples: a seeded subset, 1000 by default; null: every
    record, in the seeded order), `--metadata` and the model args as keywords."""
    from kvcore_eval.calibration.data import task_dataset

    return {"test": task_dataset(source, language, data_dir, num_samples, seed)}


def load_generation_dataset(
    source: str,
    language: str | None = None,
    data_dir: str | None = None,
    num_samples: int = 100,
    seed: int = 1234,
    **_: object,
) -> dict:
    """custom_dataset of the `_gen` tasks: a fixed, seeded subset (100 instructions by default)."""
    from kvcore_eval.calibration.data import task_dataset

    return {"test": task_dataset(source, language, data_dir, num_samples, int(seed), generation=True)}


def scored_text(prompt: str, response: str) -> str:
    """The text lm-eval scores for (prompt, response): it moves the prompt's trailing whitespace onto the
    continuation (`TemplateLM._encode_pair`), so that whitespace is scored too (an empty prompt moves nothing)."""
    return prompt[len(prompt.rstrip()) :] + response if prompt else response


def process_perplexity(doc: dict, results: list) -> dict:
    """Loglikelihood of the scored text given the prompt, weighted by the words and bytes lm-eval scored."""
    loglikelihood = results[0][0]
    scored = scored_text(doc["prompt"], doc["response"])
    words = len(re.split(r"\s+", scored.strip())) or 1
    num_bytes = len(scored.encode("utf-8")) or 1
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, num_bytes),
        "bits_per_byte": (loglikelihood, num_bytes),
    }


def process_gpt_score(doc: dict, results: list) -> dict:
    """GPT-score of the generated answer (judge from KVCORE_JUDGE_* variables; cached on disk). A judge that
    is down never loses the generations: they are reported missing and kept in lm-eval's samples file."""
    from kvcore_eval.harness.judge import score_for_task

    return score_for_task(doc["prompt"], results[0], doc.get("response"))


def mean_of_scores(scores: list) -> float:
    """Mean over the answers the judge scored; missing ones (None) are counted by gpt_score_missing instead."""
    present = [s for s in scores if s is not None]
    return sum(present) / len(present) if present else float("nan")
