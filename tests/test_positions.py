import numpy as np
import pytest
from conftest import EXAMPLE_DATA, EXAMPLE_MODEL

from kvcore_eval.analysis import positions

TEXT = (EXAMPLE_DATA / "alpaca.jsonl").read_text()[:1500]  # byte-level tokenizer: ~1500 tokens


def test_edges_default_to_powers_of_two_below_the_max_length_and_refuse_nonsense():
    assert positions.parse_edges(None, 3000) == [0, 256, 512, 1024, 2048, 3000]
    assert positions.parse_edges("512,100", 1024) == [0, 100, 512, 1024]
    assert positions.bucket_names([0, 100, 512, 1024]) == ["0-100", "100-512", "512-1024"]
    for bad in ("a,b", "0,5", "-3"):
        with pytest.raises(ValueError, match="--position-buckets"):
            positions.parse_edges(bad, 1024)


def test_buckets_that_collapse_at_the_context_are_said_before_the_model_loads(tmp_path, monkeypatch, caplog):
    """`--position-buckets 5000,9000` on a 1024-token model silently became one bucket 0-1024: refused, naming the
    context; edges of which only some are past it are named in a warning."""
    import logging

    from kvcore_eval.config import SweepConfig
    from kvcore_eval.experiments.sweep import run_sweep
    from kvcore_eval.model import models

    with pytest.raises(ValueError, match="5000,9000: every edge is at or past the model's context of 1024 tokens"):
        positions.check_edges("5000,9000", 1024)
    with caplog.at_level(logging.WARNING):
        assert positions.check_edges("256,2048", 1024) == [0, 256, 1024]
    assert "2048 at or past the model's context of 1024 tokens, dropped: the buckets are 0-256, 256-1024" in caplog.text
    loads = []
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: loads.append(a))
    out = tmp_path / "sweep"
    config = SweepConfig(
        model=str(EXAMPLE_MODEL),
        out=str(out),
        tasks="kvcore_longtext",
        data_dir=str(EXAMPLE_DATA),
        num_samples=2,
        metadata='{"doc_words": 300}',
        position_buckets="5000,9000",
    )
    with pytest.raises(ValueError, match="the buckets collapse into one, 0-1024: give edges below 1024"):
        run_sweep(config)
    assert loads == [] and not out.exists()


def test_windows_are_lm_evals_and_positions_are_indices_in_the_window():
    tokens = list(range(10, 40))  # 30 tokens, windows of 8
    windows = positions.rolling_windows(tokens, prefix_token=1, max_length=8)
    assert [len(inputs) for inputs, _ in windows] == [8, 8, 8, 8]
    assert windows[0] == ([1, *tokens[:7]], tokens[:8])
    assert sum(len(c) for _, c in windows) == 30 and [t for _, c in windows for t in c] == tokens
    inputs, last = windows[-1]  # the short last window reads a full window of the tokens before it
    assert len(last) == 6 and inputs == tokens[21:29]


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    """hf and kvcore_hf (keys and values at rank 8 of 32) on the example model, both with windows of 128 tokens."""
    from lm_eval.models.huggingface import HFLM

    from kvcore_eval.calibration.calibrate import calibrate
    from kvcore_eval.config import CalibrationConfig
    from kvcore_eval.harness.wrapper import KVCoreHFLM

    artifact = calibrate(
        CalibrationConfig(
            model=str(EXAMPLE_MODEL),
            dataset="kvcore:alpaca",
            data_dir=str(EXAMPLE_DATA),
            out=str(tmp_path_factory.mktemp("positions") / "artifact"),
            max_tokens=2000,
            seq_len=128,
            device="cpu",
        )
    )
    hf = HFLM(pretrained=str(EXAMPLE_MODEL), device="cpu", batch_size=1, max_length=128)
    kv = KVCoreHFLM(
        pretrained=str(EXAMPLE_MODEL),
        device="cpu",
        batch_size=1,
        max_length=128,
        calibration=str(artifact),
        key_rank=8,
        value_rank=8,
    )
    return hf, kv


def test_buckets_sum_back_to_lm_evals_rolling_loglikelihood(lms):
    from lm_eval.api.instance import Instance

    for lm in lms:
        scores = positions.score_text(lm, TEXT)
        assert scores.position.min() == 0 and scores.position.max() == 127
        buckets = positions.bucket_sums(scores, positions.parse_edges("16,64", 128))
        assert sum(b["tokens"] for b in buckets.values()) == len(lm.tok_encode(TEXT))
        (whole,) = lm.loglikelihood_rolling(
            [Instance("loglikelihood_rolling", doc={}, arguments=(TEXT,), idx=0)], disable_tqdm=True
        )
        assert sum(b["loglikelihood"] for b in buckets.values()) == pytest.approx(whole, rel=1e-5)
    truncated = positions.score_documents(lms[1], [TEXT], [0, 16, 64, 128])
    full = positions.score_documents(lms[0], [TEXT], [0, 16, 64, 128])
    damage = positions.nd_ppl_by_bucket(truncated, full)
    assert set(damage) == {"0-16", "16-64", "64-128"} and all(np.isfinite(list(damage.values())))
    assert any(v != 0 for v in damage.values()), "rank 8 of 32 changes the scores"
