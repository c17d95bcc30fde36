"""Sample-wise measurement: each scored document's own NER per layer, and its own perplexity under a truncation.

A document's NER comes from that document's own Grams: the model runs once over the document's text (tokenized
as calibration tokenizes, `add_special_tokens=False`) with a `gram.GramRecorder`, and each layer's K and V Gram is
eigendecomposed. A document's perplexity comes from lm-eval's per-sample log (`log_samples`): for byte perplexity
exp(−loglikelihood / bytes of the scored continuation), the same formula lm-eval aggregates over documents.
"""

from __future__ import annotations

from typing import Any

import torch

from kvcore_eval import metrics
from kvcore_eval.calibration.gram import GramAccumulator, GramRecorder
from kvcore_eval.metrics import PERPLEXITY_METRICS
from kvcore_eval.model.models import context_length, kv_geometry
from kvcore_eval.model.rope import RopeTap
from kvcore_eval.spaces import KEY_SPACES


def gram_ner(grams: dict[str, torch.Tensor], key_space: str) -> dict[str, list[float]]:
    """NER per layer of keys (in `key_space`) and values from per-layer Grams (layers, D, D)."""
    spaces = {"key": KEY_SPACES[key_space], "value": "value"}
    return {
        kind: [
            metrics.normalized_effective_rank(metrics.singular_values(torch.linalg.eigvalsh(gram).cpu().numpy()))
            for gram in grams[space]
        ]
        for kind, space in spaces.items()
    }


def document_ner(model, tokenizer, texts: list[str], key_space: str) -> list[dict[str, list[float]]]:
    """Per document: {"key": NER per layer, "value": NER per layer, "tokens": n}, from that document's own Grams. A
    document longer than the model's context (`models.context_length`, what lm-eval gives it) is read in
    consecutive windows of that length, each its own forward, as lm-eval windows a rolling document: its Grams are
    the sums over the windows."""
    from tqdm.auto import tqdm

    geometry = kv_geometry(model.config)
    context = context_length(model.config, tokenizer)
    tap = RopeTap(model)
    rows = []
    try:
        for text in tqdm(texts, desc="document NER", unit="doc"):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError("a scored document has no tokens: its NER is undefined; drop empty documents")
            accumulator = GramAccumulator(geometry, model.device)
            for start in range(0, len(ids), context):
                with torch.no_grad():
                    model.base_model(
                        input_ids=torch.tensor([ids[start : start + context]], device=model.device),  # (1, window)
                        cache=GramRecorder(accumulator, tap),
                        use_cache=True,
                    )
            rows.append({**gram_ner(accumulator.grams, key_space), "tokens": len(ids)})
    finally:
        tap.remove()
    return rows


def per_document_values(samples: list[dict[str, Any]], metric: str) -> dict[int, float]:
    """doc_id -> that document's `metric` from lm-eval's logged samples (perplexities from their (ll, count) pairs)."""
    values = {}
    for sample in samples:
        entry = sample[metric]
        if metric in PERPLEXITY_METRICS:
            loglikelihood, count = entry
            values[int(sample["doc_id"])] = PERPLEXITY_METRICS[metric](float(loglikelihood), float(count))
        else:
            values[int(sample["doc_id"])] = float(entry)
    return dict(sorted(values.items()))


def per_document_counts(samples: list[dict[str, Any]], metric: str) -> dict[int, float] | None:
    """doc_id -> the weight lm-eval gives that document in a perplexity (its bytes or words); None for other metrics."""
    if metric not in PERPLEXITY_METRICS:
        return None
    return dict(sorted((int(sample["doc_id"]), float(sample[metric][1])) for sample in samples))
