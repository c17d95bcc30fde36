"""How users install: in a fresh venv, `pip install .` and `pip install -e .`, then the plain `lm_eval` command.

The venv sees the packages of the interpreter running the tests (torch, transformers...: a `.pth` file lists its
site-packages folders; `system_site_packages` would show the base interpreter's instead, which in a user's venv
has none of them) but gets its own lm-eval, so that the task folder lm-eval indexes is the venv's, as after a
real install."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from conftest import EXAMPLE_DATA, EXAMPLE_MODEL, REPO

pytestmark = pytest.mark.slow  # a fresh install: about a minute each


def _run(command, **kwargs):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as a user's shell: no checkout on the path
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, **kwargs)
    assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-4000:])
    return result


def make_venv(env_dir: Path) -> str:
    """A fresh venv that sees this interpreter's site-packages after its own (their .pth files are not run, so an
    editable kvcore-eval installed here stays out of it); returns its python."""
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = str(env_dir / "bin" / "python")
    own = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip()
    ours = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    (Path(own) / "_kvcore_test_outer_site.pth").write_text("\n".join(ours) + "\n")
    return python


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    from kvcore_eval.calibration.calibrate import calibrate
    from kvcore_eval.config import CalibrationConfig

    return calibrate(
        CalibrationConfig(
            model=str(EXAMPLE_MODEL),
            dataset="kvcore:alpaca",
            data_dir=str(EXAMPLE_DATA),
            out=str(tmp_path_factory.mktemp("install") / "tiny"),
            max_tokens=2000,
            seq_len=128,
            device="cpu",
        )
    )


@pytest.mark.parametrize("editable", [False, True], ids=["pip install .", "pip install -e ."])
def test_plain_lm_eval_runs_kvcore_hf_after_install(editable, tiny_artifact, tmp_path):
    import lm_eval

    checkout = tmp_path / "checkout"
    files = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, checkout / name)
    env_dir = tmp_path / "venv"
    python = make_venv(env_dir)
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps"]
    _run([*pip, "--ignore-installed", f"lm-eval=={lm_eval.__version__}"])
    _run([*pip, *(["-e"] if editable else []), str(checkout)])
    if editable:  # a task added after the install is seen without reinstalling
        (checkout / "tasks" / "domains" / "kvcore_probe_edit.yaml").write_text(
            "include: ../_kvcore_perplexity.yaml\ntask: kvcore_probe_edit\n"
            "metadata:\n  version: 1.0\n  source: codealpaca\n"
        )
    task = "kvcore_probe_edit" if editable else "kvcore_alpaca"
    out = tmp_path / "out"
    _run(
        [
            python,
            "-m",
            "lm_eval",
            "--model",
            "kvcore_hf",
            "--model_args",
            f"pretrained={EXAMPLE_MODEL},calibration={tiny_artifact},key_rank=0.25",
            "--tasks",
            task,
            "--limit",
            "2",
            "--metadata",
            json.dumps({"data_dir": str(EXAMPLE_DATA)}),
            "--output_path",
            str(out),
        ],
        cwd=tmp_path,
    )
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert results["results"][task]["byte_perplexity,none"] > 1
    assert results["config"]["kvcore"]["rank_plan"]["key_rank_per_layer"]
    where = _run(
        [
            python,
            "-c",
            "import lm_eval, kvcore_eval, pathlib; print(pathlib.Path(kvcore_eval.__file__).parent);"
            "print((pathlib.Path(lm_eval.__file__).parent / 'tasks' / 'kvcore').exists())",
        ],
        cwd=tmp_path,
    ).stdout.split()
    assert where[0].startswith(str(checkout if editable else env_dir)), where
    assert where[1] == str(not editable), "a regular install copies the tasks into lm-eval; an editable one does not"
