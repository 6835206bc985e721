"""Bit-exact minifloat codecs: FP8 E4M3 / E5M2 and FP4 E2M1, encoded to integer codes and back.

Why our own codec when torch has ``float8_e4m3fn``/``float8_e5m2``: the low-precision recipes need
stochastic rounding (torch's casts only round to nearest), an E2M1 cast (torch has the
``float4_e2m1fn_x2`` dtype but no conversion to it), and saturation chosen per call rather than fixed
by the dtype. Everything here is vectorized torch code on any device; the float32 input is widened to
float64, where every step of the rounding is exact, so the result is the correctly rounded code.

Formats (``sign | exponent | mantissa``, subnormals when the exponent field is 0, -0 in all three):

===========  ====  ========  ==============  ==================  ===========================
format       bias  max       min subnormal   inf                 NaN
===========  ====  ========  ==============  ==================  ===========================
E4M3 (fn)    7     448       2^-9            none                S.1111.111 (0x7F / 0xFF)
E5M2         15    57344     2^-16           S.11111.00 (0x7C)   S.11111.{01,10,11}
E2M1         1     6         0.5             none                none
===========  ====  ========  ==============  ==================  ===========================

Encoding rules, the same for every format:

* ``rounding="nearest"``: round to nearest, ties to even (IEEE 754 RNE), including into and out of
  the subnormal range. ``rounding="stochastic"``: round up with probability equal to the distance
  from the lower neighbour in units of the local spacing, so ``E[decode(encode(x))] == x`` for
  every finite ``x`` inside the range (unbiased); exactly representable values never move.
* Overflow (a rounded magnitude above the largest finite value) and ``±inf``:
  ``saturate=True`` gives ``±max`` in every format (CUDA's ``__NV_SATFINITE`` / PTX ``.satfinite``
  behaviour). ``saturate=False`` gives ``±inf`` in E5M2 (IEEE overflow) and NaN in E4M3 (the OCP
  "fn" variant has no inf), and raises ``ValueError`` in E2M1, which has neither.
* NaN: the NaN code with the input's sign bit (0x7F / 0xFF) in E4M3 and E5M2; ``ValueError`` in
  E2M1, which has no NaN encoding (silently mapping NaN to a number would hide a diverged run).
* Zeros keep their sign, and so does a nonzero value that rounds to zero (-1e-9 gives -0).

Stochastic rounding here is distributionally the same as the GPU's ``cvt.rs`` (which adds random
bits below the kept mantissa and truncates) but draws its randomness from a torch.Generator, so it
is reproducible on CPU, not bit-identical to a GPU run.

Compared with torch's own casts on CPU (tests/test_precision_formats.py sweeps float32 densely and
fails if this changes): ``x.to(torch.float8_e5m2)`` equals ``encode(x, E5M2, saturate=False)`` and
``x.to(torch.float8_e4m3fn)`` equals ``encode(x, E4M3, saturate=True)`` bit for bit, NaN and inf
included: torch's e4m3fn cast *saturates* finite overflow and ±inf to ±448 rather than producing NaN.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FloatFormat:
    """A sign/exponent/mantissa minifloat. ``max_finite`` fixes where the special codes begin."""

    name: str
    ebits: int
    mbits: int
    max_finite: float
    has_inf: bool
    has_nan: bool

    @property
    def bias(self) -> int:
        return (1 << (self.ebits - 1)) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number (subnormals share it)."""
        return 1 - self.bias

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def sign_bit(self) -> int:
        return 1 << (self.ebits + self.mbits)

    @property
    def max_code(self) -> int:
        """Magnitude code of ``max_finite``; larger magnitude codes are inf/NaN or do not exist."""
        return _magnitude_code(self.max_finite, self)

    @property
    def nan_code(self) -> int | None:
        return self.sign_bit - 1 if self.has_nan else None

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.mbits)

    @property
    def min_normal(self) -> float:
        return 2.0**self.emin


E4M3 = FloatFormat("e4m3", ebits=4, mbits=3, max_finite=448.0, has_inf=False, has_nan=True)
E5M2 = FloatFormat("e5m2", ebits=5, mbits=2, max_finite=57344.0, has_inf=True, has_nan=True)
E2M1 = FloatFormat("e2m1", ebits=2, mbits=1, max_finite=6.0, has_inf=False, has_nan=False)
FORMATS = {f.name: f for f in (E4M3, E5M2, E2M1)}
ROUNDINGS = ("nearest", "stochastic")


def get_format(fmt: str | FloatFormat) -> FloatFormat:
    if isinstance(fmt, FloatFormat):
        return fmt
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r} is not a known format; use one of {sorted(FORMATS)}")
    return FORMATS[fmt]


def check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r} is not supported; use one of {ROUNDINGS}")


def _magnitude_code(value: float, fmt: FloatFormat) -> int:
    """Code of a positive, exactly representable value (plain Python; used for constants)."""
    e = max(math.frexp(value)[1] - 1, fmt.emin)
    return (e - fmt.emin) * (1 << fmt.mbits) + int(value / 2.0 ** (e - fmt.mbits))


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """Exact 2**exponent in float64 built from the bit pattern (exp2 need not be exact)."""
    return ((exponent + 1023) << 52).view(torch.float64)


def encode(
    x: torch.Tensor,
    fmt: str | FloatFormat,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    saturate: bool = True,
) -> torch.Tensor:
    """Round ``x`` (any float dtype; read as float32) to ``fmt`` and return uint8 codes, same shape.

    ``generator`` feeds the stochastic draws (one float64 uniform per element). See the module
    docstring for overflow, inf, NaN and zero handling.
    """
    fmt = get_format(fmt)
    check_rounding(rounding)
    x = x.detach().float()
    negative = x.view(torch.int32) < 0  # sign bit, so -0.0 and -NaN keep their sign
    nan, inf = torch.isnan(x), torch.isinf(x)
    mag = torch.where(nan | inf, 0.0, x.abs()).double()

    # Spacing of the format around |x|: 2**(e - mbits), with e clamped to emin so that values below
    # the normal range land on the subnormal grid. Dividing by a power of two is exact in float64.
    exponent = (torch.frexp(mag).exponent.long() - 1).clamp_min(fmt.emin)
    exponent = torch.where(mag == 0, fmt.emin, exponent)  # frexp(0) reports exponent 0
    scaled = mag * _pow2(fmt.mbits - exponent)  # in [0, 2**(mbits+1)]
    if rounding == "nearest":
        steps = torch.round(scaled)  # half to even
    else:
        low = torch.floor(scaled)
        u = torch.rand(x.shape, generator=generator, dtype=torch.float64, device=x.device)
        steps = low + (u < scaled - low)
    # A carry out of the mantissa (steps == 2**(mbits+1)) lands on the next exponent's first code.
    code = (exponent - fmt.emin) * (1 << fmt.mbits) + steps.long()

    overflow = (code > fmt.max_code) | inf
    if saturate:
        code = torch.where(overflow, fmt.max_code, code)
    elif fmt.has_inf:
        code = torch.where(overflow, fmt.max_code + 1, code)
    elif fmt.has_nan:
        code = torch.where(overflow, fmt.nan_code, code)
    elif bool(overflow.any()):
        raise ValueError(
            f"{fmt.name} has no inf or NaN, so values beyond ±{fmt.max_finite} cannot be encoded with "
            "saturate=False; pass saturate=True to clamp them to the largest finite value"
        )
    if fmt.nan_code is not None:
        code = torch.where(nan, fmt.nan_code, code)
    elif bool(nan.any()):
        raise ValueError(f"{fmt.name} has no NaN encoding and the input contains NaN")
    return (code | (negative.long() * fmt.sign_bit)).to(torch.uint8)


@functools.cache
def _decode_table(fmt: FloatFormat) -> torch.Tensor:
    """float32 value of every code, indexed by code: (2**bits,)."""
    codes = torch.arange(1 << fmt.bits)
    mag = codes & (fmt.sign_bit - 1)
    field, mant = mag >> fmt.mbits, mag & ((1 << fmt.mbits) - 1)
    # Subnormals (field 0) have no implicit leading one and share the exponent emin.
    significand = torch.where(field == 0, mant, mant + (1 << fmt.mbits)).double()
    exponent = torch.where(field == 0, fmt.emin, field - fmt.bias) - fmt.mbits
    value = significand * _pow2(exponent)
    if fmt.has_inf:
        value = torch.where(mag == fmt.max_code + 1, torch.inf, value)
    if fmt.has_nan:
        value = torch.where(mag > fmt.max_code + fmt.has_inf, torch.nan, value)
    sign = torch.where(codes & fmt.sign_bit != 0, -1.0, 1.0).double()
    return torch.copysign(value, sign).float()


def decode(codes: torch.Tensor, fmt: str | FloatFormat) -> torch.Tensor:
    """uint8 codes -> float32 values (exact), same shape; -0, inf and NaN decode as such."""
    fmt = get_format(fmt)
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be torch.uint8, got {codes.dtype}")
    table = _decode_table(fmt).to(codes.device)
    return table[(codes & ((1 << fmt.bits) - 1)).long()]


def round_to_format(
    x: torch.Tensor,
    fmt: str | FloatFormat,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    saturate: bool = True,
) -> torch.Tensor:
    """float32 values of ``x`` rounded to ``fmt``: ``decode(encode(x, ...))``."""
    return decode(encode(x, fmt, rounding, generator, saturate), fmt)


def representable_values(fmt: str | FloatFormat) -> torch.Tensor:
    """All finite non-negative values of ``fmt`` in increasing order, float32."""
    fmt = get_format(fmt)
    return _decode_table(fmt)[: fmt.max_code + 1].clone()
