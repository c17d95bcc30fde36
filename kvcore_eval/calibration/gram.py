"""Incremental float64 Gram matrices KᵀK and VᵀV, recorded through transformers' Cache seam.

`GramRecorder` is a `Cache` whose layers store nothing: every attention call hands its new keys and values
to `update`, which adds their Gram to a float64 accumulator and returns them untouched, so attention runs
exactly as without a cache. Memory is (spaces, layers, D, D) whatever the token count.

Spaces: `key_post_rope` (what a KV cache holds), `key_pre_rope` (the paper's K = X·W_k, recovered by undoing
RoPE with the tables the layer really used, `rope.RopeTap`, and verified by `selfcheck`; equal to post-RoPE
for models without RoPE) and `value`. Padding enters as zero rows, which add nothing to XᵀX.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from kvcore_eval.model.models import KVGeometry
from kvcore_eval.model.rope import RopeTap, pre_rope_keys
from kvcore_eval.spaces import SPACES


class GramAccumulator:
    """Per-layer float64 Grams for each space, and the token count each layer has seen."""

    def __init__(self, geometry: KVGeometry, device: torch.device | str = "cpu"):
        self.geometry = geometry
        width = geometry.width
        self.grams = {
            space: torch.zeros(geometry.num_layers, width, width, dtype=torch.float64, device=device)
            for space in SPACES
        }
        self.token_count = torch.zeros(geometry.num_layers, dtype=torch.int64, device=device)  # (layers,)

    def add(self, layer_idx: int, space: str, activations: torch.Tensor) -> None:
        """activations: (tokens, D) of one layer; accumulated as float64 XᵀX."""
        rows = activations.to(torch.float64)
        self.grams[space][layer_idx].addmm_(rows.T, rows)

    def nonfinite_layers(self) -> list[int]:
        """Layers whose Gram holds NaN or inf (one device sync for all layers and spaces)."""
        traces = torch.stack(
            [gram.diagonal(dim1=1, dim2=2).sum(-1) for gram in self.grams.values()]
        )  # (spaces, layers)
        bad = ~torch.isfinite(traces).all(dim=0)
        return bad.nonzero().flatten().tolist()

    def all_reduce(self) -> None:
        """Sum Grams and token counts over the processes of a torch.distributed group."""
        import torch.distributed as dist

        for gram in self.grams.values():
            dist.all_reduce(gram, op=dist.ReduceOp.SUM)
        dist.all_reduce(self.token_count, op=dist.ReduceOp.SUM)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"gram.{space}": gram.cpu() for space, gram in self.grams.items()}
        state["token_count"] = self.token_count.cpu()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for space in SPACES:
            self.grams[space].copy_(state[f"gram.{space}"])
        self.token_count.copy_(state["token_count"])


@dataclass
class _RecordingContext:
    accumulator: GramAccumulator
    tap: RopeTap
    token_mask: torch.Tensor | None = None  # (batch, seq) 0/1: which tokens enter the Grams (no padding)


class _RecordingLayer(DynamicLayer):
    """Records the Gram of each update and stores nothing (get_seq_length stays 0: no past, one forward)."""

    def __init__(self, context: _RecordingContext, layer_idx: int):
        super().__init__()
        self.context = context
        self.layer_idx = layer_idx

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: (batch, kv_heads, seq, head_dim)
        batch, kv_heads, seq, head_dim = key_states.shape
        geometry = self.context.accumulator.geometry
        if (kv_heads, head_dim) != (geometry.kv_heads, geometry.head_dim):
            raise ValueError(
                f"layer {self.layer_idx} caches {kv_heads} heads x {head_dim} dims but the config says "
                f"{geometry.kv_heads} x {geometry.head_dim}: this architecture's attention is not supported"
            )
        mask = self.context.token_mask
        weights = None if mask is None else mask.reshape(-1, 1).to(torch.float64)  # (batch*seq, 1)
        add = self.context.accumulator.add
        key_rows = _token_rows(key_states, weights)
        add(self.layer_idx, "key_post_rope", key_rows)
        add(self.layer_idx, "value", _token_rows(value_states, weights))
        tap = self.context.tap
        pre_rope = (
            key_rows if not tap.has_rope else _token_rows(pre_rope_keys(key_states, self.layer_idx, tap), weights)
        )
        add(self.layer_idx, "key_pre_rope", pre_rope)
        self.context.accumulator.token_count[self.layer_idx] += mask.sum() if mask is not None else batch * seq
        return key_states, value_states


def _token_rows(states: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """(batch, kv_heads, seq, head_dim) -> float64 (batch*seq, kv_heads*head_dim), all KV heads of a token
    concatenated; rows of padding (weight 0) become zero."""
    batch, kv_heads, seq, head_dim = states.shape
    rows = states.transpose(1, 2).reshape(batch * seq, kv_heads * head_dim).to(torch.float64)
    return rows if weights is None else rows * weights


class GramRecorder(Cache):
    """A Cache that feeds every layer's keys and values into a `GramAccumulator`. Pass as `cache=` to a forward."""

    def __init__(self, accumulator: GramAccumulator, tap: RopeTap):
        self.context = _RecordingContext(accumulator, tap)
        layers = [_RecordingLayer(self.context, idx) for idx in range(accumulator.geometry.num_layers)]
        super().__init__(layers=layers)

    def set_token_mask(self, token_mask: torch.Tensor | None) -> None:
        """token_mask: (batch, seq), nonzero where a real token stands; None means every token counts."""
        self.context.token_mask = token_mask
