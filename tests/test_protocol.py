"""protocol=after_prefill (exact prefill, then the compressed cache, as deployed caches run) and transformers' own
QuantizedCache as a peer, measured from what it holds."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import EXAMPLE_MODEL, build_model
from lm_eval.models.huggingface import HFLM
from test_wrapper import artifact_dir, requests, run  # noqa: F401  (the module fixture is shared)

from kvcore_eval.compression import peers
from kvcore_eval.harness.wrapper import KVCoreHFLM


def kvcore(llama_dir, artifact, **options):
    return KVCoreHFLM(pretrained=str(llama_dir), calibration=str(artifact), batch_size=1, device="cpu", **options)


@pytest.fixture(scope="module")
def plain(llama_dir):
    return HFLM(pretrained=str(llama_dir), batch_size=1, device="cpu")


@pytest.mark.parametrize("kind", ["loglikelihood", "loglikelihood_rolling", "generate_until"])
def test_at_full_rank_after_prefill_equals_hf(kind, llama_dir, artifact_dir, plain):  # noqa: F811
    """Two forwards (context, then continuation), or chunks of 4 tokens, give what one forward of hf gives."""
    lm = kvcore(llama_dir, artifact_dir, key_rank="full", value_rank="full", protocol="after_prefill", prefill_chunk=4)
    got, expected = run(lm, kind), run(plain, kind)
    if kind == "generate_until":
        assert got == expected
    else:
        values = [r[0] if isinstance(r, tuple) else r for r in got]
        assert values == pytest.approx([r[0] if isinstance(r, tuple) else r for r in expected], abs=1e-4)


def test_after_prefill_leaves_the_contexts_logits_exact_and_changes_the_continuations(
    llama_dir,
    artifact_dir,  # noqa: F811
    plain,
):
    """A truncated plan under after_prefill: every logit the context's own forward gives equals hf's (the prefill is
    exact); the continuation, read through the compressed context, differs. Under forward both differ."""
    tokens = torch.randint(3, 259, (1, 24), generator=torch.Generator().manual_seed(2))
    context = 15  # the first forward: the context's 15 tokens
    with torch.no_grad():
        expected = plain.model(tokens).logits
    after = kvcore(llama_dir, artifact_dir, key_rank=4, value_rank=4, protocol="after_prefill")
    after._context_lengths = {tuple(tokens[0].tolist()): context}
    forward = kvcore(llama_dir, artifact_dir, key_rank=4, value_rank=4)
    got, everywhere = after._model_call(tokens), forward._model_call(tokens)
    assert torch.allclose(got[:, :context], expected[:, :context], atol=1e-5)
    assert (got[:, context:] - expected[:, context:]).abs().amax(-1).min() > 1e-3, "every continuation logit moves"
    assert (everywhere[:, 1:context] - expected[:, 1:context]).abs().amax(-1).min() > 1e-3


def test_a_chunked_prefill_equals_one_prefill_at_full_rank(llama_dir, artifact_dir):  # noqa: F811
    tokens = torch.randint(3, 259, (1, 30), generator=torch.Generator().manual_seed(3))
    whole = kvcore(llama_dir, artifact_dir, key_rank="full", value_rank="full")._model_call(tokens)
    chunked = kvcore(
        llama_dir, artifact_dir, key_rank="full", value_rank="full", protocol="after_prefill", prefill_chunk=7
    )
    assert chunked._chunks(tokens) == [(0, 7), (7, 14), (14, 21), (21, 28), (28, 30)]
    assert torch.allclose(chunked._model_call(tokens), whole, atol=1e-5)


def test_after_prefill_needs_one_request_a_batch_and_reconstruction(llama_dir, artifact_dir):  # noqa: F811
    with pytest.raises(ValueError, match="one request a forward: use batch_size=1"):
        KVCoreHFLM(
            pretrained=str(llama_dir), calibration=str(artifact_dir), key_rank=4, protocol="after_prefill", batch_size=2
        )
    with pytest.raises(ValueError, match="use attention=reconstruct"):
        kvcore(llama_dir, artifact_dir, key_rank=4, protocol="after_prefill", attention="latent")


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """A tiny Llama whose KV width (2 heads x 32) is a multiple of HQQ's groups of 64."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=259,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    path = tmp_path_factory.mktemp("wide")
    build_model(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(EXAMPLE_MODEL / name, path / name)
    return path


def expected_peer_bytes(bits: int, tokens: int, residual: int, layers: int = 2, width: int = 64) -> int:
    """Codes (bits a number, packed), one float32 scale and one float32 zero-point a group of 64 numbers, over the
    quantized tokens; the residual window in float32; for keys and values of every layer."""
    quantized = (tokens - residual) * width
    per_kind = quantized * bits // 8 + quantized // 64 * 2 * 4 + residual * width * 4
    return 2 * layers * per_kind


@pytest.mark.parametrize(
    "backend",
    ["hqq", pytest.param("quanto", marks=pytest.mark.slow)],  # quanto builds its kernels on first use (a minute)
)
def test_a_quantized_caches_bytes_are_its_codes_scales_zero_points_and_residual_window(backend, wide_dir):
    """transformers' QuantizedCache through kvcore_hf: what it holds after a 40-token prefill and 6 decoded tokens
    (residual window 4: it flushed into codes once the window filled), counted part by part."""
    lm = KVCoreHFLM(
        pretrained=str(wide_dir),
        basis="identity",
        peer=backend,
        latent_bits=4,
        residual_length=4,
        protocol="after_prefill",
        batch_size=1,
        device="cpu",
    )
    cache = lm.new_cache()
    tokens = torch.randint(3, 259, (1, 46), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        lm.model(tokens[:, :40], cache=cache, use_cache=True)
        for position in range(40, 46):
            lm.model(tokens[:, position : position + 1], cache=cache, use_cache=True)
    held = lm.held_bytes(cache)
    in_window = cache.layers[0].keys.shape[-2] if cache.layers[0].keys.dim() == 4 else 0
    assert cache.get_seq_length() == 46 and in_window < 4
    assert sum(held.values()) == expected_peer_bytes(4, 46, in_window)
    assert held["residual"] == 2 * 2 * in_window * 64 * 4


def test_a_peer_runs_only_as_deployed_and_a_missing_backend_is_one_line(monkeypatch):
    from kvcore_eval.config import TruncationConfig

    with pytest.raises(ValueError, match="runs under protocol=after_prefill"):
        TruncationConfig(basis="identity", peer="hqq", latent_bits=4)
    with pytest.raises(ValueError, match="quantizes to 2, 4 bits"):
        TruncationConfig(basis="identity", peer="quanto", latent_bits=3, protocol="after_prefill").check_runnable()
    real = peers.importlib.util.find_spec
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name: None if name == "hqq" else real(name))
    with pytest.raises(ValueError) as refused:
        TruncationConfig(basis="identity", peer="hqq", latent_bits=4, protocol="after_prefill").check_runnable()
    assert str(refused.value) == 'peer=hqq needs the hqq package, which is not installed: pip install ".[peers]"'


def test_hqq_refuses_a_kv_width_it_cannot_group(llama_dir):
    with pytest.raises(ValueError, match="KV width is 32.*use peer=quanto"):
        KVCoreHFLM(
            pretrained=str(llama_dir),
            basis="identity",
            peer="hqq",
            latent_bits=4,
            protocol="after_prefill",
            batch_size=1,
            device="cpu",
        )
