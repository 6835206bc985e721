"""Load and save Hugging Face NemotronH checkpoints: ``config.json`` + safetensors (single file or
sharded with ``model.safetensors.index.json``). Nothing is ever unpickled.

On disk, names use the ``backbone.`` prefix and each routed expert is its own 2-D matrix
(``...mixer.experts.{e}.up_proj.weight``), as NVIDIA's released checkpoints do; in memory the experts
of a layer are one 3-D parameter. Checkpoints written by transformers' internal naming
(``model.`` prefix, fused 3-D experts) are read too.
"""

from __future__ import annotations

import json
import os
import re
import uuid
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kinetic.config import ModelConfig

_EXPERT_KEY = re.compile(r"^(.*\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$")
_FUSED_KEY = re.compile(r"^(.*\.mixer\.experts)\.(up_proj|down_proj)$")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def to_disk_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In-memory state dict -> released checkpoint names (per-expert 2-D matrices)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        m = _FUSED_KEY.match(name)
        if m:
            for e in range(tensor.shape[0]):
                out[f"{m.group(1)}.{e}.{m.group(2)}.weight"] = tensor[e].contiguous()
        else:
            out[name] = tensor.contiguous()
    return out


def from_disk_names(names: list[str]) -> tuple[dict[str, str], dict[str, dict[int, str]]]:
    """Map disk names onto in-memory names: (plain renames, fused name -> {expert: disk name})."""
    plain: dict[str, str] = {}
    experts: dict[str, dict[int, str]] = defaultdict(dict)
    for disk in names:
        name = "backbone." + disk[len("model."):] if disk.startswith("model.") else disk
        m = _EXPERT_KEY.match(name)
        if m:
            experts[f"{m.group(1)}.{m.group(3)}"][int(m.group(2))] = disk
        else:
            plain[name] = disk
    return plain, dict(experts)


def _checkpoint_files(path: Path) -> tuple[list[Path], dict[str, Path]]:
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({path / f for f in weight_map.values()})
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index} is not a valid safetensors index ({type(err).__name__}: {err}); "
                             "restore it from the run or re-save the checkpoint") from None
        return files, {k: path / f for k, f in weight_map.items()}
    single = path / SINGLE_NAME
    if single.is_file():
        return [single], {}
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no {SINGLE_NAME}, {INDEX_NAME} or *.safetensors in {path}")
    return found, {}


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, under its disk name."""
    files, _ = _checkpoint_files(Path(path))
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(_read_file(file))
    return tensors


def _read_file(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file; ValueError naming the file when it is missing, empty,
    truncated or not safetensors at all (safetensors' own errors name neither)."""
    if not file.is_file():
        raise ValueError(f"{file} is missing (named by {INDEX_NAME}); restore it or re-save the checkpoint")
    if file.stat().st_size == 0:
        raise ValueError(f"{file} is empty; the checkpoint was not written completely: re-save it, or "
                         "resume from an earlier checkpoint")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a Mapping)
    except Exception as err:  # SafetensorError derives from Exception only
        raise ValueError(f"{file} is truncated or corrupt ({err}); the checkpoint was not written "
                         "completely: re-save it, or resume from an earlier checkpoint") from None


def read_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """``path/config.json`` as a ModelConfig, and every tensor of the safetensors files. A config that
    declares MTP layers the files lack (transformers drops ``mtp.*`` when it re-saves) loses them,
    with a warning. Build the model from the config, then :func:`load_state` fills it."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    config = ModelConfig.from_pretrained(path)
    disk = read_tensors(path)
    if config.num_nextn_predict_layers and not any(k.startswith("mtp.") for k in disk):
        warnings.warn(f"{path} declares num_nextn_predict_layers={config.num_nextn_predict_layers} but "
                      "holds no mtp.* tensors (e.g. re-saved by transformers): loading without MTP",
                      stacklevel=3)
        config = config.replace(num_nextn_predict_layers=0)
    return config, disk


def load_state(model, disk: dict[str, torch.Tensor], *, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu"):
    """Fill ``model`` (built from the checkpoint's config, e.g. on the meta device) with the tensors
    :func:`read_checkpoint` returned; returns it on ``device`` in eval mode.

    Raises ValueError naming every missing, unexpected or mis-shaped tensor.
    """
    state = _assemble(model, disk, dtype)
    if model.config.tie_word_embeddings:
        state["lm_head.weight"] = state["backbone.embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
    model.to(device)
    model.eval()
    return model


def _assemble(model, disk: dict[str, torch.Tensor], dtype: torch.dtype | None):
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        disk = {k: v for k, v in disk.items() if k != "lm_head.weight"}
    plain, experts = from_disk_names(list(disk))
    state, problems = {}, []
    for name, disk_name in plain.items():
        if name not in expected:
            problems.append(f"unexpected tensor {disk_name!r}")
            continue
        state[name] = disk[disk_name]
    for name, by_index in experts.items():
        if name not in expected:
            problems.append(f"unexpected expert tensors {name}.*")
            continue
        n = expected[name].shape[0]
        missing = sorted(set(range(n)) - set(by_index))
        extra = sorted(set(by_index) - set(range(n)))
        if missing or extra:
            problems.append(f"{name}: experts missing {missing[:8]} / unexpected {extra[:8]} "
                            f"(config has n_routed_experts={n})")
            continue
        state[name] = torch.stack([disk[by_index[e]] for e in range(n)])
    for name, ref in expected.items():
        if name not in state:
            problems.append(f"missing tensor {name!r} (shape {tuple(ref.shape)})")
        elif tuple(state[name].shape) != tuple(ref.shape):
            problems.append(f"tensor {name!r} has shape {tuple(state[name].shape)}, config implies "
                            f"{tuple(ref.shape)}")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"checkpoint does not match its config.json:\n  {shown}{more}")
    for name, tensor in state.items():
        target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        if name.endswith("e_score_correction_bias"):
            target = torch.float32  # balancing bias stays fp32, as in transformers
        state[name] = tensor.to(target)
    return state


def save_pretrained(model, path: str | Path, *, max_shard_size: int = 5 * 2**30,
                    config_style: str = "pattern") -> Path:
    """Write config.json and safetensors shards atomically (temp files + rename)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    disk = to_disk_state(state)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(disk):
        nbytes = disk[name].numel() * disk[name].element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = disk[name]
        size += nbytes
    for stale in [path / SINGLE_NAME, path / INDEX_NAME, *path.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        _atomic_save(shards[0], path / SINGLE_NAME)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save(shard, path / fname)
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in disk.values())
        _atomic_write(path / INDEX_NAME, json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))
    _atomic_write(path / "config.json", model.config.to_json_string(config_style))
    return path


def _temp_name(file: Path) -> Path:
    """A fresh name beside ``file``. Not ``tempfile.mkstemp``: it creates mode 0600 whatever the
    umask, and the renamed file would keep that; files made by ``open`` get the umask's mode."""
    return file.with_name(f".{file.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _atomic_save(tensors: dict[str, torch.Tensor], file: Path) -> None:
    tmp = _temp_name(file)
    try:
        tmp.touch()  # the mode the umask gives; safetensors writes 0600 files whatever the umask
        mode = tmp.stat().st_mode & 0o777
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, mode)
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_write(file: Path, text: str) -> None:
    tmp = _temp_name(file)
    try:
        tmp.write_text(text)
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)
