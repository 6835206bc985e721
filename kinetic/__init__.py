"""kinetic: an open implementation of the Nemotron 3 system (hybrid Mamba-2/attention latent-MoE
language models with multi-token prediction) in PyTorch."""

from kinetic.config import ModelConfig, preset
from kinetic.infer.cache import InferenceCache
from kinetic.model import NemotronHForCausalLM

__version__ = "0.1.0"


def from_pretrained(path, *, dtype=None, device="cpu") -> NemotronHForCausalLM:
    """Load a Hugging Face NemotronH checkpoint directory (config.json + safetensors)."""
    return NemotronHForCausalLM.from_pretrained(path, dtype=dtype, device=device)


__all__ = ["InferenceCache", "ModelConfig", "NemotronHForCausalLM", "from_pretrained", "preset"]
