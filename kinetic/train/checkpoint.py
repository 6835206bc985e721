"""Training checkpoints, written atomically: everything goes into a temporary directory that is
renamed into place, and the ``latest`` pointer is replaced only after that, so a process killed
mid-save leaves the previous checkpoint intact and pointed to.

Layout of ``<run>/checkpoints/step_000123/``: the model in the Hugging Face layout (config.json +
model.safetensors, and tokenizer.json + tokenizer_config.json when the run has a tokenizer, so every
checkpoint opens on its own), ``optimizer.pt`` and ``rng.pt`` (tensors only, read with
weights_only=True), and ``state.json`` (step, tokens seen, data-loader position, schedule).

Resuming reads a checkpoint whole before changing anything; one that cannot be read (a disk error, a
file damaged after it was written) is skipped, with a warning, for the newest older one
(:func:`read_newest_intact`). ``rng.pt`` holds the torch
(and CUDA) RNG states and, under ``generators``, any further generator states the trainer passes,
e.g. a precision recipe's stochastic-rounding streams as ``{"stochastic_rounding/rank0": uint8
tensor, ...}``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from kinetic.data.tokenizer import copy_tokenizer
from kinetic.hf import save_pretrained
from kinetic.model import NemotronHForCausalLM

_STEP_DIR = re.compile(r"^step_\d+$")


class CheckpointError(ValueError):
    """A run's checkpoints cannot be resumed from: every one is damaged, or they hold another model."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run: the one ``latest`` names, else (a damaged or missing
    pointer) the newest directory with its state.json."""
    return next((p for p in checkpoints_newest_first(run_dir) if (p / "state.json").is_file()), None)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def checkpoints_newest_first(run_dir: Path) -> list[Path]:
    """The checkpoint ``latest`` points to, then the older ones, newest first. Without a readable
    pointer (killed between the rename and the pointer update), every checkpoint: each directory
    is complete once it has its name."""
    root = checkpoint_dir(run_dir)
    steps = sorted((p for p in root.glob("step_*") if p.is_dir() and _STEP_DIR.match(p.name)), reverse=True)
    pointer = root / "latest"
    name = pointer.read_text(errors="replace").strip() if pointer.is_file() else ""
    if _STEP_DIR.match(name):
        steps = [root / name] + [p for p in steps if p.name < name]
    return steps


def save_checkpoint(run_dir: Path, step: int, model, optimizer, state: dict[str, Any],
                    keep: int = 2, generators: dict[str, torch.Tensor] | None = None,
                    tokenizer: Path | None = None) -> Path:
    """Write ``step_<step>`` atomically; ``tokenizer`` (a tokenizer.json or a directory holding one)
    is copied in with its tokenizer_config.json. Keeps the newest ``keep`` checkpoints."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    tmp = root / f".tmp_{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_pretrained(model, tmp)
    if tokenizer is not None:
        copy_tokenizer(tokenizer, tmp, model_max_length=model.config.max_position_embeddings)
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


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Every part of a checkpoint, read into memory: ``model`` (a NemotronHForCausalLM),
    ``optimizer``, ``rng`` and ``state``. CheckpointError naming the file that cannot be read."""
    path = Path(path)
    try:
        model = NemotronHForCausalLM.from_pretrained(path)  # ValueError naming a bad safetensors file
    except (ValueError, OSError) as err:
        raise CheckpointError(str(err)) from None

    def part(name: str, read):
        try:
            return read(path / name)
        except Exception as err:  # torch.load and json fail in many ways on a damaged file
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointError(f"{path / name} is unreadable ({reason})") from None

    parts = {"model": model, "optimizer": part("optimizer.pt", lambda f: torch.load(f, weights_only=True)),
             "rng": part("rng.pt", lambda f: torch.load(f, weights_only=True)),
             "state": part("state.json", lambda f: json.loads(f.read_text()))}
    needed = {"step", "tokens", "data", "python_rng"}
    if not isinstance(parts["state"], dict) or not needed <= set(parts["state"]):
        raise CheckpointError(f"{path / 'state.json'} lacks the step, tokens, data or python_rng entry")
    return parts


def read_newest_intact(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of a run that reads whole, and its parts; each damaged newer one is
    named in a warning on stderr. None without checkpoints; CheckpointError naming every damaged
    file when none is intact."""
    damaged = []
    for path in checkpoints_newest_first(run_dir):
        try:
            parts = read_checkpoint(path)
        except CheckpointError as err:
            damaged.append((path, str(err)))
            continue
        for bad, reason in damaged:
            print(f"warning: skipping damaged checkpoint {bad.name}: {reason}", file=sys.stderr)
        if damaged:
            print(f"warning: resuming from the older checkpoint {path}", file=sys.stderr)
        return path, parts
    if damaged:
        raise CheckpointError(f"no intact checkpoint in {checkpoint_dir(run_dir)} "
                              f"({'; '.join(reason for _, reason in damaged)}); remove the directory to "
                              "start again from step 0")
    return None


def load_checkpoint(path: Path, model, optimizer, parts: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore model weights, optimizer, RNG states; return the saved trainer state, with the extra
    generator states saved beside the RNG under ``"generators"`` (restoring those is the caller's).
    ``parts`` are those :func:`read_checkpoint` returned for ``path`` (read here when None)."""
    parts = parts if parts is not None else read_checkpoint(path)
    loaded, rng, state = parts["model"], parts["rng"], dict(parts["state"])
    if loaded.config != model.config:
        changed = [k for k, v in loaded.config.to_dict().items() if model.config.to_dict().get(k) != v]
        raise CheckpointError(f"{path} holds another model than the config asks for (differs in "
                              f"{', '.join(changed) or 'its config'}); resume with the run's own [model] "
                              "section or choose a new run.out_dir")
    model.load_state_dict(loaded.state_dict())
    optimizer.load_state_dict(parts["optimizer"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate(_py_rng_from_json(state.pop("python_rng")))
    state["generators"] = rng.get("generators", {})
    return state


def _py_rng_to_json(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_rng_from_json(state):
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
