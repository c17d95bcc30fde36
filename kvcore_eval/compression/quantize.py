"""Quantized storage of the cache's latents (`latent_bits=16|8|4`): what is stored, and how it is read back.

8 and 4 bits: symmetric absmax quantization **per token, per group of `GROUP_SIZE` consecutive channels** of each
stored vector (a token's latent of r numbers, or one head's key/value where a kind is stored in full). Why per
token: a token is quantized once, when it enters the cache, and never touched again (streaming; no window kept in
full precision as per-channel schemes such as KIVI need). Why per group rather than one scale per token: a latent's
channels are in eigen-order, so its first channels are orders of magnitude larger than its last; one absmax per
token would round the small tail channels to zero. Consecutive eigen-ordered channels have similar magnitudes, so a
group of 32 shares one scale at little loss. Codes are int8 in [-127, 127], or in [-7, 7] stored packed two per
byte (uint8, low nibble first: memory really halves); scales are float16 (2 bytes a group), computed, rounded to
float16, then used for quantizing, so reading back multiplies by exactly what was stored. A scale past float16's
range is refused, never silently clipped.

16 bits: the latent is stored as a 16-bit float, the model's dtype when it is one, else float16 (no scales), and a
value past float16's range is refused. Without `latent_bits` latents keep the model's dtype. Nothing is simulated:
the cache holds the codes and scales, and `stored_bytes` counts them as held.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GROUP_SIZE = 32  # channels sharing one scale
SCALE_DTYPE = torch.float16
LATENT_BITS = (16, 8, 4)
_FLOAT16_MAX = torch.finfo(torch.float16).max


@dataclass(frozen=True)
class Codec:
    """How stored vectors are encoded: `bits` None (the model's dtype), 16, 8 or 4."""

    bits: int | None
    model_dtype: torch.dtype

    @property
    def quantizes(self) -> bool:
        return self.bits in (8, 4)

    @property
    def float_dtype(self) -> torch.dtype:
        """The dtype of unquantized storage."""
        if self.bits == 16 and self.model_dtype not in (torch.float16, torch.bfloat16):
            return torch.float16
        return self.model_dtype

    def bytes_per_vector(self, width: int) -> int:
        """Bytes stored for one vector of `width` numbers: codes (packed for 4 bits) plus its group scales."""
        if not self.quantizes:
            return width * torch.empty(0, dtype=self.float_dtype).element_size()
        codes = width if self.bits == 8 else math.ceil(width / 2)
        return codes + math.ceil(width / GROUP_SIZE) * torch.empty(0, dtype=SCALE_DTYPE).element_size()

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (..., width) -> codes (..., width or ceil(width/2)) and scales (..., groups) or None."""
        if not self.quantizes:
            stored = x.to(self.float_dtype)
            if self.float_dtype == torch.float16 and not torch.isfinite(stored).all():
                raise ValueError(
                    f"latent_bits=16 stores float16, and a cached value exceeds its range ({_FLOAT16_MAX:.0f}): "
                    "use latent_bits=8 (scaled) or leave latent_bits unset"
                )
            return stored, None
        qmax = 2 ** (self.bits - 1) - 1
        width = x.shape[-1]
        groups = math.ceil(width / GROUP_SIZE)
        padded = torch.nn.functional.pad(x.float(), (0, groups * GROUP_SIZE - width))
        grouped = padded.unflatten(-1, (groups, GROUP_SIZE))  # (..., groups, GROUP_SIZE)
        scale = grouped.abs().amax(-1) / qmax  # (..., groups)
        if bool((scale > _FLOAT16_MAX).any()):
            raise ValueError(
                f"latent_bits={self.bits}: a cached value exceeds what float16 scales can hold: leave latent_bits unset"
            )
        scale = scale.to(SCALE_DTYPE)
        used = scale.float().unsqueeze(-1)
        codes = torch.where(used > 0, grouped / torch.where(used > 0, used, 1.0), 0.0).round().clamp(-qmax, qmax)
        codes = codes.flatten(-2)[..., :width].to(torch.int8)
        return (codes if self.bits == 8 else _pack_int4(codes)), scale

    def decode(self, codes: torch.Tensor, scale: torch.Tensor | None, width: int, dtype: torch.dtype) -> torch.Tensor:
        """Inverse of `encode` (up to rounding): (..., width) in `dtype`."""
        if scale is None:
            return codes.to(dtype)
        values = (codes if self.bits == 8 else _unpack_int4(codes, width)).float()
        groups = scale.shape[-1]
        padded = torch.nn.functional.pad(values, (0, groups * GROUP_SIZE - width)).unflatten(-1, (groups, GROUP_SIZE))
        return (padded * scale.float().unsqueeze(-1)).flatten(-2)[..., :width].to(dtype)


def _pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-7, 7] (..., width) -> uint8 (..., ceil(width/2)): two codes a byte, low nibble first."""
    shifted = (codes + 8).to(torch.uint8)
    if shifted.shape[-1] % 2:
        shifted = torch.nn.functional.pad(shifted, (0, 1), value=8)
    return shifted[..., 0::2] | (shifted[..., 1::2] << 4)


def _unpack_int4(packed: torch.Tensor, width: int) -> torch.Tensor:
    low, high = (packed & 0x0F).to(torch.int8) - 8, (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).flatten(-2)[..., :width]
