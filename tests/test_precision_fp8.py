"""Tests for kinetic.precision.fp8: per-tensor current scaling (TE's scale rules), codes equal to
torch's own float8 casts of the scaled tensor, saturation under a supplied amax, and unbiased
stochastic rounding."""

from __future__ import annotations

import math

import pytest
import torch

from kinetic.precision import fp8

CASES = [("e4m3", torch.float8_e4m3fn, 448.0), ("e5m2", torch.float8_e5m2, 57344.0)]


@pytest.mark.parametrize("fmt, dtype, fmt_max", CASES)
def test_current_scaling_matches_torch_cast(fmt, dtype, fmt_max):
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * 3
    q = fp8.quantize(x, fmt)
    amax = x.abs().amax()
    assert q.scale == torch.tensor(fmt_max) / amax and q.scale.dtype == torch.float32
    assert torch.equal(q.codes, (x * q.scale).to(dtype).view(torch.uint8))
    assert torch.equal(q.dequantize(), (x * q.scale).to(dtype).float() * (1.0 / q.scale))
    assert q.shape == x.shape
    # The amax element lands on (or next to) fmt_max; relative error is at most half a spacing.
    rel = ((q.dequantize() - x).abs() / x.abs().clamp_min(amax / 1000)).max()
    assert rel <= 2.0 ** -(4 if fmt == "e4m3" else 3) * 1.001


def test_scale_fallbacks():
    assert fp8.compute_scale(torch.tensor(0.0)) == 1
    assert fp8.compute_scale(torch.tensor(math.inf)) == 1
    assert fp8.compute_scale(torch.tensor(math.nan)) == 1
    assert fp8.compute_scale(torch.tensor(1e-45)) == torch.finfo(torch.float32).max
    z = fp8.quantize(torch.zeros(4, 4))
    assert z.scale == 1 and torch.equal(z.dequantize(), torch.zeros(4, 4))


def test_supplied_amax_saturates():
    x = torch.tensor([1.0, -2.0, 0.5])
    q = fp8.quantize(x, "e4m3", amax=1.0)  # scale 448: -2 -> -896 saturates to -448
    assert q.codes.tolist() == [0x7E, 0xFE, 0x76] and q.dequantize().tolist() == [1.0, -1.0, 0.5]


def test_stochastic_rounding_is_unbiased():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, generator=g)
    x[0] = 4.0  # fixes amax, so every draw shares one scale
    draws = 4000
    q = fp8.quantize(x.repeat(draws), "e5m2", rounding="stochastic", generator=g)
    mean = q.dequantize().view(draws, -1).double().mean(0)
    spacing = 2.0 ** (torch.floor(torch.log2(x.abs().double() * q.scale)).clamp_min(-14) - 2) / q.scale
    assert ((mean - x.double()).abs() / spacing).max() < 6 * 0.5 / math.sqrt(draws)
    nearest = fp8.quantize(x, "e5m2").dequantize().double()
    assert ((nearest - x.double()).abs() / spacing).max() > 0.2  # RNE errs by up to half a spacing


def test_bad_arguments():
    with pytest.raises(ValueError, match="FP8"):
        fp8.quantize(torch.zeros(2), "e2m1")
    with pytest.raises(ValueError, match="rounding"):
        fp8.quantize(torch.zeros(2), rounding="truncate")
