"""Damage by position: rolling perplexity split by where each token sits in the model's context window.

lm-eval scores a rolling-perplexity document (`loglikelihood_rolling`) in windows of the model's max length
(`lm_eval.utils.get_rolling_token_windows`, context_len=1, made disjoint): the first window predicts the first L
tokens after the prefix token; each later window predicts the next L tokens from the L tokens before them, and the
last, shorter window predicts its tokens from a full window of the tokens before them. A token's **position** here
is the index, in the window the model actually reads, of the input token whose logits predict it: 0 for the first
token of a document (predicted from the prefix token alone), L-1 at most. It is the number of earlier tokens the
model attends to when predicting it, so it is exactly how many cached keys and values the truncation acts on.

The windows and the scored logits are lm-eval's own, run through the model's `_model_call` (for `kvcore_hf`, with
its low-rank cache), so each bucket's log-likelihood sums back to lm-eval's loglikelihood_rolling of the document.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvcore_eval import outputs
from kvcore_eval.metrics import nd_ppl

logger = logging.getLogger(__name__)

DEFAULT_EDGES = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


@dataclass
class TokenScores:
    """Per predicted token of one or more documents: log-likelihood and position in the context window."""

    loglikelihood: np.ndarray  # (tokens,) float64, natural log
    position: np.ndarray  # (tokens,) int


def parse_edges(spec: str | None, max_length: int) -> list[int]:
    """Bucket edges [0, e1, ..., max_length]: `spec` is a comma-separated list of inner edges ("256,512,1024"),
    default 256, 512, 1k, 2k, ... below the model's max length."""
    if spec in (None, "", "default"):
        inner = [e for e in DEFAULT_EDGES if e < max_length]
    else:
        try:
            inner = sorted({int(e) for e in spec.split(",") if e.strip()})
        except ValueError:
            raise ValueError(
                f"--position-buckets {spec!r}: give increasing token positions such as 256,512,1024"
            ) from None
        if not inner or inner[0] <= 0:
            raise ValueError(f"--position-buckets {spec!r}: edges must be positive token positions")
        if inner[0] >= max_length:
            raise ValueError(
                f"--position-buckets {spec}: every edge is at or past the model's context of {max_length} tokens, so "
                f"the buckets collapse into one, 0-{max_length}: give edges below {max_length} (e.g. "
                f"{max_length // 4},{max_length // 2})"
            )
        inner = [e for e in inner if e < max_length]
    return [0, *inner, max_length]


def check_edges(spec: str | None, max_length: int) -> list[int]:
    """`parse_edges` before any model loads, with a warning naming the edges at or past the context (dropped)."""
    edges = parse_edges(spec, max_length)
    if spec not in (None, "", "default"):
        if dropped := sorted({int(e) for e in spec.split(",") if e.strip()} - set(edges)):
            logger.warning(
                "--position-buckets: %s at or past the model's context of %d tokens, dropped: the buckets are %s",
                ", ".join(map(str, dropped)),
                max_length,
                ", ".join(bucket_names(edges)),
            )
    return edges


def bucket_names(edges: list[int]) -> list[str]:
    return [f"{a}-{b}" for a, b in zip(edges[:-1], edges[1:], strict=True)]


def rolling_windows(tokens: list[int], prefix_token: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's rolling windows of a document: (input tokens, predicted tokens) per window, as HFLM makes them."""
    from lm_eval import utils

    pairs = utils.get_rolling_token_windows(
        token_list=tokens, prefix_token=prefix_token, max_seq_len=max_length, context_len=1
    )
    windows = []
    for context, continuation in map(utils.make_disjoint_window, pairs):
        whole = (context + continuation)[-(max_length + 1) :]  # what HFLM._loglikelihood_tokens feeds
        windows.append((whole[:-1], continuation))
    return windows


def score_text(lm, text: str) -> TokenScores:
    """Log-likelihood and context position of every token of `text` under `lm` (an HFLM or KVCoreHFLM), in
    lm-eval's rolling windows; the sum equals lm-eval's loglikelihood_rolling of `text`."""
    import torch
    import torch.nn.functional as F

    loglikelihoods, positions = [], []
    for inputs, continuation in rolling_windows(lm.tok_encode(text), lm.prefix_token_id, lm.max_length):
        with torch.no_grad():
            logits = lm._model_call(torch.tensor([inputs], device=lm.device))  # (1, len(inputs), vocab)
        scored = F.log_softmax(logits[0, -len(continuation) :], dim=-1)  # (len(continuation), vocab)
        target = torch.tensor(continuation, device=scored.device).unsqueeze(-1)
        loglikelihoods.append(torch.gather(scored, 1, target).squeeze(-1).double().cpu().numpy())
        positions.append(np.arange(len(inputs) - len(continuation), len(inputs)))
    return TokenScores(np.concatenate(loglikelihoods), np.concatenate(positions))


def bucket_sums(scores: TokenScores, edges: list[int]) -> dict[str, dict[str, float]]:
    """Per bucket [a, b) of positions: the tokens' summed log-likelihood, their count and their token perplexity."""
    out = {}
    for name, low, high in zip(bucket_names(edges), edges[:-1], edges[1:], strict=True):
        inside = (scores.position >= low) & (scores.position < high)
        total, count = float(scores.loglikelihood[inside].sum()), int(inside.sum())
        out[name] = {
            "loglikelihood": total,
            "tokens": count,
            "token_perplexity": float(np.exp(-total / count)) if count else float("nan"),
        }
    return out


def score_documents(lm, texts: list[str], edges: list[int]) -> dict[str, dict[str, float]]:
    """Bucket sums over several documents (every token of every document, pooled by position)."""
    scores = [score_text(lm, text) for text in texts]
    pooled = TokenScores(
        np.concatenate([s.loglikelihood for s in scores]), np.concatenate([s.position for s in scores])
    )
    return bucket_sums(pooled, edges)


def nd_ppl_by_bucket(truncated: dict, baseline: dict) -> dict[str, float]:
    """ND-PPL of each bucket's token perplexity: (PPL_r - PPL_full) / PPL_full."""
    return {
        name: nd_ppl(truncated[name]["token_perplexity"], baseline[name]["token_perplexity"])
        for name in baseline
        if baseline[name]["tokens"]
    }


def summarize(baseline: dict[str, Any], ranks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One rolling task's position table: tokens and full-rank token perplexity per bucket, ND-PPL per rank."""
    names = bucket_names(baseline["edges"])  # in position order (saved JSON may sort the keys)
    base = {name: baseline["buckets"][name] for name in names}
    return {
        "edges": baseline["edges"],
        "max_length": baseline["max_length"],
        "documents": baseline["documents"],
        "tokens": {name: b["tokens"] for name, b in base.items()},
        "baseline_token_perplexity": {name: b["token_perplexity"] for name, b in base.items()},
        "nd_ppl": {rank: nd_ppl_by_bucket(points["buckets"], base) for rank, points in ranks.items()},
    }


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# ND-PPL by position in the context window (truncated {result['truncate']}, keys {result['key_space']})",
        "",
        "Position: index in the model's context window of the token whose logits predict it (lm-eval's rolling "
        "windows of the model's max length; kvcore_eval/positions.py). ND-PPL of the bucket's token perplexity.",
    ]
    for task, table in result["tasks"].items():
        buckets = [name for name, n in table["tokens"].items() if n]
        lines += [
            "",
            f"## {task} ({table['documents']} documents, max length {table['max_length']})",
            "",
            "| | " + " | ".join(buckets) + " |",
            "|---|" + "---:|" * len(buckets),
            "| tokens | " + " | ".join(str(table["tokens"][b]) for b in buckets) + " |",
            "| token PPL, full rank | "
            + " | ".join(f"{table['baseline_token_perplexity'][b]:.3f}" for b in buckets)
            + " |",
        ]
        for rank, values in table["nd_ppl"].items():
            lines.append(f"| ND-PPL, rank {rank} | " + " | ".join(f"{values[b]:+.4f}" for b in buckets) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path) -> None:
    """ND-PPL against position bucket, a line per rank, a panel per rolling task."""
    from matplotlib.figure import Figure

    tasks = list(result["tasks"])
    figure = Figure(figsize=(0.5 + 4.2 * len(tasks), 3.4), dpi=130, layout="constrained")
    axes = figure.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks, strict=True):
        table = result["tasks"][task]
        buckets = [name for name, n in table["tokens"].items() if n]
        for rank, values in table["nd_ppl"].items():
            if float(rank) < 1:
                ax.plot(range(len(buckets)), [values[b] for b in buckets], marker="o", ms=4, label=f"rank {rank}")
        ax.set_xticks(range(len(buckets)), buckets, fontsize=7, rotation=30)
        ax.set(xlabel="position in the context window (tokens)", ylabel="ND-PPL of token perplexity", title=task)
        ax.title.set_fontsize(8)
        ax.axhline(0, color="k", lw=0.5)
        ax.grid(alpha=0.3)
        ax.legend(frameon=False, fontsize=7)
    figure.suptitle(f"damage by position: truncated {result['truncate']}", fontsize=9)
    outputs.atomic_save_figure(figure, path)
