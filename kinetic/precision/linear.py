"""Emulated low-precision GEMMs for training: ``QuantLinear`` (for ``nn.Linear``) and ``QuantExperts``
(for the MoE expert stacks), both built on one autograd Function that quantizes the operands of all
three GEMMs of a linear layer ``y = x Wᵀ`` the way the recipe says.

Legend: x (N tokens, K in), W (M out, K in), dy (N, M). Every GEMM quantizes both operands along its
reduction dimension (that is where the hardware's scaling blocks run) and multiplies the dequantized
values in float32::

    fprop   y  = Q_act(x) · Q_w(W)ᵀ                       reduction K
    dgrad   dx = Q_grad(dy) · Q_w(Wᵀ)ᵀ                    reduction M (W quantized transposed)
    wgrad   dW = Q_grad(RHT(dyᵀ)) · Q_act(RHT(xᵀ))ᵀ        reduction N (tokens), RHT optional

NVFP4 (``kinetic.precision.nvfp4``, TE's arithmetic): activations and gradients in 1x16 blocks along
the reduction dim, weights in 16x16 blocks, so ``Q_w(Wᵀ) == Q_w(W)ᵀ`` bit for bit and the forward's
quantized weight is reused by dgrad (with 1x16 weight blocks, the ablation, Wᵀ is quantized again and
the two copies differ). Gradients round stochastically, weights and activations to nearest even. The
16-point random Hadamard transform (one sign vector per run) is applied along the token dim to both
wgrad operands before quantization, so their amax is taken after it; it cancels in the product.
FP8 (``kinetic.precision.fp8``): per-tensor current scaling, E4M3 for x and W, E5M2 (or E4M3) for dy.
BF16: x, W and dy rounded to bfloat16 (round to nearest even), products in float32.

What is and is not emulated: only the GEMM operands are quantized. Outputs, bias adds and everything
outside the GEMMs stay in the model's dtype (float32 on CPU), so a comparison between recipes
isolates operand quantization. Master weights, their gradients and the optimizer state are the
module's own float32 parameters: the wrappers hold the *same* Parameter objects, never a copy.

Padding: the token count N need not be a multiple of 16, nor need K or M. Operands are zero-padded to
whole blocks before quantization and the results sliced back. Zeros change neither a block's amax nor
the tensor's amax, and they add nothing to a product, so padding is exact; for the RHT, padded token
rows are mixed into their group of 16 but still cancel in the wgrad product (M Mᵀ = I). A real kernel
pads (or masks) the same way.

Randomness (the RHT signs and the stochastic-rounding stream) lives in one ``QuantState`` shared by
all wrapped layers of a model and seeded by the recipe. The signs are a function of the seed; the
stochastic-rounding generators advance with every gradient quantized, so their states are part of a
training checkpoint (``QuantState.state_dict``; the trainer saves one per data-parallel rank) and a
resumed run rounds exactly as an uninterrupted one.

Data parallelism: with ``QuantState.reduce_amax`` (the recipe's default when torch.distributed runs
more than one rank) the per-tensor amax of every activation and gradient operand is all-reduced (MAX)
over the data-parallel group before its scale is computed, in the manner of Transformer Engine's
amax reduction over a process group (``amax_reduction_group``). Every rank then quantizes with the
scale of the global batch, so the FP8 scale and the NVFP4 per-tensor scale S_enc no longer depend on
how tokens were split across ranks (NVFP4 block scales stay per block: a block never spans ranks).
Weights are identical on every rank and use their own amax. The reduction is a collective, so every
rank must run the same GEMMs: ``QuantExperts`` then also runs experts that received no tokens.

Transformer Engine: ``te_status`` / ``resolve_backend`` are the capability-checked stub for a TE
backend. The TE execution path is not implemented yet (nothing here can test it): ``backend="auto"``
therefore always runs the emulation, and ``backend="te"`` raises a clear error, naming what is missing
when TE or a capable GPU is absent, and that the path is a stub when both are present.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kinetic.kernels.torch_ops import combine_assignments, sort_by_expert
from kinetic.model.mlp import relu2
from kinetic.model.moe import Experts
from kinetic.precision import fp8, nvfp4

FORMATS = ("bf16", "fp8", "nvfp4")
BACKENDS = ("auto", "emulated", "te")
BLOCK = 16  # NVFP4 block length and RHT size


@dataclass(frozen=True)
class GemmConfig:
    """How one layer's three GEMMs quantize their operands (the per-layer part of a recipe)."""

    fmt: str = "nvfp4"  # "bf16" | "fp8" | "nvfp4"
    rht: bool = True  # random Hadamard transform on both wgrad operands (along tokens)
    stochastic_rounding: bool = True  # gradient operands (dgrad and wgrad) round stochastically
    weight_block: tuple[int, int] = (16, 16)  # NVFP4 weight scaling blocks: (16, 16) or (1, 16)
    fp8_format: str = "e4m3"  # FP8 format of weights and activations
    fp8_grad_format: str = "e5m2"  # FP8 format of gradients

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"format={self.fmt!r} is not supported; use one of {FORMATS}")
        if tuple(self.weight_block) not in nvfp4.BLOCKS:
            raise ValueError(f"weight_block={self.weight_block!r} is not supported; use (16, 16) or (1, 16)")
        for name in ("fp8_format", "fp8_grad_format"):
            if getattr(self, name) not in fp8.FP8_FORMATS:
                raise ValueError(f"{name}={getattr(self, name)!r} is not an FP8 format; use one of "
                                 f"{fp8.FP8_FORMATS}")
        if self.fmt == "bf16" and (self.rht or self.stochastic_rounding):
            raise ValueError("the bf16 format rounds to nearest and has no block scales: set rht=False "
                             "and stochastic_rounding=False")

    @property
    def transposable_weight(self) -> bool:
        """Whether Q(Wᵀ) == Q(W)ᵀ, so the forward's quantized weight serves dgrad as is."""
        return self.fmt != "nvfp4" or tuple(self.weight_block) == (16, 16)


class QuantState:
    """What every wrapped layer of one model shares: the RHT sign vector (drawn once for the run, as
    TE does), one stochastic-rounding generator per device, and whether (and over which process
    group, None = the default group) activation and gradient amaxes are all-reduced."""

    def __init__(self, seed: int = 0, rank: int = 0, reduce_amax: bool = False, group=None) -> None:
        self.seed, self.rank = seed, rank
        self.reduce_amax, self.group = reduce_amax, group
        self.signs = nvfp4.rht_signs(torch.Generator().manual_seed(seed))  # the same on every rank
        self._generators: dict[torch.device, torch.Generator] = {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The stochastic-rounding generators' states by device name: uint8 CPU tensors, safe for
        ``torch.load(weights_only=True)``. The signs need no saving: they follow from the seed."""
        return {str(device): g.get_state() for device, g in self._generators.items()}

    def load_state_dict(self, states: dict[str, torch.Tensor]) -> None:
        for name, state in states.items():
            self.generator(torch.device(name)).set_state(state)

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            # a stream apart from the sign draw and per data-parallel rank, so ranks round independently
            seed = (self.seed + 1 + self.rank * 1_000_003) % 2**63
            self._generators[device] = torch.Generator(device=device).manual_seed(seed)
        return self._generators[device]


# ---------------------------------------------------------------------- operand quantization
def _pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad a 2-D tensor at the end up to multiples of (rows, cols)."""
    pad_r, pad_c = -x.shape[0] % rows, -x.shape[1] % cols
    return F.pad(x, (0, pad_c, 0, pad_r)) if pad_r or pad_c else x


def quantize_operand(x: torch.Tensor, cfg: GemmConfig, role: str, state: QuantState) -> torch.Tensor:
    """Fake-quantize a GEMM operand ``x: (rows, reduction)``: float32 values of Q(x), same shape.

    ``role`` is "weight", "act" or "grad"; it picks the NVFP4 block (weights: ``cfg.weight_block``,
    others 1x16 along the last dim), the FP8 format, and the rounding (gradients stochastic when
    ``cfg.stochastic_rounding``, all else round-to-nearest-even).
    """
    assert role in ("weight", "act", "grad") and x.dim() == 2, (role, x.shape)
    x = x.detach().float()
    if cfg.fmt == "bf16":
        return x.to(torch.bfloat16).float()
    amax = reduced_amax(x, role, state)  # before the empty-tensor exit: every rank joins the collective
    if x.numel() == 0:
        return x.clone()
    stochastic = role == "grad" and cfg.stochastic_rounding
    rounding = "stochastic" if stochastic else "nearest"
    gen = state.generator(x.device) if stochastic else None
    if cfg.fmt == "fp8":
        fmt = cfg.fp8_grad_format if role == "grad" else cfg.fp8_format
        return fp8.quantize(x, fmt, rounding, gen, amax=amax).dequantize()
    block = tuple(cfg.weight_block) if role == "weight" else (1, BLOCK)
    padded = _pad_to(x, block[0], block[1])  # zeros change no amax
    q = nvfp4.quantize(padded, block, rounding, gen, global_amax=amax).dequantize()
    return q[: x.shape[0], : x.shape[1]]


def reduced_amax(x: torch.Tensor, role: str, state: QuantState) -> torch.Tensor | None:
    """The per-tensor amax of an activation or gradient operand all-reduced (MAX) over
    ``state.group`` when ``state.reduce_amax``; None (each tensor uses its own amax) otherwise, and
    for weights, which are the same on every rank."""
    if role == "weight" or not state.reduce_amax:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("reduce_amax=True needs an initialized torch.distributed process group; "
                           "set the recipe's reduce_amax=False (or leave it None) for a single process")
    amax = x.abs().amax() if x.numel() else torch.zeros((), device=x.device)
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=state.group)
    return amax


def wgrad_operands(dy: torch.Tensor, x: torch.Tensor, cfg: GemmConfig,
                   state: QuantState) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantized wgrad operands ``(Q(RHT(dyᵀ)): (M, Np), Q(RHT(xᵀ)): (K, Np))`` from dy (N, M) and
    x (N, K); ``dW = a @ b.T``. Tokens are zero-padded to Np, a multiple of 16, for the RHT."""
    dy_t, x_t = dy.detach().float().T, x.detach().float().T
    if cfg.rht:
        dy_t, x_t = _pad_to(dy_t, 1, BLOCK), _pad_to(x_t, 1, BLOCK)
        signs = state.signs.to(dy_t.device)
        dy_t = nvfp4.random_hadamard_transform(dy_t, signs, dim=-1)
        x_t = nvfp4.random_hadamard_transform(x_t, signs, dim=-1)
    return quantize_operand(dy_t, cfg, "grad", state), quantize_operand(x_t, cfg, "act", state)


# ---------------------------------------------------------------------- the GEMM
class _QuantGemm(torch.autograd.Function):
    """``y = x Wᵀ`` with the three GEMMs quantized per ``cfg``; x (N, K), W (M, K) -> y (N, M)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, cfg: GemmConfig, state: QuantState):
        w_q = quantize_operand(weight, cfg, "weight", state)
        y = quantize_operand(x, cfg, "act", state) @ w_q.T
        ctx.cfg, ctx.state = cfg, state
        ctx.save_for_backward(x, weight, w_q if cfg.transposable_weight else None)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, w_q = ctx.saved_tensors
        cfg, state = ctx.cfg, ctx.state
        dx = dw = None
        if ctx.needs_input_grad[0]:
            # dgrad reduces over M: W is the operand (K, M) with blocks along M, i.e. Q(Wᵀ)
            w_t_q = w_q.T if w_q is not None else quantize_operand(weight.T, cfg, "weight", state)
            dx = (quantize_operand(dy, cfg, "grad", state) @ w_t_q.T).to(x.dtype)
        if ctx.needs_input_grad[1]:
            a, b = wgrad_operands(dy, x, cfg, state)
            dw = (a @ b.T).to(weight.dtype)
        return dx, dw, None, None


def quant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: GemmConfig,
                 state: QuantState) -> torch.Tensor:
    """``F.linear`` with quantized GEMMs: x (..., K), weight (M, K), bias (M,) -> (..., M). The bias
    is added after the GEMM in the model's dtype (its gradient is a plain sum, not a GEMM)."""
    y = _QuantGemm.apply(x.reshape(-1, x.shape[-1]), weight, cfg, state)
    y = y.view(*x.shape[:-1], weight.shape[0])
    return y + bias if bias is not None else y


# ---------------------------------------------------------------------- modules
class QuantLinear(nn.Module):
    """Drop-in for an ``nn.Linear`` whose GEMMs run quantized. Holds the linear's own ``weight`` and
    ``bias`` Parameters (same objects, same state-dict keys), and the original module, unregistered,
    so ``restore_high_precision`` can put it back."""

    def __init__(self, linear: nn.Linear, cfg: GemmConfig, state: QuantState) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.cfg, self.state = cfg, state
        self.__dict__["original"] = linear  # plain attribute: not a submodule, not in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.weight, self.bias, self.cfg, self.state)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {describe(self.cfg)}")


class QuantExperts(Experts):
    """The MoE expert stack with each expert's two GEMMs quantized on its own token slice (per-expert
    scales, as a grouped GEMM quantizes each group): the assignments sorted by expert, one quantized
    GEMM pair per expert. Experts that received no tokens are skipped (run on 0 tokens when amaxes
    are reduced across ranks) and get zero gradients."""

    def __init__(self, experts: Experts, cfg: GemmConfig, state: QuantState) -> None:
        nn.Module.__init__(self)  # Experts.__init__ would allocate fresh parameters
        self.up_proj = experts.up_proj  # (E, I, width)
        self.down_proj = experts.down_proj  # (E, width, I)
        self.cfg, self.state = cfg, state
        self.__dict__["original"] = experts

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        order, token_of, counts = sort_by_expert(indices, self.up_proj.shape[0])
        counts = counts.tolist()
        xs = x.index_select(0, token_of)  # (tokens * k, width), grouped by expert
        ups, downs = self.up_proj.unbind(0), self.down_proj.unbind(0)
        # with amax reduction an idle expert still runs (on 0 tokens), so all ranks join its collectives
        everyone = self.state.reduce_amax
        outs = [quant_linear(relu2(quant_linear(chunk, ups[e], None, self.cfg, self.state)), downs[e],
                             None, self.cfg, self.state)
                for e, chunk in enumerate(xs.split(counts)) if counts[e] or everyone]
        ys = torch.cat(outs) if outs else xs
        ys = ys.float() * weights.reshape(-1).index_select(0, order).unsqueeze(-1)
        out = combine_assignments(ys, order, indices.shape[1], atomic_free=ys.device.type != "cpu")
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        e, i, w = self.up_proj.shape
        return f"experts={e}, width={w}, intermediate={i}, {describe(self.cfg)}"


def describe(cfg: GemmConfig) -> str:
    """Short human-readable form of a GemmConfig, e.g. ``nvfp4 w16x16 rht sr``."""
    if cfg.fmt == "bf16":
        return "bf16"
    if cfg.fmt == "fp8":
        parts = [f"fp8 {cfg.fp8_format}/{cfg.fp8_grad_format}"]
    else:
        parts = [f"nvfp4 w{cfg.weight_block[0]}x{cfg.weight_block[1]}"]
    parts += ["rht"] * cfg.rht + ["sr"] * cfg.stochastic_rounding
    return " ".join(parts)


# ---------------------------------------------------------------------- Transformer Engine stub
# Minimum compute capability of TE's native GEMMs: FP8 on Ada/Hopper (8.9), NVFP4 on Blackwell (10.0).
TE_MIN_CAPABILITY = {"bf16": (8, 0), "fp8": (8, 9), "nvfp4": (10, 0)}


def te_status(fmt: str) -> tuple[bool, str]:
    """Whether Transformer Engine could run ``fmt`` here, and why not."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False, "transformer_engine is not importable (pip install transformer-engine[pytorch])"
    if not torch.cuda.is_available():
        return False, "no CUDA device is available"
    need, have = TE_MIN_CAPABILITY[fmt], torch.cuda.get_device_capability()
    if have < need:
        return False, f"{fmt} GEMMs need compute capability >= {need}, this GPU has {have}"
    return True, "available"


def resolve_backend(backend: str, fmt: str) -> tuple[str, str]:
    """The backend that will run the GEMMs and a note saying why. Only "emulated" exists today.

    ``"te"`` is the capability-checked stub: it raises ``RuntimeError`` naming what is missing, and
    ``NotImplementedError`` where TE and the GPU are both fine (the TE path is not wired yet).
    ``"auto"`` runs the emulation until that path exists.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; use one of {BACKENDS}")
    if backend == "emulated":
        return "emulated", "emulation requested"
    ok, why = te_status(fmt)
    if backend == "te":
        if not ok:
            raise RuntimeError(f"backend='te' was requested for {fmt}, but {why}; use backend='emulated' "
                               "(or 'auto') to run the bit-exact emulation instead")
        raise NotImplementedError("backend='te': Transformer Engine is available, but kinetic's TE path "
                                  "is a stub (kinetic/precision/linear.py); use backend='emulated'")
    return "emulated", f"auto: Transformer Engine path not implemented ({why})"
