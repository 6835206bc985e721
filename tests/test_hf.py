"""Checkpoint files: names and layout on disk, MTP tensors surviving load -> save, sharding,
dtype, and errors that name the offending tensor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import kinetic
from kinetic.hf import read_tensors
from kinetic.model import NemotronHForCausalLM
from tests.conftest import make_config, randomize


@pytest.fixture
def saved(tmp_path):
    model = randomize(NemotronHForCausalLM(make_config("latent-grouped-mtp")), seed=30).eval()
    model.save_pretrained(tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_disk_layout_matches_released_checkpoints(saved):
    model, path = saved
    names = set(read_tensors(path))
    config = model.config
    assert all(n.startswith(("backbone.", "lm_head.", "mtp.")) for n in names)
    e = config.n_routed_experts
    up = [n for n in names if n.startswith("backbone.layers.2.mixer.experts.")]
    assert len(up) == 2 * e  # one 2-D up and down matrix per expert
    tensors = read_tensors(path)
    assert tensors["backbone.layers.2.mixer.experts.3.up_proj.weight"].shape == (
        config.moe_intermediate_size, config.moe_latent_size)
    assert {"mtp.layers.0.enorm.weight", "mtp.layers.0.hnorm.weight", "mtp.layers.0.eh_proj.weight",
            "mtp.layers.0.mixer.q_proj.weight", "mtp.layers.1.mixer.gate.e_score_correction_bias",
            "mtp.layers.1.final_layernorm.weight"} <= names
    assert json.loads((path / "config.json").read_text())["hybrid_override_pattern"] == "M*EM-E"


def test_load_save_keeps_every_tensor_bit_for_bit(saved, tmp_path):
    model, path = saved
    before = read_tensors(path)
    reloaded = kinetic.from_pretrained(path)
    reloaded.save_pretrained(tmp_path / "again")
    after = read_tensors(tmp_path / "again")
    assert set(before) == set(after)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert any(n.startswith("mtp.") for n in before)
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    with torch.no_grad():
        a, b = model(ids), reloaded(ids)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.mtp_logits[0], b.mtp_logits[0])


def test_sharded_checkpoint_round_trip(saved, tmp_path):
    model, _ = saved
    model.save_pretrained(tmp_path / "sharded", max_shard_size=20_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 3 and all((tmp_path / "sharded" / s).is_file() for s in shards)
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    reloaded = kinetic.from_pretrained(tmp_path / "sharded")
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)


def test_load_in_bfloat16_keeps_balancing_bias_fp32(saved):
    _, path = saved
    model = kinetic.from_pretrained(path, dtype=torch.bfloat16)
    assert model.backbone.embeddings.weight.dtype == torch.bfloat16
    assert model.backbone.layers[2].mixer.gate.e_score_correction_bias.dtype == torch.float32
    out = model(torch.randint(0, model.config.vocab_size, (1, 9)))
    assert torch.isfinite(out.logits).all()


def _rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_tensor_is_named(saved):
    _, path = saved
    _rewrite(path, lambda t: t.pop("backbone.layers.0.mixer.A_log"))
    with pytest.raises(ValueError, match=r"missing tensor 'backbone\.layers\.0\.mixer\.A_log'"):
        kinetic.from_pretrained(path)


def test_unexpected_and_misshaped_tensors_are_named(saved):
    _, path = saved

    def edit(t):
        t["backbone.layers.0.mixer.bogus"] = torch.zeros(2)
        t["backbone.norm_f.weight"] = torch.zeros(7)
        t.pop("backbone.layers.2.mixer.experts.5.down_proj.weight")

    _rewrite(path, edit)
    with pytest.raises(ValueError) as err:
        kinetic.from_pretrained(path)
    text = str(err.value)
    assert "unexpected tensor 'backbone.layers.0.mixer.bogus'" in text
    assert "'backbone.norm_f.weight' has shape (7,)" in text
    assert "experts missing [5]" in text


def test_missing_files_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        kinetic.from_pretrained(tmp_path / "nope")
    make_config("dense-moe-1group").save_pretrained(tmp_path / "cfg_only")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        kinetic.from_pretrained(tmp_path / "cfg_only")


def test_loading_never_unpickles(saved, monkeypatch):
    _, path = saved

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle-based torch.load was called")

    monkeypatch.setattr(torch, "load", forbidden)
    kinetic.from_pretrained(path)


def test_tied_embeddings_round_trip(tmp_path):
    config = make_config("dense-moe-1group", tie_word_embeddings=True)
    model = randomize(NemotronHForCausalLM(config), seed=31).eval()
    assert model.lm_head.weight is model.backbone.embeddings.weight
    model.save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in read_tensors(tmp_path / "tied")
    reloaded = kinetic.from_pretrained(tmp_path / "tied")
    assert reloaded.lm_head.weight is reloaded.backbone.embeddings.weight
    ids = torch.randint(0, config.vocab_size, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_kinetic_config_styles_both_open_in_transformers(saved, tmp_path, transformers_mod):
    model, _ = saved
    for style in ("pattern", "transformers"):
        model.save_pretrained(tmp_path / style, config_style=style)
        hf = transformers_mod.AutoModelForCausalLM.from_pretrained(tmp_path / style, dtype=torch.float32)
        assert hf.config.layers_block_type == model.config.layers_block_type
        assert "mtp" not in " ".join(n for n, _ in hf.named_parameters())


def test_transformers_internal_names_and_fused_experts_load(saved, tmp_path):
    """A state dict dumped from transformers' modules (``model.`` prefix, 3-D expert tensors)."""
    model, _ = saved
    dumped = {("model." + k[len("backbone."):] if k.startswith("backbone.") else k): v.contiguous()
              for k, v in model.state_dict().items()}
    assert any(v.dim() == 3 and "experts" in k for k, v in dumped.items())
    out = tmp_path / "internal"
    model.config.save_pretrained(out)
    save_file(dumped, out / "model.safetensors")
    reloaded = kinetic.from_pretrained(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
