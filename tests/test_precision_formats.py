"""Tests for kinetic.precision.formats: every rounding edge case of the FP8/FP4 codecs, a dense
float32 sweep against torch's own float8 casts and torchao's E2M1 cast, and stochastic rounding's
unbiasedness (with round-to-nearest's bias as the contrast)."""

from __future__ import annotations

import math

import pytest
import torch

from kinetic.precision import formats as F

ALL = [F.E4M3, F.E5M2, F.E2M1]
NAN = float("nan")
INF = float("inf")


def enc(values, fmt, **kw) -> list[int]:
    return F.encode(torch.tensor(values, dtype=torch.float32), fmt, **kw).tolist()


def next_up(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x, torch.full_like(x, INF))


def next_down(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x, torch.full_like(x, -INF))


def float32_sweep() -> torch.Tensor:
    """Every sign, exponent and top-10-mantissa-bit pattern of float32 (2**19 of them), each with six
    endings of the low 13 bits: exact, one ulp above, just below and exactly at the midpoint of the
    low bits, one ulp past it and all ones. Every E4M3/E5M2 tie (and its float32 neighbours) lies on
    this grid, as do ±0, subnormals, ±inf and NaNs."""
    high = torch.arange(1 << 19, dtype=torch.int64) << 13
    low = torch.tensor([0, 1, 0xFFF, 0x1000, 0x1001, 0x1FFF])
    bits = (high[:, None] | low).reshape(-1)
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)


@pytest.fixture
def mx_kernels():
    pytest.importorskip("torchao")
    return pytest.importorskip("torchao.prototype.mx_formats.kernels")


def test_decode_tables():
    e2m1 = F.decode(torch.arange(16, dtype=torch.uint8), F.E2M1)
    assert e2m1.tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    assert torch.signbit(e2m1[8])
    e4m3 = F.decode(torch.arange(256, dtype=torch.uint8), F.E4M3)
    assert e4m3[0x7E] == 448 and e4m3[1] == 2**-9 and e4m3[7] == 7 * 2**-9 and e4m3[8] == 2**-6
    assert e4m3.isnan().nonzero().flatten().tolist() == [0x7F, 0xFF]
    assert not e4m3.isinf().any()
    e5m2 = F.decode(torch.arange(256, dtype=torch.uint8), F.E5M2)
    assert e5m2[0x7B] == 57344 and e5m2[1] == 2**-16 and e5m2[4] == 2**-14
    assert e5m2[0x7C] == INF and e5m2[0xFC] == -INF
    assert e5m2.isnan().nonzero().flatten().tolist() == [0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF]


@pytest.mark.parametrize("fmt, dtype", [(F.E4M3, torch.float8_e4m3fn), (F.E5M2, torch.float8_e5m2)])
def test_decode_matches_torch_float8(fmt, dtype):
    codes = torch.arange(256, dtype=torch.uint8)
    ours, theirs = F.decode(codes, fmt), codes.view(dtype).float()
    assert torch.equal(ours.isnan(), theirs.isnan())
    assert torch.equal(ours.nan_to_num().view(torch.int32), theirs.nan_to_num().view(torch.int32))


@pytest.mark.parametrize("fmt", ALL, ids=lambda f: f.name)
def test_every_code_round_trips(fmt):
    codes = torch.arange(1 << fmt.bits, dtype=torch.uint8)
    values = F.decode(codes, fmt)
    finite = ~values.isnan()  # NaN payloads other than the canonical one do not round-trip
    for rounding in F.ROUNDINGS:
        back = F.encode(values[finite], fmt, rounding=rounding, saturate=False)
        assert torch.equal(back, codes[finite])


@pytest.mark.parametrize("fmt", ALL, ids=lambda f: f.name)
def test_ties_go_to_even_and_neighbours_to_nearest(fmt):
    grid = F.representable_values(fmt).double()
    lo, hi = grid[:-1], grid[1:]
    mid = ((lo + hi) / 2).float()  # midpoints have one more significant bit: exact in float32
    assert torch.equal(mid.double(), (lo + hi) / 2)
    lo_code = torch.arange(len(lo), dtype=torch.uint8)
    even = torch.where(lo_code % 2 == 0, lo_code, lo_code + 1)
    for sign in (1.0, -1.0):
        s = 0 if sign > 0 else fmt.sign_bit
        assert torch.equal(F.encode(sign * mid, fmt), even | s)
        assert torch.equal(F.encode(sign * next_down(mid), fmt), lo_code | s)
        assert torch.equal(F.encode(sign * next_up(mid), fmt), (lo_code + 1) | s)


def test_e2m1_hand_table():
    # The midpoints of 0, .5, 1, 1.5, 2, 3, 4, 6 and where RNE sends them (even mantissa wins).
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    assert enc(ties, F.E2M1) == [0, 2, 2, 4, 4, 6, 6]
    assert enc([-t for t in ties], F.E2M1) == [8, 10, 10, 12, 12, 14, 14]
    assert enc([0.26, 0.74, 1.3, 2.6, 3.4, 4.9, 5.1, 5.99], F.E2M1) == [1, 1, 3, 5, 5, 6, 7, 7]


def test_largest_finite_and_just_past_it():
    # E4M3: 448 = 1.110b * 2^8; the would-be next value 480 is NaN, so 464 is the rounding boundary.
    x = [448, 464, 464.0001, 1e6, INF, -INF]
    assert enc(x, F.E4M3) == [0x7E, 0x7E, 0x7E, 0x7E, 0x7E, 0xFE]
    assert enc(x, F.E4M3, saturate=False) == [0x7E, 0x7E, 0x7F, 0x7F, 0x7F, 0xFF]
    # E5M2: 57344 = 1.11b * 2^15; the 61440 tie rounds to even, i.e. up to 2^16, i.e. overflow.
    x = [57344, next_down(torch.tensor(61440.0)).item(), 61440, INF, -INF]
    assert enc(x, F.E5M2) == [0x7B, 0x7B, 0x7B, 0x7B, 0xFB]
    assert enc(x, F.E5M2, saturate=False) == [0x7B, 0x7B, 0x7C, 0x7C, 0xFC]
    # E2M1: 6 = 1.1b * 2^2; 7 ties to 8 (even), which does not exist.
    assert enc([6, 6.99, 7, 1e30, INF, -INF], F.E2M1) == [7, 7, 7, 7, 7, 15]
    assert enc([6, 6.99], F.E2M1, saturate=False) == [7, 7]
    for bad in (7.0, INF):
        with pytest.raises(ValueError, match="saturate=True"):
            F.encode(torch.tensor([bad]), F.E2M1, saturate=False)


def test_subnormals():
    s = 2**-9  # E4M3's smallest subnormal; subnormals are k * s for k = 1..7
    x = [s / 2, next_up(torch.tensor(s / 2)).item(), s, 1.5 * s, 2.5 * s, 7 * s]
    assert enc(x, F.E4M3) == [0, 1, 1, 2, 2, 7]
    # 7.5 s is the tie between the largest subnormal and the smallest normal 2^-6 = 8 s (even).
    assert enc([7.5 * s, next_down(torch.tensor(7.5 * s)).item()], F.E4M3) == [8, 7]
    assert F.round_to_format(torch.tensor([3 * s]), F.E4M3).item() == 3 * s
    s = 2**-16
    assert enc([s / 2, 0.75 * s, s, 3.5 * s, 4 * s], F.E5M2) == [0, 1, 1, 4, 4]
    assert enc([0.2, 0.3, 0.5], F.E2M1) == [0, 1, 1]
    # float32 subnormal inputs are far below every format's range and round to (signed) zero.
    tiny = torch.tensor([1e-45, -1e-45])
    for fmt in ALL:
        assert F.encode(tiny, fmt).tolist() == [0, fmt.sign_bit]


@pytest.mark.parametrize("fmt", ALL, ids=lambda f: f.name)
@pytest.mark.parametrize("rounding", F.ROUNDINGS)
def test_zeros_keep_their_sign(fmt, rounding):
    x = torch.tensor([0.0, -0.0, -fmt.min_subnormal / 8, fmt.min_subnormal / 8])
    codes = F.encode(x, fmt, rounding=rounding, generator=torch.Generator().manual_seed(0))
    assert codes.tolist()[:2] == [0, fmt.sign_bit]
    back = F.decode(codes, fmt)
    assert back.tolist()[:2] == [0.0, 0.0] and torch.signbit(back[:2]).tolist() == [False, True]
    if rounding == "nearest":
        assert torch.signbit(back).tolist() == [False, True, True, False]


def test_nan():
    for fmt in (F.E4M3, F.E5M2):
        for saturate in (True, False):
            assert enc([NAN, -NAN], fmt, saturate=saturate) == [0x7F, 0xFF]
            assert F.round_to_format(torch.tensor([NAN]), fmt).isnan().all()
    with pytest.raises(ValueError, match="no NaN"):
        F.encode(torch.tensor([1.0, NAN]), F.E2M1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="e4m3"):
        F.encode(torch.zeros(2), "fp8")
    with pytest.raises(ValueError, match="stochastic"):
        F.encode(torch.zeros(2), F.E4M3, rounding="up")
    with pytest.raises(ValueError, match="uint8"):
        F.decode(torch.zeros(2, dtype=torch.int32), F.E4M3)


def test_dense_sweep_matches_torch_float8_casts():
    """torch 2.13 (CPU): the e5m2 cast is IEEE (overflow and inf give inf); the e4m3fn cast
    *saturates* finite overflow and ±inf to ±448 (it does not produce NaN). Both keep NaN's sign."""
    x = float32_sweep()
    e5m2 = F.encode(x, F.E5M2, saturate=False)
    assert torch.equal(e5m2, x.to(torch.float8_e5m2).view(torch.uint8))
    e4m3 = F.encode(x, F.E4M3, saturate=True)
    assert torch.equal(e4m3, x.to(torch.float8_e4m3fn).view(torch.uint8))
    # Where nothing overflows the two saturation settings agree, so in-range RNE is pinned either way.
    in_range = x.abs() < 464
    assert torch.equal(F.encode(x[in_range], F.E4M3, saturate=False), e4m3[in_range])


def test_dense_sweep_e2m1_matches_torchao(mx_kernels):
    """torchao's E2M1 cast (bit-twiddling RNE, saturating, sign-preserving) is an independent
    implementation; it has no NaN handling, so NaNs are left out."""
    x = float32_sweep()
    x = x[~x.isnan()]
    assert torch.equal(F.encode(x, F.E2M1), mx_kernels.f32_to_f4_unpacked(x))
    codes = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(F.decode(codes, F.E2M1), mx_kernels.f4_unpacked_to_f32(codes))


@pytest.mark.parametrize("fmt", ALL, ids=lambda f: f.name)
def test_stochastic_rounding_picks_a_neighbour_with_the_right_odds(fmt):
    g = torch.Generator().manual_seed(0)
    grid = F.representable_values(fmt)
    lo, hi = grid[:-1], grid[1:]
    frac = torch.rand(len(lo), generator=g, dtype=torch.float64)
    x = (lo.double() + frac * (hi - lo).double()).float()
    frac = (x.double() - lo.double()) / (hi - lo).double()  # after float32 rounding of x
    draws = 4000
    out = F.round_to_format(x.expand(draws, -1), fmt, rounding="stochastic", generator=g)
    assert ((out == lo) | (out == hi)).all()
    p_up = (out == hi).double().mean(0)
    sigma = (frac * (1 - frac) / draws).sqrt().clamp_min(1e-3)
    assert ((p_up - frac).abs() <= 5 * sigma).all()


def test_stochastic_rounding_is_unbiased_and_nearest_is_not():
    g = torch.Generator().manual_seed(1)
    # Values spread over the E4M3 range, many draws each: the mean of SR converges to x.
    x = torch.exp(torch.empty(512).uniform_(math.log(2**-8), math.log(400), generator=g))
    draws = 2000
    sr = F.round_to_format(x.expand(draws, -1), F.E4M3, rounding="stochastic", generator=g).double()
    spacing = 2.0 ** (torch.floor(torch.log2(x.double())).clamp_min(-6) - 3)
    err = (sr.mean(0) - x.double()) / spacing  # in units of the local spacing
    assert err.abs().max() < 6 * 0.5 / math.sqrt(draws)
    assert abs(err.mean()) < 6 * 0.5 / math.sqrt(draws * len(x))
    # A crafted input where RNE always rounds the same way: 1.2 sits 0.4 spacings above 1.0 in E2M1.
    x = torch.full((20000,), 1.2)
    rne = F.round_to_format(x, F.E2M1).double().mean() - 1.2
    sr = F.round_to_format(x, F.E2M1, rounding="stochastic", generator=g).double().mean() - 1.2
    assert abs(rne + 0.2) < 1e-6
    assert abs(sr) < 5 * 0.5 * 0.5 / math.sqrt(len(x))  # |error| <= spacing/2 = 0.25, 5 sigma


def test_stochastic_rounding_follows_the_generator():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    a = F.encode(x, F.E5M2, rounding="stochastic", generator=torch.Generator().manual_seed(3))
    b = F.encode(x, F.E5M2, rounding="stochastic", generator=torch.Generator().manual_seed(3))
    c = F.encode(x, F.E5M2, rounding="stochastic", generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_stochastic_rounding_saturates():
    x = torch.tensor([460.0, 448.0, 1e9, -INF])
    codes = F.encode(x, F.E4M3, rounding="stochastic", generator=torch.Generator().manual_seed(0))
    assert codes.tolist() == [0x7E, 0x7E, 0x7E, 0xFE]
