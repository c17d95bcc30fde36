import torch

from kvcore_eval import rope


def _cos_sin(batch, seq, dim, scale=1.0):
    positions = torch.arange(seq, dtype=torch.float32)[None, :, None].expand(batch, seq, dim // 2)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    angles = torch.cat([positions * inv_freq, positions * inv_freq], dim=-1)
    return angles.cos() * scale, angles.sin() * scale


def test_unrotate_inverts_rotate():
    keys = torch.randn(2, 3, 7, 16, dtype=torch.float64)
    cos, sin = _cos_sin(2, 7, 16)
    assert torch.allclose(rope.unrotate(rope.rotate(keys, cos, sin), cos, sin), keys, atol=1e-6)


def test_unrotate_handles_scaled_and_partial_rope():
    keys = torch.randn(1, 2, 5, 16, dtype=torch.float64)
    cos, sin = _cos_sin(1, 5, 8, scale=1.3)  # rotary_dim 8 of 16, attention_scaling 1.3
    rotated = rope.rotate(keys, cos, sin)
    assert torch.equal(rotated[..., 8:], keys[..., 8:])
    assert torch.allclose(rope.unrotate(rotated, cos, sin), keys, atol=1e-6)


def test_rotate_matches_transformers_llama(family_models):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = family_models["llama"]
    keys = torch.randn(2, 2, 6, 16)
    positions = torch.arange(6).unsqueeze(0).expand(2, 6)
    cos, sin = rope.cos_sin(rope.find_rotary_embedding(model), keys, positions)
    _, expected = apply_rotary_pos_emb(keys, keys, cos, sin)
    assert torch.allclose(rope.rotate(keys, cos, sin), expected, atol=1e-6)


def test_models_without_rope_have_no_rotary_module(family_models):
    assert rope.find_rotary_embedding(family_models["gpt2"]) is None
    assert rope.find_rotary_embedding(family_models["qwen3"]) is not None
