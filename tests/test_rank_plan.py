import numpy as np
import pytest

from kvcore_eval.compression.rank_plan import budget_ranks, parse_rank
from kvcore_eval.config import TruncationConfig


def test_parse_rank_forms():
    assert parse_rank(0.25, 32, 3, "key_rank") == [8, 8, 8]
    assert parse_rank(5, 32, 2, "key_rank") == [5, 5]
    assert parse_rank("8:16:4", 32, 3, "key_rank") == [8, 16, 4]
    assert parse_rank([1, 32], 32, 2, "key_rank") == [1, 32]
    assert parse_rank("0.5", 16, 1, "value_rank") == [8]
    assert parse_rank("full", 16, 2, "value_rank") == parse_rank("FULL", 16, 2, "value_rank") == [16, 16]


@pytest.mark.parametrize(
    "spec,message",
    [
        (40, "outside 1..32"),
        (0, "must be positive"),
        (-3, "must be positive"),
        (-0.5, "must be positive"),
        ("-0.25", "must be positive"),
        (1.5, "fraction"),
        ("8:8", "lists 2 ranks but the model has 3 layers"),
        (1, "ambiguous: write key_rank=full"),
        (1.0, "ambiguous"),
        ("1", "ambiguous"),
        ("1.0", "ambiguous"),
        ("8:x:8", "not a rank: give an int"),
        ("quarter", "not a rank"),
    ],
)
def test_bad_ranks_name_the_fix(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_rank(spec, 32, 3, "key_rank")


def test_energy_budget_keeps_the_largest_normalized_eigenvalues():
    steep = np.array([0.9, 0.05, 0.03, 0.02])  # compressible layer
    flat = np.array([0.25, 0.25, 0.25, 0.25])  # incompressible layer
    ranks = budget_ranks([steep, flat], budget=0.5, method="energy")
    assert sum(ranks) == 4 and ranks[1] > ranks[0]
    assert budget_ranks([steep, flat], budget=1.0, method="energy") == [4, 4]
    assert min(budget_ranks([steep, flat], budget=0.01, method="energy")) == 1


def test_ner_budget_is_proportional_to_ner():
    ranks = budget_ranks([np.ones(8), np.ones(8)], budget=0.5, method="ner", ner=[0.2, 0.6])
    assert ranks == [2, 6]


@pytest.mark.parametrize("budget", [0.05, 0.13, 0.3, 0.5, 0.77, 1.0])
def test_ner_budget_meets_the_budget_after_rounding(budget):
    """Rounding each share separately misses the budget (and clipping at 1 or the width overshoots it)."""
    widths = [24, 24, 24, 24, 24, 24, 24]
    ner = [0.02, 0.31, 0.33, 0.34, 0.9, 0.95, 0.97]
    ranks = budget_ranks([np.ones(w) for w in widths], budget=budget, method="ner", ner=ner)
    assert sum(ranks) == max(len(widths), round(budget * sum(widths)))
    assert all(1 <= r <= w for r, w in zip(ranks, widths, strict=False))
    assert ranks == sorted(ranks), "a larger NER never gets fewer dimensions"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({}, "no truncation asked for"),
        ({"key_rank": 4, "rank_budget": 0.5}, "both given"),
        ({"rank_budget": 1.5}, r"\(0, 1\]"),
        ({"key_rank": 4, "key_space": "rope"}, "pre_rope or post_rope"),
        ({"key_rank": 4, "truncate": "all"}, "keys, values or both"),
        ({"rank_budget": 0.5, "granularity": "head"}, "granularity=layer"),
        ({"value_rank": 0.5, "truncate": "keys"}, "value_rank=0.5 with truncate=keys truncates nothing"),
        ({"key_rank": 0.25, "truncate": "values"}, "key_rank=0.25 with truncate=values truncates nothing"),
        ({"key_rank": 4, "basis": "svd"}, "use data, weights, random, sequence, rotation or identity"),
        ({"key_rank": 4, "basis": "data", "calibration": None}, "kvcore_hf needs calibration="),
        ({"key_rank": 4, "basis": "weights", "key_space": "post_rope"}, "projection weights give no basis"),
        ({"rank_budget": 0.5, "basis": "random"}, "needs a spectrum and basis=random has none"),
        ({"rank_budget": 0.5, "basis": "sequence", "budget_method": "uniform"}, "depend on its length"),
        ({"key_rank": 4, "basis": "sequence", "granularity": "head"}, "use granularity=layer"),
        ({"key_rank": 4, "basis": "sequence", "attention": "latent"}, "use attention=reconstruct"),
        ({"key_rank": 4, "latent_bits": 9}, "use 1 to 8 or 16"),
        ({"key_rank": 4, "latent_bits": 1, "quantizer": "absmax"}, "one level"),
        ({"key_rank": 4, "budget_method": "greedy"}, "energy, ner, sensitivity, uniform or waterfill"),
        ({"bits": 2, "rank_budget": 0.5}, "rank_budget and bits both given"),
        ({"bits": 2, "key_rank": 4}, "bits and key_rank both given"),
        ({"bits": 2, "budget_method": "waterfill", "latent_bits": 4}, "drop latent_bits"),
        ({"bits": 2, "budget_method": "waterfill", "basis": "random"}, "needs a spectrum|use basis=data"),
        ({"basis": "rotation", "key_rank": 4}, "keeps every dimension"),
        ({"basis": "identity"}, "give the bits of its codes with latent_bits"),
    ],
)
def test_truncation_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TruncationConfig(**{"calibration": "x", **kwargs}).check_runnable()


def test_new_options_parse_from_model_arg_strings():
    from kvcore_eval.config import split_options

    options, _ = split_options(
        TruncationConfig,
        {"basis": "random", "basis_seed": "7", "latent_bits": "8", "key_rank": "full", "value_rank": "full"},
        others=set(),
    )
    config = TruncationConfig(**options)
    config.check_runnable()
    assert (config.basis_seed, config.latent_bits, config.calibration) == (7, 8, None)
    assert TruncationConfig(calibration="x", rank_budget=0.5, basis="random", budget_method="uniform").basis == "random"


def test_fit_budget_takes_the_largest_allocation_within_the_target():
    """The cost (bytes) of an allocation grows with its total; the fit is the largest total whose cost fits."""
    from kvcore_eval.compression.rank_plan import allocate, fit_budget

    spectra = [np.array([0.9, 0.05, 0.03, 0.02]), np.array([0.25, 0.25, 0.25, 0.25])]
    cost = lambda ranks: 10 + 3 * sum(ranks)  # noqa: E731  (a fixed overhead of 10 and 3 bytes a dimension)
    ranks = fit_budget(lambda total: allocate(spectra, total, "energy"), cost, target=30, low=2, high=8)
    assert cost(ranks) <= 30 < cost(ranks) + 3 and sum(ranks) == 6
    assert fit_budget(lambda t: allocate(spectra, t, "energy"), cost, target=100, low=2, high=8) == [4, 4]
    with pytest.raises(ValueError):
        fit_budget(lambda t: allocate(spectra, t, "energy"), cost, target=12, low=2, high=8)
    assert allocate(spectra, 5, "uniform") == [2, 2] and allocate(spectra, 100, "uniform") == [4, 4]


def test_sensitivity_budget_meets_the_budget_and_follows_the_measurement(tmp_path, family_models, calibration_tokens):
    import json

    from conftest import calibrate_in_memory

    from kvcore_eval.compression.rank_plan import make_plan

    calibration = calibrate_in_memory(family_models["llama"], calibration_tokens)  # 2 layers, D = 32
    table = {
        "key_space": "pre_rope",
        "rank": 0.25,
        "nd_ppl": {"a": {"key": [0.01, 0.30], "value": [0.02, 0.10]}, "b": {"key": [0.03, 0.50], "value": [0.0, 0.20]}},
    }
    (tmp_path / "per_layer.json").write_text(json.dumps(table))
    config = TruncationConfig(
        calibration="x", rank_budget=0.4, budget_method="sensitivity", sensitivity=str(tmp_path / "per_layer.json")
    )
    plan = make_plan(config, calibration)
    assert sum(plan.key_rank_per_layer) + sum(plan.value_rank_per_layer) == round(0.4 * 4 * 32)
    assert (
        plan.key_rank_per_layer[1] > plan.key_rank_per_layer[0]
        and plan.value_rank_per_layer[1] > plan.value_rank_per_layer[0]
    )
    assert plan.key_rank_per_layer[1] > plan.value_rank_per_layer[1], "the most sensitive (layer, kind) keeps most"
    with pytest.raises(ValueError, match="measured on pre_rope keys"):
        make_plan(TruncationConfig(**{**vars(config), "key_space": "post_rope"}), calibration)
    with pytest.raises(ValueError, match="go together"):
        TruncationConfig(calibration="x", rank_budget=0.4, budget_method="sensitivity")
    missing = TruncationConfig(**{**vars(config), "sensitivity": str(tmp_path / "runs" / "per_layer.json")})
    with pytest.raises(ValueError, match="per_layer.json does not exist: pass the per_layer.json that `kvcore-eval"):
        make_plan(missing, calibration)
