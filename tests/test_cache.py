import pytest
import torch
from conftest import FAMILIES, calibrate_in_memory
from transformers import DynamicCache

from kvcore_eval.compression.cache import LayerBases, LowRankCache, cache_bytes_per_token, layer_bases
from kvcore_eval.compression.rank_plan import RankPlan
from kvcore_eval.model.rope import RopeTap

_TAPS: dict[int, RopeTap] = {}


def tap_of(model) -> RopeTap:
    """One tap per model object (hooks stay on the session's models; one set is enough)."""
    if id(model) not in _TAPS:
        _TAPS[id(model)] = RopeTap(model)
    return _TAPS[id(model)]


def low_rank_cache(
    model, calibration, key_rank, value_rank, key_space="pre_rope", granularity="layer", full_basis=False
):
    geometry = calibration.geometry
    width = geometry.width if granularity == "layer" else geometry.head_dim
    plan = RankPlan(
        [key_rank] * geometry.num_layers if key_rank else None,
        [value_rank] * geometry.num_layers if value_rank else None,
        width,
        granularity,
        key_space,
    )
    bases = layer_bases(calibration, plan)
    if full_basis:  # rank D as an explicit orthonormal basis, so the projection code runs (layer_bases skips it)
        space = "key_pre_rope" if key_space == "pre_rope" else "key_post_rope"
        vectors = calibration.eigenvectors if granularity == "layer" else calibration.head_eigenvectors
        bases = [LayerBases(vectors[space][i], vectors["value"][i]) for i in range(geometry.num_layers)]
    return LowRankCache(bases, geometry.kv_heads, tap_of(model) if key_space == "pre_rope" else None)


def logits(model, input_ids, cache=None):
    with torch.no_grad():
        return model(input_ids=input_ids, cache=cache if cache is not None else DynamicCache(), use_cache=True).logits


@pytest.fixture(scope="module")
def calibrations(family_models, calibration_tokens):
    return {family: calibrate_in_memory(model, calibration_tokens) for family, model in family_models.items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("key_space,granularity", [("pre_rope", "layer"), ("post_rope", "layer"), ("pre_rope", "head")])
def test_full_rank_basis_reproduces_baseline_logits(
    family, key_space, granularity, family_models, calibrations, token_batch
):
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
        steps.append(logits(model, token_batch[:, position : position + 1], cache))
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
    assert stored["rope_tables"] == stored["rope_positions"] == 0
    plan = RankPlan([key_rank] * 2, [value_rank] * 2, width, granularity, "post_rope")
    per_token = cache_bytes_per_token(plan, geometry.kv_heads, geometry.num_layers, 4, {"rope_positions": 999})
    assert per_token["low_rank"] * token_batch.numel() == stored["keys"] + stored["values"]
    assert per_token["ratio"] == pytest.approx((key_rank + value_rank) / (2 * width))


@pytest.mark.parametrize(
    "family,groups,kept", [("llama", 1, "positions"), ("gemma3", 2, "positions"), ("phi3", 1, "tables")]
)
def test_pre_rope_cache_keeps_positions_once_per_group(family, groups, kept, family_models, calibrations, token_batch):
    """What rotates the cached pre-RoPE keys is kept once per rotary group, not per layer, and reported: the
    positions (4 bytes a token), from which the model's rotary module recomputes the tables; the tables themselves
    where their frequencies change with the length (Phi-3's longrope)."""
    model, calibration = family_models[family], calibrations[family]
    cache = low_rank_cache(model, calibration, 4, None, "pre_rope")
    logits(model, token_batch, cache)
    rotary_dim = tap_of(model).tables(0).cos.shape[-1]
    per_token = {"positions": 4, "tables": 2 * rotary_dim * 4}[kept]  # int32 positions; cos and sin in float32
    assert len(cache.rope.positions if kept == "positions" else cache.rope.groups) == groups
    # the three rows share their positions, hence one row a group
    assert cache.stored_bytes()[f"rope_{kept}"] == groups * per_token * token_batch.shape[1]
    assert cache.stored_bytes()["rope_tables" if kept == "positions" else "rope_positions"] == 0
    assert cache.layers[0].keys.shape == (3, 24, 4)
    geometry = calibration.geometry
    plan = RankPlan([4] * 2, None, geometry.width, "layer", "pre_rope")
    predicted = cache_bytes_per_token(
        plan, geometry.kv_heads, geometry.num_layers, 4, {f"rope_{kept}": groups * per_token}
    )
    stored = cache.stored_bytes()
    assert (
        predicted["low_rank"] == (stored["keys"] + stored["values"]) / token_batch.numel() + groups * per_token
    )  # per row: an upper bound


def test_sliding_window_layers_are_compared_with_the_models_own_cache(family_models):
    from kvcore_eval.compression.cache import compare_with_model_cache, sliding_window_layers

    windows = sliding_window_layers(family_models["gemma3"].config)
    assert windows == {0: 16}  # layer 0 slides, layer 1 is global
    assert sliding_window_layers(family_models["llama"].config) == {}
    per_token = {"low_rank": 50.0, "full": 200.0, "ratio": 0.25}
    comparison = compare_with_model_cache(per_token, windows, num_layers=2, contexts=(16, 1024))
    assert comparison["ratio_to_model_cache_at_context"]["16"] == pytest.approx(0.25)
    # at 1024 tokens the model's own cache holds 16 + 1024 token-layers, not 2048
    assert comparison["ratio_to_model_cache_at_context"]["1024"] == pytest.approx(50 * 1024 / (100 * (16 + 1024)))
    assert compare_with_model_cache(per_token, {}, 2) is None


def test_generate_with_low_rank_cache_matches_one_shot_greedy(family_models, calibrations, token_batch):
    """Greedy generation through the cache picks, at each step, the argmax of the one-shot truncated logits."""
    model, calibration = family_models["llama"], calibrations["llama"]
    prompt = token_batch[:1, :10]
    with torch.no_grad():
        generated = model.generate(
            prompt, max_new_tokens=8, do_sample=False, cache=low_rank_cache(model, calibration, 8, 16), pad_token_id=0
        )
    one_shot = logits(model, generated, low_rank_cache(model, calibration, 8, 16))
    assert torch.equal(one_shot[0, 9:-1].argmax(-1), generated[0, 10:])


def left_padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 10 and 6 tokens, the second left-padded, as batched generation feeds them."""
    input_ids = torch.randint(3, 259, (2, 10), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :4], attention_mask[1, :4] = 0, 0
    return input_ids, attention_mask


def generate(model, input_ids, attention_mask, cache, max_new_tokens=8):
    with torch.no_grad():
        return model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            cache=cache,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_cache_equals_plain_model_in_batched_left_padded_generation(family, family_models, calibrations):
    """Every family: a full-rank low-rank cache (pre-RoPE keys, so RoPE is undone and redone at every step)
    generates the same tokens with the same scores as the model's own cache, and holds every token fed."""
    from kvcore_eval.harness.wrapper import check_cache_kept

    model, calibration = family_models[family], calibrations[family]
    input_ids, attention_mask = left_padded_prompts()
    cache = low_rank_cache(model, calibration, 1, 1, "pre_rope", full_basis=True)
    ours, plain = (
        generate(model, input_ids, attention_mask, cache),
        generate(model, input_ids, attention_mask, DynamicCache()),
    )
    assert torch.equal(ours.sequences, plain.sequences)
    assert torch.allclose(torch.stack(ours.scores), torch.stack(plain.scores), atol=1e-4)
    check_cache_kept(cache, ours.sequences, model.config)
    assert cache.get_seq_length() == ours.sequences.shape[1] - 1


def test_phi3_longrope_generation_past_the_switch_is_refused(family_models, calibrations):
    """Phi-3 replaces the cache once the input reaches original_max_position_embeddings + 1 tokens: the rest
    would run uncompressed, so the check after generate refuses it."""
    from conftest import PHI3_SWITCH

    from kvcore_eval.harness.wrapper import check_cache_kept

    model, calibration = family_models["phi3"], calibrations["phi3"]
    prompt = torch.randint(3, 259, (1, PHI3_SWITCH - 4), generator=torch.Generator().manual_seed(4))
    cache = low_rank_cache(model, calibration, 8, 8)
    output = generate(model, prompt, torch.ones_like(prompt), cache)
    with pytest.raises(RuntimeError, match=f"original_max_position_embeddings \\+ 1 = {PHI3_SWITCH + 1}"):
        check_cache_kept(cache, output.sequences, model.config)


def _dynamic_llama():
    from conftest import _COMMON, build_model
    from transformers import LlamaConfig

    config = LlamaConfig(
        **{**_COMMON, "max_position_embeddings": 16},
        num_key_value_heads=2,
        head_dim=16,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    )
    return build_model(config)


@pytest.mark.parametrize("family", ["phi3", "dynamic_llama"])
def test_full_rank_cache_equals_models_own_cache_past_the_original_length(family, family_models, calibration_tokens):
    """Longrope and dynamic NTK change their frequencies with the length: old keys keep the rotation they were
    cached with. Prefill 12 tokens, decode to 40, one token at a time: the full-rank cache equals the model's own."""
    from conftest import calibrate_in_memory

    model = family_models[family] if family in family_models else _dynamic_llama()
    calibration = calibrate_in_memory(model, calibration_tokens)
    tokens = torch.randint(3, 259, (2, 40), generator=torch.Generator().manual_seed(5))

    def stepwise(cache):
        steps = [logits(model, tokens[:, :12], cache)]
        steps += [logits(model, tokens[:, i : i + 1], cache) for i in range(12, tokens.shape[1])]
        return torch.cat(steps, dim=1)

    ours, plain = (
        stepwise(low_rank_cache(model, calibration, 1, 1, "pre_rope", full_basis=True)),
        stepwise(DynamicCache()),
    )
    assert torch.allclose(ours, plain, atol=1e-5)


def _method_cache(method: str, model, calibration):
    """(cache, plan, codec, sequence basis numbers per row) of one frontier method at about a quarter of the width."""
    from kvcore_eval.compression import bases
    from kvcore_eval.compression.quantize import Codec

    geometry = calibration.geometry
    width, layers = geometry.width, geometry.num_layers
    low = [width // 4] * layers
    plans = {
        "data": (low, low, "layer", None, calibration),
        "data_head": ([geometry.head_dim // 4] * layers, None, "head", None, calibration),
        "weights": (low, low, "layer", None, bases.weight_bases(model, tap_of(model), True)),
        "random": (low, low, "layer", None, bases.random_bases(geometry, 0)),
        "sequence": (low, low, "layer", None, bases.flat_spectrum(geometry, "sequence")),
        "int8": (None, None, "layer", 8, calibration),
        "int4": (None, None, "layer", 4, calibration),
        "float16": (None, None, "layer", 16, calibration),
        "low_rank_int8": ([width // 2] * layers, [width // 2] * layers, "layer", 8, calibration),
        "low_rank_int4_head": ([3] * layers, [5] * layers, "head", 4, calibration),
    }
    keys, values, granularity, bits, source = plans[method]
    plan = RankPlan(keys, values, width if granularity == "layer" else geometry.head_dim, granularity, "pre_rope")
    codec = Codec(bits, torch.float32)
    bases_of_layers = layer_bases(source, plan, sequence=method == "sequence")
    cache = LowRankCache(bases_of_layers, geometry.kv_heads, tap_of(model), codec=codec)
    sequence_numbers = 2 * layers * width * (width // 4) if method == "sequence" else 0
    return cache, plan, codec, sequence_numbers


@pytest.mark.parametrize(
    "method",
    ["data", "data_head", "weights", "random", "sequence", "int8", "int4", "float16", "low_rank_int8",
     "low_rank_int4_head"],
)  # fmt: skip
def test_measured_bytes_per_token_equal_the_expected_count(method, family_models, calibrations):
    """One row of 40 tokens (its rotary tables are its own): the bytes the cache holds, per token, are what
    `cache_bytes_per_token` counts (latents or codes, float16 scales, rotary tables), plus for basis=sequence the
    row's own bases (D·r numbers per layer and kind, in the model's dtype)."""
    model, calibration = family_models["llama"], calibrations["llama"]
    geometry = calibration.geometry
    cache, plan, codec, sequence_numbers = _method_cache(method, model, calibration)
    tokens = torch.randint(3, 259, (1, 40), generator=torch.Generator().manual_seed(6))
    logits(model, tokens[:, :30], cache)
    for position in range(30, 40):
        logits(model, tokens[:, position : position + 1], cache)
    stored = cache.stored_bytes()
    assert cache.get_seq_length() == 40
    rope = {"rope_positions": 4}  # llama's tables are recomputed from int32 positions
    expected = cache_bytes_per_token(plan, geometry.kv_heads, geometry.num_layers, 4, rope, codec)
    assert sum(stored.values()) / 40 == pytest.approx(expected["low_rank"] + sequence_numbers * 4 / 40)
    assert stored["sequence_bases"] == sequence_numbers * 4
    assert stored["rope_positions"] == (40 * 4 if plan.key_rank_per_layer else 0) and stored["rope_tables"] == 0
    assert (stored["scales"] > 0) == (codec.bits in (8, 4))


@pytest.mark.parametrize("bits,tolerance", [(16, 2e-3), (8, 2e-2), (4, 0.3)])
def test_quantized_full_rank_cache_stays_near_the_plain_model(bits, tolerance, family_models, token_batch):
    """key_rank=value_rank=full with latent_bits: the plain quantized cache. Max logit error relative to the largest
    logit: float16 within 2e-3, int8 within 2e-2, int4 within 0.3 (the fixtures' weights are scaled up, so attention
    is sharp); each finer format strictly better than the next."""
    from kvcore_eval.compression.quantize import Codec

    model = family_models["llama"]
    geometry = kv_geometry_of(model)
    plain = logits(model, token_batch)
    full = [LayerBases(None, None)] * geometry.num_layers
    errors = {}
    for b in (16, 8, 4):
        cache = LowRankCache(full, geometry.kv_heads, codec=Codec(b, torch.float32))
        errors[b] = ((logits(model, token_batch, cache) - plain).abs().max() / plain.abs().max()).item()
    assert errors[bits] < tolerance
    assert errors[16] < errors[8] < errors[4]
    assert errors[16] > 0, "16 bits on a float32 model stores float16: not exact"


def kv_geometry_of(model):
    from kvcore_eval.model.models import kv_geometry

    return kv_geometry(model.config)


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_latent_attention_reads_quantized_latents(granularity, family_models, calibrations, token_batch):
    """attention=latent with int8 latents equals the reconstruction path over the same codes."""
    from kvcore_eval.compression import latent
    from kvcore_eval.compression.quantize import Codec

    model, calibration = family_models["llama"], calibrations["llama"]
    geometry = calibration.geometry
    width = geometry.width if granularity == "layer" else geometry.head_dim
    plan = RankPlan([width // 2] * 2, [width // 4] * 2, width, granularity, "post_rope")
    bases_of_layers = layer_bases(calibration, plan)
    latent.register()
    implementation = model.config._attn_implementation
    results = []
    for is_latent in (False, True):
        cache = LowRankCache(bases_of_layers, geometry.kv_heads, latent=is_latent, codec=Codec(8, torch.float32))
        model.set_attn_implementation(latent.NAME if is_latent else implementation)
        with latent.active(cache):
            results.append(logits(model, token_batch, cache))
    model.set_attn_implementation(implementation)
    assert torch.allclose(results[0], results[1], atol=1e-4)
    assert cache.layers[0].keys.dtype == torch.int8
