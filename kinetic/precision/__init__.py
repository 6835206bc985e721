"""Low-precision numerics emulated in plain PyTorch: bit-exact FP8/FP4 codecs (``formats``), NVFP4
block quantization with the random Hadamard transform (``nvfp4``) and FP8 per-tensor current scaling
(``fp8``). These are the reference definitions the training recipes and any fast kernels are tested
against; they run on CPU.

On top of them: quantized-GEMM modules (``linear``: ``QuantLinear``, ``QuantExperts``) and training
recipes (``recipe``: ``PrecisionRecipe``, ``get_recipe``, ``apply_recipe``, ``restore_high_precision``)
that swap a built model's linear layers and expert GEMMs to BF16/FP8/NVFP4 emulation."""

from kinetic.precision import formats, fp8, nvfp4
from kinetic.precision.linear import GemmConfig, QuantExperts, QuantLinear, QuantState
from kinetic.precision.recipe import (
    PRESETS,
    PrecisionRecipe,
    RecipeReport,
    apply_recipe,
    get_recipe,
    quant_state,
    restore_high_precision,
)

__all__ = [
    "PRESETS", "GemmConfig", "PrecisionRecipe", "QuantExperts", "QuantLinear", "QuantState", "RecipeReport",
    "apply_recipe", "formats", "fp8", "get_recipe", "nvfp4", "quant_state", "restore_high_precision",
]
