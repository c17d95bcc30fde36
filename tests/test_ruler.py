"""RULER offline: lm-eval's synthetic RULER tasks and kvcore_ruler with kvcore_hf, the documents kvcore_ruler builds,
calibration on generated tasks held out from what is scored, and `kvcore-eval tokenizer`."""

import pytest
from conftest import EXAMPLE_DATA, EXAMPLE_MODEL

from kvcore_eval.harness import ruler

pytestmark = pytest.mark.filterwarnings("ignore")

# lm-eval's RULER tasks that generate their documents without a download (checked one by one; the essay tasks
# niah_single_2/3, niah_multikey_1, niah_multiquery, niah_multivalue read the hub, qa_squad/qa_hotpot download
# their questions), and kvcore's essay-haystack tasks over the shipped text.
OFFLINE_RULER = ["niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_cwe", "ruler_fwe"]
KVCORE_RULER = [f"kvcore_ruler_{name}" for name in ruler.KINDS]
LENGTH = 2048  # tokens; the example model (1024 positions, read here up to 4096) has a byte-level tokenizer


@pytest.fixture(scope="module")
def count_tokens():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(EXAMPLE_MODEL)
    return lambda text: len(tokenizer(text).input_ids)


@pytest.mark.parametrize("task", sorted(ruler.KINDS))
def test_kvcore_ruler_documents_are_deterministic_and_of_the_requested_length(task, tmp_path, count_tokens):
    haystack = tmp_path / "texts"
    haystack.mkdir()
    (haystack / "a.txt").write_text((EXAMPLE_DATA / "alpaca.jsonl").read_text())
    words = ruler.haystack_words(haystack)
    for length in (768, 1024):
        docs = [ruler.build_document(task, i, length, words, count_tokens) for i in range(3)]
        assert docs == [ruler.build_document(task, i, length, words, count_tokens) for i in range(3)]
        assert docs != [ruler.build_document(task, i, length, words, count_tokens, seed=7) for i in range(3)]
        for doc in docs:
            assert doc["length"] == count_tokens(doc["input"]) + ruler.TOKENS_TO_GENERATE
            assert 0.98 * length <= doc["length"] <= length
            assert all(answer in doc["input"] for answer in doc["outputs"])
            assert len(doc["outputs"]) == (4 if task in ("niah_multivalue", "niah_multiquery") else 1)
            assert doc["input"].count("One of the special magic") == (1 if task.startswith("niah_single") else 4)


def test_haystack_is_a_file_or_a_folder_and_the_shipped_one_by_default(tmp_path):
    assert len(ruler.haystack_words()) > 3000
    with pytest.raises(ValueError, match="does not exist"):
        ruler.haystack_words(tmp_path / "missing")
    with pytest.raises(ValueError, match="no .txt files"):
        ruler.haystack_words(tmp_path)
    docs = ruler.text_documents(None, 1000)
    assert len(docs) == len(ruler.haystack_words()) // 1000
    assert " ".join(d["text"] for d in docs).split() == ruler.haystack_words()[: 1000 * len(docs)]


def test_largest_fitting_finds_the_edge_from_any_hint():
    for limit in (0, 1, 77, 3000):
        for hint in (0, 1, 50, 5000):
            assert ruler.largest_fitting(lambda n, limit=limit: n <= limit, hint) == limit


def test_kvcore_ruler_reads_a_gguf_tokenizer_and_says_what_to_pass_without_one():
    with pytest.raises(ValueError, match="tokenizer"):
        ruler.tokenizer_from({})
    assert ruler.tokenizer_from({"pretrained": str(EXAMPLE_MODEL)}).name_or_path == str(EXAMPLE_MODEL)
    assert ruler.tokenizer_from({"pretrained": "x", "tokenizer": str(EXAMPLE_MODEL)}).name_or_path == str(EXAMPLE_MODEL)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from kvcore_eval.calibration.calibrate import calibrate
    from kvcore_eval.config import CalibrationConfig

    return calibrate(
        CalibrationConfig(
            model=str(EXAMPLE_MODEL),
            dataset="kvcore:alpaca",
            data_dir=str(EXAMPLE_DATA),
            out=str(tmp_path_factory.mktemp("ruler") / "artifact"),
            max_tokens=2000,
            seq_len=128,
            device="cpu",
        )
    )


def full_rank_kvcore(artifact):
    """kvcore_hf on the example model at full rank (it must generate exactly what hf generates)."""
    from kvcore_eval.harness.wrapper import KVCoreHFLM

    return KVCoreHFLM(
        pretrained=str(EXAMPLE_MODEL),
        device="cpu",
        batch_size=1,
        max_length=4096,
        calibration=str(artifact),
        key_rank="full",
        value_rank="full",
    )


@pytest.fixture(scope="module")
def models(artifact):
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(EXAMPLE_MODEL), device="cpu", batch_size=1, max_length=4096)
    return hf, full_rank_kvcore(artifact)


def manager():
    from kvcore_eval.harness.lm_tasks import task_manager

    return task_manager(None, None, {"pretrained": str(EXAMPLE_MODEL), "max_seq_lengths": [LENGTH]})


def first_request(task: str):
    """The task's first document and the generation request lm-eval builds for it (documents made once)."""
    from lm_eval.api.instance import Instance

    from kvcore_eval.harness.lm_tasks import leaf_tasks, load_as_evaluated

    (instance,) = leaf_tasks(load_as_evaluated(manager(), [task]))
    doc = next(iter(instance.eval_docs))
    context = instance.fewshot_context(doc, 0, gen_prefix=instance.doc_to_prefix(doc))
    arguments = (context, {**instance.config.generation_kwargs, "max_gen_toks": 12})
    return instance, doc, Instance("generate_until", doc, arguments, 0)


@pytest.mark.slow
@pytest.mark.parametrize("task", OFFLINE_RULER + KVCORE_RULER)
def test_ruler_tasks_run_offline_and_full_rank_kvcore_hf_generates_what_hf_generates(task, models, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    hf, kv = models
    instance, doc, request = first_request(task)
    (expected,), (got,) = hf.generate_until([request]), kv.generate_until([request])
    assert got == expected and got.strip()
    assert instance.process_results(doc, [got])[str(LENGTH)] >= 0  # scored at the requested length
    assert doc["length"] <= LENGTH  # RULER's length: the input's tokens plus the 128 it budgets for the answer
    if task in KVCORE_RULER:
        assert doc["length"] >= 0.98 * LENGTH


@pytest.mark.slow
def test_calibration_on_a_generated_task_reads_only_documents_after_the_scored_ones(models):
    """`lm_eval:niah_single_1` with --skip-docs N: the first N documents are exactly those an evaluation with
    --limit N scores (same needles: the task is loaded under the evaluation's seeds), and none is calibrated."""
    import lm_eval

    from kvcore_eval.calibration.data import iter_texts

    hf, _ = models
    results = lm_eval.simple_evaluate(
        model=hf,
        tasks=["niah_single_1"],
        limit=2,
        task_manager=manager(),
        gen_kwargs="max_gen_toks=2",
        log_samples=True,
    )
    scored = [sample["doc"]["input"] for sample in results["samples"]["niah_single_1"]]
    metadata = {"pretrained": str(EXAMPLE_MODEL), "max_seq_lengths": [LENGTH]}
    every = list(iter_texts("lm_eval:niah_single_1", metadata=metadata))
    held_out = list(iter_texts("lm_eval:niah_single_1", metadata=metadata, skip_docs=2))
    assert [text.startswith(prompt) for text, prompt in zip(every[:2], scored, strict=True)] == [True, True]
    assert held_out == every[2:] and not any(text.startswith(p) for text in held_out for p in scored)
    assert every[2] != every[0] and "The special magic number for" in every[2]


def test_tokenizer_command_writes_a_folder_ruler_reads(tmp_path, capsys, count_tokens):
    from lm_eval.tasks.ruler.common_utils import get_tokenizer

    from kvcore_eval.cli import main
    from kvcore_eval.harness.lm_tasks import save_tokenizer

    main(["tokenizer", str(EXAMPLE_MODEL), "--out", str(tmp_path / "tok")])
    assert '{"tokenizer": "' + str(tmp_path / "tok") + '"}' in capsys.readouterr().out
    text = "The grass is green. 1234567"
    assert len(get_tokenizer(str(tmp_path / "tok"))(text).input_ids) == count_tokens(text)
    with pytest.raises(ValueError, match="not an empty folder"):
        save_tokenizer(get_tokenizer(str(tmp_path / "tok")), tmp_path / "tok")


@pytest.mark.slow
@pytest.mark.parametrize("skip_docs,seen", [(0, 2), (2, 0)])
def test_overlap_of_a_calibration_on_a_generated_task_with_its_scored_documents(skip_docs, seen, tmp_path):
    """Calibrated on `lm_eval:niah_single_1` (documents generated at load time), then scored by kvcore_hf on
    niah_single_1 with --limit 2: the results count both scored documents as seen when the calibration read them,
    none when --skip-docs 2 kept them apart. The generation request's context holds the answer prefix, so the
    calibration's prompt is that context."""
    import json

    import lm_eval

    from kvcore_eval.calibration.calibrate import calibrate
    from kvcore_eval.config import CalibrationConfig

    artifact = calibrate(
        CalibrationConfig(
            model=str(EXAMPLE_MODEL),
            dataset="lm_eval:niah_single_1",
            metadata=json.dumps({"max_seq_lengths": [LENGTH]}),
            skip_docs=skip_docs,
            out=str(tmp_path / "artifact"),
            max_tokens=2 * LENGTH,
            seq_len=256,
            device="cpu",
        )
    )
    lm = full_rank_kvcore(artifact)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=["niah_single_1"], limit=2, task_manager=manager(), gen_kwargs="max_gen_toks=2"
    )
    overlap = results["config"]["kvcore"]["calibration_overlap"]["niah_single_1"]
    assert overlap == {"scored": 2, "seen": seen, "fraction": seen / 2}
