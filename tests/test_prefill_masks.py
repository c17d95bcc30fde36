"""No tensor quadratic in the prompt's length: every path kvcore_hf runs hands SDPA a causal prefill as `is_causal=True`
with no mask, through a kernel that builds no (q_len, kv_len) scores; padding gets a boolean mask, never a float one.
Checked on SDPA's own arguments, recorded by a wrapper around `torch.nn.functional.scaled_dot_product_attention`."""

from __future__ import annotations

import pytest
import torch
from test_wrapper import artifact_dir  # noqa: F401  (module fixture: the llama artifact)
from torch.nn.attention import SDPBackend

from kvcore_eval.harness.wrapper import KVCoreHFLM

MODES = {  # kvcore_hf options of each path: reconstruct, latent, quantized codes, the per-sequence basis
    "reconstruct pre_rope": dict(key_rank=0.25, value_rank=0.5),
    "reconstruct post_rope": dict(key_rank=0.25, value_rank=0.5, key_space="post_rope"),
    "latent post_rope": dict(key_rank=0.25, value_rank=0.5, key_space="post_rope", attention="latent"),
    "latent pre_rope": dict(key_rank=0.25, value_rank=0.5, attention="latent"),
    "latent keys only": dict(key_rank=0.25, key_space="post_rope", attention="latent"),
    "int8 latent": dict(key_rank=0.25, value_rank=0.5, key_space="post_rope", attention="latent", latent_bits=8),
    "int4 identity": dict(basis="identity", latent_bits=4),
    "sequence basis": dict(basis="sequence", key_rank=0.25, value_rank=0.5, batch_size=1),
}


@pytest.fixture
def sdpa_calls(monkeypatch) -> list[dict]:
    """Every SDPA call's mask, causal flag and the kernel torch picks for its arguments."""
    calls: list[dict] = []
    original = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        kernel = torch._fused_sdp_choice(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa=enable_gqa)
        calls.append({"mask": attn_mask, "is_causal": is_causal, "kernel": SDPBackend(kernel), "q_len": query.shape[2]})
        return original(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    return calls


def kvcore_hf(llama_dir, artifact, options: dict) -> KVCoreHFLM:
    calibration = {} if options.get("basis") in ("identity", "sequence") else {"calibration": str(artifact)}
    return KVCoreHFLM(pretrained=str(llama_dir), device="cpu", **{"batch_size": 2, **calibration, **options})


@pytest.mark.parametrize("mode", MODES)
def test_an_unpadded_prefill_builds_no_mask_and_no_scores(mode, llama_dir, artifact_dir, sdpa_calls):  # noqa: F811
    """lm-eval's scoring forward (`_model_call`, no attention mask) in each mode: SDPA gets no mask and
    `is_causal=True` in every layer, and dispatches to a fused kernel (the math kernel would build the scores)."""
    lm = kvcore_hf(llama_dir, artifact_dir, MODES[mode])
    sdpa_calls.clear()  # the load's self-checks run padded probe batches
    tokens = torch.randint(3, 250, (int(lm.batch_size), 40), generator=torch.Generator().manual_seed(0))
    lm._model_call(tokens)
    assert len(sdpa_calls) == lm.model.config.num_hidden_layers
    for call in sdpa_calls:
        assert call["mask"] is None and call["is_causal"] is True, call
        assert call["kernel"] != SDPBackend.MATH, call


@pytest.mark.parametrize("mode", ["latent post_rope", "reconstruct pre_rope"])
def test_a_padded_prefill_gets_a_boolean_mask(mode, llama_dir, artifact_dir, sdpa_calls):  # noqa: F811
    """Batched generation with left padding: the prefill's mask is boolean (1 byte a pair, as `hf`'s sdpa path),
    not the float mask eager attention builds; decode steps of an unpadded batch need none."""
    from test_cache import left_padded_prompts

    lm = kvcore_hf(llama_dir, artifact_dir, MODES[mode])
    input_ids, attention_mask = left_padded_prompts()
    sdpa_calls.clear()
    lm._model_generate(input_ids, input_ids.shape[1] + 3, stop=[], attention_mask=attention_mask, do_sample=False)
    prefill = [call for call in sdpa_calls if call["q_len"] > 1]
    assert prefill and all(call["mask"] is not None and call["mask"].dtype == torch.bool for call in prefill)
