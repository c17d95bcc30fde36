"""GPT-score: an LLM judge behind any OpenAI-compatible server (OpenAI, vLLM, Ollama, llama.cpp server).

The judge rates an answer to an instruction from 1 to 10 (the reference answer shown when there is one),
with a versioned prompt, temperature 0 and a seed. Every answer is cached on disk (sqlite) under
(judge model, prompt version, instruction, reference, answer), written as soon as it arrives: a rerun or a
crash costs no second call. HTTP retries with exponential backoff on 429/5xx/timeouts are the openai
client's own (`max_retries`). An unparseable reply is asked again once with a stricter reminder, then
recorded as missing, never as a made-up score, and not cached: the next run asks again. The API key is read
from the environment and never written.

In lm-eval's `_gen` tasks (`score_for_task`) a judge that is down or not configured never costs the
generations: the answers are scored as missing, with one loud error, and lm-eval writes them to its samples
file (`--log_samples`), which `kvcore-eval judge` scores afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvcore_eval.config import JudgeConfig, env_name
from kvcore_eval.metrics import bootstrap_stderr_of_mean
from kvcore_eval.outputs import atomic_write_text

logger = logging.getLogger(__name__)

PROMPT_VERSION = "kvcore-gpt-score-v1"
SYSTEM_PROMPT = "You are a careful, impartial judge of answers written by an AI assistant."
USER_TEMPLATE = (
    "Rate the assistant's answer to the instruction for helpfulness, correctness and relevance, on a scale of "
    "1 (useless) to 10 (excellent).{reference_note}\n\n[Instruction]\n{instruction}\n\n{reference_block}"
    "[Assistant's answer]\n{answer}\n\nReply with one line, exactly: Rating: N"
)
STRICT_REMINDER = (
    "Your reply could not be read. Reply with exactly `Rating: N`, N an integer from 1 to 10, and nothing else."
)
_RATING = re.compile(r"rating\s*[:=]\s*\[*\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


@dataclass
class Judgement:
    score: float | None  # None: missing (unparseable after the reminder)
    raw: str
    cached: bool


class JudgeUnavailable(RuntimeError):
    """The judge did not answer after every retry; judgements obtained so far are in the cache."""


def parse_rating(reply: str) -> float | None:
    """The judge's [[rating]] from its reply, 1 to 10; None when absent or out of range."""
    match = _RATING.search(reply or "")
    if match is None:
        return None
    value = float(match.group(1))
    return value if 1 <= value <= 10 else None


def render_prompt(instruction: str, answer: str, reference: str | None) -> str:
    """The user message for one answer, with the reference answer when the task has one."""
    has_reference = bool(reference and reference.strip())
    return USER_TEMPLATE.format(
        instruction=instruction.strip(),
        answer=answer.strip(),
        reference_note=" A reference answer is shown for comparison." if has_reference else "",
        reference_block=f"[Reference answer]\n{reference.strip()}\n\n" if has_reference else "",
    )


class JudgeCache:
    """sqlite: one row per judgement, committed as it arrives. Holds no key and no headers."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, score REAL, raw TEXT, record TEXT)"
            )
            self._db.commit()
        except sqlite3.DatabaseError as err:
            raise ValueError(
                f"judge cache {self.path} is not an sqlite database ({err}): point --cache-path "
                f"({env_name('cache_path')}) at a new file, or at the judge.sqlite of an earlier run"
            ) from err

    @staticmethod
    def key(model: str, instruction: str, answer: str, reference: str | None) -> str:
        """One judgement's cache key: judge model, prompt version, instruction, reference and answer."""
        payload = json.dumps([model, PROMPT_VERSION, instruction, reference or "", answer])
        return hashlib.sha256(payload.encode()).hexdigest()

    def get(self, key: str) -> Judgement | None:
        """The cached judgement of `key`, or None."""
        with self._lock:
            row = self._db.execute("SELECT score, raw FROM judgements WHERE key = ?", (key,)).fetchone()
        return None if row is None else Judgement(row[0], row[1], cached=True)

    def put(self, key: str, judgement: Judgement, record: dict[str, Any]) -> None:
        """Store one judgement with its record, committed at once (a crash loses nothing judged)."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO judgements VALUES (?, ?, ?, ?)",
                (key, judgement.score, judgement.raw, json.dumps(record)),
            )
            self._db.commit()


@dataclass
class JudgeStats:
    calls: int = 0
    cache_hits: int = 0
    missing: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def http_client_loggers() -> list[str]:
    """The loggers of the HTTP client the installed openai package sends requests through (httpx; httpx2 in newer
    releases), each of which logs one INFO line per request."""
    import types

    try:
        from openai import _base_client
    except ImportError:
        return ["httpx", "httpx2"]
    used = {
        value.__name__.partition(".")[0] for value in vars(_base_client).values() if isinstance(value, types.ModuleType)
    }
    return sorted({"httpx", "httpx2"} | {name for name in used if name.startswith("httpx")})


def quiet_http_client() -> None:
    """One INFO line per answer from the HTTP client would drown the run's own log: its loggers log warnings only."""
    for name in http_client_loggers():
        client_logger = logging.getLogger(name)
        client_logger.setLevel(max(client_logger.getEffectiveLevel(), logging.WARNING))


class GPTJudge:
    """Scores answers through the openai client; `score` is thread-safe, `score_many` runs them concurrently."""

    def __init__(self, config: JudgeConfig):
        import openai

        api_key = os.environ.get(config.api_key_env)
        if not api_key:
            raise ValueError(
                f"no API key for the judge: set the environment variable {config.api_key_env} "
                "(any non-empty value for a local server that checks none)"
            )
        self.config = config
        self.client = openai.OpenAI(
            base_url=config.base_url, api_key=api_key, max_retries=config.max_retries, timeout=config.timeout
        )
        self.cache = JudgeCache(config.cache_path)
        self.stats = JudgeStats()
        quiet_http_client()
        self._stats_lock = threading.Lock()

    @property
    def where(self) -> str:
        """The judge's URL, as errors name it."""
        return self.config.base_url or "https://api.openai.com/v1"

    def _ask(self, messages: list[dict[str, str]]) -> str:
        """One chat completion; every way a server can fail is a JudgeUnavailable naming the judge's URL."""
        import openai

        extra = {"seed": self.config.seed} if self.config.seed is not None else {}
        try:
            response = self.client.chat.completions.create(
                model=self.config.model, messages=messages, temperature=0, max_tokens=32, **extra
            )
        except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
            raise JudgeUnavailable(
                f"judge at {self.where} refused the key in {self.config.api_key_env}: set it to a valid key"
            ) from err
        except (
            openai.APIConnectionError,
            openai.APITimeoutError,
            openai.RateLimitError,
            openai.InternalServerError,
        ) as err:
            raise JudgeUnavailable(
                f"judge {self.config.model} at {self.where} did not answer after "
                f"{self.config.max_retries} retries ({type(err).__name__}); every score obtained so far is kept in "
                f"{self.cache.path}: rerun once the server is up to continue"
            ) from err
        except openai.NotFoundError as err:
            raise JudgeUnavailable(
                f"judge at {self.where} answered 404 for model {self.config.model!r} ({err.message}): check the judge "
                f"model name (--model, {env_name('model')}) and the URL (--base-url, {env_name('base_url')})"
            ) from err
        except openai.APIError as err:  # 400, 422, a reply the client cannot read ...
            status = getattr(err, "status_code", None)
            raise JudgeUnavailable(
                f"judge at {self.where} refused the request for model {self.config.model!r} "
                f"({status or type(err).__name__}: {err.message}): check --model and --base-url"
            ) from err
        except ValueError as err:  # status 200 and a JSON body cut short, or not the shape of a chat completion
            raise JudgeUnavailable(
                f"judge at {self.where} answered with a body that is not a complete chat completion "
                f"({type(err).__name__}: {err}): the server or a proxy before it cut the reply short or is not "
                f"OpenAI-compatible; check it and --base-url ({env_name('base_url')})"
            ) from err
        return self._content(response)

    def _content(self, response: Any) -> str:
        """The reply's text, from an OpenAI-shaped response; anything else names the URL."""
        if isinstance(response, str | bytes):  # the client hands over a body that is not JSON as it is
            raise JudgeUnavailable(
                f"judge at {self.where} did not reply with JSON (it sent {str(response)[:60]!r}): --base-url must be "
                "an OpenAI-compatible endpoint, usually ending in /v1"
            )
        if not getattr(response, "choices", None) or getattr(response.choices[0], "message", None) is None:
            raise JudgeUnavailable(
                f"judge at {self.where} replied without `choices` (not an OpenAI chat completion): --base-url must be "
                "an OpenAI-compatible chat-completions endpoint"
            )
        with self._stats_lock:
            self.stats.calls += 1
            if response.usage is not None:
                self.stats.prompt_tokens += response.usage.prompt_tokens or 0
                self.stats.completion_tokens += response.usage.completion_tokens or 0
        return response.choices[0].message.content or ""

    def score(self, instruction: str, answer: str, reference: str | None = None) -> Judgement:
        """One answer's judgement: from the cache, else asked (unparsed replies once more, never cached)."""
        key = JudgeCache.key(self.config.model, instruction, answer, reference)
        if (cached := self.cache.get(key)) is not None:
            with self._stats_lock:
                self.stats.cache_hits += 1
            return cached
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": render_prompt(instruction, answer, reference)},
        ]
        reply = self._ask(messages)
        if (score := parse_rating(reply)) is None:
            messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": STRICT_REMINDER}]
            reply = self._ask(messages)
            score = parse_rating(reply)
        judgement = Judgement(score, reply, cached=False)
        if score is None:  # not cached: the next run asks again
            logger.warning("judge reply unparseable after the reminder, recorded as missing: %r", reply[:200])
            return judgement
        self.cache.put(
            key,
            judgement,
            {
                "model": self.config.model,
                "prompt_version": PROMPT_VERSION,
                "instruction": instruction,
                "reference": reference,
                "answer": answer,
            },
        )
        return judgement

    def score_many(self, items: list[tuple[str, str, str | None]]) -> list[Judgement]:
        """(instruction, answer, reference) triples, at most `max_concurrency` in flight; order kept."""
        from tqdm.auto import tqdm

        with ThreadPoolExecutor(max_workers=self.config.max_concurrency) as pool:
            answers = pool.map(lambda item: self.score(*item), items)
            judgements = list(tqdm(answers, total=len(items), desc="judge", unit="answer"))
        self.stats.missing += sum(j.score is None for j in judgements)
        return judgements

    def summary(self) -> dict[str, Any]:
        """Judge model, prompt version and this run's counts: calls, cache hits, missing scores, tokens."""
        return {"judge_model": self.config.model, "prompt_version": PROMPT_VERSION, **asdict(self.stats)}


JUDGED_PREFIX = "judged_"
JUDGED_FIELDS = ("doc_id", "gpt_score", "judge_raw")


def judged_path(samples_path: Path) -> Path:
    """`judged_<samples file name>` beside it: outside lm-eval's `samples_*.jsonl` glob, so a rerun of
    `kvcore-eval judge .../samples_<task>_*.jsonl` never takes the scores for samples."""
    return samples_path.with_name(JUDGED_PREFIX + samples_path.name)


def read_samples(samples_path: Path) -> tuple[list[dict[str, Any]], list[tuple[str, str, str | None]]]:
    """The samples of an lm-eval samples file and their (instruction, answer, reference); errors name the line."""
    if not samples_path.is_file():
        raise FileNotFoundError(f"samples file {samples_path} does not exist (lm-eval writes it with --log_samples)")
    samples, items = [], []
    try:
        lines = samples_path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{samples_path} is not text: pass the samples_<task>_*.jsonl lm-eval writes") from err
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            sample = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{samples_path} line {number} is not JSON: it is not an lm-eval samples file (JSON lines); pass the "
                "samples_<task>_*.jsonl that lm-eval writes with --log_samples"
            ) from err
        doc = sample.get("doc") if isinstance(sample, dict) else None
        if not isinstance(doc, dict) or "prompt" not in doc or not sample.get("filtered_resps"):
            raise ValueError(
                f"{samples_path} line {number} is not an lm-eval sample of a kvcore _gen task (a JSON object with "
                "doc.prompt and filtered_resps): judge the samples_<task>_*.jsonl of a kvcore _gen task"
            )
        answer = sample["filtered_resps"][0]
        samples.append(sample)
        items.append((doc["prompt"], answer if isinstance(answer, str) else answer[0], doc.get("response")))
    return samples, items


def check_judged_out(out_path: Path, samples_path: Path) -> None:
    """--out may replace only an earlier judged file: never the samples, a folder, or a file of the user's."""
    if out_path.resolve() == samples_path.resolve():
        raise ValueError(
            f"--out {out_path} is the samples file itself: the scores would replace the generations; "
            f"drop --out (default {judged_path(samples_path).name}) or name another file"
        )
    if out_path.is_dir():
        raise ValueError(f"--out {out_path} is a folder: name a file, e.g. {out_path / judged_path(samples_path).name}")
    if out_path.exists():
        first = out_path.read_text(encoding="utf-8", errors="replace").partition("\n")[0]
        try:
            ours = set(json.loads(first)) == set(JUDGED_FIELDS)
        except (json.JSONDecodeError, TypeError):
            ours = False
        if not ours:
            raise FileExistsError(
                f"--out {out_path} exists and is not a judged file kvcore-eval wrote: it is never replaced; "
                "name another file"
            )


def judge_samples(samples_path: str | Path, config: JudgeConfig, out_path: str | Path | None = None) -> dict[str, Any]:
    """Score an lm-eval samples file (--log_samples) of a generation task; writes judged_<samples name>.
    The samples and --out are checked before the judge is asked anything."""
    samples_path = Path(samples_path)
    samples, items = read_samples(samples_path)
    out_path = Path(out_path) if out_path is not None else judged_path(samples_path)
    check_judged_out(out_path, samples_path)
    judge = GPTJudge(config)
    judgements = judge.score_many(items)
    rows = [
        {"doc_id": sample.get("doc_id"), "gpt_score": judgement.score, "judge_raw": judgement.raw}
        for sample, judgement in zip(samples, judgements, strict=True)
    ]
    atomic_write_text(out_path, "".join(json.dumps(row) + "\n" for row in rows))
    scores = [j.score for j in judgements if j.score is not None]
    return {
        "samples": len(samples),
        "gpt_score": sum(scores) / len(scores) if scores else None,
        "gpt_score_stderr": bootstrap_stderr_of_mean(scores) if len(scores) > 1 else None,  # seeded bootstrap
        "output": str(out_path),
        **judge.summary(),
    }


_shared_judge: GPTJudge | None = None
_judge_error: str | None = None  # set once the judge failed in this process: later answers are not sent
_shared_lock = threading.Lock()
# A child of lm-eval's logger: plain `lm_eval` shows it.
task_logger = logging.getLogger("lm_eval.tasks.kvcore_judge")


def judge_from_env() -> GPTJudge:
    """One judge per process for lm-eval's `process_results`, configured by JudgeConfig.from_env()."""
    global _shared_judge
    with _shared_lock:
        if _shared_judge is None:
            _shared_judge = GPTJudge(JudgeConfig.from_env())
        return _shared_judge


def score_for_task(instruction: str, answer: str, reference: str | None) -> dict[str, float | None]:
    """process_results of the `_gen` tasks. A judge that is down or not configured costs no generation: the
    answer is recorded as missing, one error says how to score the samples file later, later answers are not sent."""
    global _judge_error
    if _judge_error is None:
        try:
            judgement = judge_from_env().score(instruction, answer, reference)
            return {"gpt_score": judgement.score, "gpt_score_missing": float(judgement.score is None)}
        except (JudgeUnavailable, ValueError, OSError) as err:
            _judge_error = str(err)
            kept = (
                "the samples file this run writes (--log_samples) keeps every generation"
                if {"--log_samples", "-s"} & set(sys.argv)
                else "rerun lm_eval with --log_samples to keep the generations in a samples file"
            )
            task_logger.error(
                "GPT-score not available (%s). Every answer of this run is reported as missing; %s: score it "
                "afterwards with `kvcore-eval judge <samples_*.jsonl> --model ...`",
                err,
                kept,
            )
    return {"gpt_score": None, "gpt_score_missing": 1.0}
