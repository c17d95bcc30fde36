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
