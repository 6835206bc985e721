"""NVFP4 quantization (E2M1 values, E4M3 block scales, FP32 tensor scale) and the 16-point random
Hadamard transform, emulated bit-exactly on CPU.

The canonical arithmetic is Transformer Engine's (the recipe of "Pretraining LLMs with NVFP4",
arXiv 2509.25149; TE ``core_nvfp4.cuh`` and its Python reference ``quantization_nvfp4.py``), all in
float32 with round-to-nearest-even per operation::

    S_enc   = min(448 * 6 / amax, FLT_MAX), or 1 when amax == 0 (or S_enc underflows to 0)
    S_dec   = 1 / S_enc                                   -> NVFP4Quantized.global_scale
    s_b     = e4m3_rne_satfinite(amax_b * (S_enc * fp32(1/6)))  -> .scales (E4M3 subnormals kept)
    enc_b   = min(1 / (s_b * S_dec), FLT_MAX)
    code    = e2m1_satfinite(x * enc_b)               (RNE, or stochastic for gradients)
    value   = e2m1(code) * (s_b * S_dec)              -> .dequantize()

TE folds 1/6 into S_enc; ``(amax_b / 6) * S_enc`` can differ in the last bit and so, at an E4M3
rounding midpoint, in the scale. TE's standalone dequantize kernel forms the factor from the amax
(``s_b * amax * fp32(1/2688)``) rather than from ``S_dec``; we dequantize with the stored
``global_scale``, as torchao does.

``amax_b`` is taken over 1x16 blocks along the last (GEMM reduction) dimension, or over 16x16 tiles
for weights so that the transposed copy used by the backward pass quantizes to the exact transpose.
A block whose scale underflows to 0 gets ``enc_b = FLT_MAX``; its codes saturate but it dequantizes
to zeros, and an all-zero tensor quantizes to zeros (never NaN).

Two deliberate differences from torchao 0.18's ``NVFP4Tensor.to_nvfp4`` reference: torchao clamps
block scales to at least 2^-6 (the smallest *normal* E4M3), so tiny blocks lose precision there, and
with a per-tensor scale it returns NaN for an all-zero tensor. Given ``per_tensor_scale=global_scale``
it otherwise agrees bit for bit on float32 data (tested on random and outlier-heavy tensors), with
one more, unintended difference: it evaluates the block scale as ``(amax_b / 6) / S_dec`` and the
element multiplier as ``(1 / S_dec) / s_b``. Those float32 results can differ from TE's in the last
bit, which changes a rounding when the exact value lies within an ulp of a midpoint: essentially
never for float32 inputs, but for bf16-valued inputs on ~0.07% of elements and, for some amax, on
up to ~0.7% of block scales. We follow TE.

Precision recipe (TE's): weights and activations round to nearest; gradients (the dgrad and wgrad
inputs) round stochastically; both inputs of the weight-gradient GEMM get the random Hadamard
transform along the token dimension before quantization, so their amax is taken after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kinetic.precision.formats import E2M1, E4M3, check_rounding, decode, encode

BLOCKS = ((1, 16), (16, 16))
RHT_SIZE = 16
FP4_MAX = 6.0
FP8_MAX = 448.0
FLT_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class NVFP4Quantized:
    """An NVFP4 tensor. ``x ≈ decode(codes) * scales[block] * global_scale``.

    codes:        (rows, cols) uint8 E2M1 codes, one per element (bit 3 is the sign).
    scales:       (rows / block[0], cols / block[1]) float32, every entry an exact E4M3 value; the
                  raw E4M3 bytes are ``scale_codes``.
    global_scale: () float32 per-tensor decode scale ``1 / S_enc``.
    block:        (1, 16) or (16, 16).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor
    block: tuple[int, int]

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def scale_codes(self) -> torch.Tensor:
        return encode(self.scales, E4M3)

    def dequantize(self) -> torch.Tensor:
        """float32 values, shape ``self.shape``: ``e2m1 * (s_b * global_scale)``."""
        rows, cols = self.shape
        bm, bn = self.block
        values = decode(self.codes, E2M1).view(rows // bm, bm, cols // bn, bn)
        scale = (self.scales * self.global_scale)[:, None, :, None]
        return (values * scale).view(rows, cols)


def global_encode_scale(amax: torch.Tensor) -> torch.Tensor:
    """TE's ``S_enc = 448 * 6 / amax`` in float32, capped at FLT_MAX, and 1 for amax 0 (or inf)."""
    amax = amax.float()
    s_enc = torch.clamp_max(torch.tensor(FP8_MAX * FP4_MAX, dtype=torch.float32) / amax, FLT_MAX)
    return torch.where((amax == 0) | (s_enc == 0), torch.ones_like(s_enc), s_enc)


def _check_input(x: torch.Tensor, block: tuple[int, int]) -> None:
    if tuple(block) not in BLOCKS:
        raise ValueError(
            f"block={block!r} is not supported; use (1, 16) for activations and "
            "gradients or (16, 16) for weights"
        )
    if x.dim() != 2:
        raise ValueError(
            f"NVFP4 quantizes 2-D tensors (rows, reduction dim); got shape {tuple(x.shape)}. "
            "Flatten leading dims first"
        )
    if x.shape[0] % block[0] or x.shape[1] % block[1]:
        raise ValueError(
            f"shape {tuple(x.shape)} is not a multiple of block {tuple(block)}; pad the "
            "tensor to whole blocks"
        )
    if not x.is_floating_point():
        raise ValueError(f"NVFP4 quantizes floating-point tensors; got {x.dtype}")


def quantize(
    x: torch.Tensor,
    block: tuple[int, int] = (1, 16),
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    global_amax: torch.Tensor | float | None = None,
) -> NVFP4Quantized:
    """Quantize a 2-D tensor ``x: (rows, cols)`` (cols = reduction dim) to NVFP4 with TE's arithmetic.

    ``rounding="stochastic"`` rounds the E2M1 elements stochastically with ``generator``; block
    scales always round to nearest. ``global_amax`` overrides ``max|x|`` (e.g. one amax shared by
    several tensors); values it does not cover saturate to ±6 · scale.
    """
    block = tuple(block)
    _check_input(x, block)
    check_rounding(rounding)
    x = x.detach().float().contiguous()
    rows, cols = x.shape
    bm, bn = block
    amax = x.abs().amax() if global_amax is None else torch.as_tensor(global_amax, dtype=torch.float32)
    s_enc = global_encode_scale(amax)
    s_dec = 1.0 / s_enc

    tiles = x.view(rows // bm, bm, cols // bn, bn)
    block_amax = tiles.abs().amax(dim=(1, 3))
    # TE folds 1/6 into the global scale (one multiply per block); the order matters for exactness.
    rcp_fp4_max = torch.tensor(1.0 / FP4_MAX, dtype=torch.float32)
    scales = decode(encode(block_amax * (s_enc * rcp_fp4_max), E4M3), E4M3)
    enc = torch.clamp_max(1.0 / (scales * s_dec), FLT_MAX)
    scaled = (tiles * enc[:, None, :, None]).view(rows, cols)
    codes = encode(scaled, E2M1, rounding, generator, saturate=True)
    return NVFP4Quantized(codes=codes, scales=scales, global_scale=s_dec, block=block)


def hadamard_matrix(n: int = RHT_SIZE) -> torch.Tensor:
    """Sylvester Hadamard matrix of ±1 entries, (n, n) float32; ``n`` a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def rht_signs(generator: torch.Generator | None = None, n: int = RHT_SIZE) -> torch.Tensor:
    """A random ±1 float32 sign vector (n,); draw it once per run and reuse it for every GEMM (TE's
    reference hard-codes one such vector)."""
    return torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1


def rht_matrix(signs: torch.Tensor) -> torch.Tensor:
    """``diag(signs) @ H / sqrt(n)``: (n, n) float32, orthogonal (entries ±1/4 for n = 16, so
    ``M @ M.T == I`` holds exactly in float32)."""
    n = signs.numel()
    return signs.float()[:, None] * hadamard_matrix(n) / n**0.5


def random_hadamard_transform(
    x: torch.Tensor, signs: torch.Tensor, dim: int = -1, inverse: bool = False
) -> torch.Tensor:
    """Apply the 16-point RHT to every group of 16 consecutive entries along ``dim``.

    Each group ``v`` becomes ``v @ rht_matrix(signs)`` (``@ rht_matrix(signs).T`` with
    ``inverse=True``), TE's convention. For the weight-gradient GEMM ``dW = dYᵀ X`` apply it along the
    token dimension of both operands: ``(dYᵀ M)(Xᵀ M)ᵀ = dYᵀ X`` because ``M Mᵀ = I``, while the
    outliers that would inflate a block's amax are spread over 16 entries. Quantize the transformed
    tensors (their amax is then taken after the transform).
    """
    if signs.shape != (RHT_SIZE,):
        raise ValueError(f"signs must have shape ({RHT_SIZE},), got {tuple(signs.shape)}; use rht_signs()")
    length = x.shape[dim]
    if length % RHT_SIZE:
        raise ValueError(
            f"dimension {dim} of shape {tuple(x.shape)} has length {length}, not a multiple "
            f"of {RHT_SIZE}; pad it to apply the random Hadamard transform"
        )
    m = rht_matrix(signs).to(device=x.device, dtype=x.dtype)
    if inverse:
        m = m.T
    moved = x.movedim(dim, -1)
    groups = moved.reshape(*moved.shape[:-1], length // RHT_SIZE, RHT_SIZE)
    return (groups @ m).reshape(moved.shape).movedim(-1, dim)
