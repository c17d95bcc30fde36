"""Rotary position embedding, undone and redone on cached keys.

transformers caches keys *after* RoPE. The paper's K = X·W_k is the key *before* RoPE, so the cache and
the calibration recover it by rotating back: RoPE (the `rotate_half` convention used by Llama, Mistral,
Qwen2/3, Gemma and Phi-3) maps each pair of dimensions (x1, x2) to (x1·cos − x2·sin, x2·cos + x1·sin), a
rotation scaled by `attention_scaling` (cos² + sin² = s²), so its inverse is the opposite rotation divided
by s². Partial rotary (cos narrower than head_dim) rotates only the first `cos.shape[-1]` dimensions.
"""

from __future__ import annotations

import torch
from torch import nn


def find_rotary_embedding(model: nn.Module) -> nn.Module | None:
    """The model's shared rotary-embedding module (`...rotary_emb`), or None for models without RoPE."""
    for name, module in model.named_modules():
        if name.endswith("rotary_emb") and hasattr(module, "inv_freq"):
            return module
    return None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE. keys: (batch, kv_heads, seq, head_dim); cos, sin: (batch, seq, rotary_dim)."""
    cos, sin = cos.unsqueeze(1).to(keys.dtype), sin.unsqueeze(1).to(keys.dtype)
    rotary_dim = cos.shape[-1]
    k_rot, k_pass = keys[..., :rotary_dim], keys[..., rotary_dim:]
    k_rot = k_rot * cos + _rotate_half(k_rot) * sin
    return torch.cat((k_rot, k_pass), dim=-1)


def unrotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Invert `rotate`: the key before RoPE. Same shapes as `rotate`."""
    cos, sin = cos.unsqueeze(1).to(keys.dtype), sin.unsqueeze(1).to(keys.dtype)
    rotary_dim = cos.shape[-1]
    k_rot, k_pass = keys[..., :rotary_dim], keys[..., rotary_dim:]
    scale_squared = cos * cos + sin * sin
    k_rot = (k_rot * cos - _rotate_half(k_rot) * sin) / scale_squared
    return torch.cat((k_rot, k_pass), dim=-1)


def cos_sin(rotary_embedding: nn.Module, like: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (batch, seq, rotary_dim) at `position_ids` (batch or 1, seq), in float32."""
    return rotary_embedding(like.float(), position_ids)


def positions_from_kwargs(attention_kwargs: dict, past_length: int, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """Position ids of the new tokens, (batch, seq): those the model passed to attention, else past_length + arange."""
    position_ids = attention_kwargs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(past_length, past_length + seq, device=device).unsqueeze(0)
    if position_ids.ndim == 3:  # multimodal rope sections: (sections, batch, seq); text positions are equal
        position_ids = position_ids[0]
    return position_ids.to(device).expand(batch, seq)
