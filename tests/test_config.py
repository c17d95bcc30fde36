"""Each option declared once: identities derived from whole configurations, choices, model_arg coercion."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from kvcore_eval import config as C
from kvcore_eval.config import CalibrationConfig, SweepConfig, TruncationConfig, identity, identity_differences

PACKAGE = Path(C.__file__).parent

# For each field, values that make a valid configuration and differ from the default.
OTHER_VALUES = {
    "model": "other-model",
    "dataset": "other.jsonl",
    "out": "elsewhere",
    "revision": "v2",
    "gguf_file": "m.gguf",
    "split": "test",
    "data_dir": "data",
    "skip_docs": 7,
    "include_path": "mine",
    "metadata": '{"max_seq_lengths": [1024]}',
    "gen_kwargs": "max_gen_toks=16",
    "position_buckets": "256,512",
    "text_field": "body",
    "prompt_format": "question",
    "max_tokens": 1234,
    "seq_len": 64,
    "batch_size": 3,
    "device": "cuda",
    "dtype": "bfloat16",
    "checkpoint_every": 99,
    "resume": True,
    "overwrite": True,
    "tasks": "kvcore_alpaca",
    "basis_scope": "shared",
    "ranks": "0.5",
    "metric": "word_perplexity",
    "num_samples": 9,
    "calibration_tokens": 999,
    "per_layer": True,
    "per_layer_rank": 0.5,
    # the truncation every sweep point shares
    "calibration": "artifact",
    "sensitivity": "per_layer.json",
    "key_rank": 0.25,
    "value_rank": "8:16",
    "rank_budget": 0.5,
    "budget_method": "ner",
    "key_space": "post_rope",
    "granularity": "head",
    "truncate": "keys",
    "allow_mismatch": True,
    "attention": "latent",
    "overlap": "refuse",
    "basis": "random",
    "basis_seed": 5,
    "latent_bits": 8,
    "quantizer": "minmax",
    "bits": 2.0,
    "weighting": "absolute",
    "protocol": "after_prefill",
    "prefill_chunk": 64,
    "peer": "hqq",
    "residual_length": 64,
    "allow_overlap": True,
}


# Options that are only valid together: the second is changed with the first.
PAIRED = {
    "sensitivity": {"budget_method": "sensitivity"},
    "basis_scope": {"truncation": TruncationConfig(calibration="artifact")},
    "truncation": {"basis_scope": "shared"},
    "prefill_chunk": {"protocol": "after_prefill"},
    "peer": {"basis": "identity", "latent_bits": 4, "protocol": "after_prefill"},
}


# A second value for the options that are valid only with their pair: a paired change is compared with the same
# pair holding this value, so that only the option itself differs.
ALTERNATE = {
    "calibration": "another-artifact",
    "sensitivity": "another_per_layer.json",
    "prefill_chunk": 32,
    "peer": "quanto",
}


def _replace(config, name, value, alternate=None):
    """(config with `name` changed, the config it is compared with)."""
    try:
        return dataclasses.replace(config, **{name: value}), config
    except ValueError:
        pair = PAIRED[name]
        return dataclasses.replace(config, **{name: value, **pair}), dataclasses.replace(
            config, **{name: alternate, **pair}
        )


def _variants(config):
    """(field path, its metadata, a config with only that option changed, the config to compare it with) for every
    field, embedded ones too."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            skipped = field.metadata.get("cli_skip", ())
            for name, metadata, inner, _ in _variants(value):
                if name not in skipped:
                    alternate = (
                        dataclasses.replace(value, **{name: ALTERNATE[name], **PAIRED.get(name, {})})
                        if name in ALTERNATE
                        else value
                    )
                    yield f"{field.name}.{name}", metadata, *_replace(config, field.name, inner, alternate)
        else:
            assert field.name in OTHER_VALUES, f"give {field.name} another value in OTHER_VALUES"
            value = OTHER_VALUES[field.name]
            yield field.name, field.metadata, *_replace(config, field.name, value, ALTERNATE.get(field.name))


@pytest.mark.parametrize(
    "base",
    [
        CalibrationConfig(model="m", dataset="kvcore:alpaca", out="o"),
        SweepConfig(model="m", out="o"),
        TruncationConfig(),
    ],
    ids=["calibration", "sweep", "truncation"],
)
def test_every_number_changing_field_changes_the_identity_and_no_other(base):
    for name, metadata, changed, reference in _variants(base):
        differs = identity(changed) != identity(reference)
        assert differs == metadata.get("identity", True), name


def test_identity_names_the_fields_that_differ():
    a = identity(SweepConfig(model="m", out="o"))
    b = identity(
        SweepConfig(model="m", out="o2", metric="word_perplexity", truncation=TruncationConfig(key_space="post_rope"))
    )
    assert identity_differences(a, b) == [
        "metric: 'byte_perplexity' then, 'word_perplexity' now",
        "truncation.key_space: 'pre_rope' then, 'post_rope' now",
    ]


def test_a_field_added_later_leaves_work_written_before_it_the_same_work():
    """Points and folders written before `protocol` existed ran what protocol=forward runs: at its default the field is
    not in the identity (so their settings still match), set otherwise it is."""
    added = [f.name for f in dataclasses.fields(TruncationConfig) if f.metadata["added"]]
    assert added == ["protocol", "prefill_chunk", "peer", "residual_length"]
    before = identity(TruncationConfig())
    assert not set(added) & set(before)
    assert identity_differences(before, identity(TruncationConfig(protocol="after_prefill"))) == [
        "protocol: 'forward' then, 'after_prefill' now"
    ]
    # work that recorded the default (written while the field was always in the identity) matches one that leaves it out
    assert identity_differences({**before, "protocol": "forward", "residual_length": 128}, before) == []
    assert identity_differences({**before, "protocol": "after_prefill"}, before) == [
        "protocol: 'after_prefill' then, 'forward' now"
    ]


@pytest.mark.parametrize(
    "options,message",
    [
        ({"key_space": "rope"}, "key_space='rope': use pre_rope or post_rope"),
        ({"truncate": "all"}, "use keys, values or both"),
        ({"attention": "fast"}, "use reconstruct or latent"),
        ({"budget_method": "magic"}, "use energy, ner, sensitivity, uniform or waterfill"),
    ],
)
def test_allowed_values_come_from_the_declared_literal(options, message):
    with pytest.raises(ValueError, match=message):
        TruncationConfig(**options)


def test_model_args_are_coerced_by_declared_type_and_misspellings_named():
    own, rest = C.split_options(
        TruncationConfig,
        {"key_rank": "0.5", "allow_mismatch": "true", "rank_budget": 1, "pretrained": "m", "trust_remote_code": True},
        others={"pretrained"},
    )
    assert own == {"key_rank": "0.5", "allow_mismatch": True, "rank_budget": 1.0}
    assert rest == {"pretrained": "m", "trust_remote_code": True}
    for wrong, right in (("key_rnak", "key_rank"), ("alow_mismatch", "allow_mismatch"), ("keyspace", "key_space")):
        with pytest.raises(ValueError, match=f"unknown option {wrong}=.*did you mean {right}="):
            C.split_options(TruncationConfig, {wrong: "x"}, others=set())
    with pytest.raises(ValueError, match="allow_mismatch='maybe' is not a boolean"):
        C.split_options(TruncationConfig, {"allow_mismatch": "maybe"}, others=set())


def test_key_space_default_is_written_once():
    """No option declaration in the package spells a key space as its default: they all read DEFAULT_KEY_SPACE."""
    literals = []
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("option", "field"):
                values = [*node.args[:1], *[k.value for k in node.keywords if k.arg == "default"]]
                literals += [
                    f"{path.name}:{node.lineno}"
                    for v in values
                    if isinstance(v, ast.Constant) and v.value in ("pre_rope", "post_rope")
                ]
            if isinstance(node, ast.arguments):
                literals += [
                    f"{path.name}:{d.lineno}"
                    for d in node.defaults + node.kw_defaults
                    if isinstance(d, ast.Constant) and d.value in ("pre_rope", "post_rope")
                ]
    assert literals == []
    assert 'DEFAULT_KEY_SPACE: KeySpace = "pre_rope"' in (PACKAGE / "spaces.py").read_text()


def test_model_loading_options_are_declared_once_for_every_lm_eval_run():
    from kvcore_eval.config import FrontierConfig

    shared = {f.name: f for f in dataclasses.fields(C.LMEvalRunConfig)}
    assert set(shared) == {"model", "gguf_file", "data_dir", "include_path", "batch_size", "device", "dtype"}
    for config_class in (C.EvalConfig, SweepConfig, FrontierConfig):
        fields = {f.name: f for f in dataclasses.fields(config_class)}
        for name, declared in shared.items():
            assert fields[name].metadata is declared.metadata, f"{config_class.__name__}.{name} is declared again"


def test_the_scoring_options_of_sweep_and_frontier_are_declared_once():
    from kvcore_eval.config import FrontierConfig

    own = {f.name for f in dataclasses.fields(C.TaskScoringConfig)} - {
        f.name for f in dataclasses.fields(C.LMEvalRunConfig)
    }
    assert own == {"metric", "metadata", "gen_kwargs", "num_samples", "calibration_tokens", "seq_len"}
    declared = {f.name: f for f in dataclasses.fields(C.TaskScoringConfig)}
    for config_class in (SweepConfig, FrontierConfig):
        fields = {f.name: f for f in dataclasses.fields(config_class)}
        for name in own:
            assert fields[name].metadata is declared[name].metadata, f"{config_class.__name__}.{name} is declared again"


def test_eval_splits_a_gguf_path_into_lm_evals_pretrained_and_gguf_file(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    args = C.EvalConfig(model=str(tmp_path / "m.gguf"), tasks="kvcore_alpaca").model_args()
    assert (args["pretrained"], args["gguf_file"]) == (str(tmp_path), "m.gguf")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        C.EvalConfig(model=str(tmp_path / "missing.gguf"), tasks="kvcore_alpaca").model_args()


def test_paths_of_artifacts_are_not_identities_their_content_is():
    """A sweep or frontier folder moved elsewhere reuses its points: they are keyed on basis_sha256 and
    sensitivity_sha256 (sweep.point_settings), not on where the files lie."""
    moved = TruncationConfig(
        calibration="/elsewhere/artifact", sensitivity="/elsewhere/per_layer.json", budget_method="sensitivity"
    )
    here = TruncationConfig(calibration="runs/artifact", sensitivity="runs/per_layer.json", budget_method="sensitivity")
    assert identity(moved) == identity(here)
    assert identity(dataclasses.replace(moved, key_rank=0.5)) != identity(here)


@pytest.mark.parametrize(
    "metric,message",
    [
        ("kvcore_alpaca=bits_per_byte", "kvcore_alpaca=bits_per_byte: bits_per_byte is the log of a perplexity"),
        ("bits_per_byte", r"a bare metric is the perplexity of ND-PPL \(byte_perplexity, word_perplexity\)"),
    ],
)
def test_bits_per_byte_is_never_taken_for_a_perplexity(metric, message):
    """Its relative change is not ND-PPL (+0.078 where the byte perplexity's is +0.246): refused, naming the fix."""
    from kvcore_eval.config import FrontierConfig, SweepConfig

    for kind in (SweepConfig, FrontierConfig):
        with pytest.raises(ValueError, match=message) as err:
            kind(model="m", out="o", metric=metric)
        assert "byte_perplexity" in str(err.value)
    assert SweepConfig(model="m", out="o", metric="kvcore_alpaca=byte_perplexity").metric_choice()[1] == {
        "kvcore_alpaca": "byte_perplexity"
    }


def test_empty_lists_are_refused_before_anything_loads():
    from kvcore_eval.config import EvalConfig, FrontierConfig, SweepConfig

    with pytest.raises(ValueError, match="--methods ',' names no method: give comma-separated methods, of: "):
        FrontierConfig(model="m", out="o", methods=",")
    for kind in (FrontierConfig, SweepConfig):
        with pytest.raises(ValueError, match="--tasks ' , ' names no task"):
            kind(model="m", out="o", tasks=" , ")
    with pytest.raises(ValueError, match="--tasks ',' names no task"):
        EvalConfig(model="m", tasks=",")
    for limit in (0, -3):
        with pytest.raises(ValueError, match=f"--limit {limit} scores no document: .*drop --limit"):
            EvalConfig(model="m", tasks="kvcore_alpaca", limit=limit)


def test_a_per_sequence_basis_with_a_batch_is_refused_in_the_configuration():
    """`frontier --methods sequence --batch-size 2` is refused when the configuration is built, before any load."""
    from kvcore_eval.config import FrontierConfig

    with pytest.raises(ValueError, match="--methods sequence cannot run with these options: .*use batch_size=1"):
        FrontierConfig(model="m", out="o", methods="uniform,sequence", batch_size=2)
    assert FrontierConfig(model="m", out="o", methods="uniform", batch_size=2).batch_size == 2
