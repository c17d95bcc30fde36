import pytest
import torch
from transformers import DynamicCache

from conftest import FAMILIES, calibrate_in_memory
from kvcore_eval.cache import LayerBases, LowRankCache, cache_bytes_per_token, layer_bases
from kvcore_eval.rank_plan import RankPlan
from kvcore_eval.rope import find_rotary_embedding


def low_rank_cache(model, calibration, key_rank, value_rank, key_space="pre_rope", granularity="layer", full_basis=False):
    geometry = calibration.geometry
    width = geometry.width if granularity == "layer" else geometry.head_dim
    plan = RankPlan([key_rank] * geometry.num_layers if key_rank else None, [value_rank] * geometry.num_layers if value_rank else None,
                    width, granularity, key_space)
    bases = layer_bases(calibration, plan)
    if full_basis:  # rank D as an explicit orthonormal basis, so the projection code runs (layer_bases skips it)
        space = "key_pre_rope" if key_space == "pre_rope" else "key_post_rope"
        full = lambda s, l: calibration.eigenvectors[s][l] if granularity == "layer" else calibration.head_eigenvectors[s][l]  # noqa: E731
        bases = [LayerBases(full(space, l), full("value", l)) for l in range(geometry.num_layers)]
    rotary = find_rotary_embedding(model) if key_space == "pre_rope" else None
    return LowRankCache(bases, geometry.kv_heads, rotary)


def logits(model, input_ids, cache=None):
    with torch.no_grad():
        return model(input_ids=input_ids, cache=cache if cache is not None else DynamicCache(), use_cache=True).logits


@pytest.fixture(scope="module")
def calibrations(family_models, calibration_tokens):
    return {family: calibrate_in_memory(model, calibration_tokens) for family, model in family_models.items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("key_space,granularity", [("pre_rope", "layer"), ("post_rope", "layer"), ("pre_rope", "head")])
def test_full_rank_basis_reproduces_baseline_logits(family, key_space, granularity, family_models, calibrations, token_batch):
    model, calibration = family_models[family], calibrations[family]
    cache = low_rank_cache(model, calibration, 1, 1, key_space, granularity, full_basis=True)
    assert torch.allclose(logits(model, token_batch, cache), logits(model, token_batch), atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_lower_rank_changes_logits_monotonically(family, family_models, calibrations, token_batch):
    model, calibration = family_models[family], calibrations[family]
    width = calibration.geometry.width
    baseline = logits(model, token_batch)
    errors = []
    for rank in (width, width // 2, width // 4, 2):
        cache = low_rank_cache(model, calibration, rank, rank)
        errors.append((logits(model, token_batch, cache) - baseline).norm().item())
    assert errors[0] < 1e-4
    assert errors[1] > 1e-3, "truncation must change the logits"
    assert errors == sorted(errors), f"error should grow as rank falls: {errors}"


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
def test_prefill_plus_decode_equals_one_shot(family, family_models, calibrations, token_batch):
    model, calibration = family_models[family], calibrations[family]
    width = calibration.geometry.width
    one_shot = logits(model, token_batch, low_rank_cache(model, calibration, width // 4, width // 2))
    cache = low_rank_cache(model, calibration, width // 4, width // 2)
    steps = [logits(model, token_batch[:, :16], cache)]
    for position in range(16, token_batch.shape[1]):
        steps.append(logits(model, token_batch[:, position:position + 1], cache))
    assert torch.allclose(torch.cat(steps, dim=1), one_shot, atol=1e-5)


def test_pre_rope_truncation_equals_folding_projection_into_wk(family_models, calibrations, token_batch):
    """The paper's K·V_r·V_rᵀ: W_k' = P_r·P_rᵀ·W_k in a model copy with a full cache gives the same logits."""
    import copy

    model, calibration = family_models["llama"], calibrations["llama"]
    rank = 8
    cache = low_rank_cache(model, calibration, rank, None, "pre_rope")
    folded = copy.deepcopy(model)
    with torch.no_grad():
        for layer, block in enumerate(folded.model.layers):
            basis = calibration.eigenvectors["key_pre_rope"][layer][:, :rank]  # (D, r)
            block.self_attn.k_proj.weight.copy_(basis @ basis.T @ block.self_attn.k_proj.weight)
    assert torch.allclose(logits(model, token_batch, cache), logits(folded, token_batch), atol=1e-5)


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_stored_bytes_are_r_over_d_of_dynamic_cache(granularity, family_models, calibrations, token_batch):
    model, calibration = family_models["llama"], calibrations["llama"]
    geometry = calibration.geometry
    width = geometry.width if granularity == "layer" else geometry.head_dim
    key_rank, value_rank = width // 4, width // 2
    cache = low_rank_cache(model, calibration, key_rank, value_rank, "post_rope", granularity)
    logits(model, token_batch, cache)
    full = DynamicCache()
    logits(model, token_batch, full)
    full_keys = sum(layer.keys.numel() * layer.keys.element_size() for layer in full.layers)
    stored = cache.stored_bytes()
    assert stored["keys"] == full_keys * key_rank // width
    assert stored["values"] == full_keys * value_rank // width
    plan = RankPlan([key_rank] * 2, [value_rank] * 2, width, granularity, "post_rope")
    per_token = cache_bytes_per_token(plan, geometry.kv_heads, geometry.num_layers, 4, has_rope=True)
    assert per_token["low_rank"] * token_batch.numel() == stored["keys"] + stored["values"]
    assert per_token["ratio"] == pytest.approx((key_rank + value_rank) / (2 * width))


def test_pre_rope_cache_stores_positions_and_reports_them(family_models, calibrations, token_batch):
    model, calibration = family_models["llama"], calibrations["llama"]
    cache = low_rank_cache(model, calibration, 4, None, "pre_rope")
    logits(model, token_batch, cache)
    assert cache.stored_bytes()["positions"] == 2 * token_batch.numel() * 4  # int32 per token per layer
    assert cache.layers[0].keys.shape == (3, 24, 4)
    geometry = calibration.geometry
    plan = RankPlan([4] * 2, None, geometry.width, "layer", "pre_rope")
    per_token = cache_bytes_per_token(plan, geometry.kv_heads, geometry.num_layers, 4, has_rope=True)
    assert per_token["low_rank"] * token_batch.numel() == sum(cache.stored_bytes().values())
    assert cache_bytes_per_token(plan, geometry.kv_heads, geometry.num_layers, 4, has_rope=False)["low_rank"] == per_token["low_rank"] - 8


def test_generate_with_low_rank_cache_matches_one_shot_greedy(family_models, calibrations, token_batch):
    """Greedy generation through the cache picks, at each step, the argmax of the one-shot truncated logits."""
    model, calibration = family_models["llama"], calibrations["llama"]
    prompt = token_batch[:1, :10]
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=8, do_sample=False, cache=low_rank_cache(model, calibration, 8, 16), pad_token_id=0)
    one_shot = logits(model, generated, low_rank_cache(model, calibration, 8, 16))
    assert torch.equal(one_shot[0, 9:-1].argmax(-1), generated[0, 10:])
