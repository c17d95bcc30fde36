import json
import shutil

import pytest
from conftest import EXAMPLE_DATA, REPO

from kvcore_eval import outputs
from kvcore_eval.calibration.data import VISR_LANGUAGES, iter_texts, task_dataset

DOMAINS = ["alpaca", "medalpaca", "codealpaca", "wizardcoder", "functioncall"]
ALL_TASKS = [f"kvcore_{d}" for d in DOMAINS] + [f"kvcore_visr_{code}" for code in VISR_LANGUAGES]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The shipped data: the domain files and VisR-Bench's QA files in the repository's nested layout."""
    root = tmp_path_factory.mktemp("data")
    for domain in DOMAINS:
        shutil.copy(EXAMPLE_DATA / f"{domain}.jsonl", root / f"{domain}.jsonl")
    shutil.copytree(EXAMPLE_DATA / "visr", root / "visr")
    return root


def manager(data_dir, **metadata):
    from lm_eval.tasks import TaskManager

    return TaskManager(
        include_path=str(REPO / "tasks"), include_defaults=False, metadata={"data_dir": str(data_dir), **metadata}
    )


@pytest.fixture(scope="module")
def task_manager(data_dir):
    return manager(data_dir)


def build(task, task_manager, limit=None):
    from lm_eval.tasks import get_task_dict

    built = get_task_dict([task], task_manager)[task]
    built.build_all_requests(limit=limit, rank=0, world_size=1)
    return built


def test_groups_name_every_task(task_manager):
    assert set(ALL_TASKS) <= set(task_manager.all_subtasks)
    assert {"kvcore_domains", "kvcore_multilingual", "kvcore_all"} <= set(task_manager.all_groups)


@pytest.mark.parametrize("task", ALL_TASKS)
def test_every_task_builds_requests_from_the_shipped_data(task, task_manager):
    built = build(task, task_manager, limit=2)
    assert len(built.instances) == 2
    context, continuation = built.instances[0].arguments
    assert continuation.strip(), "the response is scored"
    if not task.startswith("kvcore_visr_"):
        assert context.strip()


def test_multilingual_group_runs_on_the_shipped_data(task_manager):
    """Every language of kvcore_multilingual has shipped questions (issue: 'visr has no records in language nl')."""
    from lm_eval.tasks import get_task_dict

    tasks = get_task_dict(["kvcore_multilingual"], task_manager)
    leaves = [t for group in tasks.values() for t in (group.values() if isinstance(group, dict) else [group])]
    assert len(leaves) == len(VISR_LANGUAGES)


def test_visr_languages_come_from_the_nested_files(data_dir):
    german = task_dataset("visr", language="de", data_dir=str(data_dir))["response"]
    assert len(german) == 6 and any("Gesamtumsatz" in q for q in german)
    english = task_dataset("visr", language="en", data_dir=str(data_dir))["response"]
    assert len(english) == 6 and all(q.isascii() for q in english), "English comes from text/table/figure_QA.json"


def test_visr_older_layout_is_read(tmp_path):
    (tmp_path / "visr").mkdir()
    older = [
        {
            "file_name": "d",
            "page": 1,
            "QA": {
                "detected_language": "Italian",
                "questions": [
                    {
                        "question_in_english": "Who?",
                        "question_in_detected_language": "Chi ha firmato?",
                        "answer_in_detected_language": "Lei.",
                    }
                ],
            },
        }
    ]
    (tmp_path / "visr" / "multilingual_QA.json").write_text(json.dumps(older))
    assert task_dataset("visr", language="it", data_dir=str(tmp_path))["response"] == ["Chi ha firmato?"]


def test_a_language_absent_from_the_data_lists_those_present(tmp_path):
    (tmp_path / "visr").mkdir()
    document = {
        "file_name": "d",
        "qa_list": [{"question": "Qui?", "answer": "", "page_index": 0, "detected_language": "French"}],
    }
    (tmp_path / "visr" / "multilingual_QA.json").write_text(json.dumps([document]))
    with pytest.raises(ValueError, match="no records in language 'cs' \\(Czech\\); languages present: French"):
        task_dataset("visr", language="cs", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown language 'xx'"):
        task_dataset("visr", language="xx", data_dir=str(tmp_path))


def test_visr_is_downloaded_from_the_pinned_url_and_cached(tmp_path, monkeypatch):
    """The loader reads the QA files over HTTP (a local server stands in for GitHub) and caches them."""
    import functools
    import http.server
    import threading

    from kvcore_eval.calibration import data

    served = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            served.append(self.path)

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(EXAMPLE_DATA / "visr"))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv(data.VISR_URL_ENV, f"http://127.0.0.1:{server.server_address[1]}/{{commit}}/../{{file}}")
    monkeypatch.setenv(outputs.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    try:
        first = task_dataset("visr", language="ja")["response"]
        assert len(first) == 6 and len(served) == 1
        assert task_dataset("visr", language="ja")["response"] == first and len(served) == 1, (
            "the second read is cached"
        )
    finally:
        server.shutdown()


def test_functioncall_perplexity_target_has_no_end_of_text_markers(task_manager):
    built = build("kvcore_functioncall", task_manager, limit=3)
    for instance in built.instances:
        context, continuation = instance.arguments
        assert "<|endoftext|>" not in continuation and "USER:" in continuation and context.startswith("SYSTEM:")


def test_functioncall_generation_prompt_is_the_first_request(data_dir):
    rows = task_dataset("functioncall", data_dir=str(data_dir), generation=True)
    first = json.loads((data_dir / "functioncall.jsonl").read_text().splitlines()[0])
    row = next(r for r in rows if r["prompt"].startswith(first["system"]))
    assert row["prompt"].endswith("USER: What is the weather in Paris?\n\n\nASSISTANT:")
    assert row["response"] == ' <functioncall> {"name": "get_weather", "arguments": \'{"city": "Paris"}\'}'


@pytest.mark.slow
def test_perplexity_tasks_score_a_seeded_default_subset(tmp_path):
    """A source larger than the default subset: 1000 documents by default, --metadata num_samples changes it."""
    with open(tmp_path / "alpaca.jsonl", "w") as f:
        for i in range(1200):
            f.write(json.dumps({"instruction": f"Task {i}", "input": "", "output": f"Answer {i}."}) + "\n")
    assert len(build("kvcore_alpaca", manager(tmp_path)).instances) == 1000
    assert len(build("kvcore_alpaca", manager(tmp_path, num_samples=7)).instances) == 7


def test_missing_field_names_the_field_and_the_file(tmp_path):
    (tmp_path / "alpaca.jsonl").write_text(json.dumps({"instruction": "x", "answer": "y"}) + "\n")
    with pytest.raises(KeyError, match=r"alpaca.*no field 'output'"):
        task_dataset("alpaca", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no medalpaca.jsonl"):
        task_dataset("medalpaca", data_dir=str(tmp_path))


def test_seeded_subset_is_fixed(data_dir):
    first = task_dataset("alpaca", data_dir=str(data_dir), num_samples=5, seed=3)["prompt"]
    assert first == task_dataset("alpaca", data_dir=str(data_dir), num_samples=5, seed=3)["prompt"]
    assert first != task_dataset("alpaca", data_dir=str(data_dir), num_samples=5, seed=4)["prompt"]


def test_calibration_texts_keep_the_language_filter_with_a_field_override(data_dir):
    texts = list(iter_texts("kvcore:visr:de", text_field="question", data_dir=str(data_dir)))
    assert len(texts) == 6 and texts[0] == "Wie hoch ist der für 2021 ausgewiesene Gesamtumsatz?"
    assert list(iter_texts("kvcore:visr:de", data_dir=str(data_dir))) == texts


@pytest.mark.slow
def test_lm_eval_task_texts_skip_the_evaluated_documents(data_dir):
    """lm_eval:<task> reads the task's own documents; skip_docs leaves out the ones --limit would score."""
    every = list(iter_texts("lm_eval:kvcore_codealpaca", data_dir=str(data_dir)))
    assert len(every) == len((data_dir / "codealpaca.jsonl").read_text().splitlines())
    assert list(iter_texts("lm_eval:kvcore_codealpaca", data_dir=str(data_dir), skip_docs=3)) == every[3:]
    with pytest.raises(ValueError, match="names a group"):
        list(iter_texts("lm_eval:kvcore_domains", data_dir=str(data_dir)))


def test_scored_bytes_and_words_are_those_lm_eval_scores(task_manager):
    """lm-eval moves the prompt's trailing newline onto the continuation and scores it: the byte weight counts it."""
    import sys

    from conftest import EXAMPLE_MODEL
    from lm_eval.models.huggingface import HFLM

    sys.path.insert(0, str(REPO / "tasks"))
    import utils

    lm = HFLM(pretrained=str(EXAMPLE_MODEL), device="cpu")  # the byte-level tokenizer: one token a byte
    task = build("kvcore_alpaca", task_manager, limit=2)
    for instance in task.instances:
        context, continuation = instance.args
        assert context.endswith("\n"), "the alpaca prompt ends with a newline"
        _, scored_tokens = lm._encode_pair(context, continuation)
        scored = lm.tokenizer.decode(scored_tokens)
        weights = utils.process_perplexity(instance.doc, [(-1.0, False)])
        assert weights["byte_perplexity"][1] == len(scored.encode("utf-8"))
        assert weights["word_perplexity"][1] == len(scored.split())


@pytest.mark.slow
def test_held_out_pool_is_not_capped_by_the_task_yaml_num_samples(tmp_path):
    """1,100 records, the YAML's default subset of 1,000 scored: calibration reads the other 100."""
    from kvcore_eval.calibration.data import iter_documents

    record = {"instruction": "Say a number.", "input": "", "output": ""}
    lines = [json.dumps({**record, "output": f"The number {i}."}) for i in range(1100)]
    (tmp_path / "alpaca.jsonl").write_text("\n".join(lines) + "\n")
    pool = list(iter_documents("lm_eval:kvcore_alpaca", data_dir=str(tmp_path), skip_docs=1000))
    assert len(pool) == 100


def test_loading_kvcore_tasks_warns_of_nothing_they_declare(caplog):
    """lm-eval's per-load "Custom kwargs" notice is dropped for our tasks, and every metric declares its aggregation
    and direction (no "aggregation is not" / "higher_is_better is not" defaults)."""
    import logging

    from kvcore_eval.harness.lm_tasks import ALL_RECORDS, load_as_evaluated, task_manager

    with caplog.at_level(logging.WARNING):
        load_as_evaluated(task_manager(str(EXAMPLE_DATA), None, ALL_RECORDS), ["kvcore_all", "kvcore_longtext"])
    noise = [r.getMessage() for r in caplog.records if r.name.startswith("lm_eval")]
    assert not [m for m in noise if "Custom kwargs" in m or "is not. using default" in m], noise


def test_lm_evals_ruler_module_prints_no_download_error_offline():
    import subprocess
    import sys

    code = "from kvcore_eval.harness.lm_tasks import import_ruler_quietly; import_ruler_quietly()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert "[nltk_data]" not in result.stdout + result.stderr and "urlopen" not in result.stdout + result.stderr
