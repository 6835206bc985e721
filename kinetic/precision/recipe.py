"""Precision recipes: which GEMMs of a built model run in BF16, FP8 or NVFP4, and which stay in high
precision. ``apply_recipe(model, recipe)`` swaps modules in place after construction (torchtitan's
converter pattern), ``restore_high_precision(model)`` undoes it for the final part of training.

NVIDIA's defaults (``get_recipe("nvfp4")``, resolved per model by ``PrecisionRecipe.resolve``):

* NVFP4 GEMMs with 16x16 weight blocks, the random Hadamard transform on wgrad inputs and stochastic
  rounding of gradients (see ``kinetic.precision.linear`` for the exact GEMM definitions);
* about 15% of the blocks' linear layers kept in BF16, mostly at the end: the 12B study of
  "Pretraining LLMs with NVFP4" kept the first 2 and last 8 of 62 blocks, so ``keep_first_blocks`` /
  ``keep_last_blocks`` default to round(2/62 · L) and round(8/62 · L) for an L-block model;
* embeddings, lm_head, norms and the MoE router are never swapped (they are not ``nn.Linear``
  GEMMs here, or, for the lm_head, its weight feeds the fused loss directly), so they stay in the
  model's dtype;
* for latent-MoE models (Nemotron 3 Super) also the latent projections, the MTP layers and the
  attention projections. NVIDIA singles out the Mamba output projection as well; here it is the
  opt-in ``keep_mamba_out_proj``.

Data parallelism: ``reduce_amax`` (default: on when torch.distributed runs more than one rank)
all-reduces the per-tensor amax of activation and gradient operands across the data-parallel group,
like Transformer Engine's amax reduction over a process group, so all ranks quantize with the same
scales.

Master weights, gradients and optimizer state stay FP32: the swapped modules hold the model's own
Parameter objects, so an optimizer built before ``apply_recipe`` is unaffected. "High precision" in
this emulation means the model's dtype (float32 on CPU); on GPU with bf16 autocast it is BF16. The
``"bf16"`` recipe emulates BF16 GEMMs by rounding x, W and dy to bfloat16 (round to nearest even),
products in float32, master weights fp32 - the baseline the low-precision recipes are compared with.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
from torch import nn

from kinetic.config import ModelConfig
from kinetic.model.attention import Attention
from kinetic.model.mamba2 import Mamba2Mixer
from kinetic.model.moe import Experts
from kinetic.precision.linear import (
    BACKENDS,
    FORMATS,
    GemmConfig,
    QuantExperts,
    QuantLinear,
    QuantState,
    describe,
    resolve_backend,
)

# The 12B NVFP4 study kept the first 2 and last 8 of its 62 blocks in BF16 (~16% of linear layers).
NVIDIA_KEEP_FIRST, NVIDIA_KEEP_LAST, NVIDIA_DEPTH = 2, 8, 62


@dataclass(frozen=True)
class PrecisionRecipe:
    """One training precision recipe. ``None`` fields mean "NVIDIA's default for this model's kind"
    and are filled in by ``resolve``."""

    format: str = "nvfp4"  # GEMM format of the quantized layers: "bf16" | "fp8" | "nvfp4"
    rht: bool = True  # 16-point random Hadamard transform on both wgrad inputs (along tokens)
    stochastic_rounding: bool = True  # gradients (dgrad and wgrad inputs) round stochastically
    weight_block: tuple[int, int] = (16, 16)  # NVFP4 weight blocks: (16, 16) 2-D or (1, 16) 1-D
    fp8_format: str = "e4m3"  # FP8 format for weights and activations
    fp8_grad_format: str = "e5m2"  # FP8 format for gradients ("e5m2" or "e4m3")
    keep_first_blocks: int | None = None  # first blocks kept high precision (None = round(2/62 · L))
    keep_last_blocks: int | None = None  # last blocks kept high precision (None = round(8/62 · L))
    keep_latent_proj: bool | None = None  # MoE latent projections (None = yes for latent-MoE models)
    keep_mtp: bool | None = None  # every MTP layer (None = yes for latent-MoE models)
    keep_attention: bool | None = None  # q/k/v/o projections (None = yes for latent-MoE models)
    keep_mamba_out_proj: bool = False  # Mamba-2 output projections
    keep_patterns: tuple[str, ...] = ()  # fnmatch patterns of module names kept high precision
    switch_to_bf16_at: float | None = None  # fraction of steps after which all layers run high precision
    seed: int = 0  # RHT sign vector and stochastic-rounding stream
    reduce_amax: bool | None = None  # all-reduce act/grad amaxes across ranks (None = when world > 1)
    backend: str = "auto"  # "auto" | "emulated" | "te" (TE is a capability-checked stub)

    def __post_init__(self) -> None:
        # TOML gives lists; the dataclass is frozen and hashable, so store tuples
        object.__setattr__(self, "weight_block", tuple(self.weight_block))
        object.__setattr__(self, "keep_patterns", tuple(self.keep_patterns))
        if self.format not in FORMATS:
            raise ValueError(f"precision format={self.format!r} is not supported; use one of {FORMATS}")
        if self.backend not in BACKENDS:
            raise ValueError(f"precision backend={self.backend!r} is not supported; use one of {BACKENDS}")
        for name in ("keep_first_blocks", "keep_last_blocks"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"precision {name}={value!r} must be an integer >= 0 (or None for auto)")
        s = self.switch_to_bf16_at
        if s is not None and not 0 < s <= 1:
            raise ValueError(f"precision switch_to_bf16_at={s!r} must be in (0, 1] (or None for never)")
        self.gemm_config()  # validates rht/rounding/block/FP8 formats

    def gemm_config(self) -> GemmConfig:
        return GemmConfig(self.format, self.rht, self.stochastic_rounding, self.weight_block,
                          self.fp8_format, self.fp8_grad_format)

    def replace(self, **changes: Any) -> PrecisionRecipe:
        return dataclasses.replace(self, **changes)

    def resolve(self, config: ModelConfig) -> PrecisionRecipe:
        """The recipe with every ``None`` replaced by NVIDIA's default for ``config``'s kind, and
        ``reduce_amax`` by whether this process is one of several torch.distributed ranks."""
        depth = len(config.hybrid_override_pattern)
        latent = config.moe_latent_size is not None
        auto = {
            "keep_first_blocks": _round(depth * NVIDIA_KEEP_FIRST / NVIDIA_DEPTH),
            "keep_last_blocks": _round(depth * NVIDIA_KEEP_LAST / NVIDIA_DEPTH),
            "keep_latent_proj": latent, "keep_mtp": latent, "keep_attention": latent,
            "reduce_amax": dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1,
        }
        return self.replace(**{k: v for k, v in auto.items() if getattr(self, k) is None})

    def switch_step(self, total_steps: int) -> int | None:
        """First optimizer step (0-based) that runs after the switch to high precision, or None."""
        if self.switch_to_bf16_at is None:
            return None
        return _round(self.switch_to_bf16_at * total_steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrecisionRecipe:
        """From a ``[precision]`` table: ``recipe = "<preset>"`` (default "nvfp4") plus any field of
        this class overriding it; unknown keys are errors."""
        data = dict(data)
        name = data.pop("recipe", "nvfp4")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown precision keys {unknown}; [precision] accepts 'recipe' and "
                             f"{sorted(known)}")
        return get_recipe(name, **data)


def _round(x: float) -> int:
    return int(x + 0.5)  # half up, unlike round()'s half-to-even


# Named presets: a handful, as overrides of the defaults (which are NVIDIA's NVFP4 recipe).
_KEEP_NOTHING = dict(keep_first_blocks=0, keep_last_blocks=0, keep_latent_proj=False, keep_mtp=False,
                     keep_attention=False, keep_mamba_out_proj=False)
PRESETS: dict[str, dict[str, Any]] = {
    "nvfp4": {},
    "nvfp4-no-rht": dict(rht=False),
    "nvfp4-no-sr": dict(stochastic_rounding=False),
    "nvfp4-1d-weights": dict(weight_block=(1, 16)),
    "nvfp4-all-quantized": dict(_KEEP_NOTHING),
    # FP8 current scaling is robust enough that every block linear layer runs in FP8
    "fp8": dict(format="fp8", rht=False, stochastic_rounding=False, **_KEEP_NOTHING),
    "bf16": dict(format="bf16", rht=False, stochastic_rounding=False, **_KEEP_NOTHING),
}


def get_recipe(name: str, **overrides: Any) -> PrecisionRecipe:
    """A named preset (see ``PRESETS``) with field overrides on top."""
    if name not in PRESETS:
        raise ValueError(f"unknown precision recipe {name!r}; choose one of {sorted(PRESETS)}")
    return PrecisionRecipe(**{**PRESETS[name], **overrides})


# ---------------------------------------------------------------------- model surgery
@dataclass
class LinearLayer:
    """One swappable GEMM module of a model and where it sits."""

    name: str  # module name, e.g. "backbone.layers.3.mixer.in_proj"
    module: nn.Module
    kind: str  # attention | mamba_in_proj | mamba_out_proj | latent_proj | experts | mlp | eh_proj | other
    block: int | None  # backbone block index; None in MTP layers and outside the blocks
    in_mtp: bool

    @property
    def gemms(self) -> int:
        """Linear layers this module counts as: an expert stack is its two grouped GEMMs."""
        return 2 if isinstance(self.module, Experts) else 1

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.module.parameters(recurse=False))


@dataclass
class RecipeReport:
    """What ``apply_recipe`` did. Fractions count the blocks' linear layers (backbone and MTP; an
    expert stack counts as its two GEMMs); the lm_head is always kept and not counted."""

    recipe: PrecisionRecipe  # resolved: no None left
    backend: str
    backend_note: str
    quantized: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # module name -> why it stays high precision
    kept_fraction: float = 0.0  # of block linear layers, by count
    kept_param_fraction: float = 0.0  # of block linear-layer parameters

    def summary(self) -> str:
        n_kept = sum(1 for reason in self.kept.values() if reason != "lm_head")
        return (f"{describe(self.recipe.gemm_config())} ({self.backend}): {len(self.quantized)} modules "
                f"quantized, {n_kept} kept high precision + lm_head/embeddings/norms/router; "
                f"{100 * self.kept_fraction:.1f}% of linear layers "
                f"({100 * self.kept_param_fraction:.1f}% of their parameters) kept")

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe.to_dict(), "backend": self.backend, "backend_note": self.backend_note,
                "quantized": self.quantized, "kept": self.kept, "kept_fraction": self.kept_fraction,
                "kept_param_fraction": self.kept_param_fraction}


def linear_layers(model: nn.Module) -> list[LinearLayer]:
    """Every ``nn.Linear`` and expert stack of a NemotronH model, with its position and kind."""
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear | Experts | QuantLinear):
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        parts = name.split(".")
        block = int(parts[2]) if parts[:2] == ["backbone", "layers"] else None
        layers.append(LinearLayer(name, module, _kind(parent, leaf, module), block,
                                  in_mtp=parts[:2] == ["mtp", "layers"]))
    return layers


def _kind(parent: nn.Module, leaf: str, module: nn.Module) -> str:
    if isinstance(module, Experts):
        return "experts"
    if isinstance(parent, Attention):
        return "attention"
    if isinstance(parent, Mamba2Mixer):
        return "mamba_out_proj" if leaf == "out_proj" else "mamba_in_proj"
    if leaf in ("fc1_latent_proj", "fc2_latent_proj"):
        return "latent_proj"
    if leaf == "eh_proj":
        return "eh_proj"
    return "mlp" if leaf in ("up_proj", "down_proj") else "other"


def keep_reason(layer: LinearLayer, recipe: PrecisionRecipe, depth: int) -> str | None:
    """Why ``layer`` stays high precision under the resolved ``recipe``, or None to quantize it."""
    if layer.name == "lm_head":
        return "lm_head"
    if layer.block is None and not layer.in_mtp:
        return "outside the blocks"
    for pattern in recipe.keep_patterns:
        if fnmatch.fnmatchcase(layer.name, pattern):
            return f"pattern {pattern!r}"
    if layer.in_mtp and recipe.keep_mtp:
        return "mtp layer"
    if layer.block is not None and layer.block < recipe.keep_first_blocks:
        return "first blocks"
    if layer.block is not None and layer.block >= depth - recipe.keep_last_blocks:
        return "last blocks"
    rules = {"latent_proj": recipe.keep_latent_proj, "attention": recipe.keep_attention,
             "mamba_out_proj": recipe.keep_mamba_out_proj}
    if rules.get(layer.kind):
        return layer.kind.replace("_", " ")
    return None


def apply_recipe(model: nn.Module, recipe: PrecisionRecipe | str, rank: int = 0,
                 group: dist.ProcessGroup | None = None) -> RecipeReport:
    """Swap the quantized layers of a built NemotronH model in place; returns what was swapped/kept.

    Call it once, after construction and before (or after) building the optimizer: parameters are
    neither copied nor replaced. A model that already carries a recipe is refused. ``rank`` (the
    data-parallel rank) gives each rank its own stochastic-rounding stream; the RHT signs are shared.
    ``group`` is the data-parallel process group that amaxes are reduced over (None = the default
    group) when the resolved recipe has ``reduce_amax``.
    """
    if isinstance(recipe, str):
        recipe = get_recipe(recipe)
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise ValueError("apply_recipe needs a NemotronHForCausalLM (a module with a ModelConfig .config); "
                         "unwrap DDP/compiled wrappers first")
    if any(isinstance(m, QuantLinear | QuantExperts) for m in model.modules()):
        raise ValueError("this model already has a precision recipe applied; call "
                         "restore_high_precision(model) before applying another")
    resolved = recipe.resolve(config)
    backend, note = resolve_backend(resolved.backend, resolved.format)
    gemm, state = resolved.gemm_config(), QuantState(resolved.seed, rank, resolved.reduce_amax, group)
    depth = len(config.hybrid_override_pattern)
    report = RecipeReport(resolved, backend, note)
    counted = kept_gemms = all_params = kept_params = 0
    for layer in linear_layers(model):
        reason = keep_reason(layer, resolved, depth)
        if layer.block is not None or layer.in_mtp:
            counted, all_params = counted + layer.gemms, all_params + layer.params
            if reason:
                kept_gemms, kept_params = kept_gemms + layer.gemms, kept_params + layer.params
        if reason:
            report.kept[layer.name] = reason
            continue
        wrapper = QuantExperts if isinstance(layer.module, Experts) else QuantLinear
        _set_module(model, layer.name, wrapper(layer.module, gemm, state))
        report.quantized.append(layer.name)
    report.kept_fraction = kept_gemms / max(counted, 1)
    report.kept_param_fraction = kept_params / max(all_params, 1)
    return report


def quant_state(model: nn.Module) -> QuantState | None:
    """The ``QuantState`` shared by a model's quantized modules (None if it has none): its stochastic-
    rounding generators belong in a training checkpoint."""
    for module in model.modules():
        if isinstance(module, QuantLinear | QuantExperts):
            return module.state
    return None


def restore_high_precision(model: nn.Module, to: str = "native") -> list[str]:
    """The final switch: every quantized module runs in high precision from now on; returns their
    names (empty if there were none, so calling it again is harmless).

    ``to="native"`` puts the original ``nn.Linear`` / ``Experts`` modules back (same parameters), so
    the GEMMs run in the model's dtype. ``to="bf16"`` keeps the wrappers but switches them to the
    emulated BF16 GEMM, the CPU stand-in for NVIDIA's switch to BF16.
    """
    if to not in ("native", "bf16"):
        raise ValueError(f"to={to!r} is not supported; use 'native' or 'bf16'")
    names = [name for name, m in model.named_modules() if isinstance(m, QuantLinear | QuantExperts)]
    for name in names:
        module = model.get_submodule(name)
        if to == "native":
            # the original sat outside the module tree meanwhile, so it missed train()/eval() calls
            _set_module(model, name, module.original.train(module.training))
        else:
            module.cfg = GemmConfig("bf16", rht=False, stochastic_rounding=False)
    return names


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)
