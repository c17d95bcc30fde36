"""compare.py: two lm-eval results files metric by metric. (Files of another kind: test_evaluate.py.)"""

from __future__ import annotations

import json
import math

import pytest

from kvcore_eval.analysis.compare import compare, load_results, to_markdown


def results(path, tasks: dict[str, dict]) -> str:
    path.write_text(json.dumps({"results": tasks, "config": {"model": "hf"}}))
    return str(path)


def test_rows_pair_each_numeric_metric_and_skip_the_rest(tmp_path):
    a = results(
        tmp_path / "a.json",
        {
            "t": {
                "alias": "t",
                "word_perplexity,none": 20.0,
                "word_perplexity_stderr,none": 0.5,
                "byte_perplexity,none": 2.0,
                "only_in_a,none": 1.0,
                "zero,none": 0,
            }
        },
    )
    b = results(
        tmp_path / "b.json",
        {"t": {"alias": "t", "word_perplexity,none": 15.0, "byte_perplexity,none": 2.5, "zero,none": 3}},
    )
    rows = compare(a, b)
    assert [r["metric"] for r in rows] == ["byte_perplexity", "word_perplexity", "zero"], "sorted, filter suffix cut"
    byte, word, zero = rows
    assert (byte["a"], byte["b"], byte["delta"], byte["relative"]) == (2.0, 2.5, 0.5, 0.25)
    assert word["delta"] == -5.0 and word["relative"] == -0.25
    assert zero["delta"] == 3 and math.isnan(zero["relative"]), "no relative change from 0, never a made-up one"


def test_markdown_has_a_row_per_metric_with_signed_changes(tmp_path):
    a = results(tmp_path / "a.json", {"t": {"acc,none": 0.5}, "u": {"acc,none": 0.8}})
    b = results(tmp_path / "b.json", {"t": {"acc,none": 0.4}, "u": {"acc,none": 0.9}})
    text = to_markdown(compare(a, b), "full", "rank 0.5")
    lines = text.splitlines()
    assert lines[0] == "| task | metric | full | rank 0.5 | delta | relative |" and len(lines) == 4
    assert "| t | acc | 0.5000 | 0.4000 | -0.1000 | -20.00% |" in lines
    assert "| u | acc | 0.8000 | 0.9000 | +0.1000 | +12.50% |" in lines


def test_missing_or_other_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="results file .*none.json does not exist"):
        load_results(tmp_path / "none.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="is not an lm-eval results file"):
        load_results(tmp_path / "list.json")
    a = results(tmp_path / "a.json", {"t": {"acc,none": 0.5}})
    b = results(tmp_path / "b.json", {"u": {"acc,none": 0.5}})
    with pytest.raises(ValueError, match=r"cover different tasks \(\['t'\] vs \['u'\]\)"):
        compare(a, b)


def test_columns_are_labelled_by_model_and_plan_not_file_names(tmp_path):
    from kvcore_eval.analysis.compare import labels

    full = {"model": "hf", "model_args": "pretrained=runs/smol,gguf_file=SmolLM2.gguf,dtype=float32"}
    truncated = {
        "model": "kvcore_hf",
        "model_args": {"pretrained": "runs/smol", "gguf_file": "SmolLM2.gguf"},
        "kvcore": {
            "truncation": {"basis": "data", "key_rank": "0.25", "value_rank": "0.25", "truncate": "both"},
            "cache_bytes_per_token": {"ratio": 0.261},
        },
    }
    a, b = tmp_path / "results_1.json", tmp_path / "results_2.json"
    a.write_text(json.dumps({"results": {"t": {"acc,none": 0.5}}, "config": full}))
    b.write_text(json.dumps({"results": {"t": {"acc,none": 0.4}}, "config": truncated}))
    assert labels(a, b) == (
        "SmolLM2.gguf · hf (full cache)",
        "SmolLM2.gguf · kvcore_hf key_rank=0.25 value_rank=0.25, 26.1 % cache",
    )
    same = labels(a, a)
    assert same[0].endswith("(results_1.json)") and same[0] == same[1], "the same run twice: file names tell them apart"


def test_a_folder_is_named_as_a_folder_with_the_results_file_in_it(tmp_path, caplog):
    """`compare a.json out` where out is lm-eval's --output_path folder: it says so, and names the file inside."""
    from kvcore_eval.cli import main

    a = results(tmp_path / "a.json", {"t": {"byte_perplexity,none": 2.0}})
    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    with pytest.raises(ValueError, match=f"^{out} is a folder, not a results file: pass the results_\\*.json"):
        load_results(out)
    results(out / "model" / "results_2026-12-07.json", {"t": {"byte_perplexity,none": 3.0}})
    with pytest.raises(SystemExit) as exit_info, caplog.at_level("ERROR"):
        main(["compare", a, str(out)])
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert exit_info.value.code == 2 and "does not exist" not in error
    assert (
        error
        == f"{out} is a folder, not a results file: pass the results_*.json lm-eval wrote (in it: "
        + str(out / "model" / "results_2026-12-07.json")
        + ")"
    )
