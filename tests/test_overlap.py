"""Calibration/evaluation overlap: recorded by calibrate, measured by kvcore_hf, refused by eval and sweep."""

import json
import logging

import pytest
from conftest import EXAMPLE_DATA, EXAMPLE_MODEL

from kvcore_eval.calibration.artifact import load_calibration
from kvcore_eval.calibration.calibrate import calibrate
from kvcore_eval.calibration.overlap import digest, normalize
from kvcore_eval.config import CalibrationConfig, EvalConfig, SweepConfig, TruncationConfig
from kvcore_eval.experiments.evaluate import run_lm_eval

SCORED = 4  # documents each evaluation here scores (--limit)


def test_normalization_ignores_unicode_form_and_whitespace_only():
    composed, decomposed = "caf\u00e9  au\tlait\n", " cafe\u0301 au lait"
    assert normalize(composed) == normalize(decomposed) == "caf\u00e9 au lait"
    assert digest(composed) == digest(decomposed) != digest("cafe au lait")
    assert digest(" \n\t") == 0, "an empty text never matches"


def _calibrate(out, dataset, **extra):
    return calibrate(
        CalibrationConfig(
            model=str(EXAMPLE_MODEL),
            dataset=dataset,
            data_dir=str(EXAMPLE_DATA),
            out=str(out),
            max_tokens=100_000,
            seq_len=64,
            device="cpu",
            **extra,
        )
    )


@pytest.fixture(scope="module")
def in_sample(tmp_path_factory):
    """Every document of kvcore_alpaca's data: the README's old, in-sample recipe."""
    return _calibrate(tmp_path_factory.mktemp("overlap") / "in", "kvcore:alpaca")


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """The task's documents after the SCORED ones an evaluation with --limit SCORED scores."""
    return _calibrate(tmp_path_factory.mktemp("overlap") / "out", "lm_eval:kvcore_alpaca", skip_docs=SCORED)


def test_the_artifact_records_a_digest_of_every_calibrated_document(in_sample, held_out):
    from kvcore_eval.calibration.data import iter_documents

    documents = list(iter_documents("kvcore:alpaca", data_dir=str(EXAMPLE_DATA)))
    calibration = load_calibration(in_sample, eigenvectors=False)
    assert calibration.document_digests.tolist() == [[digest(p + r), digest(p)] for p, r in documents]
    assert calibration.metadata["documents"]["count"] == len(documents) == 16
    assert load_calibration(held_out).metadata["documents"]["count"] == 16 - SCORED


def _evaluate(artifact, **extra):
    config = EvalConfig(
        model=str(EXAMPLE_MODEL),
        tasks="kvcore_alpaca",
        truncation=TruncationConfig(calibration=str(artifact), key_rank="0.5", value_rank="0.5"),
        data_dir=str(EXAMPLE_DATA),
        limit=SCORED,
        **extra,
    )
    return run_lm_eval(config)["config"]["kvcore"]["calibration_overlap"]["kvcore_alpaca"]


def test_eval_refuses_an_in_sample_calibration_before_scoring(in_sample):
    with pytest.raises(ValueError, match=r"4 of the 4 documents of kvcore_alpaca.*--skip-docs.*--allow-overlap"):
        _evaluate(in_sample)


@pytest.mark.slow
def test_overlap_is_recorded_in_the_results_and_warned_loudly(in_sample, held_out, caplog):
    with caplog.at_level(logging.WARNING):
        assert _evaluate(in_sample, allow_overlap=True) == {"scored": 4, "seen": 4, "fraction": 1.0}
    assert any("in-sample" in r.getMessage() and "!!!!" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert _evaluate(held_out) == {"scored": 4, "seen": 0, "fraction": 0.0}
    assert not any("in-sample" in r.getMessage() for r in caplog.records)


def test_one_scored_document_in_the_calibration_is_counted(held_out, tmp_path):
    """A calibration file holding one scored document (reformatted whitespace) and unrelated text: 1 of 4 seen."""
    from kvcore_eval.calibration.data import iter_documents

    scored = list(iter_documents("lm_eval:kvcore_alpaca", data_dir=str(EXAMPLE_DATA)))[:SCORED]
    prompt, response = scored[2]
    lines = [{"text": "  ".join((prompt + response).split(" "))}, {"text": "Unrelated notes about rivers. " * 40}]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    artifact = _calibrate(tmp_path / "mixed", str(tmp_path / "mixed.jsonl"))
    assert _evaluate(artifact, allow_overlap=True) == {"scored": 4, "seen": 1, "fraction": 0.25}


def test_sweep_refuses_a_shared_basis_that_saw_the_scored_documents_before_loading(in_sample, tmp_path, monkeypatch):
    from kvcore_eval.experiments.sweep import run_sweep
    from kvcore_eval.model import models

    loads = []
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: loads.append(a))
    config = SweepConfig(
        model=str(EXAMPLE_MODEL),
        out=str(tmp_path / "sweep"),
        tasks="kvcore_alpaca",
        basis_scope="shared",
        truncation=TruncationConfig(calibration=str(in_sample)),
        data_dir=str(EXAMPLE_DATA),
        num_samples=SCORED,
    )
    with pytest.raises(ValueError, match="saw 4 of the 4 documents of kvcore_alpaca.*--allow-overlap"):
        run_sweep(config)
    assert loads == [] and not (tmp_path / "sweep").exists()
