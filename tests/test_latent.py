import pytest
import torch
from conftest import calibrate_in_memory

from kvcore_eval.compression import latent
from kvcore_eval.compression.cache import LowRankCache, layer_bases
from kvcore_eval.compression.rank_plan import RankPlan
from kvcore_eval.model.rope import RopeTap

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt_neox", "gpt2"]
CASES = [  # (key space, granularity, key rank fraction or None, value rank fraction)
    ("post_rope", "layer", 0.25, 0.5),
    ("post_rope", "head", 0.25, 0.5),
    ("post_rope", "layer", None, 0.25),
    ("pre_rope", "layer", 0.25, 0.5),
    ("pre_rope", "head", 0.5, 0.25),
]


@pytest.fixture(scope="module")
def setups(family_models, calibration_tokens):
    latent.register()
    return {
        family: (
            family_models[family],
            calibrate_in_memory(family_models[family], calibration_tokens),
            RopeTap(family_models[family]),
        )
        for family in FAMILIES
    }


def caches(setup, key_space, granularity, key_fraction, value_fraction):
    model, calibration, tap = setup
    geometry = calibration.geometry
    width = geometry.width if granularity == "layer" else geometry.head_dim
    rank = lambda f: None if f is None else [max(1, round(f * width))] * geometry.num_layers  # noqa: E731
    bases = layer_bases(calibration, RankPlan(rank(key_fraction), rank(value_fraction), width, granularity, key_space))
    tap = tap if key_space == "pre_rope" else None
    return (lambda: LowRankCache(bases, geometry.kv_heads, tap)), (
        lambda: LowRankCache(bases, geometry.kv_heads, tap, latent=True)
    )


def run(model, implementation, cache, call):
    """`call(cache)` with the model on `implementation`, the cache active for latent attention."""
    original = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        with torch.no_grad(), latent.active(cache):
            return call(cache)
    finally:
        model.set_attn_implementation(original)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_latent_attention_equals_reconstruction_in_one_shot_scoring(family, case, setups, token_batch):
    model = setups[family][0]
    reconstructing, attending = caches(setups[family], *case)
    forward = lambda cache: model(input_ids=token_batch, cache=cache, use_cache=True).logits  # noqa: E731
    expected = run(model, "sdpa", reconstructing(), forward)
    got = run(model, latent.NAME, attending(), forward)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3]], ids=["post-layer", "post-head", "pre-layer"])
def test_latent_attention_equals_reconstruction_in_batched_generation(family, case, setups):
    from test_cache import left_padded_prompts

    model = setups[family][0]
    input_ids, attention_mask = left_padded_prompts()
    reconstructing, attending = caches(setups[family], *case)

    def generate(cache):
        return model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=8,
            min_new_tokens=8,
            do_sample=False,
            cache=cache,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )

    expected, got = run(model, "sdpa", reconstructing(), generate), run(model, latent.NAME, attending(), generate)
    assert torch.equal(got.sequences, expected.sequences)
    assert torch.allclose(torch.stack(got.scores), torch.stack(expected.scores), atol=1e-4)


def test_full_rank_latent_kvcore_hf_equals_lm_eval_hf(llama_dir, tmp_path):
    from lm_eval.models.huggingface import HFLM
    from test_wrapper import requests

    from kvcore_eval.harness.wrapper import KVCoreHFLM

    artifact = _artifact(llama_dir, tmp_path)
    full = KVCoreHFLM(
        pretrained=str(llama_dir),
        calibration=str(artifact),
        key_rank="full",
        value_rank="full",
        attention="latent",
        device="cpu",
    )
    low = KVCoreHFLM(
        pretrained=str(llama_dir),
        calibration=str(artifact),
        key_rank=0.25,
        value_rank=0.5,
        key_space="post_rope",
        attention="latent",
        device="cpu",
    )
    reconstructed = KVCoreHFLM(
        pretrained=str(llama_dir),
        calibration=str(artifact),
        key_rank=0.25,
        value_rank=0.5,
        key_space="post_rope",
        device="cpu",
    )
    plain = HFLM(pretrained=str(llama_dir), device="cpu")
    scores = {
        name: [r[0] for r in lm.loglikelihood(requests("loglikelihood"))]
        for name, lm in (("full", full), ("plain", plain), ("low", low), ("reconstructed", reconstructed))
    }
    assert scores["full"] == pytest.approx(scores["plain"], abs=1e-5)
    assert scores["low"] == pytest.approx(scores["reconstructed"], abs=1e-5)
    assert all(abs(a - b) > 1e-3 for a, b in zip(scores["low"], scores["plain"], strict=False))
    assert (
        full.model.config._attn_implementation == latent.NAME
        and reconstructed.model.config._attn_implementation != latent.NAME
    )


def _artifact(model_dir, tmp_path):
    from conftest import EXAMPLE_DATA

    from kvcore_eval.calibration.calibrate import calibrate
    from kvcore_eval.config import CalibrationConfig

    return calibrate(
        CalibrationConfig(
            model=str(model_dir),
            dataset=str(EXAMPLE_DATA / "alpaca.jsonl"),
            prompt_format="alpaca",
            out=str(tmp_path / "artifact"),
            max_tokens=1000,
            seq_len=64,
            device="cpu",
        )
    )


def test_what_latent_attention_cannot_do_is_refused(family_dirs, family_models, setups, tmp_path, token_batch):
    from kvcore_eval.harness.wrapper import KVCoreHFLM

    with pytest.raises(ValueError, match="does not implement softcap.*attention=reconstruct"):  # Gemma2 caps its logits
        KVCoreHFLM(
            pretrained=str(family_dirs["gemma2"]),
            calibration=str(_artifact(family_dirs["gemma2"], tmp_path)),
            key_rank=0.5,
            attention="latent",
            device="cpu",
        )
    model = setups["llama"][0]
    with pytest.raises(RuntimeError, match="outside `latent.active"):
        original = model.config._attn_implementation
        model.set_attn_implementation(latent.NAME)
        try:
            with torch.no_grad():
                model(input_ids=token_batch)
        finally:
            model.set_attn_implementation(original)
