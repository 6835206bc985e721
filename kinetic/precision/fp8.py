"""FP8 with per-tensor current scaling, emulated bit-exactly: the scale is computed from this
tensor's own amax at quantization time (no amax history), as Transformer Engine's
``Float8CurrentScaling`` recipe does.

    scale     = fmt_max / amax  (float32; 1 when amax is 0, inf or NaN; FLT_MAX if it overflows)
    codes     = encode(x * scale, fmt)                 (saturating, RNE or stochastic)
    dequant   = decode(codes) * (1 / scale)            (TE stores and multiplies by scale_inv)

Which format goes where is the recipe's choice: E4M3 for weights and activations (more mantissa),
E5M2 or E4M3 for gradients (E5M2 trades mantissa for range).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kinetic.precision.formats import check_rounding, decode, encode, get_format

FLT_MAX = torch.finfo(torch.float32).max
FP8_FORMATS = ("e4m3", "e5m2")


@dataclass(frozen=True)
class FP8Quantized:
    """An FP8 tensor: ``x ≈ decode(codes, fmt) * scale_inv``.

    codes: uint8 FP8 codes, same shape as the input.
    scale: () float32 encode scale ``fmt_max / amax``.
    fmt:   "e4m3" or "e5m2".
    """

    codes: torch.Tensor
    scale: torch.Tensor
    fmt: str

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def scale_inv(self) -> torch.Tensor:
        return 1.0 / self.scale

    def dequantize(self) -> torch.Tensor:
        return decode(self.codes, self.fmt) * self.scale_inv


def compute_scale(amax: torch.Tensor, fmt: str = "e4m3") -> torch.Tensor:
    """TE's current-scaling scale from an amax: ``fmt_max / amax`` in float32, with the fallbacks
    above (a scale of 1 leaves a zero or non-finite tensor to the codec's zero/inf/NaN rules)."""
    fmt_max = torch.tensor(get_format(fmt).max_finite, dtype=torch.float32)
    amax = torch.as_tensor(amax, dtype=torch.float32)
    scale = torch.clamp_max(fmt_max / amax, FLT_MAX)
    degenerate = (amax == 0) | ~torch.isfinite(amax)
    return torch.where(degenerate, torch.ones_like(scale), scale)


def quantize(
    x: torch.Tensor,
    fmt: str = "e4m3",
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    amax: torch.Tensor | float | None = None,
) -> FP8Quantized:
    """Quantize ``x`` (any shape) to FP8 ``fmt`` with one per-tensor scale.

    ``amax`` overrides ``max|x|`` (e.g. an amax reduced across data-parallel ranks); values it does
    not cover saturate to ±fmt_max.
    """
    if fmt not in FP8_FORMATS:
        raise ValueError(f"fmt={fmt!r} is not an FP8 format; use one of {FP8_FORMATS}")
    check_rounding(rounding)
    x = x.detach().float()
    scale = compute_scale(x.abs().amax() if amax is None else amax, fmt)
    codes = encode(x * scale, fmt, rounding, generator, saturate=True)
    return FP8Quantized(codes=codes, scale=scale, fmt=fmt)
