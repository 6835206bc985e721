"""Low-precision numerics emulated in plain PyTorch: bit-exact FP8/FP4 codecs (``formats``), NVFP4
block quantization with the random Hadamard transform (``nvfp4``) and FP8 per-tensor current scaling
(``fp8``). These are the reference definitions the training recipes and any fast kernels are tested
against; they run on CPU."""

from kinetic.precision import formats, fp8, nvfp4

__all__ = ["formats", "fp8", "nvfp4"]
