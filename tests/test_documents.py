"""documents.py: each scored document's own NER, from its own Grams, whatever its length against the context."""

from __future__ import annotations

import numpy as np
import torch
from conftest import EXAMPLE_MODEL, build_model, calibrate_in_memory, family_configs

from kvcore_eval.harness.documents import document_ner
from kvcore_eval.metrics import normalized_effective_rank, singular_values


def test_a_document_longer_than_the_context_is_read_in_windows_of_it():
    """A GPT-2 with 64 positions and a document of 3 x 64 tokens: no IndexError (what failed the sweep after every
    point), and its Grams are those of its three windows, each read from position 0 (a batch of the windows)."""
    from transformers import AutoTokenizer

    config = family_configs()["gpt2"]
    config.n_positions = 64
    model = build_model(config)
    tokenizer = AutoTokenizer.from_pretrained(EXAMPLE_MODEL)
    text = bytes(range(65, 65 + 48)).decode() * 4  # 192 bytes: 192 tokens of the byte-level tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 3 * 64
    (row,) = document_ner(model, tokenizer, [text], "post_rope")
    windows = calibrate_in_memory(model, torch.tensor(ids).view(3, 64))
    for kind, space in (("key", "key_post_rope"), ("value", "value")):
        expected = [normalized_effective_rank(singular_values(values.numpy())) for values in windows.eigenvalues[space]]
        np.testing.assert_allclose(row[kind], expected, rtol=1e-6)
    assert row["tokens"] == 192
    (short,) = document_ner(model, tokenizer, [text[:50]], "post_rope")  # within the context: one forward
    whole = calibrate_in_memory(model, torch.tensor([ids[:50]]))
    expected = [normalized_effective_rank(singular_values(v.numpy())) for v in whole.eigenvalues["value"]]
    np.testing.assert_allclose(short["value"], expected, rtol=1e-6)
