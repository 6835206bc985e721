"""Training checkpoints, written atomically: everything goes into a temporary directory that is
renamed into place, and the ``latest`` pointer is replaced only after that, so a process killed
mid-save leaves the previous checkpoint intact and pointed to.

Layout of ``<run>/checkpoints/step_000123/``: the model in the Hugging Face layout (config.json +
model.safetensors), ``optimizer.pt`` and ``rng.pt`` (tensors only, read with weights_only=True),
and ``state.json`` (step, tokens seen, data-loader position, schedule). ``rng.pt`` holds the torch
(and CUDA) RNG states and, under ``generators``, any further generator states the trainer passes,
e.g. a precision recipe's stochastic-rounding streams as ``{"stochastic_rounding/rank0": uint8
tensor, ...}``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from kinetic.hf import save_pretrained
from kinetic.model import NemotronHForCausalLM


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = checkpoint_dir(run_dir) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoint_dir(run_dir) / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(run_dir: Path, step: int, model, optimizer, state: dict[str, Any],
                    keep: int = 2, generators: dict[str, torch.Tensor] | None = None) -> Path:
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    tmp = root / f".tmp_{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_pretrained(model, tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    rng = rng_state()
    torch.save({"torch": rng["torch"], **({"cuda": rng["cuda"]} if "cuda" in rng else {}),
                "generators": dict(generators or {})}, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "python_rng": _py_rng_to_json(rng["python"])},
                                               indent=2))
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer_tmp = root / ".latest.tmp"
    pointer_tmp.write_text(name)
    os.replace(pointer_tmp, root / "latest")
    others = sorted(p for p in root.glob("step_*") if p.name != name)
    for old in others[: len(others) - max(keep - 1, 0)]:  # keep the newest `keep`, this one included
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer) -> dict[str, Any]:
    """Restore model weights, optimizer, RNG states; return the saved trainer state, with the extra
    generator states saved beside the RNG under ``"generators"`` (restoring those is the caller's)."""
    loaded = NemotronHForCausalLM.from_pretrained(path)
    model.load_state_dict(loaded.state_dict())
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = json.loads((path / "state.json").read_text())
    random.setstate(_py_rng_from_json(state.pop("python_rng")))
    state["generators"] = rng.get("generators", {})
    return state


def _py_rng_to_json(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_rng_from_json(state):
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
