import json

import pytest
from conftest import EXAMPLE_DATA, EXAMPLE_MODEL

from kvcore_eval.analysis.table import dataset_label, write_table
from kvcore_eval.config import TableConfig


@pytest.fixture(scope="module")
def three_sources(tmp_path_factory):
    """Three calibrations of the embedded default, on three data sources, made alike."""
    from kvcore_eval.calibration.calibrate import calibrate
    from kvcore_eval.config import CalibrationConfig

    root = tmp_path_factory.mktemp("table")
    return [
        calibrate(
            CalibrationConfig(
                model=str(EXAMPLE_MODEL),
                dataset=f"kvcore:{source}",
                data_dir=str(EXAMPLE_DATA),
                out=str(root / source.replace(":", "-")),
                max_tokens=256,
                seq_len=64,
                device="cpu",
            )
        )
        for source in ("alpaca", "codealpaca", "visr:de")
    ]


def test_table_of_three_calibrations_writes_markdown_json_and_heatmap(three_sources, tmp_path):
    from kvcore_eval.analysis.report import layer_table, mean_ner
    from kvcore_eval.calibration.artifact import load_calibration

    paths = write_table(TableConfig(runs=[str(r) for r in three_sources], out=str(tmp_path / "table")))
    table = json.loads(paths["json"].read_text())
    assert table["models"] == ["tiny-llama"] and table["datasets"] == ["alpaca", "codealpaca", "visr:de"]
    expected = mean_ner(layer_table(load_calibration(three_sources[0])), "key_pre_rope")
    assert table["cells"]["tiny-llama"]["alpaca"]["key"] == pytest.approx(expected)
    markdown = paths["markdown"].read_text()
    assert "| visr:de | " in markdown and f"{expected:.3f} / " in markdown
    assert paths["heatmap tiny-llama"].read_bytes()[:4] == b"\x89PNG"
    write_table(
        TableConfig(runs=[str(r) for r in three_sources], out=str(tmp_path / "table"))
    )  # a rerun rewrites its own folder


def test_calibrations_made_differently_are_refused_or_listed(three_sources, tmp_path):
    from kvcore_eval.calibration.calibrate import calibrate
    from kvcore_eval.config import CalibrationConfig

    longer = calibrate(
        CalibrationConfig(
            model=str(EXAMPLE_MODEL),
            dataset="kvcore:medalpaca",
            data_dir=str(EXAMPLE_DATA),
            out=str(tmp_path / "medalpaca"),
            max_tokens=384,
            seq_len=64,
            device="cpu",
        )
    )
    runs = [str(r) for r in three_sources] + [str(longer)]
    with pytest.raises(ValueError, match="calibrations differ in tokens .*--allow-mixed"):
        write_table(TableConfig(runs=runs, out=str(tmp_path / "mixed")))
    assert not (tmp_path / "mixed").exists(), "refused before writing"
    paths = write_table(TableConfig(runs=runs, out=str(tmp_path / "mixed"), allow_mixed=True))
    assert "Mixed calibrations" in paths["markdown"].read_text() and "medalpaca: 384" in paths["markdown"].read_text()


def test_dataset_labels():
    assert dataset_label("kvcore:alpaca") == "alpaca" and dataset_label("kvcore:visr:de") == "visr:de"
    assert dataset_label("lm_eval:my_task") == "my_task" and dataset_label("/data/notes.jsonl") == "notes"
