"""The NemotronH model family: hybrid Mamba-2/attention blocks, (latent) MoE and MTP."""

from kinetic.model.cache import Cache
from kinetic.model.nemotron_h import CausalLMOutput, NemotronHForCausalLM

__all__ = ["Cache", "CausalLMOutput", "NemotronHForCausalLM"]
