"""`kvcore-eval` command line: a view of the config dataclasses, one subcommand per step of the flow.

calibrate | report | table | eval | sweep | frontier | compare | judge | tokenizer"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from kvcore_eval import __version__
from kvcore_eval.config import (
    CalibrationConfig,
    EvalConfig,
    FrontierConfig,
    JudgeConfig,
    SweepConfig,
    TableConfig,
    choices,
    field_type,
)


def add_dataclass_arguments(parser: argparse.ArgumentParser, config_class: type, skip: tuple[str, ...] = ()) -> None:
    """One --flag per field, from its one declaration: required fields have no default, bools are switches, a
    Literal's values are the choices, help is the field's help. An embedded configuration (a dataclass field)
    contributes its own fields, but those its field's `cli_skip` names."""
    for field in dataclasses.fields(config_class):
        if field.name in skip:
            continue
        kind = field_type(config_class, field.name)
        if dataclasses.is_dataclass(kind):
            add_dataclass_arguments(parser, kind, skip=field.metadata.get("cli_skip", ()))
            continue
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if kind is bool:
            parser.add_argument(flag, dest=field.name, action="store_true", help=help_text)
            continue
        allowed = choices(config_class, field.name)
        default = None if required else field.default
        shown = "" if required or default is None or "default:" in help_text else f" (default: {default})"
        parser.add_argument(
            flag,
            dest=field.name,
            type=str if allowed or not isinstance(kind, type) else kind,
            choices=allowed,
            required=required,
            default=default,
            help=help_text + shown,
        )


def config_from_args(config_class: type, args: argparse.Namespace, skip: tuple[str, ...] = ()):
    """The configuration the flags of `add_dataclass_arguments` describe (embedded configurations built whole; the
    fields their `cli_skip` names keep their defaults, even where the outer configuration has a flag of that name)."""
    values = {}
    for field in dataclasses.fields(config_class):
        kind = field_type(config_class, field.name)
        if dataclasses.is_dataclass(kind):
            values[field.name] = config_from_args(kind, args, field.metadata.get("cli_skip", ()))
        elif field.name not in skip and hasattr(args, field.name):
            values[field.name] = getattr(args, field.name)
    return config_class(**values)


def _calibrate(args: argparse.Namespace) -> None:
    """`kvcore-eval calibrate`: accumulate the Grams over the dataset and write the artifact. Under `accelerate
    launch --num_processes N` where accelerate started one process, the N processes are started under torchrun."""
    from kvcore_eval.calibration import calibrate as module  # lazy: torch, lm-eval (a fast --help)

    config = config_from_args(CalibrationConfig, args)  # bad options fail here, before any process starts
    if (processes := module.simple_launch_processes(os.environ, module.parent_argv())) is not None:
        sys.exit(module.relaunch_with_torchrun(processes, sys.argv[1:], os.environ))
    module.calibrate(config)


def _report(args: argparse.Namespace) -> None:
    """`kvcore-eval report`: per-layer NER tables and plot of an artifact; prints the files written."""
    from kvcore_eval.analysis.report import write_report  # lazy: torch, lm-eval (a fast --help)

    for kind, path in write_report(args.artifact, args.out).items():
        print(f"{kind}: {path}")


def _eval(args: argparse.Namespace) -> None:
    """`kvcore-eval eval`: one lm-eval run; prints lm-eval's results table, then writes --output (a late write that
    fails loses nothing: the table is printed and the results kept elsewhere)."""
    from lm_eval.utils import make_table

    from kvcore_eval.experiments.evaluate import evaluate, save_results  # lazy: torch, lm-eval (a fast --help)

    config = config_from_args(EvalConfig, args)
    results = evaluate(config)
    print(make_table(results), flush=True)
    if config.output:
        save_results(results, Path(config.output))


def _sweep(args: argparse.Namespace) -> None:
    """`kvcore-eval sweep`: ND-PPL over tasks and ranks with one model load; prints its markdown tables."""
    from kvcore_eval.experiments.sweep import run_sweep  # lazy: torch, lm-eval (a fast --help)

    config = config_from_args(SweepConfig, args)
    run_sweep(config)
    print((Path(config.out) / "sweep.md").read_text())
    if config.per_layer:
        print((Path(config.out) / "per_layer.md").read_text())


def _frontier(args: argparse.Namespace) -> None:
    """`kvcore-eval frontier`: every method at each budget of measured bytes; prints frontier.md."""
    from kvcore_eval.experiments.frontier import run_frontier  # lazy: torch, lm-eval (a fast --help)

    config = config_from_args(FrontierConfig, args)
    run_frontier(config)
    print((Path(config.out) / "frontier.md").read_text())


def _compare(args: argparse.Namespace) -> None:
    """`kvcore-eval compare`: two lm-eval results files side by side, as markdown."""
    from kvcore_eval.analysis.compare import compare, labels, to_markdown  # lazy: torch, lm-eval (a fast --help)

    print(to_markdown(compare(args.a, args.b), *labels(args.a, args.b)))


def _table(args: argparse.Namespace) -> None:
    """`kvcore-eval table`: the paper's models x datasets NER table from calibrations; prints the files."""
    from kvcore_eval.analysis.table import write_table  # lazy: torch, lm-eval (a fast --help)

    for kind, path in write_table(config_from_args(TableConfig, args)).items():
        print(f"{kind}: {path}")


def _tokenizer(args: argparse.Namespace) -> None:
    """`kvcore-eval tokenizer`: write a GGUF model's tokenizer to a folder lm-eval's RULER tasks can read."""
    from kvcore_eval.harness.lm_tasks import save_tokenizer  # lazy: torch, lm-eval (a fast --help)
    from kvcore_eval.model import models  # lazy: torch, lm-eval (a fast --help)

    model_id, gguf_file = models.gguf_location(args.model, args.gguf_file)
    out = save_tokenizer(models.load_tokenizer(model_id, None, gguf_file), Path(args.out))
    print(f'{out}  (lm-eval\'s RULER tasks: --metadata \'{{"tokenizer": "{out}"}}\')')


def _judge(args: argparse.Namespace) -> None:
    """`kvcore-eval judge`: GPT-score samples files through an OpenAI-compatible judge; prints a summary per file."""
    from kvcore_eval.harness.judge import judge_samples  # lazy: torch, lm-eval (a fast --help)

    if args.out is not None and len(args.samples) > 1:
        raise ValueError(
            f"--out names one file, and {len(args.samples)} samples files were given: drop --out (each file's scores "
            "go to judged_<its name> beside it), or judge one file"
        )
    config = config_from_args(JudgeConfig, args)
    summaries = {path: judge_samples(path, config, args.out) for path in args.samples}
    print(json.dumps(summaries if len(summaries) > 1 else next(iter(summaries.values())), indent=2))


def build_parser() -> argparse.ArgumentParser:
    """The `kvcore-eval` parser: one subcommand per step, its flags generated from the configurations."""
    parser = argparse.ArgumentParser(prog="kvcore-eval", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kvcore-eval {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    calibrate = commands.add_parser(
        "calibrate", help="accumulate per-layer K/V Grams over a dataset and write the artifact"
    )
    add_dataclass_arguments(calibrate, CalibrationConfig)
    calibrate.set_defaults(run=_calibrate)

    report = commands.add_parser("report", help="per-layer NER, effective rank and energy ranks of an artifact")
    report.add_argument("artifact", help="artifact directory written by calibrate")
    report.add_argument(
        "--out", default=None, help="where to write report.md/.json/ner.png (default: the artifact directory)"
    )
    report.set_defaults(run=_report)

    evaluate = commands.add_parser(
        "eval", help="one lm-eval run with kvcore_hf (or the hf baseline without --calibration)"
    )
    add_dataclass_arguments(evaluate, EvalConfig)
    evaluate.set_defaults(run=_eval)

    sweep = commands.add_parser("sweep", help="ND-PPL per task over ranks, NER per task, and their correlation")
    add_dataclass_arguments(sweep, SweepConfig)
    sweep.set_defaults(run=_sweep)

    frontier = commands.add_parser(
        "frontier", help="every method (basis, allocation, bits) at equal measured bytes per token: the Pareto front"
    )
    add_dataclass_arguments(frontier, FrontierConfig)
    frontier.set_defaults(run=_frontier)

    table = commands.add_parser(
        "table", help="the paper's models x datasets NER table, and layer x dataset heatmaps, from calibrations"
    )
    table.add_argument("runs", nargs="+", help="calibration artifact folders (any number of models x datasets)")
    add_dataclass_arguments(table, TableConfig, skip=("runs",))
    table.set_defaults(run=_table)

    tokenizer = commands.add_parser(
        "tokenizer", help="write a model's tokenizer (a GGUF file's too) as a folder lm-eval's RULER tasks can read"
    )
    tokenizer.add_argument("model", help="model folder, hub id or .gguf file")
    tokenizer.add_argument("--gguf-file", default=None, help="GGUF file inside the model folder")
    tokenizer.add_argument("--out", required=True, help="new folder for the tokenizer files")
    tokenizer.set_defaults(run=_tokenizer)

    comparison = commands.add_parser("compare", help="two lm-eval results files side by side")
    comparison.add_argument("a", help="lm-eval results JSON")
    comparison.add_argument("b", help="lm-eval results JSON of the same tasks")
    comparison.set_defaults(run=_compare)

    judge = commands.add_parser(
        "judge", help="GPT-score an lm-eval samples file of a _gen task through an OpenAI-compatible judge"
    )
    judge.add_argument(
        "samples", nargs="+", help="lm-eval samples .jsonl files (written with --log_samples; a glob may name several)"
    )
    judge.add_argument("--out", default=None, help="judged samples .jsonl (default: judged_<samples name>, beside it)")
    add_dataclass_arguments(judge, JudgeConfig)
    judge.set_defaults(run=_judge)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: parse, configure logging, run the subcommand; a known error is one logged line, exit 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("kvcore_eval")
    try:
        args.run(args)
    except KeyboardInterrupt:
        if args.command == "calibrate":
            log.error("interrupted: the last checkpoint is kept; continue with the same command plus --resume")
        else:
            log.error("interrupted: finished work is kept; run the same command again to continue")
        sys.exit(130)
    except (ValueError, OSError, KeyError, FloatingPointError, RuntimeError) as err:
        log.error("%s", err)
        sys.exit(2)
