"""Training configuration: TOML files mapped onto dataclasses.

Every field has a default and a one-line comment; unknown keys and wrong types are errors naming
``section.key``. Defaults follow what NVIDIA reports for Nemotron 3 Nano pretraining: AdamW
(0.9, 0.95), weight decay 0.1, warmup-stable-decay to 1% of peak, expert-bias update rate 1e-3,
sequence-level balancing loss 1e-4, MTP loss scale 0.3 (Super).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from kinetic.config import check_changes
from kinetic.device import DEVICE_CHOICES, valid_device_spec


@dataclass
class ModelSection:
    preset: str = "tiny"  # kinetic preset name, used when `config` is empty
    config: str = ""  # path to a config.json / checkpoint dir (overrides preset)
    overrides: dict = field(default_factory=dict)  # ModelConfig fields replaced on top


@dataclass
class DataSection:
    corpus: str = ""  # corpus directory built by `kinetic data build` ("" = synthetic tokens)
    weights: dict = field(default_factory=dict)  # domain -> blend weight ({} = in proportion to tokens)
    seq_len: int = 256  # tokens per training sequence


@dataclass
class TrainSection:
    steps: int = 100  # optimizer steps
    micro_batch: int = 8  # sequences per forward/backward on each process
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 0  # model init, data order, dropout-free RNG
    threads: int = 0  # torch CPU threads (0 = torch default)
    compile: bool = False  # torch.compile the model: first steps compile (minutes on CPU), later ones faster
    device: str = "auto"  # "auto" (GPU if visible, else CPU), "cpu", "cuda" (GPU LOCAL_RANK) or "cuda:N"


@dataclass
class OptimSection:
    lr: float = 3e-3  # peak learning rate
    betas: list = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # decoupled weight decay on matrices (not norms, biases, 1-D params)
    grad_clip: float = 1.0  # global gradient-norm clip (0 = off)


@dataclass
class ScheduleSection:
    warmup_steps: int = 10  # linear warmup from 0
    decay_fraction: float = 0.2  # warmup-stable-decay: the last fraction of steps decays
    min_lr_ratio: float = 0.01  # decay ends at this fraction of the peak
    decay_shape: str = "linear"  # "linear" or "sqrt" (1 - sqrt) decay


@dataclass
class LossSection:
    mtp_scale: float = 0.3  # weight of the mean MTP loss over depths
    balance_loss: float = 1e-4  # sequence-level MoE balancing loss coefficient (0 = off)
    expert_bias_rate: float = 1e-3  # aux-loss-free expert-bias update rate (0 = off)


@dataclass
class PrecisionSection:
    recipe: str = ""  # "" = plain fp32; else a kinetic.precision preset: bf16, fp8, nvfp4, nvfp4-no-rht, ...
    overrides: dict = field(default_factory=dict)  # PrecisionRecipe fields, e.g. {switch_to_bf16_at = 0.8}


@dataclass
class RunSection:
    out_dir: str = "runs/pretrain"  # run directory: metrics, checkpoints, report
    log_every: int = 10  # steps between metrics lines
    eval_every: int = 50  # steps between validation passes (0 = only at the end)
    eval_batches: int = 4  # validation batches per pass
    save_every: int = 50  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2  # most recent checkpoints kept on disk
    progress: bool = True  # live progress bar


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    loss: LossSection = field(default_factory=LossSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        def bad(name: str, value: Any, allowed: str) -> None:
            raise ValueError(f"config {name}={value!r} is invalid: {allowed}")

        for name in ("steps", "micro_batch", "grad_accum"):
            if getattr(self.train, name) < 1:
                bad(f"train.{name}", getattr(self.train, name), "must be >= 1")
        for section, name, least, meaning in _LOWER_BOUNDS:
            value = getattr(getattr(self, section), name)
            if value < least:
                bad(f"{section}.{name}", value, f"must be >= {least} ({meaning}); set {section}.{name} "
                    f"to {least} or more")
        try:
            check_changes(self.model.overrides)
        except ValueError as err:
            raise ValueError(f"config [model] overrides: {err}") from None
        if not valid_device_spec(self.train.device):
            bad("train.device", self.train.device, f"use {DEVICE_CHOICES}")
        if self.data.seq_len < 2:
            bad("data.seq_len", self.data.seq_len, "must be >= 2")
        if self.optim.lr <= 0:
            bad("optim.lr", self.optim.lr, "must be > 0")
        if len(self.optim.betas) != 2 or not all(0 <= b < 1 for b in self.optim.betas):
            bad("optim.betas", self.optim.betas, "must be two numbers in [0, 1)")
        if not 0 <= self.schedule.decay_fraction <= 1:
            bad("schedule.decay_fraction", self.schedule.decay_fraction, "must be in [0, 1]")
        if self.schedule.decay_shape not in ("linear", "sqrt"):
            bad("schedule.decay_shape", self.schedule.decay_shape, "use 'linear' or 'sqrt'")
        if self.train.compile and self.precision.recipe:
            bad("train.compile", True, f"cannot be combined with precision.recipe={self.precision.recipe!r} "
                "(torch.compile fails on the emulated low-precision casts, torch 2.13 on CPU): set "
                "train.compile=false or drop the recipe")
        if any(not isinstance(w, int | float) or w < 0 for w in self.data.weights.values()):
            bad("data.weights", self.data.weights, "weights must be numbers >= 0")


# (section, key, smallest value that works, what the value means): a checked setting names itself,
# its value and the fix, instead of failing later (log_every=0 divided by zero; eval_batches=0
# reported a validation loss of 0; keep_checkpoints=0 deleted every checkpoint as it was written).
_LOWER_BOUNDS = (
    ("train", "threads", 0, "torch CPU threads, 0 = torch's default"),
    ("optim", "eps", 0.0, "AdamW epsilon"),
    ("optim", "weight_decay", 0.0, "decoupled weight decay"),
    ("optim", "grad_clip", 0.0, "gradient-norm clip, 0 = off"),
    ("schedule", "warmup_steps", 0, "linear warmup steps"),
    ("schedule", "min_lr_ratio", 0.0, "final fraction of the peak learning rate"),
    ("loss", "mtp_scale", 0.0, "MTP loss weight, 0 = off"),
    ("loss", "balance_loss", 0.0, "balancing loss coefficient, 0 = off"),
    ("loss", "expert_bias_rate", 0.0, "expert-bias update rate, 0 = off"),
    ("run", "log_every", 1, "steps between metrics lines"),
    ("run", "eval_every", 0, "steps between validation passes, 0 = only at the end"),
    ("run", "eval_batches", 1, "validation batches per pass"),
    ("run", "save_every", 0, "steps between checkpoints, 0 = only at the end"),
    ("run", "keep_checkpoints", 1, "checkpoints kept on disk; 2 or more lets --resume fall back past a "
                                   "damaged one"),
)


def _coerce(section: str, key: str, value: Any, expected: Any) -> Any:
    name = f"{section}.{key}"
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = {int: isinstance(value, int) and not isinstance(value, bool), float: isinstance(value, float),
          bool: isinstance(value, bool), str: isinstance(value, str), list: isinstance(value, list),
          dict: isinstance(value, dict)}.get(expected, True)
    if not ok:
        raise ValueError(f"config {name}={value!r} has type {type(value).__name__}; expected "
                         f"{getattr(expected, '__name__', expected)}")
    return value


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig from nested dicts; unknown sections/keys and wrong types are errors."""
    sections = {f.name: f for f in dataclasses.fields(TrainConfig)}
    built = {}
    for name, values in data.items():
        if name not in sections:
            raise ValueError(f"unknown config section [{name}]; sections are {sorted(sections)}")
        if not isinstance(values, dict):
            raise ValueError(f"config [{name}] must be a table, got {type(values).__name__}")
        cls = sections[name].default_factory
        hints = get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"unknown config key {name}.{key}; [{name}] has {sorted(known)}")
            kwargs[key] = _coerce(name, key, value, hints[key])
        built[name] = cls(**kwargs)
    config = TrainConfig(**built)
    config.validate()
    return config


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a TOML config; ``overrides`` like ``["train.steps=20", "run.out_dir='x'"]`` win."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} " + ("is a directory; pass a .toml file" if path.is_dir()
                                                          else "does not exist"))
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid TOML: {err}") from None
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"override {item!r} must look like section.key=value")
        section, name = key.strip().split(".", 1)
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()  # bare strings need no quotes
        data.setdefault(section, {})[name] = value
    return from_dict(data)
