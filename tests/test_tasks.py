import json
import shutil

import pytest

from conftest import EXAMPLE_DATA, REPO
from kvcore_eval.data import VISR_LANGUAGES, task_dataset

DOMAINS = ["alpaca", "medalpaca", "codealpaca", "wizardcoder", "functioncall"]
ALL_TASKS = [f"kvcore_{d}" for d in DOMAINS] + [f"kvcore_visr_{code}" for code in VISR_LANGUAGES]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The shipped domain files, and a VisR file the test writes with two questions in every language."""
    root = tmp_path_factory.mktemp("data")
    for domain in DOMAINS:
        shutil.copy(EXAMPLE_DATA / f"{domain}.jsonl", root / f"{domain}.jsonl")
    with open(root / "visr.jsonl", "w") as f:
        for code, name in VISR_LANGUAGES.items():
            for i in range(2):
                f.write(json.dumps({"question": f"question {i} in {name}?", "language": name}) + "\n")
    return root


@pytest.fixture(scope="module")
def task_manager(data_dir):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(REPO / "tasks"), include_defaults=False, metadata={"data_dir": str(data_dir)})


def test_groups_name_every_task(task_manager):
    assert set(ALL_TASKS) <= set(task_manager.all_subtasks)
    assert {"kvcore_domains", "kvcore_multilingual", "kvcore_all"} <= set(task_manager.all_groups)


@pytest.mark.parametrize("task", ALL_TASKS)
def test_every_task_builds_requests_from_local_data(task, task_manager):
    from lm_eval.tasks import get_task_dict

    built = get_task_dict([task], task_manager)[task]
    built.build_all_requests(limit=2, rank=0, world_size=1)
    assert len(built.instances) == 2
    context, continuation = built.instances[0].arguments
    assert continuation.strip(), "the response is scored"
    if task.startswith("kvcore_visr_"):
        assert VISR_LANGUAGES[task.removeprefix("kvcore_visr_")] in continuation
    else:
        assert context.strip()


def test_missing_field_names_the_field_and_the_file(tmp_path):
    (tmp_path / "alpaca.jsonl").write_text(json.dumps({"instruction": "x", "answer": "y"}) + "\n")
    with pytest.raises(KeyError, match=r"alpaca.*no field 'output'"):
        task_dataset("alpaca", data_dir=str(tmp_path))


def test_unknown_language_and_missing_file(data_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown language 'xx'"):
        task_dataset("visr", language="xx", data_dir=str(data_dir))
    with pytest.raises(FileNotFoundError, match="no medalpaca.jsonl"):
        task_dataset("medalpaca", data_dir=str(tmp_path))


def test_seeded_subset_is_fixed(data_dir):
    first = task_dataset("alpaca", data_dir=str(data_dir), num_samples=5, seed=3)["prompt"]
    assert first == task_dataset("alpaca", data_dir=str(data_dir), num_samples=5, seed=3)["prompt"]
    assert first != task_dataset("alpaca", data_dir=str(data_dir), num_samples=5, seed=4)["prompt"]


def test_calibration_texts_keep_the_language_filter_with_a_field_override(data_dir):
    from kvcore_eval.data import iter_texts

    texts = list(iter_texts("kvcore:visr:de", text_field="question", data_dir=str(data_dir)))
    assert texts == ["question 0 in German?", "question 1 in German?"]
    assert list(iter_texts("kvcore:visr:de", data_dir=str(data_dir))) == texts
