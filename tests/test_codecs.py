"""Every method one codec: today's methods unchanged by the refactor, the spectral code's bytes, error and limits, the
rotation, and pre-RoPE keys rotated from positions rather than from stored tables."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, calibrate_in_memory
from method_reference import PLANS, method_rows

from kvcore_eval.compression.bases import hadamard, rotation_bases
from kvcore_eval.compression.cache import LayerBases, LowRankCache, cache_bytes_per_token, layer_bases
from kvcore_eval.compression.rank_plan import RankPlan, make_plan
from kvcore_eval.config import TruncationConfig
from kvcore_eval.model.models import KVGeometry, kv_geometry
from kvcore_eval.model.rope import RopeTap

REFERENCE = json.loads((REPO / "tests" / "data" / "method_rows.json").read_text())


@pytest.mark.slow
def test_todays_methods_give_the_rows_they_gave_before_the_codec_refactor(tmp_path):
    """Each of today's methods at a fixed plan on the embedded model: the same byte perplexity (to float round-off),
    the same ranks, and the same bytes but for the rotary tables, now one int32 position a token. A budget
    allocation's plan is taken at the ranks it had (its budget now buys more: the tables are gone), and the same
    allocation rule is checked to give those ranks from their total."""
    from kvcore_eval.calibration.artifact import load_calibration
    from kvcore_eval.compression.rank_plan import allocate

    before_rows = {row["method"]: row for row in REFERENCE["rows"]}
    plans = {}
    for method, plan in PLANS.items():
        if "rank_budget" in plan:
            ranks = before_rows[method]["rank_plan"]
            plan = {kind: ":".join(map(str, ranks[f"{kind}_per_layer"])) for kind in ("key_rank", "value_rank")}
        plans[method] = plan
    rows = {row["method"]: row for row in method_rows(tmp_path, plans)}
    assert REFERENCE["made_by"].startswith("the layout commit")
    eigenvalues = load_calibration(tmp_path / "basis", eigenvectors=False).eigenvalues
    spectra = [eigenvalues[space][layer].numpy() for space in ("key_pre_rope", "value") for layer in range(4)]
    for method in ("energy", "ner"):
        ranks = before_rows[method]["rank_plan"]
        expected = ranks["key_rank_per_layer"] + ranks["value_rank_per_layer"]
        from kvcore_eval import metrics

        ner = [metrics.normalized_effective_rank(metrics.singular_values(values)) for values in spectra]
        assert allocate(spectra, sum(expected), method, ner) == expected, method
    for before in REFERENCE["rows"]:
        now = rows[before["method"]]
        # rel 1e-6, not equality: float32 sums on another thread count (an xdist worker has one) move the last digits;
        # one rank more or less, or another basis, moves the perplexity by 1e-3 or more.
        assert now["byte_perplexity"] == pytest.approx(before["byte_perplexity"], rel=1e-6), before["method"]
        for kind in ("key_rank_per_layer", "value_rank_per_layer"):
            assert now["rank_plan"][kind] == before["rank_plan"][kind], before["method"]
        assert now["bytes_per_token"] - now["rope_bytes_per_token"] == pytest.approx(
            before["bytes_per_token"] - before["rope_bytes_per_token"]
        ), before["method"]
        assert now["rope_bytes_per_token"] == (4.0 if before["rope_bytes_per_token"] else 0.0), before["method"]


def test_the_hadamard_rotation_is_orthonormal_and_seeded():
    for size in (1, 2, 16, 64):
        matrix = hadamard(size)
        assert torch.allclose(matrix @ matrix.T, torch.eye(size, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(matrix.abs(), torch.full_like(matrix, size**-0.5), rtol=1e-15)
    with pytest.raises(ValueError, match="power-of-two head_dim.*basis=random"):
        hadamard(80)
    geometry = KVGeometry(num_layers=2, kv_heads=3, head_dim=8)
    first, again, other = rotation_bases(geometry, 0), rotation_bases(geometry, 0), rotation_bases(geometry, 1)
    for space in first.eigenvectors:
        vectors = first.eigenvectors[space]  # (layers, D, D), block-diagonal over the KV heads
        eye = torch.eye(24).expand(2, 24, 24)
        assert torch.allclose(vectors.transpose(1, 2) @ vectors, eye, atol=1e-6)
        assert torch.equal(vectors, again.eigenvectors[space]) and not torch.equal(vectors, other.eigenvectors[space])
        assert torch.count_nonzero(vectors[0, :8, 8:]) == 0, "each head rotated within itself"
    assert not torch.equal(first.eigenvectors["value"], first.eigenvectors["key_pre_rope"]), "signs drawn per space"


def test_the_seed_changes_what_a_symmetric_code_of_the_rotated_vector_keeps():
    """The signs flip x's coordinates before the Hadamard mixes them: flipped after it, a symmetric code would undo
    them and every seed would decode the same vector."""
    from kvcore_eval.compression.quantize import Codec

    geometry = KVGeometry(num_layers=1, kv_heads=1, head_dim=64)
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(0))
    x[:, 3] *= 20  # an outlier channel, what a rotation is for
    codec = Codec(3, torch.float32, "midrise")
    decoded = []
    for seed in (0, 1):
        vectors = rotation_bases(geometry, seed).eigenvectors["value"][0]  # (D, D)
        decoded.append(codec.decode(*codec.encode(x @ vectors), 64, torch.float32) @ vectors.T)
    assert not torch.allclose(decoded[0], decoded[1], atol=1e-3)
    for x_hat in decoded:
        assert float((x_hat - x).square().sum() / x.square().sum()) < 0.1


def _pre_rope_logits(model, calibration, tokens, recompute: bool) -> torch.Tensor:
    """Logits of `tokens` (a prefill, then 6 decode steps) with pre-RoPE keys projected on a full-width basis; the
    tables recomputed from positions, or kept as today."""
    geometry = kv_geometry(model.config)
    tap = RopeTap(model)
    try:
        if not recompute:
            tap.recomputable = lambda layer_idx: False  # the kept-tables path, for comparison
        bases = [
            LayerBases(calibration.eigenvectors["key_pre_rope"][i], calibration.eigenvectors["value"][i])
            for i in range(geometry.num_layers)
        ]
        cache = LowRankCache(bases, geometry.kv_heads, tap)
        with torch.no_grad():
            steps = [model(input_ids=tokens[:, :10], cache=cache, use_cache=True).logits]
            for position in range(10, tokens.shape[1]):
                steps.append(model(input_ids=tokens[:, position : position + 1], cache=cache, use_cache=True).logits)
        stored = cache.stored_bytes()
        assert (stored["rope_positions"] > 0, stored["rope_tables"] > 0) == (recompute, not recompute)
        return torch.cat(steps, dim=1)
    finally:
        tap.remove()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gpt_neox",
                                    "gptj", "cohere"])  # fmt: skip
def test_pre_rope_keys_rotated_from_positions_give_the_logits_of_the_kept_tables(family, family_models, token_batch):
    """Every family whose rotary tables depend on the position alone (Gemma-3's two rotary groups, partial rotary,
    interleaved pairs): the cache keeps one int32 position a token, and the logits equal those of the kept tables."""
    model = family_models[family]
    calibration = calibrate_in_memory(model, token_batch)
    tokens = token_batch[:1, :16]
    recomputed = _pre_rope_logits(model, calibration, tokens, recompute=True)
    kept = _pre_rope_logits(model, calibration, tokens, recompute=False)
    assert (recomputed - kept).abs().max() <= 1e-5 * kept.abs().max()


def test_longrope_keeps_its_tables(family_models, token_batch):
    """Phi-3's longrope switches frequencies with the length: its tables cannot be recomputed from positions alone."""
    model = family_models["phi3"]
    calibration = calibrate_in_memory(model, token_batch)
    _pre_rope_logits(model, calibration, token_batch[:1, :16], recompute=False)
    tap = RopeTap(model)
    try:
        with torch.no_grad():
            model(input_ids=token_batch[:1, :8])
        assert not tap.recomputable(0)
    finally:
        tap.remove()


def _spectral(model, calibration, bits: float, tap) -> tuple[LowRankCache, RankPlan, dict]:
    geometry = kv_geometry(model.config)
    truncation = TruncationConfig(calibration="in-memory", budget_method="waterfill", bits=bits)
    rope = {"rope_positions": 4.0}

    def per_token(plan):
        return cache_bytes_per_token(plan, geometry.kv_heads, geometry.num_layers, 4, rope)

    plan = make_plan(truncation, calibration, per_token)
    bases = layer_bases(calibration, plan, model_dtype=torch.float32, scheme=truncation.scheme)
    return LowRankCache(bases, geometry.kv_heads, tap, measure_error=True), plan, per_token(plan)


@pytest.mark.parametrize("bits", [1.5, 2.0, 3.0, 4.0, 8.0])
def test_spectral_bytes_are_what_the_plan_counts_and_meet_the_budget(bits, family_models, token_batch):
    """One row of 40 tokens: the bytes the cache holds are the plan's count exactly (codes of each segment, one float16
    scale a group of 32 coded channels, one int32 position), within 1 % below the budget in bits per number."""
    model = family_models["llama"]
    calibration = calibrate_in_memory(model, token_batch)
    tap = RopeTap(model)
    try:
        cache, plan, predicted = _spectral(model, calibration, bits, tap)
        tokens = torch.randint(3, 259, (1, 40), generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            model(input_ids=tokens[:, :30], cache=cache, use_cache=True)
            for position in range(30, 40):
                model(input_ids=tokens[:, position : position + 1], cache=cache, use_cache=True)
    finally:
        tap.remove()
    stored = cache.stored_bytes()
    assert sum(stored.values()) / 40 == predicted["low_rank"]
    numbers = 2 * 2 * 32  # 2 layers, keys and values, D = 32
    held = 8 * predicted["low_rank"] / numbers
    assert bits * 0.99 <= held <= bits, held
    for runs in (plan.key_bits_per_layer or []) + (plan.value_bits_per_layer or []):
        widths = [b for b, count in runs for _ in range(count)]
        assert widths == sorted(widths, reverse=True), "bits never increase along the eigen-order"


def test_spectral_at_16_bits_everywhere_equals_the_full_cache(family_models, token_batch):
    model = family_models["llama"]
    calibration = calibrate_in_memory(model, token_batch)
    geometry = kv_geometry(model.config)
    runs = [[[16, geometry.width]]] * geometry.num_layers
    width = [geometry.width] * geometry.num_layers
    plan = RankPlan(width, width, geometry.width, "layer", "pre_rope", runs, runs)
    tap = RopeTap(model)
    try:
        cache = LowRankCache(layer_bases(calibration, plan), geometry.kv_heads, tap)
        with torch.no_grad():
            ours = model(input_ids=token_batch, cache=cache, use_cache=True).logits
            plain = model(input_ids=token_batch).logits
    finally:
        tap.remove()
    assert (ours - plain).abs().max() <= 2e-3 * plain.abs().max(), "float16 round-off of whitened latents"
    assert cache.stored_bytes()["scales"] == 0


def test_spectral_error_falls_with_bits_and_beats_dropping_at_equal_bytes(family_models, token_batch):
    """More bits, less squared error; and at the bytes of a rank-r truncation the spectral code leaves less error."""
    model = family_models["llama"]
    calibration = calibrate_in_memory(model, token_batch)
    tap = RopeTap(model)
    errors = {}
    try:
        for bits in (1.5, 3.0, 6.0):
            cache, _, _ = _spectral(model, calibration, bits, tap)
            with torch.no_grad():
                model(input_ids=token_batch, cache=cache, use_cache=True)
            measured = cache.squared_errors()
            errors[bits] = sum(e for kind in measured.values() for e, _ in kind) / sum(
                n for kind in measured.values() for _, n in kind
            )
    finally:
        tap.remove()
    assert errors[1.5] > errors[3.0] > errors[6.0] > 0
