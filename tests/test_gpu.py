"""The device paths: calibration, the low-rank cache, latent attention, `kvcore_hf` through lm-eval and a model
split by `device_map`, each compared with a CPU reference computed another way (batch size 1, the reconstruction
path), so that the same assertions hold on every device.

Every test runs on `cpu` here and on `cuda` where a CUDA device is present; the cuda cases are marked `gpu`
(`pytest -m gpu` runs only them: benchmarks/gpu_check.sh) and are skipped without CUDA. Float32 throughout (TF32
matmuls are off, torch's default), so device and CPU agree to float round-off.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import EXAMPLE_DATA, calibrate_in_memory

from kvcore_eval.calibration.artifact import load_calibration
from kvcore_eval.calibration.calibrate import calibrate
from kvcore_eval.compression import latent
from kvcore_eval.compression.cache import LowRankCache, layer_bases
from kvcore_eval.compression.rank_plan import RankPlan
from kvcore_eval.config import CalibrationConfig
from kvcore_eval.model.rope import RopeTap

CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]),
]
EIGENVALUE_TOLERANCE = 1e-6  # |λ_device − λ_cpu| / λ_max, per layer and space
LOGIT_TOLERANCE = 1e-5  # ‖logits_device − logits_cpu‖ / ‖logits_cpu‖
DOCUMENTS = 12  # kvcore_alpaca documents scored through lm-eval: more than one batch of 8


def calibration_config(model_dir, out, device: str, batch_size: int) -> CalibrationConfig:
    return CalibrationConfig(
        model=str(model_dir),
        dataset=str(EXAMPLE_DATA / "alpaca.jsonl"),
        out=str(out),
        prompt_format="alpaca",
        max_tokens=2000,
        seq_len=64,
        batch_size=batch_size,
        device=device,
        dtype="float32",
    )


@pytest.fixture(scope="module")
def cpu_artifact(llama_dir, tmp_path_factory):
    """The reference calibration: CPU, one sequence per forward (no padding, no batching)."""
    return calibrate(calibration_config(llama_dir, tmp_path_factory.mktemp("cpu") / "run", "cpu", batch_size=1))


@pytest.mark.parametrize("device", DEVICES)
def test_calibration_on_device_equals_cpu(device, llama_dir, cpu_artifact, tmp_path):
    """Calibrated on `device` four sequences per forward, the eigenvalues of every Gram equal the CPU's to 1e-6 of
    the largest, over the same token count."""
    run = calibrate(calibration_config(llama_dir, tmp_path / "run", device, batch_size=4))
    here, reference = load_calibration(run), load_calibration(cpu_artifact)
    assert torch.equal(here.token_count, reference.token_count)
    for space, expected in reference.eigenvalues.items():
        got = here.eigenvalues[space]  # (layers, D), float64
        error = ((got - expected).abs().amax(-1) / expected[:, 0]).max().item()
        assert error < EIGENVALUE_TOLERANCE, f"{space}: relative eigenvalue error {error:.1e}"


@pytest.fixture(scope="module")
def llama_setup(family_models, calibration_tokens):
    latent.register()
    model = family_models["llama"]
    return model, calibrate_in_memory(model, calibration_tokens)


def forward_logits(model, cache, input_ids: torch.Tensor, implementation: str, prefill: int) -> torch.Tensor:
    """Logits of a prefill of `prefill` tokens, then of each remaining token fed one at a time through the cache
    (teacher-forced decode): (batch, seq, vocab), float32 on the CPU."""
    original = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    steps = [input_ids[:, :prefill]] + list(input_ids[:, prefill:].split(1, dim=1))
    try:
        with torch.no_grad(), latent.active(cache):
            return torch.cat([model(input_ids=step, cache=cache, use_cache=True).logits.cpu() for step in steps], 1)
    finally:
        model.set_attn_implementation(original)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
def test_low_rank_cache_and_latent_attention_on_device_equal_cpu(device, key_space, llama_setup, token_batch):
    """Prefill then decode with the rank-r cache on `device`, attending over the reconstruction and over the
    latents: both equal the CPU reconstruction's logits, and the cache's latents live on `device`."""
    cpu_model, calibration = llama_setup
    geometry = calibration.geometry
    rank = [geometry.width // 4] * geometry.num_layers
    plan = RankPlan(rank, [geometry.width // 2] * geometry.num_layers, geometry.width, "layer", key_space)

    def logits(model, where: str, is_latent: bool) -> torch.Tensor:
        tap = RopeTap(model) if key_space == "pre_rope" else None
        cache = LowRankCache(layer_bases(calibration, plan, where), geometry.kv_heads, tap, latent=is_latent)
        implementation = latent.NAME if is_latent else "sdpa"
        result = forward_logits(model, cache, token_batch.to(where), implementation, prefill=16)
        assert all(layer.keys.device.type == torch.device(where).type for layer in cache.layers)
        if tap is not None:
            tap.remove()
        return result

    reference = logits(cpu_model, "cpu", is_latent=False)
    model = copy.deepcopy(cpu_model).to(device)
    for is_latent in (False, True):
        got = logits(model, device, is_latent)
        error = ((got - reference).norm() / reference.norm()).item()
        assert error < LOGIT_TOLERANCE, f"latent={is_latent}: logits differ from the CPU's by {error:.1e}"


@pytest.fixture(scope="module")
def cpu_perplexity(llama_dir, cpu_artifact):
    """kvcore_alpaca's word perplexity through lm-eval on the CPU, batch size 1, attending over the reconstruction."""
    return evaluate(llama_dir, cpu_artifact, "cpu", "reconstruct", batch_size=1)


def evaluate(model_dir, artifact, device: str, attention: str, batch_size: int) -> float:
    import lm_eval

    import kvcore_eval.harness.wrapper  # noqa: F401  (registers kvcore_hf)
    from kvcore_eval.harness.lm_tasks import task_manager

    results = lm_eval.simple_evaluate(
        model="kvcore_hf",
        model_args=f"pretrained={model_dir},calibration={artifact},key_rank=0.25,value_rank=0.5,"
        f"key_space=post_rope,attention={attention}",
        tasks=["kvcore_alpaca"],
        limit=DOCUMENTS,
        device=device,
        batch_size=batch_size,
        task_manager=task_manager(str(EXAMPLE_DATA)),
    )
    return results["results"]["kvcore_alpaca"]["word_perplexity,none"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("attention", ["reconstruct", "latent"])
def test_kvcore_hf_through_lm_eval_on_device_in_batches_of_8(
    device, attention, llama_dir, cpu_artifact, cpu_perplexity
):
    """`kvcore_hf` with batch size 8 on `device` scores what it scores on the CPU one document at a time."""
    perplexity = evaluate(llama_dir, cpu_artifact, device, attention, batch_size=8)
    assert perplexity == pytest.approx(cpu_perplexity, rel=1e-5)


def split_device_map(num_layers: int, device: str) -> dict[str, str]:
    """The first half of the layers (and the embeddings) on `device`, the rest (and the head) on the CPU."""
    half = num_layers // 2
    layers = {f"model.layers.{i}": device if i < half else "cpu" for i in range(num_layers)}
    return {"model.embed_tokens": device, "model.rotary_emb": device, **layers, "model.norm": "cpu", "lm_head": "cpu"}


@pytest.mark.parametrize("device", DEVICES)
def test_device_map_split_between_device_and_cpu(device, llama_dir, cpu_artifact, cpu_perplexity):
    """A model whose layers are split by `device_map` between `device` and the CPU: each layer's bases live on
    its layer's device, and the scores equal the single-device CPU run's."""
    import lm_eval
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvcore_eval.harness.lm_tasks import task_manager
    from kvcore_eval.harness.wrapper import KVCoreHFLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    device_map = split_device_map(model.config.num_hidden_layers, device)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32, device_map=device_map).eval()
    lm = KVCoreHFLM(
        pretrained=model,
        tokenizer=AutoTokenizer.from_pretrained(llama_dir),
        calibration=str(cpu_artifact),
        key_rank=0.25,
        value_rank=0.5,
        key_space="post_rope",
        batch_size=8,
    )
    cache = lm.new_cache()
    for index, layer in enumerate(cache.layers):
        expected = torch.device(device_map[f"model.layers.{index}"]).type
        assert layer.bases.key.vectors.device.type == expected, (
            f"layer {index}: key basis on {layer.bases.key.vectors.device}"
        )
        assert layer.bases.value.vectors.device.type == expected, (
            f"layer {index}: value basis on {layer.bases.value.vectors.device}"
        )
    results = lm_eval.simple_evaluate(
        model=lm, tasks=["kvcore_alpaca"], limit=DOCUMENTS, task_manager=task_manager(str(EXAMPLE_DATA))
    )
    assert results["results"]["kvcore_alpaca"]["word_perplexity,none"] == pytest.approx(cpu_perplexity, rel=1e-5)
