"""lm-eval's TaskManager with kvcore's tasks: one copy of them (lm-eval's installed copy, else the checkout's
tasks/), the user's --include_path folders, and one index per process (building one reads every task lm-eval ships)."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvcore_eval import outputs

TASK_MARKER = "_kvcore_perplexity.yaml"


def tasks_dir() -> Path:
    """Where lm-eval finds our tasks: its own copy (regular install), else the source checkout's tasks/."""
    import lm_eval

    installed = Path(lm_eval.__file__).parent / "tasks" / "kvcore"
    if (installed / TASK_MARKER).is_file():
        return installed
    source = Path(__file__).resolve().parents[2] / "tasks"
    if (source / TASK_MARKER).is_file():
        return source
    raise FileNotFoundError(f"kvcore's lm-eval tasks are neither in {installed} nor in {source}: reinstall kvcore-eval")


def task_manager(
    data_dir: str | None = None, include_path: list[str] | None = None, metadata: dict[str, Any] | None = None
):
    """lm-eval's TaskManager with exactly one copy of our tasks, plus the user's `include_path` folders; `metadata`
    (and data_dir) reach every task's custom_dataset, as lm-eval's --metadata does. Building one indexes every
    task lm-eval ships (seconds), so a process keeps one per set of arguments."""
    metadata = {**({"data_dir": data_dir} if data_dir else {}), **(metadata or {})}
    return _task_manager(tuple(include_path or ()), json.dumps(metadata, sort_keys=True))


class _QuietTaskLoads(logging.Filter):
    """lm-eval warns "Custom kwargs can be passed to `--metadata`" each time a task with a custom dataset loads: our
    tasks all have one (their options are documented in tasks/README.md), and a sweep loads each task at every point,
    so for kvcore's tasks the warning is dropped, for any other task said once."""

    MESSAGE = "Custom kwargs can be passed to `--metadata`"

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.MESSAGE not in message:
            return True
        task = message.partition(":")[0]
        first = task not in self.seen and not task.startswith("kvcore_")
        self.seen.add(task)
        return first


def quiet_lm_eval_warnings() -> None:
    """Install the filter of lm-eval's task-loading warnings (idempotent): kvcore-eval's commands and kvcore_hf do."""
    task_logger = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _QuietTaskLoads) for f in task_logger.filters):
        task_logger.addFilter(_QuietTaskLoads())


@contextlib.contextmanager
def without_warning(logger_name: str, text: str) -> Iterator[None]:
    """Drop the warnings of one logger that contain `text` while the block runs (one known, inapplicable warning)."""
    drop = logging.Filter()
    drop.filter = lambda record: text not in record.getMessage()  # type: ignore[method-assign]
    logger = logging.getLogger(logger_name)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def import_ruler_quietly() -> None:
    """Import lm-eval's RULER data module once, its offline nltk download attempt captured: at import it tries to
    fetch nltk's punkt_tab and prints a `urlopen error` when there is no network. What it printed becomes one warning
    that says who needs that data (lm-eval's essay tasks; kvcore_ruler and niah_single_1 do not)."""
    import importlib.util
    import io
    import sys

    name = "lm_eval.tasks.ruler.prepare_niah"
    if (
        name in sys.modules
        or importlib.util.find_spec("nltk") is None
        or importlib.util.find_spec("wonderwords") is None
    ):
        return
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        importlib.import_module(name)
    if "Error loading punkt_tab" in printed.getvalue():
        logging.getLogger(__name__).warning(
            "nltk's punkt_tab data is not installed and could not be downloaded (no network): lm-eval's essay RULER "
            "tasks need it (python -m nltk.downloader punkt_tab where a network is reachable); kvcore_ruler_* and "
            "niah_single_1 do not"
        )
    elif printed.getvalue().strip():
        logging.getLogger(__name__).info("lm-eval's RULER module printed: %s", printed.getvalue().strip())


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: tuple[str, ...], metadata_json: str):
    import lm_eval
    from lm_eval.tasks import TaskManager

    quiet_lm_eval_warnings()

    ours = tasks_dir()
    paths = ([] if ours.is_relative_to(Path(lm_eval.__file__).parent) else [str(ours)]) + list(include_path)
    return TaskManager(include_path=paths or None, metadata=json.loads(metadata_json) or None)


def load_as_evaluated(manager, names: list[str]) -> dict:
    """`manager.load_task_or_group(names)` under the random seeds lm-eval's simple_evaluate sets before it loads
    tasks (its defaults), so a generated task (RULER draws needles and depths from the global RNGs at load time)
    gives the documents an evaluation scores. The global random states are restored afterwards."""
    import random

    import numpy as np
    import torch
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED

    import_ruler_quietly()  # before the seeds are set: its import draws nothing, but prints offline
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        random.seed(DEFAULT_RANDOM_SEED)
        np.random.seed(DEFAULT_OTHER_SEED)
        torch.manual_seed(DEFAULT_OTHER_SEED)
        return manager.load_task_or_group(names)
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def save_tokenizer(tokenizer, out: Path) -> Path:
    """Write `tokenizer` (for example one read from a GGUF file) as a folder that `AutoTokenizer.from_pretrained`
    and lm-eval's RULER tasks (`tokenizer=`) read: written beside `out`, then renamed into place. Refuses a folder
    that holds anything already."""
    import os
    import tempfile

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder: pass a new folder for the tokenizer")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def tokenizer_metadata(model_id: str, gguf_file: str | None, tokenizer) -> dict[str, str]:
    """What `lm_eval --model_args pretrained=<model_id>[,gguf_file=...]` hands a generated task to size its documents
    (lm-eval's RULER reads `tokenizer`, else `pretrained`). A GGUF file has no tokenizer folder RULER could read, so
    its tokenizer is written once under $KVCORE_CACHE_DIR/tokenizers/<content hash>/ and named as `tokenizer`."""
    if gguf_file is None:
        return {"pretrained": model_id}
    return {"pretrained": model_id, "gguf_file": gguf_file, "tokenizer": str(cached_tokenizer_dir(tokenizer))}


def cached_tokenizer_dir(tokenizer) -> Path:
    """A folder holding `tokenizer`, named by the hash of its saved files (written once, reused after)."""
    import hashlib
    import os
    import shutil
    import tempfile

    root = outputs.cache_dir("tokenizers")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp."))
    tokenizer.save_pretrained(tmp)
    digest = hashlib.sha256()
    for path in sorted(tmp.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    final = root / digest.hexdigest()[:16]
    if final.is_dir():
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, final)
    return final


ALL_RECORDS = {"num_samples": None}  # lm-eval metadata: a kvcore task's every record, in its seeded order


def lm_eval_task_documents(
    task: str,
    skip_docs: int = 0,
    data_dir: str | None = None,
    include_path: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Iterator[tuple[str, str]]:
    """An lm-eval task's documents as lm-eval scores them, (doc_to_text, delimiter + doc_to_target), after the first
    `skip_docs` (the documents an evaluation with --limit skip_docs scores): calibration data disjoint from the
    evaluation.

    `metadata` reaches the task as lm-eval's --metadata does. Generated tasks (RULER, kvcore_ruler) draw their
    documents at load time from the global random state and the tokenizer named in it, so they are loaded the way
    an evaluation loads them (`lm_tasks.load_as_evaluated`); a generation task's prompt is the context lm-eval sends
    (its answer prefix, gen_prefix, included: what `overlap` matches a scored request by) and its response every
    reference answer."""
    # Every record of a kvcore task, in its seeded order (the YAML's num_samples would cap the pool that lies
    # beyond the scored documents); the first N are those `--limit N` scores, with or without the cap.
    manager = task_manager(data_dir, include_path, {**ALL_RECORDS, **(metadata or {})})
    tasks = list(leaf_tasks(load_as_evaluated(manager, [task])))
    if len(tasks) != 1:
        raise ValueError(f"lm_eval:{task} names a group of {len(tasks)} tasks: calibrate on one task at a time")
    instance = tasks[0]
    delimiter = instance.config.target_delimiter or ""
    generation = instance.config.output_type == "generate_until"
    for doc in itertools.islice(instance.eval_docs, skip_docs, None):
        target = instance.doc_to_target(doc)
        if generation:
            answers = target if isinstance(target, list) else [target]
            prefix = instance.doc_to_prefix(doc) or ""
            text = str(instance.doc_to_text(doc))
            yield _generation_split(
                instance, doc, text + f"{delimiter}{prefix} {', '.join(map(str, answers))}".rstrip()
            )
            continue
        if isinstance(target, list):
            target = target[0] if target else ""
        if isinstance(target, int) and instance.config.doc_to_choice is not None:
            target = instance.doc_to_choice(doc)[target]
        yield str(instance.doc_to_text(doc)), f"{delimiter}{target}"


def _generation_split(instance, doc, whole: str) -> tuple[str, str]:
    """(prompt, response) of a generation document whose calibrated text is `whole`: the prompt is the context lm-eval
    sends the model (doc_to_text, the target delimiter and the answer prefix, 0-shot), so that the calibration's
    prompt digest is the digest of the scored request's context (`overlap`); where that context is not a prefix of
    the text (a description or few-shot examples), doc_to_text."""
    context = instance.fewshot_context(doc, num_fewshot=0, gen_prefix=instance.doc_to_prefix(doc))
    if isinstance(context, str) and whole.startswith(context):
        return context, whole[len(context) :]
    text = str(instance.doc_to_text(doc))
    return text, whole[len(text) :]


def check_continuations_fit(instance, limit: int | None, tokenizer, max_length: int, model: str) -> None:
    """lm-eval scores a loglikelihood request only when its continuation fits the model's context (HFLM asserts it,
    after the model loaded): a document of the first `limit` whose continuation does not is refused here, with its
    task, index and the fix. A token holds at least one byte, so only continuations longer than the context in bytes
    are tokenized."""
    if instance.config.output_type not in ("loglikelihood", "multiple_choice"):
        return  # rolling perplexity is windowed, a generation's context cut from the left
    delimiter = instance.config.target_delimiter or ""
    for index, doc in enumerate(itertools.islice(instance.eval_docs, limit)):
        for continuation in _continuations(instance, doc, delimiter):
            if len(continuation.encode("utf-8", "surrogatepass")) <= max_length:
                continue
            tokens = len(tokenizer(continuation, add_special_tokens=False)["input_ids"])
            if tokens > max_length:
                raise ValueError(
                    f"{instance.config.task} document {index} ({continuation[:40].strip()!r}...): its scored "
                    f"continuation is {tokens} tokens, more than the {max_length}-token context of {model}, and "
                    "lm-eval cannot score it; shorten or drop that record in the task's data, or score fewer "
                    "documents (--limit)"
                )


# A stand-in model answer per output type: what lm-eval hands process_results for one loglikelihood document.
_STAND_IN_RESULTS = {"loglikelihood": [(-1.0, False)], "loglikelihood_rolling": [-1.0]}


def check_declared_metrics(instance) -> None:
    """A task's own process_results may return a metric its metric_list does not declare: lm-eval then averages it,
    a raw TypeError after the whole run where the value is a (loglikelihood, count) pair. Tried on the first
    document with a stand-in answer (loglikelihood tasks only: no model, and nothing that calls out), such a metric is
    refused before anything loads."""
    stand_in = _STAND_IN_RESULTS.get(instance.config.output_type)
    if stand_in is None or not callable(instance.config.process_results):
        return
    doc = next(iter(instance.eval_docs), None)
    try:
        returned = instance.process_results(doc, stand_in) if doc is not None else {}
    except Exception:  # noqa: BLE001  the stand-in is not what this process_results reads: lm-eval's run will tell
        return
    declared = {str(entry["metric"]) for entry in instance.config.metric_list or []}
    undeclared = sorted(
        name for name, value in (returned or {}).items() if name not in declared and not isinstance(value, int | float)
    )
    if undeclared:
        raise ValueError(
            f"{instance.config.task}'s process_results returns {', '.join(undeclared)}, which its metric_list does not "
            "declare, so lm-eval would average its (loglikelihood, count) pairs and fail after the run: add "
            f"{undeclared[0]} to the metric_list of its YAML with its aggregation (e.g. bits_per_byte: aggregation "
            "bits_per_byte), or stop returning it"
        )


def _continuations(instance, doc, delimiter: str) -> list[str]:
    """What lm-eval scores of a loglikelihood document: its target, or each choice of a multiple-choice one."""
    if instance.config.output_type == "multiple_choice":
        return [f"{delimiter}{choice}" for choice in instance.doc_to_choice(doc)]
    target = instance.doc_to_target(doc)
    if isinstance(target, list):
        target = target[0] if target else ""
    if isinstance(target, int) and instance.config.doc_to_choice is not None:
        target = instance.doc_to_choice(doc)[target]
    return [f"{delimiter}{target}"]


def leaf_tasks(loaded) -> Iterator[Any]:
    for value in loaded.values():
        yield from leaf_tasks(value) if isinstance(value, dict) else [value]
