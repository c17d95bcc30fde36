import math

import pytest
import torch

from kvcore_eval.compression.quantize import GROUP_SIZE, Codec


def eigen_ordered_latents(width: int = 70) -> torch.Tensor:
    """(batch, seq, width) with channel magnitudes falling as a spectrum does: channel i ~ 0.9^i."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 5, width, generator=generator) * (0.9 ** torch.arange(width))


@pytest.mark.parametrize("bits", [8, 4])
def test_codes_are_stored_packed_and_decode_within_half_a_step(bits):
    x = eigen_ordered_latents()
    codec = Codec(bits, torch.float32)
    codes, scales = codec.encode(x)
    groups = math.ceil(70 / GROUP_SIZE)
    assert scales.shape == (2, 5, groups) and scales.dtype == torch.float16
    assert codes.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert codes.shape[-1] == (70 if bits == 8 else 35)  # two 4-bit codes a byte
    assert codes.numel() * codes.element_size() + scales.numel() * 2 == 10 * codec.bytes_per_vector(70)
    decoded = codec.decode(codes, scales, 70, torch.float32)
    step = scales.float().repeat_interleave(GROUP_SIZE, dim=-1)[..., :70]  # each channel's quantization step
    assert ((decoded - x).abs() <= step / 2 + 1e-6).all()
    # per group, the tail channels keep their resolution: one scale per token would flatten them to zero
    one_scale = x.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    assert (decoded - x)[..., 64:].abs().max() < one_scale.min() / 2


def test_odd_width_int4_and_zero_groups():
    x = torch.zeros(1, 3, 5)
    x[0, 1] = torch.tensor([7.0, -7.0, 3.0, 0.0, 1.0])
    codec = Codec(4, torch.bfloat16)
    codes, scales = codec.encode(x)
    assert codes.shape == (1, 3, 3)
    decoded = codec.decode(codes, scales, 5, torch.float32)
    assert torch.equal(decoded[0, 0], torch.zeros(5))  # an all-zero token stays zero (scale 0)
    assert torch.equal(decoded[0, 1], x[0, 1])  # multiples of the step are exact


def test_sixteen_bits_stores_a_16_bit_float_and_refuses_overflow():
    codec = Codec(16, torch.float32)
    codes, scales = codec.encode(torch.ones(2, 3))
    assert codes.dtype == torch.float16 and scales is None and codec.bytes_per_vector(3) == 6
    assert Codec(16, torch.bfloat16).encode(torch.ones(2, 3))[0].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="exceeds its range"):
        codec.encode(torch.full((1, 2), 1e6))
    assert Codec(None, torch.float32).bytes_per_vector(3) == 12


@pytest.mark.parametrize("scheme", ["minmax", "midrise"])
@pytest.mark.parametrize("bits", [1, 2, 3, 5, 6, 7])
def test_every_width_packs_to_its_bytes_and_decodes_near_the_input(scheme, bits):
    """Gaussian channels (what a rotation or whitening makes of a vector): every width packs to ceil(bits·width/8)
    bytes, and its error is the one the bit allocation counts on (`relative_error`)."""
    from kvcore_eval.compression.quantize import relative_error

    x = torch.randn(2, 5, 45, generator=torch.Generator().manual_seed(3))
    codec = Codec(bits, torch.float32, scheme)
    codes, scales = codec.encode(x)
    groups = math.ceil(45 / GROUP_SIZE)
    assert codes.dtype == torch.uint8 and codes.shape[-1] == math.ceil(bits * 45 / 8)
    assert scales.shape[-1] == groups * (2 if scheme == "minmax" else 1)
    assert codes.numel() + scales.numel() * 2 == 10 * codec.bytes_per_vector(45)
    decoded = codec.decode(codes, scales, 45, torch.float32)
    error = float((decoded - x).square().sum() / x.square().sum())
    assert error == pytest.approx(relative_error(bits, scheme), rel=0.5)


def test_midrise_uses_every_level_where_absmax_leaves_one_out():
    x = torch.linspace(-1, 1, 32).reshape(1, 1, 32)
    for scheme, levels in (("midrise", 4), ("minmax", 4), ("absmax", 3)):
        codec = Codec(2, torch.float32, scheme)
        decoded = codec.decode(*codec.encode(x), 32, torch.float32)
        assert len(torch.unique(decoded[0, 0])) == levels, scheme


def test_a_segmented_code_shares_its_scales_and_counts_its_bytes():
    from kvcore_eval.compression.quantize import Segment, SegmentCodec

    x = eigen_ordered_latents(width=70)
    whitening = 0.9 ** torch.arange(70)
    segments = (Segment(0, 2, 16), Segment(2, 10, 6), Segment(10, 40, 3), Segment(40, 70, 1))
    codec = SegmentCodec(segments, torch.float32, "midrise", whitening)
    codes, scales = codec.encode(x)
    # 2 float16 channels, then 68 coded channels: 3 groups of 32 share 3 scales across the segment boundaries
    assert scales.shape[-1] == 3 and codes.shape[-1] == 2 * 2 + 6 + math.ceil(3 * 30 / 8) + math.ceil(30 / 8)
    assert codes.numel() + scales.numel() * 2 == 10 * codec.bytes_per_vector()
    decoded = codec.decode(codes, scales, 70, torch.float32)
    assert torch.allclose(decoded[..., :2], x[..., :2], rtol=1e-3)  # float16
    white = (decoded - x) / whitening
    errors = [white[..., s.start : s.stop].square().mean() for s in segments[1:]]
    assert errors[0] < errors[1] < errors[2], "more bits, less error per whitened channel"


def test_a_single_tokens_record_of_odd_length_decodes():
    """One token's record (a decode step) of 29 bytes: its float16 segment is sliced at an odd offset."""
    from kvcore_eval.compression.quantize import Segment, SegmentCodec

    codec = SegmentCodec((Segment(0, 2, 16), Segment(2, 12, 7), Segment(12, 44, 3)), torch.float32, "midrise")
    x = torch.randn(1, 1, 44, generator=torch.Generator().manual_seed(5))
    codes, scales = codec.encode(x)
    assert codes.shape[-1] % 2 == 1
    record = torch.cat([torch.zeros(1, 1, 1, dtype=torch.uint8), codes], dim=-1)[..., 1:]  # odd storage offset
    assert torch.allclose(codec.decode(record, scales, 44, torch.float32)[..., :2], x[..., :2], rtol=1e-3)


def test_whitened_channels_far_past_their_calibration_keep_a_scale():
    """Data unlike the calibration: a channel calibrated at 1e-4 of its real size whitens to about 1e5, past float16's
    range; the spectral code's bfloat16 scale holds it and decodes it."""
    from kvcore_eval.compression.quantize import Segment, SegmentCodec

    whitening = torch.full((40,), 1e-4)
    codec = SegmentCodec((Segment(0, 40, 4),), torch.float32, "midrise", whitening)
    x = torch.randn(2, 3, 40, generator=torch.Generator().manual_seed(6)) * 10
    decoded = codec.decode(*codec.encode(x), 40, torch.float32)
    assert torch.isfinite(decoded).all() and float((decoded - x).square().mean() / x.square().mean()) < 0.05


@pytest.mark.parametrize("bits", range(1, 9))
def test_codes_are_packed_as_one_little_endian_bit_stream(bits):
    """Every width's shift-and-mask path (whole codes a byte, or eight codes a word) writes and reads the bit stream
    built bit by bit: code i's bit k at bit i·bits + k."""
    from kvcore_eval.compression.quantize import _pack, _unpack

    for width in (1, 7, 8, 32, 33, 45):
        codes = torch.randint(0, 2**bits, (3, 5, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        stream = ((codes.unsqueeze(-1) >> torch.arange(bits, dtype=torch.uint8)) & 1).flatten(-2)
        stream = torch.nn.functional.pad(stream, (0, (-stream.shape[-1]) % 8))
        reference = (stream.unflatten(-1, (-1, 8)) << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
        assert torch.equal(_pack(codes, bits), reference)
        assert torch.equal(_unpack(reference, bits, width), codes)


@pytest.mark.parametrize("scheme", ["absmax", "minmax", "midrise"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_decode_is_the_closed_form_and_leaves_what_is_stored_untouched(scheme, bits):
    """decode computes in place on its one float copy: what the cache holds must come out as it went in."""
    from kvcore_eval.compression.quantize import _unpack, clip_factor

    torch.manual_seed(bits)
    codec, width = Codec(bits, torch.float32, scheme), 70
    codes, scales = codec.encode(torch.randn(2, 5, width) * 3)
    held = (codes.clone(), scales.clone())
    decoded = codec.decode(codes, scales, width, torch.float32)
    assert torch.equal(codes, held[0]) and torch.equal(scales, held[1])
    groups = math.ceil(width / GROUP_SIZE)
    values = codes.float() if scheme == "absmax" and bits == 8 else _unpack(codes, bits, width).float()
    per = lambda s: s.float().repeat_interleave(GROUP_SIZE, dim=-1)[..., :width]  # noqa: E731
    if scheme == "minmax":
        expected = values * per(scales[..., :groups]) + per(scales[..., groups:])
    elif scheme == "absmax":
        expected = (values - (0 if bits == 8 else 2 ** (bits - 1))) * per(scales)
    else:
        expected = (values - 2 ** (bits - 1) + 0.5) * (per(scales) * (2 * clip_factor(bits) / 2**bits))
    assert torch.equal(decoded, expected)
