"""Quantized storage of the cache's latents: what is stored, and how it is read back.

A stored vector (a token's latent of r numbers, or one head's key/value where a kind is stored in full) is coded
**per token, per group of `GROUP_SIZE` consecutive channels**, by one of three schemes:

- `absmax` (today's int8/int4, `latent_bits=8|4`): symmetric, codes in [-(2^(b-1) - 1), 2^(b-1) - 1], one float16
  scale a group (its absmax / 127 or / 7). Why per token: a token is quantized once, when it enters the cache, and
  never touched again (no window kept in full precision as per-channel schemes such as KIVI need). Why per group: a
  latent's channels are in eigen-order, its first ones far larger than its last; one scale per token would round the
  tail to zero. 8-bit codes are int8; others are packed.
- `minmax` (KIVI's and HQQ's asymmetric codes): all 2^b levels between the group's min and max, a float16 scale and a
  float16 zero-point a group. At 2 and 3 bits every level counts: symmetric absmax int2 has three.
- `midrise` (for Gaussian-like channels: a rotated vector, or whitened eigen-channels): symmetric mid-rise, all 2^b
  levels (q + 1/2)·step, one float16 scale a group (its absmax). The step spreads α_b·absmax over the levels,
  2·α_b·absmax / 2^b: α_b = 1 from 4 bits (nothing clipped), below 1 at 1 to 3 bits, where clipping a group's extremes
  pays (`clip_factor`, the α least in squared error on Gaussian groups). Measured on Gaussian channels in groups of 32
  (`relative_error`), it beats absmax at every width and minmax per bit spent (minmax pays a second scale).

Codes of b bits are packed into bytes as one little-endian bit stream per vector (ceil(b·width/8) bytes; 4-bit codes
are then two a byte, low nibble first). Scales are computed, rounded to float16, then used for quantizing, so reading
back multiplies by exactly what was stored; a scale past float16's range is refused, never clipped. 16 bits: the
vector is stored as a 16-bit float (the model's dtype when it is one, else float16), a value past float16's range
refused. Without bits, the model's dtype. Nothing is simulated: the cache holds the codes and scales, and
`stored_bytes` counts them as held.

`SegmentCodec` codes one vector in contiguous segments of channels, each with its own bits (a spectral allocation:
the first eigen-channels at more bits than the last), optionally whitened (each channel divided by its calibrated
standard deviation, so that one group's channels share a scale well); its codes and scales are concatenated as bytes,
one record of fixed size per token. Its integer channels share one scale (bfloat16) a group of 32 consecutive channels,
whatever their bits (whitened channels all have unit variance, so one absmax serves them): the scales cost what the
bit allocation counted, ceil(r/32) a vector, however many segments there are.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

GROUP_SIZE = 32  # channels sharing one scale
SCALE_DTYPE = torch.float16
# A spectral code's shared scales: whitened channels of data unlike the calibration's can reach far past float16's
# range, and a bfloat16 scale (float32's range, 2 bytes) holds them; its coarser rounding only clips a group's largest
# value by a fraction of a step, since the rounded scale is the one codes are made with.
SEGMENT_SCALE_DTYPE = torch.bfloat16
LATENT_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16)
SCHEMES = ("absmax", "minmax", "midrise")
_FLOAT16_MAX = torch.finfo(torch.float16).max


def _midrise(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (unsigned, below 2^bits) of x with step 2·α·scale/2^bits per element (`scale` broadcast to x)."""
    half = 2 ** (bits - 1)
    step = scale * (2 * clip_factor(bits) / 2**bits)
    ratio = torch.where(step > 0, x / torch.where(step > 0, step, 1.0), 0.0)
    return ratio.floor().clamp(-half, half - 1) + half


def _unmidrise(codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    return (codes.float() - 2 ** (bits - 1) + 0.5) * (scale * (2 * clip_factor(bits) / 2**bits))


@functools.lru_cache(maxsize=16)
def clip_factor(bits: int) -> float:
    """α of the midrise code at `bits`: the fraction of a group's absmax its outer levels span, least in squared error
    on unit Gaussians in groups of GROUP_SIZE (seeded draws); 1 (no clipping) from 4 bits, where clipping no longer
    pays."""
    if bits >= 4:
        return 1.0
    from scipy import optimize

    x = torch.randn(4096, GROUP_SIZE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    absmax = x.abs().amax(-1, keepdim=True)

    def error(alpha: float) -> float:
        half, step = 2 ** (bits - 1), 2 * alpha * absmax / 2**bits
        codes = (x / step).floor().clamp(-half, half - 1)
        return float(((codes + 0.5) * step - x).square().mean())

    return float(optimize.minimize_scalar(error, bounds=(0.3, 1.0), method="bounded").x)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (..., width) below 2^bits -> uint8 (..., ceil(bits·width/8)): one little-endian bit stream."""
    if 8 % bits == 0:  # whole codes a byte (1, 2, 4, 8 bits): code i at bits (i % per_byte)·bits of byte i // per_byte
        per_byte = 8 // bits
        codes = torch.nn.functional.pad(codes.to(torch.uint8), (0, (-codes.shape[-1]) % per_byte))
        shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.uint8)
        return (codes.unflatten(-1, (-1, per_byte)) << shifts).sum(-1, dtype=torch.uint8)
    # 3, 5, 6, 7 bits: eight codes fill `bits` bytes exactly, one little-endian word of at most 56 bits
    width = codes.shape[-1]
    codes = torch.nn.functional.pad(codes.to(torch.int64), (0, (-width) % 8)).unflatten(-1, (-1, 8))  # (..., g, 8)
    word = (codes << (bits * torch.arange(8, device=codes.device))).sum(-1)  # fields do not overlap: sum = or
    packed = (word.unsqueeze(-1) >> (8 * torch.arange(bits, device=codes.device))) & 0xFF  # (..., g, bits)
    return packed.to(torch.uint8).flatten(-2)[..., : math.ceil(bits * width / 8)]


def _unpack(packed: torch.Tensor, bits: int, width: int) -> torch.Tensor:
    """Inverse of `_pack`: (..., width) uint8 codes, a shift and a mask a code (what every decode step runs)."""
    if 8 % bits == 0:  # one shift and mask a code position (a broadcast shift by a tensor of shifts is 2x slower)
        mask = 2**bits - 1
        fields = [packed & mask, *((packed >> shift) & mask for shift in range(bits, 8, bits))]
        return torch.stack(fields, dim=-1).flatten(-2)[..., :width]
    groups = math.ceil(width / 8)
    packed = torch.nn.functional.pad(packed, (0, groups * bits - packed.shape[-1])).unflatten(-1, (groups, bits))
    word = (packed.to(torch.int64) << (8 * torch.arange(bits, device=packed.device))).sum(-1)  # (..., groups)
    codes = (word.unsqueeze(-1) >> (bits * torch.arange(8, device=packed.device))) & (2**bits - 1)
    return codes.to(torch.uint8).flatten(-2)[..., :width]


def _groups(x: torch.Tensor) -> torch.Tensor:
    """x (..., width) float32 -> (..., groups, GROUP_SIZE), the last group padded by repeating its last channel (so
    that a group's min, max and absmax are its own)."""
    width = x.shape[-1]
    groups = math.ceil(width / GROUP_SIZE)
    pad = groups * GROUP_SIZE - width
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    return x.unflatten(-1, (groups, GROUP_SIZE))


def _checked_scale(scale: torch.Tensor, bits: int) -> torch.Tensor:
    if bool((scale.abs() > _FLOAT16_MAX).any()):
        raise ValueError(
            f"latent_bits={bits}: a cached value exceeds what float16 scales can hold: leave latent_bits unset"
        )
    return scale.to(SCALE_DTYPE)


@dataclass(frozen=True)
class Codec:
    """How stored vectors are encoded: `bits` None (the model's dtype), 16 (a 16-bit float), or 1-8 (integer codes of
    `scheme`: absmax, minmax or midrise)."""

    bits: int | None
    model_dtype: torch.dtype
    scheme: str = "absmax"

    def __post_init__(self) -> None:
        if self.bits is not None and self.bits not in LATENT_BITS:
            raise ValueError(f"latent_bits={self.bits}: use 1 to 8, or 16, or leave it unset for the model's dtype")
        if self.scheme not in SCHEMES:
            raise ValueError(f"quantizer={self.scheme!r}: use {', '.join(SCHEMES)}")
        if self.quantizes and self.scheme == "absmax" and self.bits < 2:
            raise ValueError("latent_bits=1 with quantizer=absmax has one level (zero): use minmax or midrise")

    @property
    def quantizes(self) -> bool:
        return self.bits is not None and self.bits <= 8

    @property
    def float_dtype(self) -> torch.dtype:
        """The dtype of unquantized storage."""
        if self.bits == 16 and self.model_dtype not in (torch.float16, torch.bfloat16):
            return torch.float16
        return self.model_dtype

    @property
    def scales_per_group(self) -> int:
        return 2 if self.scheme == "minmax" else 1  # minmax: scale and zero-point

    def bytes_per_vector(self, width: int) -> int:
        """Bytes stored for one vector of `width` numbers: codes (packed) plus its group scales."""
        if not self.quantizes:
            return width * torch.empty(0, dtype=self.float_dtype).element_size()
        scales = math.ceil(width / GROUP_SIZE) * self.scales_per_group
        return math.ceil(self.bits * width / 8) + scales * torch.empty(0, dtype=SCALE_DTYPE).element_size()

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (..., width) -> codes (int8 (..., width) for absmax 8 bits, else uint8 (..., ceil(bits·width/8))) and
        scales (..., groups · scales_per_group) float16; or the vector as stored floats and None."""
        if not self.quantizes:
            stored = x.to(self.float_dtype)
            if self.float_dtype == torch.float16 and not torch.isfinite(stored).all():
                raise ValueError(
                    f"latent_bits=16 stores float16, and a cached value exceeds its range ({_FLOAT16_MAX:.0f}): "
                    "use latent_bits=8 (scaled) or leave latent_bits unset"
                )
            return stored, None
        width = x.shape[-1]
        grouped = _groups(x.float())  # (..., groups, GROUP_SIZE)
        levels = 2**self.bits
        if self.scheme == "minmax":
            low, high = grouped.amin(-1), grouped.amax(-1)
            scale = _checked_scale((high - low) / (levels - 1), self.bits)
            zero = _checked_scale(low, self.bits)
            used, offset = scale.float().unsqueeze(-1), zero.float().unsqueeze(-1)
            codes = torch.where(used > 0, (grouped - offset) / torch.where(used > 0, used, 1.0), 0.0)
            codes = codes.round().clamp(0, levels - 1)
            scales = torch.cat([scale, zero], dim=-1)
        elif self.scheme == "absmax":
            half = levels // 2
            scales = _checked_scale(grouped.abs().amax(-1) / (half - 1), self.bits)
            used = scales.float().unsqueeze(-1)
            codes = torch.where(used > 0, grouped / torch.where(used > 0, used, 1.0), 0.0)
            codes = codes.round().clamp(-(half - 1), half - 1) + half
        else:  # midrise
            scales = _checked_scale(grouped.abs().amax(-1), self.bits)
            codes = _midrise(grouped, scales.float().unsqueeze(-1), self.bits)
        codes = codes.flatten(-2)[..., :width]
        if self.scheme == "absmax" and self.bits == 8:
            return (codes - 128).to(torch.int8), scales
        return _pack(codes.to(torch.uint8), self.bits), scales

    def decode(self, codes: torch.Tensor, scale: torch.Tensor | None, width: int, dtype: torch.dtype) -> torch.Tensor:
        """Inverse of `encode` (up to rounding): (..., width) in `dtype`."""
        if scale is None:
            return codes.to(dtype)
        # unsigned codes, except absmax's int8 (signed already)
        values = codes if self.scheme == "absmax" and self.bits == 8 else _unpack(codes, self.bits, width)
        groups = math.ceil(width / GROUP_SIZE)
        # One float tensor the size of the cache, then arithmetic in place: every read of every decode step runs this,
        # and each temporary of that size would be a fresh allocation (the same operations, in the same order, as
        # `_unmidrise` and the out-of-place forms: bit-identical).
        padded = values.float()
        if groups * GROUP_SIZE != width:
            padded = torch.nn.functional.pad(padded, (0, groups * GROUP_SIZE - width))
        padded = padded.unflatten(-1, (groups, GROUP_SIZE))
        if self.scheme == "minmax":
            scale, zero = scale[..., :groups].float().unsqueeze(-1), scale[..., groups:].float().unsqueeze(-1)
            padded.mul_(scale).add_(zero)
        elif self.scheme == "absmax":
            if self.bits != 8:
                padded.sub_(2 ** (self.bits - 1))
            padded.mul_(scale.float().unsqueeze(-1))
        else:
            step = scale.float().unsqueeze(-1) * (2 * clip_factor(self.bits) / 2**self.bits)
            padded.sub_(2 ** (self.bits - 1)).add_(0.5).mul_(step)
        return padded.flatten(-2)[..., :width].to(dtype)


@functools.lru_cache(maxsize=64)
def relative_error(bits: int, scheme: str) -> float:
    """The mean squared error of `scheme` at `bits` on unit-variance Gaussian channels in groups of GROUP_SIZE, per
    channel (0 bits: 1, the channel dropped; 16 bits: float16's round-off): the distortion model a bit allocation
    spends bits by. Measured once on seeded draws through `Codec` itself, so it is the error of the code the cache
    stores."""
    if bits == 0:
        return 1.0
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, GROUP_SIZE * 4, generator=generator)
    codec = Codec(bits, torch.float32, scheme)
    decoded = codec.decode(*codec.encode(x), x.shape[-1], torch.float32)
    return float((decoded - x).square().mean())


@dataclass(frozen=True)
class Segment:
    """Channels [start, stop) of a stored vector, coded with `bits` (1-8: integer codes; 16: a 16-bit float)."""

    start: int
    stop: int
    bits: int


def segments_of(bits_per_channel: list[int] | tuple[int, ...]) -> tuple[Segment, ...]:
    """The runs of equal bits of a non-increasing allocation, its dropped tail (0 bits) left out."""
    segments: list[Segment] = []
    for channel, bits in enumerate(bits_per_channel):
        if bits == 0:
            break
        if segments and segments[-1].bits == bits:
            segments[-1] = Segment(segments[-1].start, channel + 1, bits)
        else:
            segments.append(Segment(channel, channel + 1, bits))
    return tuple(segments)


class SegmentCodec:
    """Codes a vector of width r in contiguous segments of channels, each with its own bits (1-8: midrise integer codes;
    16: a 16-bit float), optionally whitened first (`whitening` (r,): each channel's standard deviation, divided out
    before coding and multiplied back after). The integer channels share one float16 scale (their absmax) a group of
    GROUP_SIZE consecutive channels, across segment boundaries. A token's record is its segments' codes, packed and
    concatenated (uint8), and its scales (bfloat16)."""

    def __init__(
        self,
        segments: tuple[Segment, ...],
        model_dtype: torch.dtype,
        scheme: str = "midrise",
        whitening: torch.Tensor | None = None,
    ):
        if scheme != "midrise":
            raise ValueError(f"a spectral code's segments share midrise scales; quantizer={scheme} cannot: use midrise")
        self.segments = segments
        self.width = segments[-1].stop if segments else 0
        self.float_dtype = Codec(16, model_dtype).float_dtype
        self.whitening = whitening
        self.bits = max(s.bits for s in segments) if segments else None  # the cache tests `codec.bits is None`
        floats = [s for s in segments if s.bits == 16]
        self.coded_from = floats[-1].stop if floats else 0  # float channels come first (bits never increase)

    def _code_bytes(self, segment: Segment) -> int:
        width = segment.stop - segment.start
        if segment.bits == 16:
            return width * torch.empty(0, dtype=self.float_dtype).element_size()
        return math.ceil(segment.bits * width / 8)

    def _scale_count(self) -> int:
        return math.ceil((self.width - self.coded_from) / GROUP_SIZE)

    def bytes_per_vector(self, width: int | None = None) -> int:
        scale_size = torch.empty(0, dtype=SEGMENT_SCALE_DTYPE).element_size()
        return sum(self._code_bytes(s) for s in self.segments) + self._scale_count() * scale_size

    def _channel_scales(self, scales: torch.Tensor) -> torch.Tensor:
        """(..., groups) -> (..., coded channels): each integer channel's group scale."""
        return scales.float().repeat_interleave(GROUP_SIZE, dim=-1)[..., : self.width - self.coded_from]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (..., r) -> codes (..., code bytes of every segment) uint8 and scales (..., groups) float16 (None when
        every channel is a float)."""
        x = x.float() if self.whitening is None else x.float() / self.whitening.to(x.device)
        coded = x[..., self.coded_from :]
        scales = None
        if coded.shape[-1]:
            scales = _groups(coded).abs().amax(-1).to(SEGMENT_SCALE_DTYPE)
            per_channel = self._channel_scales(scales)
        parts = []
        for segment in self.segments:
            values = x[..., segment.start : segment.stop]
            if segment.bits == 16:
                parts.append(Codec(16, self.float_dtype).encode(values)[0].contiguous().view(torch.uint8))
                continue
            local = per_channel[..., segment.start - self.coded_from : segment.stop - self.coded_from]
            parts.append(_pack(_midrise(values, local, segment.bits).to(torch.uint8), segment.bits))
        return torch.cat(parts, dim=-1), scales

    def decode(self, codes: torch.Tensor, scales: torch.Tensor | None, width: int, dtype: torch.dtype) -> torch.Tensor:
        per_channel = None if scales is None else self._channel_scales(scales)
        parts, at = [], 0
        for segment in self.segments:
            size = self._code_bytes(segment)
            code, at = codes[..., at : at + size], at + size
            if segment.bits == 16:
                # a fresh copy: a slice of one token can be "contiguous" with the record's strides and offset
                parts.append(code.clone(memory_format=torch.contiguous_format).view(self.float_dtype).float())
                continue
            local = per_channel[..., segment.start - self.coded_from : segment.stop - self.coded_from]
            parts.append(_unmidrise(_unpack(code, segment.bits, segment.stop - segment.start), local, segment.bits))
        decoded = torch.cat(parts, dim=-1)
        if self.whitening is not None:
            decoded = decoded * self.whitening.to(decoded.device)
        return decoded.to(dtype)
