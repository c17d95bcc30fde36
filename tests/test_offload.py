"""Models bigger than one device: a model whose second half of layers accelerate offloads to disk (device_map from
`max_memory`, the weights loaded by accelerate's hooks at each forward, meta tensors in the model meanwhile) calibrates
to the Grams of the model held in memory, and kvcore_hf scores what it scores on the whole model."""

from __future__ import annotations

import pytest
import torch
from conftest import EXAMPLE_DATA

from kvcore_eval.calibration.artifact import load_calibration
from kvcore_eval.calibration.calibrate import calibrate
from kvcore_eval.config import CalibrationConfig
from kvcore_eval.harness.wrapper import KVCoreHFLM
from kvcore_eval.model.models import weights_sample


@pytest.fixture(scope="module")
def models(llama_dir, tmp_path_factory):
    """(in memory, half on disk, tokenizer)."""
    from accelerate import infer_auto_device_map
    from transformers import AutoModelForCausalLM, AutoTokenizer

    whole = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    layer = sum(p.numel() * p.element_size() for p in whole.model.layers[0].parameters())
    embeddings = whole.model.embed_tokens.weight.numel() * 4
    # room for the embeddings, the first layer and accelerate's reserve of one more: the rest goes to disk
    budget = {"cpu": embeddings + 2 * layer, "disk": 10**9}
    device_map = infer_auto_device_map(whole, max_memory=budget, no_split_module_classes=whole._no_split_modules)
    assert device_map["model.layers.0"] == "cpu" and device_map["model.layers.1"] == "disk", device_map
    offloaded = AutoModelForCausalLM.from_pretrained(
        llama_dir, dtype=torch.float32, device_map=device_map, offload_folder=str(tmp_path_factory.mktemp("offload"))
    ).eval()
    assert offloaded.model.layers[1].self_attn.k_proj.weight.device.type == "meta"
    return whole, offloaded, AutoTokenizer.from_pretrained(llama_dir)


def test_weights_of_an_offloaded_model_are_read_from_its_offload(models):
    whole, offloaded, _ = models
    assert torch.equal(weights_sample(offloaded), weights_sample(whole))


@pytest.fixture(scope="module")
def artifacts(models, llama_dir, tmp_path_factory):
    whole, offloaded, tokenizer = models
    out = tmp_path_factory.mktemp("calibrations")

    def run(model, name):
        config = CalibrationConfig(
            model=str(llama_dir),
            dataset=str(EXAMPLE_DATA / "alpaca.jsonl"),
            prompt_format="alpaca",
            out=str(out / name),
            max_tokens=1500,
            seq_len=64,
            batch_size=3,
            device="cpu",
        )
        return calibrate(config, model=model, tokenizer=tokenizer)

    return run(whole, "whole"), run(offloaded, "offloaded")


def test_an_offloaded_model_calibrates_to_the_same_grams(artifacts):
    """The Gram recorder sees the keys and values of the disk-offloaded layers (real tensors, computed by the hooked
    forward): every eigenvalue and eigenvector equals the in-memory model's."""
    whole, offloaded = (load_calibration(path) for path in artifacts)
    assert torch.equal(offloaded.token_count, whole.token_count)
    assert offloaded.metadata["model"]["weights_fingerprint"] == whole.metadata["model"]["weights_fingerprint"]
    for space, values in whole.eigenvalues.items():
        assert torch.allclose(offloaded.eigenvalues[space], values, rtol=1e-12, atol=1e-12 * values.max().item())
        assert values[:, -1].abs().max() < values.max(), "non-trivial spectra"
        assert torch.allclose(offloaded.eigenvectors[space].abs(), whole.eigenvectors[space].abs(), atol=1e-9)


@pytest.mark.parametrize(
    "options",
    [
        dict(key_rank=0.25, value_rank=0.5),
        dict(key_rank=0.25, value_rank=0.5, key_space="post_rope", attention="latent", latent_bits=8),
    ],
    ids=["reconstruct pre-rope", "latent int8"],
)
def test_kvcore_hf_on_an_offloaded_model_scores_what_it_scores_in_memory(options, models, artifacts):
    from test_wrapper import requests

    whole, offloaded, tokenizer = models
    scores = {}
    for name, model in (("whole", whole), ("offloaded", offloaded)):
        lm = KVCoreHFLM(pretrained=model, tokenizer=tokenizer, calibration=str(artifacts[0]), batch_size=2, **options)
        scores[name] = [r[0] for r in lm.loglikelihood(requests("loglikelihood"))]
        rolling = lm.loglikelihood_rolling(requests("loglikelihood_rolling"))
        scores[name] += [r[0] if isinstance(r, tuple) else r for r in rolling]
    assert scores["offloaded"] == pytest.approx(scores["whole"], rel=1e-6, abs=1e-5)
