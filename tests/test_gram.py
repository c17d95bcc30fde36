import pytest
import torch
from conftest import FAMILIES
from transformers import DynamicCache

from kvcore_eval.calibration.artifact import decompose
from kvcore_eval.calibration.gram import GramAccumulator, GramRecorder
from kvcore_eval.model.models import kv_geometry
from kvcore_eval.model.rope import RopeTap

ROPE_FAMILIES = [f for f in FAMILIES if f != "gpt2"]


def record(model, input_ids, token_mask=None, attention_mask=None) -> GramAccumulator:
    accumulator = GramAccumulator(kv_geometry(model.config))
    tap = RopeTap(model)
    recorder = GramRecorder(accumulator, tap)
    recorder.set_token_mask(token_mask)
    with torch.no_grad():
        model.base_model(input_ids=input_ids, attention_mask=attention_mask, cache=recorder, use_cache=True)
    tap.remove()
    return accumulator


def stacked_cache(model, input_ids) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Post-RoPE keys and values of every layer as a plain DynamicCache holds them, as (tokens, D) rows."""
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=input_ids, cache=cache, use_cache=True)
    rows = lambda t: t.transpose(1, 2).reshape(-1, t.shape[1] * t.shape[3]).double()  # noqa: E731
    return [(rows(layer.keys), rows(layer.values)) for layer in cache.layers]


def pre_rope_keys(model, family, input_ids) -> list[torch.Tensor]:
    """The key before RoPE, captured from each family's projection module: (tokens, D) per layer."""
    geometry = kv_geometry(model.config)
    batch, seq = input_ids.shape
    heads, head_dim = geometry.kv_heads, geometry.head_dim
    take = {  # family -> (module name suffix, output -> (batch, seq, D))
        "qwen3": ("self_attn.k_norm", lambda out: out.flatten(2)),  # (batch, seq, heads, head_dim)
        "gemma3": ("self_attn.k_norm", lambda out: out.transpose(1, 2).flatten(2)),  # (batch, heads, seq, head_dim)
        "phi3": (
            "qkv_proj",
            lambda out: out[..., model.config.num_attention_heads * head_dim :][..., : geometry.width],
        ),
        "gpt_neox": (
            "attention.query_key_value",
            lambda out: out.view(batch, seq, heads, 3, head_dim)[..., 1, :].flatten(2),
        ),
        "gptj": ("attn.k_proj", lambda out: out),
    }.get(family, ("self_attn.k_proj", lambda out: out))
    captured = []
    hooks = [
        module.register_forward_hook(lambda m, i, out: captured.append(take[1](out)))
        for name, module in model.named_modules()
        if name.endswith(take[0])
    ]
    with torch.no_grad():
        model(input_ids=input_ids)
    for hook in hooks:
        hook.remove()
    assert len(captured) == geometry.num_layers
    return [keys.reshape(-1, geometry.width).double() for keys in captured]


@pytest.mark.parametrize("family", FAMILIES)
def test_incremental_gram_eigenvalues_equal_direct_svd(family, family_models, token_batch):
    model = family_models[family]
    accumulator = record(model, token_batch)
    calibration = decompose(accumulator.grams, accumulator.token_count, kv_geometry(model.config), {})
    for layer, (keys, values) in enumerate(stacked_cache(model, token_batch)):
        for space, stacked in (("key_post_rope", keys), ("value", values)):
            expected = torch.linalg.svdvals(stacked) ** 2
            got = calibration.eigenvalues[space][layer]
            assert torch.allclose(got, expected, rtol=1e-8, atol=1e-8 * expected[0].item()), (family, layer, space)
    assert accumulator.token_count.tolist() == [token_batch.numel()] * model.config.num_hidden_layers


@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_pre_rope_gram_equals_gram_of_projection_output(family, family_models, token_batch):
    model = family_models[family]
    accumulator = record(model, token_batch)
    for layer, keys in enumerate(pre_rope_keys(model, family, token_batch)):
        expected = keys.T @ keys
        got = accumulator.grams["key_pre_rope"][layer]
        assert ((got - expected).norm() / expected.norm()).item() < 1e-6, (family, layer)
        post = accumulator.grams["key_post_rope"][layer]
        assert not torch.allclose(post, expected, rtol=1e-3), "RoPE should change the Gram"


def test_pre_rope_gram_equals_wk_xtx_wk(family_models, token_batch):
    """The paper's K = X·W_k: the pre-RoPE Gram equals W_kᵀ(XᵀX)W_k of the attention inputs (Llama, no bias)."""
    model = family_models["llama"]
    inputs = []
    hooks = [
        layer.self_attn.register_forward_pre_hook(lambda m, a, kw: inputs.append(kw["hidden_states"]), with_kwargs=True)
        for layer in model.model.layers
    ]
    with torch.no_grad():
        model(input_ids=token_batch)
    for hook in hooks:
        hook.remove()
    accumulator = record(model, token_batch)
    for layer, hidden in enumerate(inputs):
        x = hidden.reshape(-1, hidden.shape[-1]).double()
        w_k = model.model.layers[layer].self_attn.k_proj.weight.double().T  # (hidden, D)
        expected = w_k.T @ (x.T @ x) @ w_k
        assert torch.allclose(
            accumulator.grams["key_pre_rope"][layer], expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item()
        )


def test_gpt2_pre_rope_space_equals_post_rope(family_models, token_batch):
    accumulator = record(family_models["gpt2"], token_batch)
    assert torch.equal(accumulator.grams["key_pre_rope"], accumulator.grams["key_post_rope"])


def test_any_batch_split_gives_the_same_gram(family_models, token_batch):
    model = family_models["qwen2"]
    whole = record(model, token_batch)
    split = GramAccumulator(kv_geometry(model.config))
    recorder = GramRecorder(split, RopeTap(model))
    with torch.no_grad():
        for row in token_batch.split(1):
            model.base_model(input_ids=row, cache=recorder, use_cache=True)
    for space, gram in whole.grams.items():
        assert torch.allclose(split.grams[space], gram, rtol=1e-12, atol=1e-12 * gram.abs().max().item())
    assert torch.equal(split.token_count, whole.token_count)


def test_padding_never_enters_the_gram(family_models, token_batch):
    model = family_models["llama"]
    short = token_batch[:, :16]
    padded = torch.cat([short, torch.zeros(3, 8, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(3, 16), torch.zeros(3, 8)], dim=1).long()
    clean = record(model, short)
    masked = record(model, padded, token_mask=mask, attention_mask=mask)
    for space, gram in clean.grams.items():
        assert torch.allclose(masked.grams[space], gram, rtol=1e-6, atol=1e-8 * gram.abs().max().item())
    assert masked.token_count.tolist() == clean.token_count.tolist() == [48, 48]


def test_nonfinite_layers_are_named():
    from kvcore_eval.model.models import KVGeometry

    accumulator = GramAccumulator(KVGeometry(num_layers=3, kv_heads=1, head_dim=2))
    accumulator.add(1, "value", torch.tensor([[float("nan"), 1.0]]))
    assert accumulator.nonfinite_layers() == [1]
