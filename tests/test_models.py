"""models.py: KV geometry of each family, the config and weights fingerprints, and loading errors."""

from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import build_model, family_configs

from kvcore_eval.model.models import (
    UNIT_ROUNDOFF,
    WEIGHT_SAMPLE,
    config_fingerprint,
    dtype_name,
    file_sha256,
    gguf_location,
    kv_geometry,
    load_causal_lm,
    load_config,
    model_identity,
    resolve_dtype,
    same_weights,
    weights_digest,
    weights_fingerprint,
    weights_sample,
)

# family -> (layers, kv_heads, head_dim) of the tiny configs in conftest.py: GQA where num_key_value_heads is set,
# an explicit head_dim where given, else hidden_size / num_attention_heads = 64 / 4.
GEOMETRIES = {
    "llama": (2, 2, 16),
    "mistral": (2, 2, 16),
    "qwen2": (2, 2, 16),
    "qwen3": (2, 2, 16),
    "gemma": (2, 1, 16),
    "gemma2": (2, 2, 16),
    "gemma3": (2, 2, 16),
    "phi3": (2, 2, 16),
    "gpt_neox": (2, 4, 16),
    "gptj": (2, 4, 16),
    "cohere": (2, 2, 16),
    "gpt2": (2, 4, 16),
}


def test_every_family_has_its_expected_geometry():
    assert set(GEOMETRIES) == set(family_configs())


@pytest.mark.parametrize("family", list(GEOMETRIES))
def test_kv_geometry_of_the_tiny_families(family, family_models):
    layers, kv_heads, head_dim = GEOMETRIES[family]
    geometry = kv_geometry(family_configs()[family])
    assert (geometry.num_layers, geometry.kv_heads, geometry.head_dim) == (layers, kv_heads, head_dim)
    assert geometry.width == kv_heads * head_dim
    assert geometry.to_dict() == {"num_layers": layers, "kv_heads": kv_heads, "head_dim": head_dim}
    from transformers import DynamicCache

    model = family_models[family]  # the cache the model itself writes has this shape
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]), past_key_values=cache, use_cache=True)
    assert len(cache.layers) == layers
    keys, values = cache.layers[0].keys, cache.layers[0].values
    assert keys.shape == (1, kv_heads, 3, head_dim) and values.shape == (1, kv_heads, 3, head_dim)


def test_a_config_without_attention_heads_is_refused():
    from transformers import MambaConfig

    with pytest.raises(ValueError, match="MambaConfig has no num_attention_heads/num_hidden_layers"):
        kv_geometry(MambaConfig(vocab_size=259, hidden_size=32, num_hidden_layers=1))


def test_config_fingerprint_is_stable_and_sensitive_to_architecture(llama_dir):
    config = family_configs()["llama"]
    fingerprint = config_fingerprint(config)
    assert fingerprint == config_fingerprint(family_configs()["llama"])
    assert fingerprint == config_fingerprint(load_config(str(llama_dir), None)), "saved and reloaded: same"
    volatile = family_configs()["llama"]
    volatile._name_or_path, volatile.use_cache = "/elsewhere/model", False
    volatile.dtype = torch.bfloat16
    assert config_fingerprint(volatile) == fingerprint, "paths, dtype and runtime flags are not the architecture"
    for name, value in [("num_key_value_heads", 4), ("rope_theta", 500000.0), ("num_hidden_layers", 3)]:
        changed = family_configs()["llama"]
        setattr(changed, name, value)
        assert config_fingerprint(changed) != fingerprint, name
    assert config_fingerprint(family_configs()["mistral"]) != fingerprint


def test_weights_fingerprint_is_equal_across_float32_and_bfloat16_loads(llama_dir):
    float32 = load_causal_lm(str(llama_dir), None, "cpu", "float32")
    bfloat16 = load_causal_lm(str(llama_dir), None, "cpu", "bfloat16")
    assert next(bfloat16.parameters()).dtype == torch.bfloat16 and not bfloat16.training
    assert weights_fingerprint(float32) == weights_fingerprint(bfloat16)
    assert same_weights(weights_sample(float32), weights_sample(bfloat16), "float32", "bfloat16")
    assert not same_weights(weights_sample(float32), weights_sample(bfloat16), "float32", "float32"), (
        "a bfloat16 load is not bit-equal to the float32 one: claimed as one dtype, it is refused"
    )
    assert weights_digest(weights_sample(float32)) == weights_digest(
        weights_sample(load_causal_lm(str(llama_dir), None, "cpu", "float32"))
    )
    assert weights_digest(weights_sample(float32)) != weights_digest(weights_sample(bfloat16))
    other = build_model(family_configs()["llama"], seed=1)  # same architecture, other weights
    assert weights_fingerprint(other) != weights_fingerprint(float32)
    assert not same_weights(weights_sample(float32), weights_sample(other), "float32", "bfloat16")


def test_weights_sample_reads_first_and_last_value_of_every_parameter(family_models):
    model = family_models["qwen3"]
    sample = weights_sample(model)
    named = sorted(model.named_parameters(), key=lambda item: item[0])
    assert sample.shape == (len(named), WEIGHT_SAMPLE) and sample.dtype == torch.float32
    for row, (_, param) in zip(sample, named, strict=True):
        flat = param.detach().reshape(-1)
        assert row[0] == flat[0] and row[-1] == flat[-1]
    assert weights_fingerprint(model, sample) == weights_fingerprint(model)


def test_same_weights_is_bit_equality_in_one_dtype_and_one_rounding_across_two():
    sample = torch.randn(4, WEIGHT_SAMPLE, generator=torch.Generator().manual_seed(0))
    assert same_weights(sample, sample.clone(), "float32", "float32")
    ulp = sample.clone()
    ulp[1, 3] = torch.nextafter(ulp[1, 3], torch.tensor(float("inf")))
    assert not same_weights(sample, ulp, "float32", "float32"), "one ulp in one dtype: not the same load"
    assert same_weights(sample, ulp, "float32", "bfloat16")
    for dtype in (torch.bfloat16, torch.float16):
        name = dtype_name(dtype)
        assert same_weights(sample, sample.to(dtype).float(), "float32", name)
        assert same_weights(sample.to(dtype).float(), sample, name, "float32")
    assert not same_weights(sample, sample.to(torch.bfloat16).float(), "float32", "float16"), (
        "a bfloat16 rounding is beyond what a float16 load can explain"
    )
    nudged = sample.clone()
    nudged[2, 5] *= 1.05  # 5 %: far beyond a bfloat16 rounding (2^-8)
    assert not same_weights(sample, nudged, "float32", "bfloat16")
    assert not same_weights(sample, sample[:3], "float32", "float32"), "a different parameter count is other weights"
    assert UNIT_ROUNDOFF["bfloat16"] > UNIT_ROUNDOFF["float16"] > UNIT_ROUNDOFF["float32"]


def test_model_identity_records_geometry_and_fingerprints(family_models):
    model = family_models["gemma"]
    identity = model_identity(model, "some/gemma", "abc123")
    assert identity["model_id"] == "some/gemma" and identity["revision"] == "abc123"
    assert identity["model_type"] == "gemma" and identity["geometry"] == {
        "num_layers": 2,
        "kv_heads": 1,
        "head_dim": 16,
    }
    assert identity["config_fingerprint"] == config_fingerprint(model.config)
    assert identity["weights_fingerprint"] == weights_fingerprint(model)
    assert "gguf" not in identity


def test_gguf_location_and_file_sha256(tmp_path):
    gguf = tmp_path / "m.Q4.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 5000)  # over one read block
    assert gguf_location(str(gguf), None) == (str(tmp_path), "m.Q4.gguf")
    assert gguf_location("org/model", "x.gguf") == ("org/model", "x.gguf")
    assert gguf_location(str(tmp_path), None) == (str(tmp_path), None)
    with pytest.raises(FileNotFoundError, match="GGUF file .*missing.gguf does not exist"):
        gguf_location(str(tmp_path / "missing.gguf"), None)
    assert file_sha256(str(gguf)) == hashlib.sha256(gguf.read_bytes()).hexdigest()


def test_loading_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="dtype 'fp8' is not one of"):
        resolve_dtype("fp8")
    assert resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(FileNotFoundError, match="model folder .*nowhere does not exist"):
        load_config(str(tmp_path / "nowhere"), None)


def test_dtype_auto_is_the_models_own_on_a_gpu_and_float32_on_the_cpu(llama_dir):
    """`--dtype auto` as lm-eval's hf reads it on an accelerator (the checkpoint's dtype), float32 on the CPU; an
    explicit dtype is kept; a checkpoint without one, or one kvcore-eval does not load, is float32."""
    from transformers import LlamaConfig

    from kvcore_eval.model.models import resolve_dtype_name

    def config(dtype):
        return LlamaConfig(dtype=dtype)

    assert resolve_dtype_name("auto", "cpu", config("bfloat16")) == "float32"
    assert resolve_dtype_name("auto", "cuda", config("bfloat16")) == "bfloat16"
    assert resolve_dtype_name("auto", "cuda:1", lambda: config(torch.float16)) == "float16"
    assert resolve_dtype_name("auto", "cuda", config(None)) == "float32"
    assert resolve_dtype_name("auto", "cuda", config("float64")) == "float32"
    assert resolve_dtype_name("bfloat16", "cpu", lambda: pytest.fail("an explicit dtype reads no config")) == "bfloat16"
    with pytest.raises(ValueError, match="dtype 'fp8' is not one of"):
        resolve_dtype_name("fp8", "cpu", config(None))
    assert load_causal_lm(str(llama_dir), None, "cpu", "auto").dtype == torch.float32


def test_eval_hands_lm_eval_the_resolved_dtype(llama_dir):
    """lm-eval's own `dtype=auto` would load the checkpoint's dtype on the CPU too: eval resolves it first."""
    from kvcore_eval.config import EvalConfig

    assert EvalConfig(model=str(llama_dir), tasks="x", device="cpu").model_args()["dtype"] == "float32"
    assert EvalConfig(model=str(llama_dir), tasks="x", dtype="bfloat16").model_args()["dtype"] == "bfloat16"
