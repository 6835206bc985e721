"""ModelConfig: validation messages, both config.json spellings (NVIDIA's pattern string and
transformers 5's block-type lists), legacy keys, special floats, unknown keys, and parameter counts
checked against transformers' NemotronH and against kinetic's own model."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from kinetic.config import PATTERN_TO_TYPE, ModelConfig, preset
from kinetic.model import NemotronHForCausalLM


def tiny(**changes) -> ModelConfig:
    return preset("tiny").replace(**changes)


def distinctive() -> ModelConfig:
    """tiny with every field the spellings disagree on set away from its default, so a reader that
    silently falls back to a default is caught."""
    return tiny(hybrid_override_pattern="M-*EME", mtp_hybrid_override_pattern="M*-E", n_groups=4,
                conv_kernel=3, chunk_size=32, num_nextn_predict_layers=2)


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize("changes, field", [
    (dict(n_groups=3), "n_groups"),  # 3 does not divide mamba_num_heads=8
    (dict(hybrid_override_pattern="M*X"), "hybrid_override_pattern"),
    (dict(hybrid_override_pattern=""), "hybrid_override_pattern"),
    (dict(mtp_hybrid_override_pattern="*e"), "mtp_hybrid_override_pattern"),
    (dict(topk_group=3), "topk_group"),  # n_group=2
    (dict(n_shared_experts=2), "n_shared_experts"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),  # 4 heads
    (dict(n_group=3), "n_group"),  # 8 experts
    (dict(num_experts_per_tok=5), "num_experts_per_tok"),  # topk_group 1 * 4 experts per group
    (dict(hidden_size=0), "hidden_size"),
    (dict(time_step_limit=(1.0, 0.5)), "time_step_limit"),
    (dict(mlp_hidden_act="gelu"), "mlp_hidden_act"),
    (dict(num_nextn_predict_layers=-1), "num_nextn_predict_layers"),
])
def test_validation_names_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}="):
        tiny(**changes)


@pytest.mark.parametrize("key, value", [
    ("hidden_size", "64"),
    ("hidden_size", 64.0),
    ("vocab_size", True),
    ("tie_word_embeddings", "false"),
    ("layer_norm_epsilon", "1e-5"),
    ("hybrid_override_pattern", 5),
    ("moe_latent_size", 32.0),
])
def test_wrong_json_types_name_the_key(key, value):
    data = tiny().to_dict()
    data[key] = value
    with pytest.raises(ValueError, match=rf"ModelConfig\.{key}="):
        ModelConfig.from_dict(data)


def test_unknown_block_type_names_the_key():
    data = tiny().to_dict("transformers")
    data["layers_block_type"] = ["linear_attention", "conv"]
    with pytest.raises(ValueError, match=r"layers_block_type.*'conv'"):
        ModelConfig.from_dict(data)


# ---------------------------------------------------------------------- legacy keys
def test_legacy_keys_are_read_and_written_back_canonically():
    data = {
        "hybrid_override_pattern": "M*E", "mamba_n_groups": 4, "mamba_d_conv": 3, "mamba_expand": 3,
        "mamba_chunk_size": 32, "mamba_dt_min": 0.002, "mamba_dt_max": 0.2,
        "mamba_dt_limit": [0.0, 8.0], "mamba_dt_init_floor": 0.0002, "mamba_conv_bias": False,
        "num_local_experts": 16, "rms_norm_eps": 1e-6, "mamba_num_heads": 8,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # legacy keys are known, not "unused"
        c = ModelConfig.from_dict(data)
    assert (c.n_groups, c.conv_kernel, c.expand, c.chunk_size) == (4, 3, 3, 32)
    assert (c.time_step_min, c.time_step_max, c.time_step_floor) == (0.002, 0.2, 0.0002)
    assert c.time_step_limit == (0.0, 8.0)
    assert c.use_conv_bias is False and c.n_routed_experts == 16 and c.layer_norm_epsilon == 1e-6
    out = c.to_dict()
    legacy = set(data) - {"hybrid_override_pattern", "mamba_num_heads"}
    assert not legacy & set(out), "legacy names are written back under their canonical names"
    assert ModelConfig.from_dict(out) == c


@pytest.mark.parametrize("order", ["legacy first", "canonical first"])
def test_canonical_key_wins_over_legacy_alias(order):
    pairs = [("mamba_n_groups", 2), ("n_groups", 4)]
    data = dict(pairs if order == "legacy first" else pairs[::-1])
    assert ModelConfig.from_dict({**data, "mamba_num_heads": 8}).n_groups == 4


# ---------------------------------------------------------------------- both spellings round-trip
@pytest.mark.parametrize("config", [distinctive(), preset("super-120b-a12b")], ids=["distinctive", "super"])
@pytest.mark.parametrize("style", ["pattern", "transformers"])
def test_dict_round_trip(config, style):
    data = config.to_dict(style)
    if style == "pattern":
        assert data["hybrid_override_pattern"] == config.hybrid_override_pattern
        assert data["num_hidden_layers"] == config.num_hidden_layers
        assert "layers_block_type" not in data
    else:
        assert data["layers_block_type"] == [PATTERN_TO_TYPE[c] for c in config.hybrid_override_pattern]
        assert data["mtp_layers_block_type"] == config.mtp_layers_block_type
        assert "hybrid_override_pattern" not in data and "mtp_hybrid_override_pattern" not in data
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = ModelConfig.from_dict(data)
    assert back == config
    assert back.mtp_hybrid_override_pattern == config.mtp_hybrid_override_pattern


@pytest.mark.parametrize("style", ["pattern", "transformers"])
def test_file_round_trip(tmp_path, style):
    config = distinctive()
    file = config.save_pretrained(tmp_path, style)
    assert file == tmp_path / "config.json"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ModelConfig.from_pretrained(tmp_path) == config
        assert ModelConfig.from_pretrained(file) == config  # a path to the file works too


def test_time_step_limit_special_float_spellings(tmp_path):
    config = tiny()
    assert config.time_step_limit == (0.0, math.inf)
    raw = json.loads(config.to_json_string("transformers"))
    assert raw["time_step_limit"] == [0.0, {"__float__": "Infinity"}]
    assert '"time_step_limit": [\n    0.0,\n    Infinity\n  ]' in config.to_json_string("pattern")

    hf_style = {"hybrid_override_pattern": "M*E", "time_step_limit": [0.0, {"__float__": "Infinity"}]}
    assert ModelConfig.from_dict(hf_style).time_step_limit == (0.0, math.inf)
    (tmp_path / "config.json").write_text('{"hybrid_override_pattern": "M*E", '
                                          '"time_step_limit": [0.0, Infinity]}')
    limit = ModelConfig.from_pretrained(tmp_path).time_step_limit
    assert limit == (0.0, math.inf) and isinstance(limit, tuple)


def test_unknown_keys_are_kept_and_written_back(tmp_path):
    data = {**tiny().to_dict(), "my_custom_key": {"a": [1, 2]}, "torch_dtype": "bfloat16"}
    with pytest.warns(UserWarning, match="my_custom_key"):
        config = ModelConfig.from_dict(data)
    assert config.extra["my_custom_key"] == {"a": [1, 2]}
    assert config.extra["torch_dtype"] == "bfloat16"
    for style in ("pattern", "transformers"):
        assert config.to_dict(style)["my_custom_key"] == {"a": [1, 2]}
        assert config.to_dict(style)["torch_dtype"] == "bfloat16"
    config.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="my_custom_key"):
        assert ModelConfig.from_pretrained(tmp_path).extra["my_custom_key"] == {"a": [1, 2]}


def test_bad_json_file_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelConfig.from_pretrained(tmp_path / "missing")


# ---------------------------------------------------------------------- transformers reads what we write
def _hf_view(c) -> tuple:
    return (list(c.layers_block_type), list(c.mtp_layers_block_type), c.n_groups, c.conv_kernel,
            c.chunk_size, tuple(float(v) for v in c.time_step_limit), c.num_nextn_predict_layers)


@pytest.mark.parametrize("config", [distinctive(), preset("nano-30b-a3b")], ids=["distinctive", "nano"])
def test_transformers_reads_both_spellings_identically(tmp_path, config):
    transformers = pytest.importorskip("transformers")
    expected = _hf_view(config)
    assert expected[5] == (0.0, math.inf)
    views = {}
    for style in ("pattern", "transformers"):
        config.save_pretrained(tmp_path / style, style)
        views[style] = _hf_view(transformers.NemotronHConfig.from_pretrained(tmp_path / style))
    # the pattern dict also works as plain keyword arguments (a bare inf needs no decoding)
    views["pattern kwargs"] = _hf_view(transformers.NemotronHConfig(**config.to_dict("pattern")))
    assert views == dict.fromkeys(views, expected)


def test_we_read_what_transformers_writes(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = distinctive()
    transformers.NemotronHConfig(**config.to_dict("pattern")).save_pretrained(tmp_path)
    assert ModelConfig.from_pretrained(tmp_path) == config


# ---------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("name", ["tiny", "small", "nano-30b-a3b"])
def test_total_params_match_transformers(name):
    transformers = pytest.importorskip("transformers")
    config = preset(name)
    if name == "tiny":
        config = config.replace(num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**config.to_dict()))
    assert config.param_counts()["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_param_counts_match_our_model(name):
    config = preset(name)
    counts = config.param_counts()
    with torch.device("meta"):
        model = NemotronHForCausalLM(config)
    params = dict(model.named_parameters())
    mtp = sum(p.numel() for n, p in params.items() if n.startswith("mtp."))
    assert counts["mtp"] == mtp > 0
    assert counts["total"] + counts["mtp"] == model.num_parameters()
    # active leaves out the input embedding table and the routed experts a token does not visit
    experts = [p for n, p in params.items() if n.startswith("backbone.") and ".experts." in n]
    idle = sum(p.numel() // config.n_routed_experts for p in experts)
    idle *= config.n_routed_experts - config.num_experts_per_tok
    embed = params["backbone.embeddings.weight"].numel()
    assert counts["active"] == counts["total"] - embed - idle
    assert counts["active_with_embeddings"] == counts["active"] + embed


def test_nano_param_counts_are_the_published_sizes():
    counts = preset("nano-30b-a3b").param_counts()
    assert 31e9 < counts["total"] < 32.5e9  # "30B"
    assert 3.0e9 < counts["active_with_embeddings"] < 3.8e9  # "A3B"
    assert counts["mtp"] == 0


def test_tied_embeddings_are_counted_once():
    counts = tiny(hybrid_override_pattern="M-*", tie_word_embeddings=True).param_counts()
    assert counts["active"] <= counts["active_with_embeddings"] <= counts["total"]


def test_layer_types_alias_and_stale_layer_count_are_not_kept():
    config = ModelConfig.from_dict({"layer_types": ["linear_attention", "moe", "full_attention", "moe"],
                                    "num_hidden_layers": 4})
    assert config.hybrid_override_pattern == "ME*E"
    shorter = config.replace(hybrid_override_pattern="ME")
    assert shorter.to_dict("pattern")["num_hidden_layers"] == 2
    assert "num_hidden_layers" not in shorter.to_dict("transformers")


@pytest.mark.parametrize("limit", [["a", 1], [0, None], [0.1], "inf"])
def test_bad_time_step_limit_names_the_field(limit):
    with pytest.raises(ValueError, match="time_step_limit"):
        ModelConfig.from_dict({"time_step_limit": limit})


def test_non_object_config_is_rejected():
    with pytest.raises(ValueError, match="JSON object"):
        ModelConfig.from_dict([1, 2])
    with pytest.raises(ValueError, match="eos_token_id"):
        ModelConfig.from_dict({"eos_token_id": ["2"]})
