import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import EXAMPLE_DATA, calibrate_in_memory
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from kvcore_eval.calibration.artifact import save_calibration
from kvcore_eval.harness.wrapper import KVCoreHFLM
from kvcore_eval.model.models import model_identity, weights_sample


@pytest.fixture(scope="module")
def artifact_dir(llama_dir, family_models, calibration_tokens, tmp_path_factory):
    model = family_models["llama"]
    calibration = calibrate_in_memory(model, calibration_tokens)
    calibration.metadata = {
        "model": {**model_identity(model, str(llama_dir), None), "has_rope": True},
        "dataset": {"spec": "random tokens"},
        "tokens": calibration_tokens.numel(),
        "model_dtype": "float32",
    }
    calibration.weights_sample = weights_sample(model)
    out = tmp_path_factory.mktemp("artifact")
    save_calibration(calibration, out)
    return out


def requests(kind):
    if kind == "loglikelihood":
        args = [("The capital of Japan is", " Tokyo."), ("def square(x):", "\n    return x * x")]
    elif kind == "loglikelihood_rolling":
        args = [("Give three tips for staying healthy. Eat well, sleep, move.",), ("Il fait beau aujourd'hui.",)]
    else:
        args = [("Below is an instruction.", {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False})]
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def run(lm, kind):
    return getattr(lm, kind)(requests(kind))


@pytest.fixture(scope="module")
def baseline(llama_dir):
    return HFLM(pretrained=str(llama_dir), batch_size=2, device="cpu")


@pytest.mark.parametrize("kind", ["loglikelihood", "loglikelihood_rolling", "generate_until"])
def test_full_rank_equals_lm_eval_hf(kind, llama_dir, artifact_dir, baseline):
    full = KVCoreHFLM(
        pretrained=str(llama_dir),
        calibration=str(artifact_dir),
        key_rank="full",
        value_rank=32,
        batch_size=2,
        device="cpu",
    )
    got, expected = run(full, kind), run(baseline, kind)
    if kind == "generate_until":
        assert got == expected
    else:
        got_values = [r[0] if isinstance(r, tuple) else r for r in got]
        expected_values = [r[0] if isinstance(r, tuple) else r for r in expected]
        assert got_values == pytest.approx(expected_values, abs=1e-5)


def test_low_rank_changes_scores_and_records_ranks(llama_dir, artifact_dir, baseline):
    low = KVCoreHFLM(
        pretrained=str(llama_dir),
        calibration=str(artifact_dir),
        key_rank=4,
        value_rank="8:4",
        batch_size=2,
        device="cpu",
    )
    got = [r[0] for r in run(low, "loglikelihood")]
    expected = [r[0] for r in run(baseline, "loglikelihood")]
    assert all(abs(a - b) > 1e-3 for a, b in zip(got, expected, strict=False))
    info = low.get_model_info()["kvcore"]
    assert info["rank_plan"]["key_rank_per_layer"] == [4, 4] and info["rank_plan"]["value_rank_per_layer"] == [8, 4]
    assert info["cache_bytes_per_token"]["ratio"] < 0.5


def test_bfloat16_evaluation_of_a_float32_calibration(llama_dir, artifact_dir, caplog):
    """Same weights in another dtype pass the weights check; full rank equals hf in bfloat16 too; the rank
    summary goes to lm-eval's logger, which plain `lm_eval` prints."""
    import logging

    with caplog.at_level(logging.INFO, logger="lm_eval"):
        full = KVCoreHFLM(
            pretrained=str(llama_dir),
            calibration=str(artifact_dir),
            key_rank="full",
            value_rank="full",
            dtype="bfloat16",
            batch_size=2,
            device="cpu",
        )
    assert full.model.dtype == torch.bfloat16
    assert any(
        r.name == "lm_eval.models.kvcore_hf" and "cache 100.0% of a full cache" in r.getMessage()
        for r in caplog.records
    )
    plain = HFLM(pretrained=str(llama_dir), dtype="bfloat16", batch_size=2, device="cpu")
    got, expected = run(full, "loglikelihood"), run(plain, "loglikelihood")
    assert [r[0] for r in got] == pytest.approx([r[0] for r in expected], abs=1e-6)
    low = KVCoreHFLM(
        pretrained=str(llama_dir),
        calibration=str(artifact_dir),
        key_rank=4,
        value_rank=4,
        dtype="bfloat16",
        batch_size=2,
        device="cpu",
    )
    assert all(abs(a[0] - b[0]) > 1e-3 for a, b in zip(run(low, "loglikelihood"), expected, strict=False))


def test_other_weights_are_refused(family_dirs, artifact_dir, tmp_path):
    """Same architecture and config, other weights: refused, naming both dtypes."""
    import shutil

    from conftest import build_model, family_configs

    other = tmp_path / "other-llama"
    build_model(family_configs()["llama"], seed=1).save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(family_dirs["llama"] / name, other / name)
    with pytest.raises(ValueError, match=r"calibrated on other weights .*torch.float32"):
        KVCoreHFLM(pretrained=str(other), calibration=str(artifact_dir), key_rank=4, device="cpu")


def test_rank_budget_turns_into_per_layer_ranks(llama_dir, artifact_dir):
    lm = KVCoreHFLM(
        pretrained=str(llama_dir), calibration=str(artifact_dir), rank_budget=0.4, batch_size=1, device="cpu"
    )
    plan, per_token = lm.kvcore_plan, lm.kvcore_cache_bytes  # 2 layers, D = 32; one int32 position a token
    assert 0.39 <= per_token["ratio"] <= 0.4 and per_token["rope_positions"] == 4, "the budget pays for the positions"
    dims = sum(plan.key_rank_per_layer) + sum(plan.value_rank_per_layer)
    assert dims * 4 + per_token["rope_positions"] == per_token["low_rank"] and per_token["rope_tables"] == 0


@pytest.fixture(scope="module")
def example_artifact(tmp_path_factory, calibration_tokens):
    """A calibration of the embedded default model (examples/tiny-llama: 4 layers, D = 32, one int32 rotary position
    a token)."""
    from conftest import EXAMPLE_MODEL
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(EXAMPLE_MODEL, dtype=torch.float32).eval()
    calibration = calibrate_in_memory(model, calibration_tokens)
    calibration.metadata = {
        "model": {**model_identity(model, str(EXAMPLE_MODEL), None), "has_rope": True},
        "dataset": {"spec": "random tokens"},
        "tokens": calibration_tokens.numel(),
        "model_dtype": "float32",
    }
    calibration.weights_sample = weights_sample(model)
    out = tmp_path_factory.mktemp("example-artifact")
    save_calibration(calibration, out)
    return out


@pytest.mark.parametrize(
    "budget,method,bits,within",
    [(0.4, "energy", None, 0.01), (0.4, "ner", None, 0.01), (0.25, "energy", 8, 0.01), (0.4, "uniform", None, 0.07)],
)  # fmt: skip
def test_rank_budget_is_met_in_measured_bytes_including_overheads(budget, method, bits, within, example_artifact):
    """On the embedded model, rank_budget=0.4 with energy gave a cache of 52.3 % before the rotary tables were
    counted. Now the bytes the caches really hold over an evaluation (batch 1: each row keeps its own positions) are
    within 1 % of the budget, below it, with rotary positions and quantization scales included; uniform (one rank for
    all) within one rank step (16 bytes of 256 here). (int8 at full rank is 28 % of the cache here, so an int8 budget
    above that keeps every rank full and stays below it.)"""
    from conftest import EXAMPLE_MODEL

    lm = KVCoreHFLM(
        pretrained=str(EXAMPLE_MODEL),
        calibration=str(example_artifact),
        rank_budget=budget,
        budget_method=method,
        latent_bits=bits,
        batch_size=1,
        device="cpu",
    )
    assert lm.kvcore_measured_bytes() is None
    run(lm, "loglikelihood_rolling")
    measured = lm.get_model_info()["kvcore"]["measured_cache_bytes_per_token"]
    assert measured["parts_per_token"]["rope_positions"] == 4 and measured["parts_per_token"]["rope_tables"] == 0
    assert (measured["parts_per_token"]["scales"] > 0) == (bits is not None)
    assert measured["ratio"] == pytest.approx(lm.kvcore_cache_bytes["ratio"])  # computed = measured at batch 1
    assert budget * (1 - within) <= measured["ratio"] <= budget


def test_budget_below_the_overheads_is_refused(example_artifact):
    from conftest import EXAMPLE_MODEL

    # one dimension of each of 4 layers x 2 kinds (8 x 4 bytes) and one int32 position: 36 of 1024 bytes a token
    with pytest.raises(ValueError, match=r"rank_budget=0.02 cannot be met: .* already costs 3.5% of the full cache"):
        KVCoreHFLM(pretrained=str(EXAMPLE_MODEL), calibration=str(example_artifact), rank_budget=0.02, device="cpu")


def test_quantized_full_cache_is_the_plain_quantized_baseline(llama_dir, artifact_dir, baseline):
    """key_rank=full,value_rank=full,latent_bits=8: no projection, every key and value in int8 with a float16 scale
    per 32 channels: measured 1 + 2/16 bytes per number of head_dim 16 (vs 4 in float32), scores near hf's."""
    lm = KVCoreHFLM(
        pretrained=str(llama_dir),
        calibration=str(artifact_dir),
        key_rank="full",
        value_rank="full",
        latent_bits=8,
        batch_size=2,
        device="cpu",
    )
    got, expected = [r[0] for r in run(lm, "loglikelihood")], [r[0] for r in run(baseline, "loglikelihood")]
    assert got != expected and got == pytest.approx(expected, rel=2e-2)
    measured = lm.get_model_info()["kvcore"]["measured_cache_bytes_per_token"]
    assert measured["ratio"] == pytest.approx((16 + 2) / (16 * 4))
    assert measured["parts_per_token"]["rope_tables"] == 0  # nothing projected pre-RoPE: no tables kept


@pytest.mark.parametrize("basis", ["weights", "random", "sequence"])
def test_data_free_bases_run_without_a_calibration(basis, llama_dir, baseline):
    """basis=weights|random|sequence need no artifact; the results record the basis and the measured bytes; at
    rank 8 of 32 each changes the scores; sequence stores its bases (D·r per layer, kind and sequence)."""
    lm = KVCoreHFLM(pretrained=str(llama_dir), basis=basis, key_rank=8, value_rank=8, batch_size=1, device="cpu")
    got, expected = [r[0] for r in run(lm, "loglikelihood")], [r[0] for r in run(baseline, "loglikelihood")]
    assert all(abs(a - b) > 1e-4 for a, b in zip(got, expected, strict=True))
    info = lm.get_model_info()["kvcore"]
    assert info["truncation"]["basis"] == basis and info["calibration"] is None
    measured = info["measured_cache_bytes_per_token"]
    assert measured["caches"] == 2
    assert (measured["parts_per_token"]["sequence_bases"] > 0) == (basis == "sequence")
    if basis == "sequence":  # two sequences, each with D·r numbers per layer and kind, in float32
        assert measured["parts_per_token"]["sequence_bases"] * measured["positions"] == 2 * (2 * 2 * 32 * 8 * 4)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"key_rank": 64}, ValueError, "outside 1..32"),
        ({"key_rank": 0}, ValueError, "must be positive"),
        ({"key_rank": 1}, ValueError, "ambiguous: write key_rank=full"),
        ({"value_rank": 0.5, "truncate": "keys"}, ValueError, "truncates nothing"),
        ({"key_rank": "8:x"}, ValueError, "not a rank"),
        ({"key_rank": "4:4:4"}, ValueError, "lists 3 ranks"),
        ({"key_rank": 4, "calibration": "/nowhere"}, FileNotFoundError, "kvcore-eval calibrate"),
        ({"key_rnak": 0.5}, ValueError, "unknown option key_rnak=0.5: did you mean key_rank="),
        ({"key_rank": 4, "alow_mismatch": "true"}, ValueError, "did you mean allow_mismatch="),
        ({"key_rank": 4, "allow_mismatch": "perhaps"}, ValueError, "not a boolean"),
        ({"key_rank": 4, "key_space": "rope"}, ValueError, "use pre_rope or post_rope"),
        ({"calibration": None, "key_rank": 4}, ValueError, "kvcore_hf needs calibration="),
        ({}, ValueError, "no truncation asked for"),
        ({"key_rank": 4, "basis": "sequence", "batch_size": 2}, ValueError, "use batch_size=1"),
        ({"basis": "random", "rank_budget": 0.5}, ValueError, "budget_method=uniform"),
        ({"key_rank": 4, "latent_bits": 9}, ValueError, "use 1 to 8 or 16"),
        ({"key_rank": 4, "basis": "spectral"}, ValueError, "use data, weights, random, sequence, rotation or identity"),
    ],
)
def test_bad_input_fails_before_weights_load_and_is_logged_first(
    kwargs, error, message, llama_dir, artifact_dir, monkeypatch, caplog
):
    def no_weights(*args, **kw):
        raise AssertionError("weights loaded before the check")

    monkeypatch.setattr(HFLM, "__init__", no_weights)
    with pytest.raises(error, match=message):
        KVCoreHFLM(pretrained=str(llama_dir), **{"calibration": str(artifact_dir), **kwargs})
    errors = [r for r in caplog.records if r.levelname == "ERROR" and r.name == "lm_eval.models.kvcore_hf"]
    assert len(errors) == 1 and re.search(message, errors[0].getMessage())


def test_artifact_from_another_model_is_refused_unless_allowed(family_dirs, artifact_dir):
    mistral = str(family_dirs["mistral"])
    with pytest.raises(ValueError, match="allow_mismatch=true"):
        KVCoreHFLM(pretrained=mistral, calibration=str(artifact_dir), key_rank=4, device="cpu")
    lm = KVCoreHFLM(pretrained=mistral, calibration=str(artifact_dir), key_rank=4, allow_mismatch=True, device="cpu")
    assert lm.kvcore_plan.key_rank_per_layer == [4, 4]
    with pytest.raises(ValueError, match="KV geometry"):
        KVCoreHFLM(
            pretrained=str(family_dirs["gpt2"]),
            calibration=str(artifact_dir),
            key_rank=4,
            allow_mismatch=True,
            device="cpu",
        )


@pytest.mark.slow
def test_plain_lm_eval_cli_runs_kvcore_hf_verbatim(llama_dir, artifact_dir, tmp_path):
    """`lm_eval --model kvcore_hf ... --tasks kvcore_alpaca`, as a user types it after `pip install .`."""
    command = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "kvcore_hf",
        "--model_args",
        f"pretrained={llama_dir},calibration={artifact_dir},key_rank=0.25",
        "--tasks",
        "kvcore_alpaca",
        "--output_path",
        str(tmp_path / "out"),
        "--device",
        "cpu",
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "KVCORE_DATA_DIR": str(EXAMPLE_DATA)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results_file = next((tmp_path / "out").rglob("results_*.json"))
    results = json.loads(results_file.read_text())
    assert results["results"]["kvcore_alpaca"]["word_perplexity,none"] > 1
    assert results["config"]["kvcore"]["rank_plan"]["key_rank_per_layer"] == [8, 8]
    assert results["n-samples"]["kvcore_alpaca"]["effective"] == 16


def test_interpreter_start_registers_kvcore_hf_lazily():
    """The installed .pth hook: after `import lm_eval.models`, kvcore_hf is a lazy target, nothing heavy imported."""
    code = (
        "import sys; import kvcore_eval_lm_eval; assert 'kvcore_eval' not in sys.modules; "
        "import lm_eval.models; from lm_eval.api.registry import model_registry; "
        "print(model_registry._objs['kvcore_hf'], 'kvcore_eval.harness.wrapper' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["kvcore_eval.harness.wrapper:KVCoreHFLM", "False"]


def test_kvcore_hf_reads_only_the_slices_its_plan_needs(llama_dir, artifact_dir):
    """The bulk of an artifact (every eigenvector of every space) stays on disk; the plan's slices equal a full
    load's."""
    from kvcore_eval.calibration.artifact import load_calibration

    lazy, full = load_calibration(artifact_dir, eigenvectors=False), load_calibration(artifact_dir)
    assert lazy.eigenvectors == {} and lazy.head_eigenvectors == {}
    assert torch.equal(lazy.basis("value", 1, 5, "layer"), full.eigenvectors["value"][1][:, :5])
    assert torch.equal(lazy.basis("key_pre_rope", 0, 3, "head"), full.head_eigenvectors["key_pre_rope"][0][..., :3])
    lm = KVCoreHFLM(pretrained=str(llama_dir), calibration=str(artifact_dir), key_rank=4, value_rank=8, device="cpu")
    assert [tuple(b.key.vectors.shape) for b in lm._bases] == [(32, 4), (32, 4)] and [
        tuple(b.value.vectors.shape) for b in lm._bases
    ] == [(32, 8), (32, 8)]


@pytest.mark.parametrize("dtype,scale", [("float32", 1.003), ("bfloat16", 1.006)])
def test_slightly_scaled_weights_are_refused(dtype, scale, family_dirs, artifact_dir, tmp_path):
    """Exact in the calibration's dtype (float32); across dtypes, only the two dtypes' rounding is forgiven."""
    import shutil

    from transformers import AutoModelForCausalLM

    scaled = tmp_path / "scaled-llama"
    model = AutoModelForCausalLM.from_pretrained(family_dirs["llama"], dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(scale)
    model.save_pretrained(scaled)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(family_dirs["llama"] / name, scaled / name)
    with pytest.raises(ValueError, match="calibrated on other weights"):
        KVCoreHFLM(pretrained=str(scaled), calibration=str(artifact_dir), key_rank=4, dtype=dtype, device="cpu")


def test_metadata_that_disagrees_with_the_basis_shapes_is_refused(artifact_dir, tmp_path):
    import shutil

    from kvcore_eval.calibration.artifact import load_calibration

    edited = tmp_path / "edited"
    shutil.copytree(artifact_dir, edited)
    metadata = json.loads((edited / "kvcore.json").read_text())
    metadata["model"]["geometry"]["num_layers"] = 1
    (edited / "kvcore.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=r"kvcore.json says .*num_layers.: 1.*token_count \(2,\) \(expected \(1,\)\)"):
        load_calibration(edited, eigenvectors=False)


def test_results_name_the_artifact_fully(llama_dir, artifact_dir):
    lm = KVCoreHFLM(pretrained=str(llama_dir), calibration=str(artifact_dir), key_rank=4, device="cpu")
    info = lm.get_model_info()["kvcore"]
    metadata = json.loads((artifact_dir / "kvcore.json").read_text())
    assert info["artifact"]["basis_sha256"] == metadata["basis_sha256"]
    assert info["artifact"]["model_id"] == str(llama_dir) and info["artifact"]["dataset"] == {"spec": "random tokens"}
    assert info["artifact"]["tokens"] == metadata["tokens"]
    assert info["rank_plan"]["key_space"] == "pre_rope" and info["rank_plan"]["key_rank_per_layer"] == [4, 4]
    assert info["cache_bytes_per_token"]["low_rank"] < info["cache_bytes_per_token"]["full"]


def test_each_layers_bases_go_to_the_device_of_its_key_projection(family_dirs, llama_dir):
    """A model loaded with a device_map goes through the per-layer placement: each layer's bases live on the device
    its key projection's weight holds, read from the model whenever a plan is applied (not assumed from lm.device).
    A second device is stood in for by `meta`: moving layer 1's k_proj there moves its bases there at the next plan.
    On a GPU machine tests/test_gpu.py splits the layers between cuda and cpu and checks the same, with scores."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvcore_eval.model.models import layer_devices
    from kvcore_eval.model.rope import attention_modules

    cpu, meta = torch.device("cpu"), torch.device("meta")
    for family, path in family_dirs.items():  # own k_proj, fused qkv_proj / query_key_value / c_attn: all found
        model = AutoModelForCausalLM.from_pretrained(path)
        assert layer_devices(model) == [cpu] * len(attention_modules(model)) == [cpu] * 2, family
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32, device_map={"": "cpu"}).eval()
    lm = KVCoreHFLM(
        pretrained=model,
        tokenizer=AutoTokenizer.from_pretrained(llama_dir),
        basis="random",
        key_rank=8,
        value_rank=8,
        batch_size=1,
    )
    assert [(layer.bases.key.vectors.device, layer.bases.value.vectors.device) for layer in lm.new_cache().layers] == [
        (cpu, cpu)
    ] * 2
    lm.model.model.layers[1].self_attn.k_proj.to("meta")
    assert layer_devices(lm.model) == [cpu, meta]
    lm.set_truncation(lm.kvcore_config)
    placed = [(layer.bases.key.vectors.device, layer.bases.value.vectors.device) for layer in lm.new_cache().layers]
    assert placed == [(cpu, cpu), (meta, meta)]


@pytest.mark.parametrize(
    "basis,options", [("random", {"key_rank": 8, "value_rank": 8}), ("rotation", {"latent_bits": 4})]
)
def test_seeded_bases_are_built_once_per_seed(basis, options, llama_dir, monkeypatch):
    """set_truncation (each frontier probe, each sweep point) with the same basis and seed reuses the bases built
    for the first; another seed builds its own; the scores are those of a model loaded with that seed."""
    from dataclasses import replace

    from kvcore_eval.compression import bases

    builds = []
    build = getattr(bases, f"{basis}_bases")
    monkeypatch.setattr(bases, f"{basis}_bases", lambda geometry, seed: builds.append(seed) or build(geometry, seed))
    lm = KVCoreHFLM(pretrained=str(llama_dir), basis=basis, batch_size=2, device="cpu", **options)
    first = run(lm, "loglikelihood")
    for _ in range(3):
        lm.set_truncation(replace(lm.kvcore_config))
    assert builds == [0] and run(lm, "loglikelihood") == first
    lm.set_truncation(replace(lm.kvcore_config, basis_seed=1))
    lm.set_truncation(replace(lm.kvcore_config, basis_seed=0))
    assert builds == [0, 1] and run(lm, "loglikelihood") == first
    lm.set_truncation(replace(lm.kvcore_config, basis_seed=1))
    fresh = KVCoreHFLM(pretrained=str(llama_dir), basis=basis, basis_seed=1, batch_size=2, device="cpu", **options)
    assert run(lm, "loglikelihood") == run(fresh, "loglikelihood")
