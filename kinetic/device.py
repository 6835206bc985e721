"""Where a process runs and in what precision, from the settings users type: ``train.device`` in a
training config, ``--device`` / ``--dtype`` on the inference commands. Bad values are ValueErrors
that name the setting, the value and what would work."""

from __future__ import annotations

import re

import torch

DEVICE_CHOICES = ("'auto' (a GPU when one is visible, else the CPU), 'cpu', 'cuda' (this process's GPU) "
                  "or 'cuda:N'")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def valid_device_spec(spec: str) -> bool:
    return spec in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", spec) is not None


def resolve_device(spec: str = "auto", local_rank: int = 0, setting: str = "train.device") -> torch.device:
    """The device ``spec`` names. ``auto`` is ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` is
    GPU ``local_rank`` (torchrun's LOCAL_RANK: one GPU per process); ``cuda:N`` is GPU N. ``setting``
    names where the user gave it, for the errors: a config key (``train.device``, shown as
    ``train.device='cuda'``) or a flag (``--device``, shown as ``--device cuda``)."""
    shown = f"{setting}={spec!r}" if "." in setting else f"{setting} {spec}"
    if not valid_device_spec(spec):
        raise ValueError(f"{shown} is invalid: use {DEVICE_CHOICES}")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    way_out = f"{setting}='cpu'" if "." in setting else f"{setting} cpu"
    if not torch.cuda.is_available():
        raise ValueError(f"{shown} needs a GPU, but torch.cuda.is_available() is False (torch "
                         f"{torch.__version__}, a CPU-only build or no visible GPU): use {way_out} or auto")
    index = local_rank if spec in ("auto", "cuda") else int(spec.split(":")[1])
    count = torch.cuda.device_count()
    if index >= count and spec in ("auto", "cuda"):
        raise ValueError(f"LOCAL_RANK {local_rank} asks for GPU {index}, but this machine shows {count}: "
                         f"launch at most {count} processes per node, or use {way_out}")
    if index >= count:
        raise ValueError(f"{shown} asks for GPU {index}, but this machine shows {count} (numbered from "
                         f"0): name one of those, or use {way_out}")
    return torch.device("cuda", index)
