"""The command line is generated from the configuration dataclasses: every option offered, once."""

from __future__ import annotations

import dataclasses

import pytest

from kvcore_eval.cli import build_parser, config_from_args
from kvcore_eval.config import PER_POINT, EvalConfig, SweepConfig, TruncationConfig


def _flags(command: str) -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {option for action in sub._actions for option in action.option_strings}


def test_eval_offers_every_kvcore_hf_option():
    flags = _flags("eval")
    for field in dataclasses.fields(TruncationConfig):
        if field.name != "overlap":  # offered as --allow-overlap (eval refuses overlap unless asked)
            assert "--" + field.name.replace("_", "-") in flags, field.name
    assert "--allow-overlap" in flags
    assert {"--gguf-file", "--attention", "--budget-method", "--sensitivity", "--allow-mismatch"} <= flags


def test_sweep_offers_the_shared_truncation_but_not_what_it_sets_per_point():
    flags = _flags("sweep")
    assert {"--calibration", "--key-space", "--truncate", "--granularity", "--attention", "--basis-scope"} <= flags
    assert not {"--" + name.replace("_", "-") for name in PER_POINT} & flags


def test_flags_build_the_configuration_whole():
    args = build_parser().parse_args(
        ["eval", "--model", "m", "--tasks", "t", "--calibration", "c", "--key-rank", "0.25", "--attention", "latent"]
    )
    config = config_from_args(EvalConfig, args)
    assert config.truncation == TruncationConfig(calibration="c", key_rank="0.25", attention="latent")
    args = build_parser().parse_args(["sweep", "--model", "m", "--out", "o", "--truncate", "values"])
    config = config_from_args(SweepConfig, args)  # the sweep's kinds, never the per-point truncation's
    assert (config.truncate, config.truncation.truncate) == ("values", "both")
    args = build_parser().parse_args(["sweep", "--model", "m", "--out", "o", "--truncate", "keys,values"])
    assert config_from_args(SweepConfig, args).truncate_kinds() == ["keys", "values"]


def test_choices_come_from_the_declaration(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--model", "m", "--tasks", "t", "--key-space", "rope"])
    assert "invalid choice: 'rope'" in (err := capsys.readouterr().err) and "pre_rope" in err and "post_rope" in err


def test_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["judge", "--help"])
    assert "(default: OpenAI) (default" not in capsys.readouterr().out
