"""lm-eval's TaskManager with kvcore's tasks: one copy of them (lm-eval's installed copy, else the checkout's
tasks/), the user's --include_path folders, and one index per process (building one reads every task lm-eval ships)."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

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


class _OncePerTask(logging.Filter):
    """lm-eval warns "Custom kwargs can be passed to `--metadata`" each time a task with a custom dataset loads;
    a sweep loads each task at every point (24 times in a small sweep): once per task says it."""

    MESSAGE = "Custom kwargs can be passed to `--metadata`"

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.MESSAGE not in message:
            return True
        task = message.partition(":")[0]
        first = task not in self.seen
        self.seen.add(task)
        return first


def _quiet_repeated_warnings() -> None:
    task_logger = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _OncePerTask) for f in task_logger.filters):
        task_logger.addFilter(_OncePerTask())


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: tuple[str, ...], metadata_json: str):
    import lm_eval
    from lm_eval.tasks import TaskManager

    _quiet_repeated_warnings()

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

    from kvcore_eval.calibration.data import CACHE_ENV

    root = Path(os.environ.get(CACHE_ENV, "~/.cache/kvcore-eval")).expanduser() / "tokenizers"
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
