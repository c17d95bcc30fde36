import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import EXAMPLE_DATA, EXAMPLE_MODEL, REPO
from judge_server import JudgeServer

from kvcore_eval.config import JudgeConfig
from kvcore_eval.harness.judge import GPTJudge, JudgeUnavailable, judge_samples, parse_rating

KEY = "sk-test-SECRET-0123456789"


@pytest.fixture
def server():
    with JudgeServer(slow_seconds=2.5) as srv:
        yield srv


@pytest.fixture
def judge_config(server, tmp_path, monkeypatch):
    monkeypatch.setenv("KVCORE_TEST_KEY", KEY)
    return JudgeConfig(
        model="judge-1",
        base_url=server.base_url,
        api_key_env="KVCORE_TEST_KEY",
        cache_path=str(tmp_path / "judge.sqlite"),
        max_retries=3,
        timeout=1.0,
        max_concurrency=3,
    )


def test_parse_rating():
    assert parse_rating("Rating: 7") == 7.0
    assert parse_rating("rating = [[8.5]]") == 8.5
    assert parse_rating("Rating: 11") is None and parse_rating("great answer") is None


@pytest.mark.slow
def test_scores_parsed_retried_and_cached(server, judge_config):
    judge = GPTJudge(judge_config)
    items = [
        ("Say hi", "hello score=9", None),
        ("Add", "2 [[429x2]] score=4", "4"),
        ("Q", "a [[500]] score=6", None),
        ("Q", "b [[slow]] score=3", None),
        ("Q", "c [[garbage-once]] score=5", None),
        ("Q", "d [[garbage]]", None),
    ]
    scores = [j.score for j in judge.score_many(items)]
    assert scores == [9.0, 4.0, 6.0, 3.0, 5.0, None], "garbage is missing, never made up"
    assert server.attempts["2 [[429x2]] score=4"] == 3 and server.attempts["a [[500]] score=6"] == 2
    assert server.attempts["b [[slow]] score=3"] == 2, "a timeout is retried"
    summary = judge.summary()
    assert summary["missing"] == 1 and summary["cache_hits"] == 0 and summary["prompt_tokens"] > 0
    assert all(header == f"Bearer {KEY}" for header in server.authorization)

    calls_before = sum(server.attempts.values())
    rerun = GPTJudge(judge_config)
    assert [j.score for j in rerun.score_many(items)] == scores
    assert sum(server.attempts.values()) == calls_before + 2, (
        "a rerun asks only for the unparsed answer (and its reminder)"
    )
    assert rerun.summary()["cache_hits"] == len(items) - 1 and rerun.summary()["missing"] == 1


def test_reference_is_shown_and_changes_the_cache_key(server, judge_config):
    judge = GPTJudge(judge_config)
    judge.score("Add", "four score=8", "4")
    judge.score("Add", "four score=8", None)
    assert server.attempts["four score=8"] == 2


@pytest.mark.slow
def test_judge_down_fails_clearly_and_keeps_scores(server, judge_config):
    judge = GPTJudge(judge_config)
    assert judge.score("Q", "fine score=7").score == 7.0
    with pytest.raises(JudgeUnavailable, match="did not answer after 3 retries.*kept in"):
        judge.score("Q", "x [[down]]")
    assert server.attempts["x [[down]]"] == 4
    assert GPTJudge(judge_config).score("Q", "fine score=7").cached


def test_rejected_key_names_the_variable(judge_config):
    with pytest.raises(JudgeUnavailable, match="refused the key in KVCORE_TEST_KEY"):
        GPTJudge(judge_config).score("Q", "x [[401]]")


def test_missing_key_names_the_variable(judge_config, monkeypatch):
    monkeypatch.delenv("KVCORE_TEST_KEY")
    with pytest.raises(ValueError, match="set the environment variable KVCORE_TEST_KEY"):
        GPTJudge(judge_config)


def _samples(path, answers):
    with open(path, "w") as f:
        for i, answer in enumerate(answers):
            f.write(
                json.dumps(
                    {"doc_id": i, "doc": {"prompt": f"instruction {i}", "response": "ref"}, "filtered_resps": [answer]}
                )
                + "\n"
            )
    return path


@pytest.mark.slow
def test_kill_mid_run_loses_nothing(tmp_path):
    """A judging subprocess is killed after some judgements; the rerun asks only for the rest."""
    with subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "judge_server.py"), "0.3"], stdout=subprocess.PIPE, text=True
    ) as srv:
        base_url = srv.stdout.readline().strip()
        samples = _samples(tmp_path / "samples.jsonl", [f"answer {i} score={i % 9 + 1}" for i in range(12)])
        cache = tmp_path / "cache.sqlite"
        env = {**os.environ, "KVCORE_TEST_KEY": KEY}
        command = [
            sys.executable,
            "-m",
            "kvcore_eval",
            "judge",
            str(samples),
            "--model",
            "judge-1",
            "--base-url",
            base_url,
            "--api-key-env",
            "KVCORE_TEST_KEY",
            "--cache-path",
            str(cache),
            "--max-concurrency",
            "1",
        ]
        run = subprocess.Popen(command, env=env, cwd=REPO)
        deadline = time.time() + 60
        while time.time() < deadline:
            if cache.exists() and sqlite3.connect(cache).execute("SELECT count(*) FROM judgements").fetchone()[0] >= 3:
                break
            time.sleep(0.1)
        run.send_signal(signal.SIGKILL)
        run.wait()
        done = sqlite3.connect(cache).execute("SELECT count(*) FROM judgements").fetchone()[0]
        assert 3 <= done < 12
        result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        srv.kill()
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["cache_hits"] == done and summary["calls"] == 12 - done
    judged = [json.loads(line) for line in (tmp_path / "judged_samples.jsonl").read_text().splitlines()]
    assert [row["gpt_score"] for row in judged] == [float(i % 9 + 1) for i in range(12)]
    scores = [float(i % 9 + 1) for i in range(12)]
    assert summary["gpt_score_stderr"] == pytest.approx(np.std(scores, ddof=1) / np.sqrt(12), rel=0.15)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), f"the key leaked into {path}"


@pytest.mark.slow
def test_gen_task_end_to_end_gives_gpt_score_in_results(server, tmp_path, monkeypatch, caplog):
    from kvcore_eval.config import EvalConfig
    from kvcore_eval.experiments.evaluate import run_lm_eval

    monkeypatch.setenv("KVCORE_TEST_KEY", KEY)
    monkeypatch.setenv("KVCORE_JUDGE_MODEL", "judge-1")
    monkeypatch.setenv("KVCORE_JUDGE_BASE_URL", server.base_url)
    monkeypatch.setenv("KVCORE_JUDGE_API_KEY_ENV", "KVCORE_TEST_KEY")
    monkeypatch.setenv("KVCORE_JUDGE_CACHE_PATH", str(tmp_path / "judge.sqlite"))
    output = tmp_path / "results.json"
    results = run_lm_eval(
        EvalConfig(
            model=str(EXAMPLE_MODEL), tasks="kvcore_alpaca_gen", data_dir=str(EXAMPLE_DATA), limit=3, output=str(output)
        )
    )
    metrics = results["results"]["kvcore_alpaca_gen"]
    assert 1 <= metrics["gpt_score,none"] <= 10 and metrics["gpt_score_missing,none"] == 0
    assert sum(server.attempts.values()) == 3
    assert KEY not in output.read_text() and KEY not in caplog.text


def test_an_unparsed_reply_is_asked_again_once_the_judge_behaves(server, judge_config):
    """An unparseable reply is missing in this run, not cached: the next run asks again and gets a score."""
    judge = GPTJudge(judge_config)
    assert judge.score_many([("Q", "x [[garbage-once]]", None)])[0].score is not None  # the reminder fixed it
    assert server.attempts["x [[garbage-once]]"] == 2
    first = GPTJudge(judge_config).score_many([("Q", "y [[garbage]]", None)])
    assert first[0].score is None
    assert server.attempts["y [[garbage]]"] == 2
    GPTJudge(judge_config).score_many([("Q", "y [[garbage]]", None)])
    assert server.attempts["y [[garbage]]"] == 4, "asked again, not served a cached 'missing'"


def test_bad_judge_inputs_name_the_fix(judge_config, tmp_path):
    with pytest.raises(ValueError, match="has no scheme: write it as http://localhost:8000/v1"):
        JudgeConfig(model="m", base_url="localhost:8000/v1")
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"results": {"kvcore_alpaca": {}}}, indent=2))
    with pytest.raises(ValueError, match="is not an lm-eval samples file"):
        judge_samples(results, judge_config)


@pytest.mark.slow
def test_gen_run_with_the_judge_down_keeps_every_generation_for_a_later_judge(tmp_path):
    """lm_eval with a dead judge finishes and writes its samples; `kvcore-eval judge` then scores all of them."""
    import socket

    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    env = {
        **os.environ,
        "KVCORE_TEST_KEY": KEY,
        "KVCORE_JUDGE_MODEL": "judge-1",
        "KVCORE_JUDGE_BASE_URL": dead,
        "KVCORE_JUDGE_API_KEY_ENV": "KVCORE_TEST_KEY",
        "KVCORE_JUDGE_MAX_RETRIES": "0",
        "KVCORE_JUDGE_CACHE_PATH": str(tmp_path / "judge.sqlite"),
        "KVCORE_DATA_DIR": str(EXAMPLE_DATA),
    }
    command = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={EXAMPLE_MODEL}",
        "--tasks",
        "kvcore_alpaca_gen",
        "--limit",
        "3",
        "--gen_kwargs",
        "max_gen_toks=16",
        "--log_samples",
        "--output_path",
        str(tmp_path / "out"),
    ]
    run = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "GPT-score not available" in run.stderr and "kvcore-eval judge" in run.stderr
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert results["results"]["kvcore_alpaca_gen"]["gpt_score_missing,none"] == 1.0
    samples = next((tmp_path / "out").rglob("samples_kvcore_alpaca_gen_*.jsonl"))
    generations = [json.loads(line)["filtered_resps"][0] for line in samples.read_text().splitlines()]
    assert len(generations) == 3
    with JudgeServer() as server:
        judge = [
            sys.executable,
            "-m",
            "kvcore_eval",
            "judge",
            str(samples),
            "--model",
            "judge-1",
            "--base-url",
            server.base_url,
            "--api-key-env",
            "KVCORE_TEST_KEY",
            "--cache-path",
            str(tmp_path / "judge.sqlite"),
        ]
        scored = subprocess.run(judge, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert scored.returncode == 0, scored.stderr[-2000:]
        summary = json.loads(scored.stdout)
        assert summary["samples"] == 3 and summary["calls"] == 3 and summary["missing"] == 0
        assert sorted(server.attempts) == sorted(answer.strip() for answer in generations), (
            "the kept generations, not new ones"
        )


def test_judge_out_never_replaces_the_samples_or_a_users_file(server, judge_config, tmp_path):
    samples = _samples(tmp_path / "samples_kvcore_alpaca_gen_2026.jsonl", ["a score=3", "b score=4"])
    before = samples.read_bytes()
    with pytest.raises(ValueError, match="is the samples file itself: the scores would replace the generations"):
        judge_samples(samples, judge_config, samples)
    mine = tmp_path / "notes.jsonl"
    mine.write_text('{"my": "notes"}\n')
    with pytest.raises(FileExistsError, match="is not a judged file kvcore-eval wrote"):
        judge_samples(samples, judge_config, mine)
    with pytest.raises(ValueError, match="is a folder"):
        judge_samples(samples, judge_config, tmp_path)
    assert samples.read_bytes() == before and mine.read_text() == '{"my": "notes"}\n'
    assert server.requests == 0, "refused before the judge is asked anything"


def test_judge_reruns_with_the_readmes_glob(server, judge_config, tmp_path):
    """README: `kvcore-eval judge runs/gen/*/samples_kvcore_alpaca_gen_*.jsonl`, run twice."""
    _samples(tmp_path / "samples_kvcore_alpaca_gen_2026.jsonl", ["a score=3", "b score=4"])
    for _ in range(2):
        (samples,) = tmp_path.glob("samples_kvcore_alpaca_gen_*.jsonl")
        summary = judge_samples(samples, judge_config)
        assert summary["gpt_score"] == 3.5
    assert summary["cache_hits"] == 2 and sorted(p.name for p in tmp_path.glob("*.jsonl")) == [
        "judged_samples_kvcore_alpaca_gen_2026.jsonl",
        "samples_kvcore_alpaca_gen_2026.jsonl",
    ]


def _judge_cli(samples, base_url, cache, caplog, model="judge-1"):
    from kvcore_eval.cli import main

    command = ["judge", str(samples), "--model", model, "--base-url", base_url, "--api-key-env", "KVCORE_TEST_KEY"]
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--cache-path", str(cache), "--max-retries", "0"])
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert exit_info.value.code == 2 and len(errors) == 1 and "\n" not in errors[0], errors
    return errors[0]


@pytest.mark.parametrize(
    "server_kind,model,message",
    [
        ({"models": ("judge-1",)}, "judge-l", "answered 404 for model 'judge-l'.*check the judge model name"),
        ({"fault": "no-choices"}, "judge-1", "replied without `choices`"),
        ({"fault": "not-json"}, "judge-1", "did not reply with JSON \\(it sent '<html>"),
        ({"fault": "truncated-json"}, "judge-1", "answered with a body that is not a complete chat completion"),
    ],
    ids=["404", "no choices", "not JSON", "truncated JSON"],
)
def test_a_misbehaving_judge_is_one_line_naming_its_url(server_kind, model, message, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("KVCORE_TEST_KEY", KEY)
    samples = _samples(tmp_path / "samples.jsonl", ["a score=3"])
    with JudgeServer(**server_kind) as bad:
        error = _judge_cli(samples, bad.base_url, tmp_path / "judge.sqlite", caplog, model=model)
    assert bad.base_url in error and re.search(message, error), error
    assert not (tmp_path / "judged_samples.jsonl").exists()


def test_bad_samples_lines_and_cache_files_are_one_line_naming_the_file(server, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("KVCORE_TEST_KEY", KEY)
    samples = _samples(tmp_path / "samples.jsonl", ["a score=3"])
    samples.write_text(samples.read_text() + "[1, 2]\n")
    error = _judge_cli(samples, server.base_url, tmp_path / "judge.sqlite", caplog)
    assert f"{samples} line 2 is not an lm-eval sample" in error
    caplog.clear()
    not_a_database = tmp_path / "scores.csv"
    not_a_database.write_text("doc,score\n" * 200)
    error = _judge_cli(_samples(tmp_path / "ok.jsonl", ["a score=3"]), server.base_url, not_a_database, caplog)
    assert f"judge cache {not_a_database} is not an sqlite database" in error
    assert not_a_database.read_text() == "doc,score\n" * 200 and server.requests == 0


@pytest.mark.slow
@pytest.mark.parametrize("server_kind", [{"models": ("judge-1",)}, {"fault": "no-choices"}], ids=["404", "no choices"])
def test_gen_run_with_a_misbehaving_judge_keeps_every_generation(server_kind, tmp_path):
    """Plain lm_eval with --log_samples: a judge answering 404 (a mistyped name) or 200 without choices costs
    no generation: the task finishes, the samples file is written, one error names the judge's URL."""
    with JudgeServer(**server_kind) as bad:
        env = {
            **os.environ,
            "KVCORE_TEST_KEY": KEY,
            "KVCORE_JUDGE_MODEL": "judge-l",
            "KVCORE_JUDGE_BASE_URL": bad.base_url,
            "KVCORE_JUDGE_API_KEY_ENV": "KVCORE_TEST_KEY",
            "KVCORE_JUDGE_CACHE_PATH": str(tmp_path / "judge.sqlite"),
            "KVCORE_DATA_DIR": str(EXAMPLE_DATA),
        }
        command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={EXAMPLE_MODEL}"]
        command += ["--tasks", "kvcore_alpaca_gen", "--limit", "3", "--gen_kwargs", "max_gen_toks=8", "--log_samples"]
        command += ["--output_path", str(tmp_path / "out")]
        run = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert bad.requests == 1, "after the first failure, later answers are not sent"
    errors = [line for line in run.stderr.splitlines() if "GPT-score not available" in line]
    assert len(errors) == 1 and bad.base_url in errors[0] and "keeps every generation" in errors[0], errors
    assert "HTTP Request" not in run.stderr, "no httpx line per request"
    samples = next((tmp_path / "out").rglob("samples_kvcore_alpaca_gen_*.jsonl"))
    assert len(samples.read_text().splitlines()) == 3
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert results["results"]["kvcore_alpaca_gen"]["gpt_score_missing,none"] == 1.0


def test_help_prints_each_default_once_and_the_version(capsys):
    from kvcore_eval import __version__
    from kvcore_eval.cli import main

    with pytest.raises(SystemExit):
        main(["judge", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: OpenAI)" in text and "(default: OpenAI) (default: None)" not in text
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"kvcore-eval {__version__}"


def test_a_truncated_reply_inside_lm_eval_is_one_error_naming_the_url(tmp_path, monkeypatch, caplog):
    """process_results of a _gen task: a judge answering 200 with a JSON body cut short costs no generation, and
    the one error names the judge's URL (not `Expecting value: line 1 column 38`)."""
    from kvcore_eval.harness import judge

    monkeypatch.setenv("KVCORE_TEST_KEY", KEY)
    monkeypatch.setattr(judge, "_shared_judge", None)
    monkeypatch.setattr(judge, "_judge_error", None)
    with JudgeServer(fault="truncated-json") as bad:
        for name, value in (("MODEL", "judge-1"), ("BASE_URL", bad.base_url), ("API_KEY_ENV", "KVCORE_TEST_KEY")):
            monkeypatch.setenv(f"KVCORE_JUDGE_{name}", value)
        monkeypatch.setenv("KVCORE_JUDGE_CACHE_PATH", str(tmp_path / "judge.sqlite"))
        monkeypatch.setenv("KVCORE_JUDGE_MAX_RETRIES", "0")
        with caplog.at_level("ERROR"):
            scores = [judge.score_for_task("Q", f"answer {i}", None) for i in range(3)]
    assert scores == [{"gpt_score": None, "gpt_score_missing": 1.0}] * 3 and bad.requests == 1
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert bad.base_url in error and "not a complete chat completion" in error


def test_the_http_clients_request_lines_are_quiet(server, judge_config, caplog):
    """The installed openai sends through httpx2, whose logger is `httpx2`: no INFO line per answer."""
    import logging

    from kvcore_eval.harness.judge import http_client_loggers

    assert "httpx2" in http_client_loggers() and "httpx" in http_client_loggers()
    with caplog.at_level(logging.INFO):
        GPTJudge(judge_config).score_many([("Q", f"answer {i} score=5", None) for i in range(3)])
    assert server.requests == 3
    assert not [r for r in caplog.records if "HTTP Request" in r.getMessage()], "one line per answer"


def test_judge_takes_several_samples_files_as_the_readmes_glob_gives_them(
    server, tmp_path, monkeypatch, capsys, caplog
):
    """`kvcore-eval judge runs/gen/*/samples_kvcore_alpaca_gen_*.jsonl` matching two files: both judged, each
    beside itself, one summary per file; --out with several files is refused before the judge is asked."""
    from kvcore_eval.cli import main

    monkeypatch.setenv("KVCORE_TEST_KEY", KEY)
    for run, answers in (("a", ["x score=3", "y score=5"]), ("b", ["z score=8"])):
        (tmp_path / run).mkdir()
        _samples(tmp_path / run / "samples_kvcore_alpaca_gen_2026.jsonl", answers)
    files = sorted(str(p) for p in tmp_path.glob("*/samples_kvcore_alpaca_gen_*.jsonl"))
    options = ["--model", "judge-1", "--base-url", server.base_url, "--api-key-env", "KVCORE_TEST_KEY"]
    options += ["--cache-path", str(tmp_path / "judge.sqlite")]
    with pytest.raises(SystemExit), caplog.at_level("ERROR"):
        main(["judge", *files, *options, "--out", str(tmp_path / "judged.jsonl")])
    assert "--out names one file, and 2 samples files were given" in caplog.text and server.requests == 0
    main(["judge", *files, *options])
    summaries = json.loads(capsys.readouterr().out)
    assert sorted(summaries) == files
    assert [summaries[f]["gpt_score"] for f in files] == [4.0, 8.0] and server.requests == 3
    for file in files:
        judged = (tmp_path / file).with_name("judged_samples_kvcore_alpaca_gen_2026.jsonl")
        assert [json.loads(line)["gpt_score"] for line in judged.read_text().splitlines()] == (
            [3.0, 5.0] if "/a/" in file else [8.0]
        )
