"""ModelConfig: the NemotronH architecture as one frozen dataclass, plus named presets.

Field names are the Hugging Face NemotronH ``config.json`` keys, so a released checkpoint's config
reads without translation. Two spellings exist in the wild and both are read and written:

* the original (``trust_remote_code``) one used by NVIDIA's released checkpoints:
  ``hybrid_override_pattern="MEM*E..."``, ``mtp_hybrid_override_pattern``, ``time_step_limit`` with a
  bare ``Infinity``, and legacy Mamba keys such as ``mamba_n_groups``/``mamba_d_conv``;
* transformers 5's: ``layers_block_type=["linear_attention", "moe", ...]`` and special floats written
  as ``{"__float__": "Infinity"}``.

Layer pattern characters: ``M`` Mamba-2, ``*`` attention, ``-`` dense MLP, ``E`` mixture of experts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PATTERN_TO_TYPE = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
TYPE_TO_PATTERN = {v: k for k, v in PATTERN_TO_TYPE.items()}
# Older names that some configs use for the same block types.
LEGACY_TYPES = {"mamba": "linear_attention", "attention": "full_attention"}

# Keys that older/remote-code configs use for fields we store under the transformers name.
LEGACY_KEYS = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_expand": "expand",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_limit": "time_step_limit",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
    "num_local_experts": "n_routed_experts",
    "norm_eps": "layer_norm_epsilon",
    "rms_norm_eps": "layer_norm_epsilon",
}

# Keys that Hugging Face tooling writes and that carry no architecture; kept verbatim in `extra`.
PASSTHROUGH_KEYS = {
    "architectures", "auto_map", "torch_dtype", "dtype", "transformers_version", "model_type",
    "rope_theta", "partial_rotary_factor", "rope_scaling", "rope_parameters", "output_router_logits",
    "router_aux_loss_coef", "num_logits_to_keep", "use_mamba_kernels", "mamba_ssm_cache_dtype",
    "moe_shared_expert_overlap", "residual_in_fp32", "rescale_prenorm_residual", "hidden_dropout",
    "attention_dropout", "sliding_window", "use_cache", "_name_or_path", "generation_config",
    "quantization_config", "moe_router_dtype", "mamba_proj_bias", "max_window_layers",
}
# Derived from the pattern: read for their content, never stored (they would go stale on replace()).
DERIVED_KEYS = {"layers_block_type", "layer_types", "mtp_layers_block_type",
                "mtp_hybrid_override_pattern", "num_hidden_layers"}


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and hyper-parameters of a NemotronH model (names = HF ``config.json`` keys)."""

    vocab_size: int = 131072  # token vocabulary
    hidden_size: int = 4096  # residual stream width
    hybrid_override_pattern: str = "M*-E"  # one char per layer: M mamba, * attention, - mlp, E moe
    tie_word_embeddings: bool = False  # share embeddings with lm_head
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    # attention (no positional encoding: Mamba layers carry position)
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    max_position_embeddings: int = 4096  # informational; attention has no position limit
    attention_bias: bool = False  # NemotronH attention never has biases
    # dense MLP (squared ReLU)
    intermediate_size: int = 21504
    mlp_hidden_act: str = "relu2"
    mlp_bias: bool = False
    # Mamba-2
    ssm_state_size: int = 128  # N: SSM state per head
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    mamba_hidden_act: str = "silu"
    n_groups: int = 8  # groups sharing B and C
    conv_kernel: int = 4
    expand: int = 2  # informational; inner width is mamba_num_heads * mamba_head_dim
    time_step_min: float = 0.001  # dt init range and lower bound transformers applies in prefill
    time_step_max: float = 0.1
    time_step_limit: tuple[float, float] = (0.0, math.inf)  # clamp on dt, applied in every path
    time_step_floor: float = 1e-4
    use_conv_bias: bool = True
    chunk_size: int = 128  # SSD chunk length
    use_bias: bool = False  # bias on Mamba in/out projections
    # MoE
    n_routed_experts: int = 8
    n_shared_experts: int = 1  # 0 or 1: NemotronH stores shared experts as one MLP
    moe_intermediate_size: int = 7688
    moe_shared_expert_intermediate_size: int = 7688
    moe_latent_size: int | None = None  # latent MoE width; None = experts work at hidden_size
    num_experts_per_tok: int = 2  # top-k
    routed_scaling_factor: float = 1.0
    n_group: int = 1  # expert groups for group-limited routing
    topk_group: int = 1  # groups a token may route into
    norm_topk_prob: bool = True
    # multi-token prediction
    num_nextn_predict_layers: int = 0  # MTP depths; 0 disables MTP
    mtp_hybrid_override_pattern: str = "*E"  # block pattern inside each MTP depth
    # misc
    initializer_range: float = 0.02
    layer_norm_epsilon: float = 1e-5
    extra: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.time_step_limit, list):
            object.__setattr__(self, "time_step_limit", tuple(float(v) for v in self.time_step_limit))
        self.validate()

    # ------------------------------------------------------------------ derived shapes
    @property
    def layers_block_type(self) -> list[str]:
        return [PATTERN_TO_TYPE[c] for c in self.hybrid_override_pattern]

    @property
    def mtp_layers_block_type(self) -> list[str]:
        return [PATTERN_TO_TYPE[c] for c in self.mtp_hybrid_override_pattern]

    @property
    def num_hidden_layers(self) -> int:
        return len(self.hybrid_override_pattern)

    @property
    def mamba_intermediate_size(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_intermediate_size + 2 * self.n_groups * self.ssm_state_size

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the field, the value and what is allowed."""

        def bad(name: str, allowed: str) -> None:
            raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} is invalid: {allowed}")

        for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "intermediate_size", "ssm_state_size", "mamba_num_heads",
                     "mamba_head_dim", "n_groups", "conv_kernel", "chunk_size", "n_routed_experts",
                     "moe_intermediate_size", "num_experts_per_tok", "n_group", "topk_group"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(name, "must be a positive integer")
        for name, pattern in (("hybrid_override_pattern", self.hybrid_override_pattern),
                              ("mtp_hybrid_override_pattern", self.mtp_hybrid_override_pattern)):
            if not isinstance(pattern, str) or not pattern or set(pattern) - set(PATTERN_TO_TYPE):
                bad(name, "must be a non-empty string of 'M' (Mamba-2), '*' (attention), "
                          "'-' (dense MLP) and 'E' (MoE), e.g. 'MEM*E'")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
        if self.mamba_num_heads % self.n_groups:
            bad("n_groups", f"must divide mamba_num_heads={self.mamba_num_heads}")
        if self.n_routed_experts % self.n_group:
            bad("n_group", f"must divide n_routed_experts={self.n_routed_experts}")
        if self.topk_group > self.n_group:
            bad("topk_group", f"must be <= n_group={self.n_group}")
        experts_per_group = self.n_routed_experts // self.n_group
        if self.n_group > 1 and experts_per_group < 2:
            bad("n_group", "group-limited routing scores each group by its top-2 experts, so each "
                           "group needs at least 2 experts")
        if self.num_experts_per_tok > self.topk_group * experts_per_group:
            bad("num_experts_per_tok", f"must be <= topk_group * experts per group = "
                                       f"{self.topk_group * experts_per_group}")
        if self.n_shared_experts not in (0, 1):
            bad("n_shared_experts", "must be 0 or 1 (NemotronH stores shared experts as one MLP of "
                                    "width moe_shared_expert_intermediate_size; widen that instead)")
        if self.n_shared_experts == 1 and self.moe_shared_expert_intermediate_size < 1:
            bad("moe_shared_expert_intermediate_size", "must be a positive integer")
        if self.moe_latent_size is not None and (not isinstance(self.moe_latent_size, int)
                                                 or self.moe_latent_size < 1):
            bad("moe_latent_size", "must be a positive integer or null")
        if not isinstance(self.num_nextn_predict_layers, int) or self.num_nextn_predict_layers < 0:
            bad("num_nextn_predict_layers", "must be an integer >= 0")
        if self.mlp_hidden_act != "relu2":
            bad("mlp_hidden_act", "only 'relu2' (squared ReLU) is supported")
        if self.mamba_hidden_act != "silu":
            bad("mamba_hidden_act", "only 'silu' is supported")
        if self.attention_bias:
            bad("attention_bias", "NemotronH attention has no biases; set it to false")
        lo, hi = self.time_step_limit if len(self.time_step_limit) == 2 else (None, None)
        if lo is None or not (0.0 <= lo < hi):
            bad("time_step_limit", "must be [low, high] with 0 <= low < high (high may be Infinity)")
        if not 0 < self.time_step_min <= self.time_step_max:
            bad("time_step_min", f"must satisfy 0 < time_step_min <= time_step_max={self.time_step_max}")
        if not self.layer_norm_epsilon > 0:
            bad("layer_norm_epsilon", "must be > 0")

    # ------------------------------------------------------------------ (de)serialization
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a ``config.json`` dict in either spelling (see module docstring)."""
        if not isinstance(data, dict):
            raise ValueError(f"a NemotronH config must be a JSON object, got {type(data).__name__}")
        data = _decode_special_floats(dict(data))
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            target = LEGACY_KEYS.get(key, key)
            if target in known:
                if target in kwargs and key != target:
                    continue  # the canonical key wins over a legacy alias
                kwargs[target] = value
            elif key in DERIVED_KEYS:
                continue
            else:
                if key not in PASSTHROUGH_KEYS:
                    warnings.warn(f"config key {key!r} is not a NemotronH field; kept but unused",
                                  stacklevel=2)
                extra[key] = value
        for alias in ("layers_block_type", "layer_types"):  # transformers treats these as one
            if "hybrid_override_pattern" not in kwargs and alias in data:
                kwargs["hybrid_override_pattern"] = _types_to_pattern(data[alias], alias)
        if "mtp_hybrid_override_pattern" in data:
            kwargs["mtp_hybrid_override_pattern"] = data["mtp_hybrid_override_pattern"]
        elif data.get("mtp_layers_block_type"):
            kwargs["mtp_hybrid_override_pattern"] = _types_to_pattern(data["mtp_layers_block_type"],
                                                                      "mtp_layers_block_type")
        if "time_step_limit" in kwargs:
            limit = kwargs["time_step_limit"]
            if (not isinstance(limit, list | tuple) or len(limit) != 2
                    or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in limit)):
                raise ValueError(f"ModelConfig.time_step_limit={limit!r} is invalid: must be two numbers "
                                 "[low, high], e.g. [0.0, Infinity]")
            kwargs["time_step_limit"] = (float(limit[0]), float(limit[1]))
        for name, value in kwargs.items():
            _check_type(cls, name, value)
        return cls(**kwargs, extra=extra)

    def to_dict(self, style: str = "pattern") -> dict[str, Any]:
        """The ``config.json`` dict.

        style="pattern": NVIDIA's released spelling (``hybrid_override_pattern``; Infinity is a bare
        JSON ``Infinity``). style="transformers": transformers 5's (``layers_block_type`` lists, special
        floats as ``{"__float__": "Infinity"}``), which it reads without warnings.
        """
        if style not in ("pattern", "transformers"):
            raise ValueError(f"style={style!r} is invalid: use 'pattern' or 'transformers'")
        out: dict[str, Any] = {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h"}
        out.update({k: v for k, v in self.extra.items() if k not in ("architectures", "model_type")})
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        if style == "transformers":
            out.pop("hybrid_override_pattern")
            out.pop("mtp_hybrid_override_pattern")
            out["layers_block_type"] = self.layers_block_type
            out["mtp_layers_block_type"] = self.mtp_layers_block_type
            out = _encode_special_floats(out)
        else:
            out["num_hidden_layers"] = self.num_hidden_layers
        return out

    def to_json_string(self, style: str = "pattern") -> str:
        return json.dumps(self.to_dict(style), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, directory: str | Path, style: str = "pattern") -> Path:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(self.to_json_string(style))
        return path / "config.json"

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Read a checkpoint directory's ``config.json`` or a path to a JSON file."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no config.json at {file}: pass a checkpoint directory or a "
                                    "path to a config.json file")
        try:
            data = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{file} is not valid JSON: {err}") from None
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes``; ValueError naming an unknown field (with the closest valid name)
        or a value of the wrong type, then whatever :meth:`validate` finds."""
        check_changes(changes)
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ parameter counts
    def param_counts(self) -> dict[str, int]:
        """Parameter counts computed arithmetically (nothing is allocated).

        total: every parameter of the main model (what transformers instantiates);
        mtp: parameters of the MTP layers (stored as ``mtp.*``; transformers drops them);
        active: parameters a token touches in the main model — routed experts count only
        ``num_experts_per_tok`` of ``n_routed_experts`` and the input embedding table is left out
        (a lookup, not compute), the convention NVIDIA uses for "active";
        active_with_embeddings: active plus the embedding table.
        """
        return count_params(self)


def _types_to_pattern(types: Any, name: str) -> str:
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
        raise ValueError(f"ModelConfig.{name}={types!r} is invalid: must be a list of block types "
                         f"from {sorted(PATTERN_TO_TYPE.values())}")
    try:
        return "".join(TYPE_TO_PATTERN[LEGACY_TYPES.get(t, t)] for t in types)
    except KeyError as err:
        raise ValueError(f"ModelConfig.{name} contains unknown block type {err.args[0]!r}: allowed "
                         f"are {sorted(PATTERN_TO_TYPE.values())}") from None


def field_names() -> list[str]:
    """The ModelConfig fields a config file or an override may set."""
    return [f.name for f in dataclasses.fields(ModelConfig) if f.name != "extra"]


def closest(name: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to a misspelled ``name``, else ``""``."""
    import difflib

    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def check_changes(changes: dict[str, Any]) -> None:
    """Every key of ``changes`` is a ModelConfig field and every value has its type; ValueError
    naming the key and the fix otherwise."""
    names = field_names()
    for key, value in changes.items():
        if key not in names:
            hint = (f" (it is the older name of {LEGACY_KEYS[key]!r}; use that)" if key in LEGACY_KEYS
                    else closest(key, names))
            raise ValueError(f"{key!r} is not a ModelConfig field{hint}; use a NemotronH config.json key "
                             "(the fields of kinetic.config.ModelConfig)")
        _check_type(ModelConfig, key, value)


def _check_type(cls: type, name: str, value: Any) -> None:
    """Reject obviously wrong JSON types early, naming the key."""
    default = next(f for f in dataclasses.fields(cls) if f.name == name).default
    if value is None or default is None:
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = (isinstance(value, int) and not isinstance(value, bool)) or (
            name == "eos_token_id" and isinstance(value, list)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
    elif isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise ValueError(f"ModelConfig.{name}={value!r} has type {type(value).__name__}; expected "
                         f"{type(default).__name__}")


def _encode_special_floats(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isinf(obj) or math.isnan(obj)):
        return {"__float__": "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")}
    if isinstance(obj, dict):
        return {k: _encode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_encode_special_floats(v) for v in obj]
    return obj


def _decode_special_floats(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__float__"}:
            return float({"Infinity": "inf", "-Infinity": "-inf", "NaN": "nan"}.get(obj["__float__"],
                                                                                   obj["__float__"]))
        return {k: _decode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_special_floats(v) for v in obj]
    return obj


# ---------------------------------------------------------------------- presets
def _tiny() -> ModelConfig:
    return ModelConfig(
        vocab_size=512, hidden_size=64, hybrid_override_pattern="M*EM-E",
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
        ssm_state_size=16, mamba_num_heads=8, mamba_head_dim=16, n_groups=2, conv_kernel=4,
        chunk_size=16, n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=64, moe_latent_size=32, num_experts_per_tok=2,
        routed_scaling_factor=2.5, n_group=2, topk_group=1, num_nextn_predict_layers=1,
        mtp_hybrid_override_pattern="*E", max_position_embeddings=8192,
    )


def _small() -> ModelConfig:
    return ModelConfig(
        vocab_size=8192, hidden_size=256, hybrid_override_pattern="MEM*EMEM*E",
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, intermediate_size=1024,
        ssm_state_size=64, mamba_num_heads=16, mamba_head_dim=32, n_groups=2, conv_kernel=4,
        chunk_size=64, n_routed_experts=64, n_shared_experts=1, moe_intermediate_size=256,
        moe_shared_expert_intermediate_size=512, moe_latent_size=128, num_experts_per_tok=4,
        routed_scaling_factor=2.5, n_group=8, topk_group=4, num_nextn_predict_layers=1,
        mtp_hybrid_override_pattern="*E", max_position_embeddings=4096,
    )


def _nano_30b_a3b() -> ModelConfig:
    # NVIDIA-Nemotron-3-Nano-30B-A3B: published shapes.
    return ModelConfig(
        vocab_size=131072, hidden_size=2688,
        hybrid_override_pattern="MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
        num_attention_heads=32, num_key_value_heads=2, head_dim=128, intermediate_size=1856,
        max_position_embeddings=262144, ssm_state_size=128, mamba_num_heads=64, mamba_head_dim=64,
        n_groups=8, conv_kernel=4, chunk_size=128, n_routed_experts=128, n_shared_experts=1,
        moe_intermediate_size=1856, moe_shared_expert_intermediate_size=3712,
        num_experts_per_tok=6, routed_scaling_factor=2.5, n_group=1, topk_group=1,
    )


def _super_120b_a12b() -> ModelConfig:
    # NVIDIA-Nemotron-3-Super-120B-A12B: latent MoE (512 experts, top-22, latent 1024) + one MTP
    # depth of pattern "*E". Widths not stated in the Nemotron 3 report follow the released config.
    return ModelConfig(
        vocab_size=131072, hidden_size=4096,
        # 88 layers: 40 Mamba-2, 40 latent-MoE, 8 attention (the published counts); the exact
        # interleaving here is ours: attention every ninth layer, as in Nano.
        hybrid_override_pattern="MEMEMEM*E" * 8 + "MEMEMEMEMEMEMEME",
        num_attention_heads=32, num_key_value_heads=2, head_dim=128, intermediate_size=2688,
        max_position_embeddings=262144, ssm_state_size=128, mamba_num_heads=128, mamba_head_dim=64,
        n_groups=8, conv_kernel=4, chunk_size=128, n_routed_experts=512, n_shared_experts=1,
        moe_intermediate_size=2688, moe_shared_expert_intermediate_size=5376,
        moe_latent_size=1024, num_experts_per_tok=22, routed_scaling_factor=5.0, n_group=1,
        topk_group=1, num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E",
        eos_token_id=[2, 11],
    )


PRESETS = {
    "tiny": _tiny,
    "small": _small,
    "nano-30b-a3b": _nano_30b_a3b,
    "super-120b-a12b": _super_120b_a12b,
}


def preset(name: str) -> ModelConfig:
    """A named preset: tiny (tests), small (CPU experiments), nano-30b-a3b, super-120b-a12b."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


# ---------------------------------------------------------------------- parameter counts
def _mixer_params(c: ModelConfig, kind: str) -> tuple[int, int]:
    """(total, active) parameters of one mixer, without its pre-norm."""
    d = c.hidden_size
    if kind == "M":
        inner, conv = c.mamba_intermediate_size, c.mamba_conv_dim
        n = d * (inner + conv + c.mamba_num_heads) + (inner + conv + c.mamba_num_heads) * c.use_bias
        n += conv * c.conv_kernel + conv * c.use_conv_bias
        n += 3 * c.mamba_num_heads + inner  # dt_bias, A_log, D, gated norm
        n += inner * d + d * c.use_bias
        return n, n
    if kind == "*":
        q = c.num_attention_heads * c.head_dim
        kv = c.num_key_value_heads * c.head_dim
        n = d * q + 2 * d * kv + q * d
        return n, n
    if kind == "-":
        n = 2 * d * c.intermediate_size + (c.intermediate_size + d) * c.mlp_bias
        return n, n
    width = c.moe_latent_size or d
    router = c.n_routed_experts * d  # e_score_correction_bias is a buffer, not a parameter
    expert = 2 * width * c.moe_intermediate_size
    shared = 0
    if c.n_shared_experts:
        s = c.moe_shared_expert_intermediate_size
        shared = 2 * d * s + (s + d) * c.mlp_bias
    latent = 0
    if c.moe_latent_size is not None:
        latent = 2 * d * width + (width + d) * c.mlp_bias
    common = router + shared + latent
    return common + c.n_routed_experts * expert, common + c.num_experts_per_tok * expert


def count_params(c: ModelConfig) -> dict[str, int]:
    d = c.hidden_size
    embed = c.vocab_size * d
    head = 0 if c.tie_word_embeddings else c.vocab_size * d
    total, active = embed + head + d, c.vocab_size * d + d  # output projection + norm_f
    for kind in c.hybrid_override_pattern:
        t, a = _mixer_params(c, kind)
        total, active = total + t + d, active + a + d
    mtp = 0
    for _ in range(c.num_nextn_predict_layers):
        mtp += 2 * d + 2 * d * d + d  # enorm, hnorm, eh_proj, final_layernorm
        mtp += sum(_mixer_params(c, k)[0] + d for k in c.mtp_hybrid_override_pattern)
    # a tied table is already counted in "active" as the output projection
    with_embed = active + (0 if c.tie_word_embeddings else embed)
    return {"total": total, "active": active, "active_with_embeddings": with_embed, "mtp": mtp}
