import pytest
import torch

from kvcore_eval.model import rope


def tables(batch, seq, dim, scale=1.0, interleaved=False) -> rope.RotaryTables:
    positions = torch.arange(seq, dtype=torch.float64)[None, :, None].expand(batch, seq, dim // 2)
    angles = positions * (1.0 / (10000 ** (torch.arange(0, dim, 2).double() / dim)))
    angles = angles.repeat_interleave(2, dim=-1) if interleaved else torch.cat([angles, angles], dim=-1)
    return rope.RotaryTables(angles.cos() * scale, angles.sin() * scale, interleaved)


@pytest.mark.parametrize("interleaved", [False, True])
def test_unrotate_inverts_rotate(interleaved):
    keys = torch.randn(2, 3, 7, 16, dtype=torch.float64)
    t = tables(2, 7, 16, interleaved=interleaved)
    assert torch.allclose(rope.unrotate(rope.rotate(keys, t), t), keys, atol=1e-12)
    assert not torch.allclose(rope.rotate(keys, t), keys, atol=1e-3)


def test_unrotate_handles_scaled_and_partial_rope():
    keys = torch.randn(1, 2, 5, 16, dtype=torch.float64)
    t = tables(1, 5, 8, scale=1.3)  # rotary_dim 8 of 16, attention_scaling 1.3
    rotated = rope.rotate(keys, t)
    assert torch.equal(rotated[..., 8:], keys[..., 8:])
    assert torch.allclose(rope.unrotate(rotated, t), keys, atol=1e-12)


def _tap_tables(model, input_ids) -> dict[int, rope.RotaryTables]:
    tap = rope.RopeTap(model)
    with torch.no_grad():
        model(input_ids=input_ids)
    tap.remove()
    return {layer: tap.tables(layer) for layer in tap.layers}


@pytest.mark.parametrize("family", ["llama", "cohere", "gptj"])
def test_rotate_with_tapped_tables_matches_the_family_rope(family, family_models):
    """The tap normalizes each family's layout (GPT-J: (sin, cos), half width) so that `rotate` equals the
    family's own apply_rotary_pos_emb."""
    import importlib

    model = family_models[family]
    t = _tap_tables(model, torch.arange(3, 9).unsqueeze(0))[0]
    keys = torch.randn(1, 2, 6, 16)
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    if family == "gptj":  # GPT-J rotates (batch, seq, heads, dim) by its first rotary_dim dims, tables (sin, cos)
        half = t.cos.shape[-1]
        sin, cos = t.sin[..., ::2], t.cos[..., ::2]
        rotated = modeling.apply_rotary_pos_emb(keys[..., :half].transpose(1, 2), sin, cos).transpose(1, 2)
        expected = torch.cat([rotated, keys[..., half:]], dim=-1)
    else:
        _, expected = modeling.apply_rotary_pos_emb(keys, keys, t.cos, t.sin)
    assert t.interleaved == (family != "llama")
    assert torch.allclose(rope.rotate(keys, t), expected, atol=1e-6)


def test_tap_groups_layers_by_the_tables_they_receive(family_models):
    """Gemma3's sliding and global layers get different rotary tables: two groups; Llama's layers share one."""
    for family, groups in (("gemma3", [0, 1]), ("llama", [0, 0])):
        tap = rope.RopeTap(family_models[family])
        with torch.no_grad():
            family_models[family](input_ids=torch.arange(3, 9).unsqueeze(0))
        assert [tap.group_of(layer) for layer in tap.layers] == groups, family
        tap.remove()


def test_models_without_rope_have_no_tables(family_models):
    assert not rope.RopeTap(family_models["gpt2"]).has_rope
    tap = rope.RopeTap(family_models["qwen3"])
    assert tap.has_rope
    with pytest.raises(RuntimeError, match="without rotary tables"):
        tap.tables(0)  # no forward yet
    tap.remove()
