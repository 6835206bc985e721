"""Tests for kinetic.precision.recipe: presets and config parsing, which layers apply_recipe keeps in
high precision (NVIDIA's defaults per model kind, explicit settings and patterns), parameters and
optimizer untouched by the swap, restore_high_precision, and a quantized tiny model that trains."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kinetic.config import ModelConfig, preset
from kinetic.model import NemotronHForCausalLM
from kinetic.model.moe import Experts, TopKRouter
from kinetic.model.norm import RMSNorm
from kinetic.precision import PRESETS, PrecisionRecipe, apply_recipe, get_recipe, restore_high_precision
from kinetic.precision.linear import QuantExperts, QuantLinear
from kinetic.precision.recipe import linear_layers
from kinetic.train.sources import SyntheticSource

# tiny GEMMs: one torch thread (see the fixture's docstring in conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0) -> NemotronHForCausalLM:
    torch.manual_seed(seed)
    return NemotronHForCausalLM(preset("tiny"))


def quantized_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, QuantLinear | QuantExperts)}


def test_presets_and_config_tables():
    for name in PRESETS:
        get_recipe(name)
    assert get_recipe("nvfp4-no-rht").rht is False
    assert get_recipe("nvfp4-no-sr").stochastic_rounding is False
    assert get_recipe("nvfp4-1d-weights").weight_block == (1, 16)
    r = PrecisionRecipe.from_dict({"recipe": "fp8", "fp8_grad_format": "e4m3", "keep_patterns": ["*.o_proj"],
                                   "switch_to_bf16_at": 0.9})
    assert (r.format, r.fp8_grad_format, r.keep_patterns) == ("fp8", "e4m3", ("*.o_proj",))
    assert r.switch_step(100) == 90 and get_recipe("nvfp4").switch_step(100) is None
    with pytest.raises(ValueError, match="unknown precision recipe"):
        get_recipe("fp4")
    with pytest.raises(ValueError, match="unknown precision keys"):
        PrecisionRecipe.from_dict({"recipe": "nvfp4", "rht_size": 16})
    with pytest.raises(ValueError, match="switch_to_bf16_at"):
        get_recipe("nvfp4", switch_to_bf16_at=1.5)
    with pytest.raises(ValueError, match="keep_last_blocks"):
        get_recipe("nvfp4", keep_last_blocks=-1)


def test_defaults_follow_nvidia_per_model_kind():
    plain = ModelConfig(hybrid_override_pattern="M-" * 31)  # 62 blocks, like the 12B study
    r = get_recipe("nvfp4").resolve(plain)
    assert (r.keep_first_blocks, r.keep_last_blocks) == (2, 8)
    assert not (r.keep_latent_proj or r.keep_mtp or r.keep_attention or r.keep_mamba_out_proj)
    latent = get_recipe("nvfp4").resolve(preset("super-120b-a12b"))
    assert latent.keep_latent_proj and latent.keep_mtp and latent.keep_attention
    assert not latent.keep_mamba_out_proj  # the configurable exception
    assert get_recipe("nvfp4", keep_attention=False).resolve(preset("tiny")).keep_attention is False


def test_about_15_percent_of_linear_layers_kept_by_default_mostly_the_last_blocks():
    with torch.device("meta"):
        model = NemotronHForCausalLM(preset("nano-30b-a3b"))  # 52 blocks, no latent MoE, no MTP
    report = apply_recipe(model, "nvfp4")
    assert 0.12 <= report.kept_fraction <= 0.18, report.summary()
    blocks = {int(n.split(".")[2]) for n in report.kept if n.startswith("backbone.")}
    assert blocks == {0, 1, 45, 46, 47, 48, 49, 50, 51}
    assert report.kept["lm_head"] == "lm_head"


def test_tiny_selection_keeps_sensitive_layers_and_leaves_the_rest_of_the_model_alone():
    model = tiny_model()
    kinds = {n: type(m) for n, m in model.named_modules()}
    report = apply_recipe(model, "nvfp4")  # tiny is a latent-MoE model with MTP: Super's rules apply
    kept, quantized = report.kept, set(report.quantized)
    assert quantized == quantized_names(model)
    assert kept["backbone.layers.1.mixer.q_proj"] == "attention"
    assert kept["backbone.layers.2.mixer.fc1_latent_proj"] == "latent proj"
    assert kept["backbone.layers.5.mixer.experts"] == "last blocks"
    assert all(reason == "mtp layer" for n, reason in kept.items() if n.startswith("mtp."))
    assert {"backbone.layers.0.mixer.in_proj", "backbone.layers.0.mixer.out_proj",
            "backbone.layers.2.mixer.experts", "backbone.layers.4.mixer.up_proj"} <= quantized
    # embeddings, lm_head, router, norms, conv: same modules, same types
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding | TopKRouter | RMSNorm | nn.Conv1d) or name == "lm_head":
            assert type(module) is kinds[name], name
    assert type(model.lm_head) is nn.Linear
    assert 0 < report.kept_fraction < 1 and report.summary().startswith("nvfp4 w16x16 rht sr")


def test_explicit_selection_and_all_quantized_and_bf16():
    model = tiny_model()
    report = apply_recipe(model, get_recipe("nvfp4-all-quantized", keep_first_blocks=1,
                                            keep_patterns=("*.down_proj",)))
    assert report.kept["backbone.layers.0.mixer.in_proj"] == "first blocks"
    assert report.kept["backbone.layers.4.mixer.down_proj"] == "pattern '*.down_proj'"
    assert "backbone.layers.4.mixer.up_proj" in report.quantized
    assert "mtp.layers.0.mixer.q_proj" in report.quantized
    restore_high_precision(model)
    report = apply_recipe(model, get_recipe("nvfp4-all-quantized", keep_mamba_out_proj=True))
    assert set(report.kept) == {"lm_head", "backbone.layers.0.mixer.out_proj",
                                "backbone.layers.3.mixer.out_proj"}
    restore_high_precision(model)
    report = apply_recipe(model, "bf16")
    assert report.kept_fraction == 0 and set(report.kept) == {"lm_head"}
    assert all(m.cfg.fmt == "bf16" for m in model.modules() if isinstance(m, QuantLinear | QuantExperts))


def test_swap_keeps_parameters_state_dict_and_optimizer_and_restore_undoes_it():
    model = tiny_model()
    params = list(model.named_parameters())
    keys = list(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    originals = {layer.name: layer.module for layer in linear_layers(model)}
    batch = SyntheticSource(512, 24, 2, seed=1).next_batch()
    with torch.no_grad():
        reference = model(batch[:, :-1]).logits

    report = apply_recipe(model, "nvfp4")
    assert [(n, id(p)) for n, p in model.named_parameters()] == [(n, id(p)) for n, p in params]
    assert list(model.state_dict()) == keys
    assert all(p.dtype == torch.float32 for p in model.parameters())
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for _, p in params}
    with torch.no_grad():
        assert not torch.equal(model(batch[:, :-1]).logits, reference)
    with pytest.raises(ValueError, match="already has a precision recipe"):
        apply_recipe(model, "fp8")

    model.eval()
    assert sorted(restore_high_precision(model)) == sorted(report.quantized)
    assert not quantized_names(model) and restore_high_precision(model) == []
    for name, module in originals.items():
        assert model.get_submodule(name) is module and not module.training
    assert [(n, id(p)) for n, p in model.named_parameters()] == [(n, id(p)) for n, p in params]
    with torch.no_grad():
        assert torch.equal(model(batch[:, :-1]).logits, reference)


def test_restore_to_bf16_keeps_the_wrappers_and_switches_their_gemms():
    model = tiny_model()
    apply_recipe(model, "nvfp4")
    names = restore_high_precision(model, to="bf16")
    assert names and all(model.get_submodule(n).cfg.fmt == "bf16" for n in names)
    with pytest.raises(ValueError, match="to="):
        restore_high_precision(model, to="fp16")


def test_apply_recipe_needs_a_nemotron_model():
    with pytest.raises(ValueError, match="ModelConfig"):
        apply_recipe(nn.Sequential(nn.Linear(16, 16)), "nvfp4")


@pytest.mark.parametrize("name", ["nvfp4-all-quantized", "fp8"])
def test_quantized_tiny_model_trains(name):
    model = tiny_model(seed=3)
    apply_recipe(model, name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = SyntheticSource(512, 32, 4, seed=2).next_batch()
    losses = []
    for _ in range(6):
        out = model(batch[:, :-1], labels=batch)
        loss = out.loss + 0.3 * torch.stack(out.mtp_losses).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    assert all(e.up_proj.grad is None or e.up_proj.grad.dtype == torch.float32 for e in experts)


def test_recipe_applied_after_trainer_construction(tmp_path):
    from kinetic.train import Trainer
    from kinetic.train.config import from_dict

    cfg = from_dict({"model": {"preset": "tiny"}, "data": {"seq_len": 16},
                     "train": {"steps": 2, "micro_batch": 2, "seed": 1},
                     "run": {"out_dir": str(tmp_path), "progress": False}})
    trainer = Trainer(cfg)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    apply_recipe(trainer.model, "nvfp4")
    record = trainer.train_step()
    assert not record.get("skipped") and torch.isfinite(torch.tensor(record["lm_loss"]))
    moved = [not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters(), strict=True)]
    assert sum(moved) > len(moved) // 2  # the optimizer updated the wrapped parameters
