"""The metric each task is scored by, read from its own metric_list without running it."""

import pytest
from conftest import EXAMPLE_DATA, EXAMPLE_MODEL

from kvcore_eval.config import SweepConfig
from kvcore_eval.units import choose_metric


def instance(task: str, length: int | None = None):
    from kvcore_eval.data import leaf_tasks
    from kvcore_eval.lm_tasks import load_as_evaluated, task_manager

    metadata = {"pretrained": str(EXAMPLE_MODEL), "num_samples": 3, **({"max_seq_lengths": [length]} if length else {})}
    (found,) = leaf_tasks(load_as_evaluated(task_manager(str(EXAMPLE_DATA), None, metadata), [task]))
    return found


def config(metric: str = "byte_perplexity") -> SweepConfig:
    return SweepConfig(model="m", out="o", metric=metric)


def test_each_kind_of_task_gets_its_own_metric():
    perplexity, generation = instance("kvcore_codealpaca"), instance("kvcore_alpaca_gen")
    assert choose_metric(config(), perplexity, None) == "byte_perplexity"
    assert choose_metric(config("word_perplexity"), perplexity, None) == "word_perplexity"
    assert choose_metric(config("kvcore_codealpaca=bits_per_byte"), perplexity, None) == "bits_per_byte"
    assert choose_metric(config(), generation, None) == "gpt_score", "a generation task's first metric"
    assert choose_metric(config("kvcore_alpaca_gen=gpt_score_missing"), generation, None) == "gpt_score_missing"
    with pytest.raises(ValueError, match="kvcore_alpaca_gen declares no 'bleu'.*gpt_score, gpt_score_missing"):
        choose_metric(config("kvcore_alpaca_gen=bleu"), generation, None)


def test_ruler_tasks_are_scored_by_the_metric_of_their_length():
    ruler = instance("kvcore_ruler_niah_single_2", 768)
    assert choose_metric(config(), ruler, 768) == "768"
    with pytest.raises(ValueError, match="give the lengths with --metadata"):
        choose_metric(config(), ruler, None)
    with pytest.raises(ValueError, match="names its metric by the context length"):
        choose_metric(config("kvcore_ruler_niah_single_2=4096"), ruler, 768)


def test_a_task_scored_through_several_filters_is_refused():
    from types import SimpleNamespace

    from kvcore_eval.units import check_single_filter

    def task(filters):
        return SimpleNamespace(config=SimpleNamespace(task="gsm8k_like", filter_list=filters))

    check_single_filter(task(None))
    check_single_filter(task([{"name": "none", "filter": [{"function": "take_first"}]}]))
    with pytest.raises(ValueError, match="gsm8k_like scores through 2 filters \\(strict-match, flexible-extract\\)"):
        check_single_filter(task([{"name": "strict-match"}, {"name": "flexible-extract"}]))
