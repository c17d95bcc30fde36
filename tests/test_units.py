"""The metric each task is scored by, read from its own metric_list without running it."""

import pytest
from conftest import EXAMPLE_DATA, EXAMPLE_MODEL

from kvcore_eval.config import SweepConfig
from kvcore_eval.harness.units import choose_metric


def instance(task: str, length: int | None = None):
    from kvcore_eval.harness.lm_tasks import leaf_tasks, load_as_evaluated, task_manager

    metadata = {"pretrained": str(EXAMPLE_MODEL), "num_samples": 3, **({"max_seq_lengths": [length]} if length else {})}
    (found,) = leaf_tasks(load_as_evaluated(task_manager(str(EXAMPLE_DATA), None, metadata), [task]))
    return found


def config(metric: str = "byte_perplexity") -> SweepConfig:
    return SweepConfig(model="m", out="o", metric=metric)


def test_each_kind_of_task_gets_its_own_metric():
    perplexity, generation = instance("kvcore_codealpaca"), instance("kvcore_alpaca_gen")
    assert choose_metric(config(), perplexity, None) == "byte_perplexity"
    assert choose_metric(config("word_perplexity"), perplexity, None) == "word_perplexity"
    assert choose_metric(config("kvcore_codealpaca=word_perplexity"), perplexity, None) == "word_perplexity"
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

    from kvcore_eval.harness.units import check_single_filter

    def task(filters):
        return SimpleNamespace(config=SimpleNamespace(task="gsm8k_like", filter_list=filters))

    check_single_filter(task(None))
    check_single_filter(task([{"name": "none", "filter": [{"function": "take_first"}]}]))
    with pytest.raises(ValueError, match="gsm8k_like scores through 2 filters \\(strict-match, flexible-extract\\)"):
        check_single_filter(task([{"name": "strict-match"}, {"name": "flexible-extract"}]))


def test_the_direction_of_a_metric_is_the_tasks_own_and_an_undeclared_one_is_refused(tmp_path):
    """RULER declares higher_is_better for its lengths up to 128k, not for the length it runs at: the unit takes
    theirs. A metric whose direction the task leaves out (lm-eval lists it as None) would invert a frontier's front
    and its winners: refused."""
    from types import SimpleNamespace

    from kvcore_eval.harness.units import higher_is_better

    assert higher_is_better(instance("kvcore_ruler_niah_single_2", 768), "768") is True
    assert higher_is_better(instance("kvcore_alpaca_gen"), "gpt_score") is True
    assert higher_is_better(instance("kvcore_alpaca_gen"), "gpt_score_missing") is False
    assert higher_is_better(instance("kvcore_codealpaca"), "byte_perplexity") is False, "its ND-PPL: lower is better"

    def task(metrics: dict):
        return SimpleNamespace(
            config=SimpleNamespace(task="mine", metric_list=[{"metric": name} for name in metrics]),
            higher_is_better=lambda: metrics,
        )

    with pytest.raises(ValueError, match="mine does not say whether more 'my_score' is better"):
        higher_is_better(task({"my_score": None}), "my_score")
    with pytest.raises(ValueError, match="does not say whether more '1024' is better"):
        higher_is_better(task({"4096": None, "8192": None}), "1024")
    with pytest.raises(ValueError, match="disagree on higher_is_better"):
        higher_is_better(task({"4096": True, "8192": False}), "1024")


@pytest.mark.slow
def test_a_bare_metric_is_a_perplexity_and_options_no_task_uses_are_refused(tmp_path):
    """`--metric acc` would silently score nothing differently (a bare metric is ND-PPL's perplexity); --gen-kwargs
    and max_seq_lengths without a task that generates or builds documents for a length would be ignored."""
    from kvcore_eval.harness.lm_tasks import task_manager
    from kvcore_eval.harness.units import task_units

    with pytest.raises(ValueError, match="--metric acc: a bare metric is the perplexity of ND-PPL.*task=acc"):
        config("acc")
    for options, match in (
        ({"gen_kwargs": "max_gen_toks=4"}, "--gen-kwargs max_gen_toks=4: none of --tasks generates"),
        ({"metadata": '{"max_seq_lengths": [768]}'}, "none of --tasks builds its documents for a length"),
    ):
        perplexity = SweepConfig(model="m", out="o", tasks="kvcore_codealpaca", num_samples=2, **options)
        with pytest.raises(ValueError, match=match):
            task_units(perplexity, lambda length: task_manager(str(EXAMPLE_DATA), None, {"num_samples": 3}))
