import copy

import pytest
import torch
from conftest import VOCAB
from transformers import DynamicCache

from kvcore_eval.compression import bases
from kvcore_eval.compression.bases import SequenceBasis
from kvcore_eval.compression.cache import LayerBases, LowRankCache
from kvcore_eval.config import TruncationConfig
from kvcore_eval.model.models import kv_geometry
from kvcore_eval.model.rope import RopeTap, attention_modules


def with_biases(model, seed: int = 0):
    """A copy whose key/value projection biases are nonzero (the fixtures' are zero at init)."""
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for attention in attention_modules(model).values():
            for name in ("k_proj", "v_proj", "query_key_value", "c_attn", "qkv_proj"):
                module = getattr(attention, name, None)
                if module is not None and getattr(module, "bias", None) is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator))
    return model


def logits(model, input_ids, cache=None):
    with torch.no_grad():
        return model(input_ids=input_ids, cache=cache if cache is not None else DynamicCache(), use_cache=True).logits


def assert_orthonormal(vectors: torch.Tensor, atol: float = 1e-5) -> None:
    """vectors: (..., n, k) with orthonormal columns."""
    gram = vectors.transpose(-1, -2) @ vectors
    assert torch.allclose(gram, torch.eye(gram.shape[-1]).expand_as(gram), atol=atol)


def test_weight_bases_are_the_svd_of_the_projection_with_its_bias(family_models):
    """Qwen2 (k_proj and v_proj with a bias): per layer and per head, the basis is the left singular vectors of [W | b]
    and the spectrum its σ², orthonormal; with a nonzero bias it differs from the SVD of W alone, and every key and
    value the model computes lies in the span (the run-time check inside weight_bases passes)."""
    model = with_biases(family_models["qwen2"])
    source = bases.weight_bases(model, RopeTap(model), truncates_keys=True)
    geometry = kv_geometry(model.config)
    for layer, attention in attention_modules(model).items():
        for kind, space in (("k_proj", "key_pre_rope"), ("v_proj", "value")):
            projection = getattr(attention, kind)
            augmented = torch.cat([projection.weight, projection.bias[:, None]], dim=1).detach().double()
            u, s, _ = torch.linalg.svd(augmented)
            vectors = source.eigenvectors[space][layer]
            assert_orthonormal(vectors)
            assert torch.allclose(source.eigenvalues[space][layer], s**2, rtol=1e-6)
            assert torch.allclose(vectors.abs(), u.float().abs(), atol=1e-5)  # the same vectors up to sign
            without_bias = torch.linalg.svd(projection.weight.detach().double())[0]
            assert not torch.allclose(vectors[:, 0].abs(), without_bias[:, 0].float().abs(), atol=1e-3)
            head_dim = geometry.head_dim
            for head in range(geometry.kv_heads):
                block = augmented[head * head_dim : (head + 1) * head_dim]
                head_u, head_s, _ = torch.linalg.svd(block)
                assert torch.allclose(source.head_eigenvalues[space][layer][head], head_s**2, rtol=1e-6)
                assert torch.allclose(
                    source.head_eigenvectors[space][layer][head].abs(), head_u.float().abs(), atol=1e-5
                )


@pytest.mark.parametrize("family", ["phi3", "gpt_neox", "gpt2", "llama"])
def test_fused_projections_are_sliced_and_checked_on_the_model(family, family_models):
    """Phi-3 qkv_proj, GPT-NeoX query_key_value (per head), GPT-2 c_attn: [W | b]·[x; 1] equals the pre-RoPE key and
    the value the cache receives; a wrong slice (the value rows taken for the key) is refused, naming the layer."""
    model = with_biases(family_models[family])
    tap = RopeTap(model)
    geometry = kv_geometry(model.config)
    projections = {
        (layer, kind): bases.projection(attention, model.config, geometry, kind)
        for layer, attention in attention_modules(model).items()
        for kind in ("key", "value")
    }
    errors = bases.check_projections(model, tap, projections, ("key", "value"))
    assert max(errors.values()) < 1e-5
    swapped = {**projections, (1, "key"): projections[(1, "value")]}
    with pytest.raises(ValueError, match="layer 1: the key the cache receives differs"):
        bases.check_projections(model, tap, swapped, ("key", "value"))
    tap.remove()


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_normalized_keys_have_no_weight_basis(family, family_models):
    model = family_models[family]
    tap = RopeTap(model)
    with pytest.raises(ValueError, match="normalizes its keys after the projection \\(k_norm"):
        bases.weight_bases(model, tap, truncates_keys=True)
    values_only = bases.weight_bases(model, tap, truncates_keys=False)  # values are still linear in x
    assert_orthonormal(values_only.eigenvectors["value"])
    tap.remove()


def test_post_rope_keys_have_no_weight_basis():
    with pytest.raises(ValueError, match="post-RoPE keys are rotated by their position"):
        TruncationConfig(basis="weights", key_space="post_rope", key_rank=4)
    TruncationConfig(basis="weights", key_space="post_rope", value_rank=4, truncate="values")  # values only: fine


def test_random_bases_are_orthonormal_and_reproducible_from_the_seed(family_models):
    geometry = kv_geometry(family_models["llama"].config)
    first, again, other = (bases.random_bases(geometry, seed) for seed in (3, 3, 4))
    for space in ("key_pre_rope", "key_post_rope", "value"):
        assert_orthonormal(first.eigenvectors[space])
        assert_orthonormal(first.head_eigenvectors[space])
        assert torch.equal(first.eigenvectors[space], again.eigenvectors[space])
        assert not torch.allclose(first.eigenvectors[space], other.eigenvectors[space])
    assert not torch.allclose(first.eigenvectors["value"], first.eigenvectors["key_pre_rope"])


def test_sequence_basis_is_each_rows_own_svd_without_its_padding():
    """Row 1 is row 0's tokens left-padded with other numbers: masked, both get the same basis, the top right
    singular vectors of the row's own tokens, orthonormal and complete even with fewer tokens than D."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(10, 16, generator=generator)
    rows = torch.stack([tokens, torch.cat([100 * torch.randn(4, 16, generator=generator), tokens[4:]])])
    mask = torch.ones(2, 10)
    mask[1, :4] = 0
    basis = bases.sequence_basis(rows, mask, rank=16)  # (2, 16, 16)
    assert_orthonormal(basis)
    own = bases.sequence_basis(tokens[None, 4:], None, rank=16)[0]
    assert torch.allclose(basis[1][:, :6].abs(), own[:, :6].abs(), atol=1e-5)  # the 6 directions its tokens use
    _, s, vh = torch.linalg.svd(tokens.double())
    assert torch.allclose(basis[0][:, :10].abs(), vh[:10].T.float().abs(), atol=1e-5)
    assert torch.allclose(rows[1, 4:] @ basis[1][:, :6] @ basis[1][:, :6].T, rows[1, 4:], atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "gemma3"])
@pytest.mark.parametrize("key_space", ["pre_rope", "post_rope"])
def test_sequence_basis_at_full_rank_and_16_bits_equals_the_plain_model(family, key_space, family_models, token_batch):
    """Each row projected on its own complete (D × D) prefill basis, then decoded one token at a time: logits
    equal the plain model's within 1e-5 (float32), 2e-3 relative with latents stored in float16 (latent_bits=16)."""
    from kvcore_eval.compression.quantize import Codec

    model = family_models[family]
    geometry = kv_geometry(model.config)
    tap = RopeTap(model)
    full = [
        LayerBases(SequenceBasis(geometry.width), SequenceBasis(geometry.width)) for _ in range(geometry.num_layers)
    ]
    plain = logits(model, token_batch)
    for codec, tolerance in ((None, 1e-5), (Codec(16, torch.float32), 2e-3)):
        cache = LowRankCache(full, geometry.kv_heads, tap if key_space == "pre_rope" else None, codec=codec)
        steps = [logits(model, token_batch[:, :16], cache)]
        steps += [logits(model, token_batch[:, i : i + 1], cache) for i in range(16, token_batch.shape[1])]
        error = (torch.cat(steps, dim=1) - plain).abs().max() / plain.abs().max()
        assert error < tolerance
        assert cache.layers[0].basis["key"].vectors.shape == (token_batch.shape[0], geometry.width, geometry.width)
    tap.remove()


def test_sequence_basis_ignores_left_padding_in_batched_generation(family_models):
    """At rank 4, a left-padded row generates what it generates alone: its basis comes from its own 6 tokens. (A rank
    above a row's token count would add directions its prefill never used, which no sequence method can choose.)"""
    model = family_models["llama"]
    geometry = kv_geometry(model.config)
    tap = RopeTap(model)
    rank = 4
    layer_bases = [LayerBases(SequenceBasis(rank), SequenceBasis(rank)) for _ in range(geometry.num_layers)]
    input_ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :4], attention_mask[1, :4] = 0, 0

    def generate(ids, mask):
        cache = LowRankCache(layer_bases, geometry.kv_heads, tap)
        cache.set_token_mask(mask)
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=6,
                min_new_tokens=6,
                do_sample=False,
                cache=cache,
                pad_token_id=0,
                output_scores=True,
                return_dict_in_generate=True,
            )
        return out, cache

    batched, cache = generate(input_ids, attention_mask)
    alone, _ = generate(input_ids[1:, 4:], attention_mask[1:, 4:])
    assert torch.equal(batched.sequences[1, 4:], alone.sequences[0])
    finite = lambda scores: torch.stack(scores).nan_to_num(0, 0, 0)  # noqa: E731  (min_new_tokens masks eos with -inf)
    assert torch.allclose(finite(batched.scores)[:, 1], finite(alone.scores)[:, 0], atol=1e-4)
    unmasked = LowRankCache(layer_bases, geometry.kv_heads, tap)  # without the mask, padding enters the bases
    logits(model, input_ids, unmasked)
    # (layer 1: the pad embedding is zero, so layer 0's pad keys are zero and cannot show it)
    assert not torch.allclose(
        unmasked.layers[1].basis["key"].vectors[1], cache.layers[1].basis["key"].vectors[1], atol=1e-3
    )
    tap.remove()
