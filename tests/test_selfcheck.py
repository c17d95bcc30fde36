import pytest
import torch
from conftest import FAMILIES

from kvcore_eval.model.rope import Convention, RopeTap
from kvcore_eval.model.selfcheck import check_key_recovery


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_passes_its_self_check(family, family_models):
    tap = RopeTap(family_models[family])
    errors = check_key_recovery(family_models[family], tap)
    tap.remove()
    assert len(errors) == 2 and max(errors.values()) < 1e-6
    assert tap.has_rope == (family != "gpt2")


@pytest.mark.parametrize(
    "family,wrong",
    [
        ("cohere", Convention()),
        ("llama", Convention(interleaved=True)),
        ("gptj", Convention(interleaved=True, sin_first=False, half_width=True)),
    ],
)
def test_a_wrong_rotary_convention_is_refused(family, wrong, family_models):
    tap = RopeTap(family_models[family])
    tap.convention = wrong
    with pytest.raises(ValueError, match=f"{family}: the pre-RoPE key kvcore-eval derives .* not supported"):
        check_key_recovery(family_models[family], tap)
    tap.remove()


def test_rope_taken_for_absent_is_refused(family_models):
    """A RoPE model whose tables were not found would be treated as RoPE-free: the check refuses it."""
    tap = RopeTap(family_models["llama"])
    tap.remove()
    tap.has_rope = False
    with pytest.raises(ValueError, match="cached key taken as the pre-RoPE key"):
        check_key_recovery(family_models["llama"], tap)


def test_self_check_passes_in_bfloat16(family_models):
    model = family_models["qwen3"].to(torch.bfloat16)
    try:
        tap = RopeTap(model)
        assert max(check_key_recovery(model, tap).values()) < 3e-2
        tap.remove()
    finally:
        model.to(torch.float32)


def test_the_probe_removes_its_hooks_when_the_forward_fails(family_models):
    """A forward that raises (here: a cache of no layers) leaves no hook on the model it probed."""
    from kvcore_eval.model.selfcheck import run_probe

    model = family_models["llama"]
    modules = [layer.self_attn.k_proj for layer in model.model.layers]
    calls = []
    with pytest.raises(Exception):  # noqa: B017 - whatever the forward raises
        run_probe(model, [], [(module, lambda *args: calls.append(1)) for module in modules])
    assert calls and all(not module._forward_hooks for module in modules)
