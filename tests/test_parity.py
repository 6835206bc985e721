"""Number-for-number parity with transformers' NemotronHForCausalLM (the hard requirement).

Checkpoints cross in both directions through real files: kinetic writes, transformers reads, and
the other way round; logits must agree to 1e-4 in float32 and greedy generation token for token.
"""

from __future__ import annotations

import pytest
import torch

import kinetic
from kinetic.model import NemotronHForCausalLM
from tests.conftest import CONFIGS, make_config, randomize

TOL = 1e-4


def _hf_from_kinetic(model, tmp_path, transformers):
    model.save_pretrained(tmp_path / "kinetic_ckpt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "kinetic_ckpt",
                                                           dtype=torch.float32)
    return hf.eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("shape", [(2, 37), (3, 16)])  # 37 is not a multiple of chunk_size=8
def test_logits_match_transformers(name, shape, tmp_path, transformers_mod):
    torch.manual_seed(0)
    model = randomize(NemotronHForCausalLM(make_config(name)), seed=1).eval()
    hf = _hf_from_kinetic(model, tmp_path, transformers_mod)
    ids = torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(ids).logits
        theirs = hf(ids).logits
    assert ours.shape == theirs.shape == (*shape, model.config.vocab_size)
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOL, f"max |Δlogits| = {diff:.3g} for config {name}"
    assert ours.std() > 0.5  # realistic weights: logits are far from flat


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_transformers_checkpoint_loads_in_kinetic(name, tmp_path, transformers_mod):
    """transformers builds and saves a model; kinetic loads its files and matches its logits."""
    config = make_config(name)
    config.save_pretrained(tmp_path / "cfg", style="transformers")
    hf_config = transformers_mod.AutoConfig.from_pretrained(tmp_path / "cfg")
    torch.manual_seed(0)
    hf = transformers_mod.NemotronHForCausalLM(hf_config)
    randomize(hf, seed=3)
    hf.eval().save_pretrained(tmp_path / "hf_ckpt")
    if config.num_nextn_predict_layers:  # transformers has no MTP and saves none
        with pytest.warns(UserWarning, match="loading without MTP"):
            model = kinetic.from_pretrained(tmp_path / "hf_ckpt")
        assert model.mtp is None
    else:
        model = kinetic.from_pretrained(tmp_path / "hf_ckpt")
    ids = torch.randint(0, config.vocab_size, (2, 29))
    with torch.no_grad():
        diff = (model(ids).logits - hf(ids).logits).abs().max().item()
    assert diff <= TOL


@pytest.mark.parametrize("name", ["latent-grouped-mtp", "unnormed-topk"])
def test_greedy_generate_matches_transformers(name, tmp_path, transformers_mod):
    # dt_bias=1 keeps Δt above time_step_min, where transformers' prefill and decode agree
    model = randomize(NemotronHForCausalLM(make_config(name)), seed=4, dt_bias=1.0).eval()
    hf = _hf_from_kinetic(model, tmp_path, transformers_mod)
    prompt = torch.randint(3, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(5))
    ours = model.generate(prompt, max_new_tokens=24, eos_token_id=None)
    theirs = hf.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.tolist() == theirs.tolist()
    assert ours.shape == (2, 11 + 24)


def test_generate_stops_at_eos_like_transformers(tmp_path, transformers_mod):
    config = make_config("dense-moe-1group")
    model = randomize(NemotronHForCausalLM(config), seed=6, dt_bias=1.0).eval()
    prompt = torch.randint(3, config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(7))
    free = model.generate(prompt, max_new_tokens=12, eos_token_id=None)
    eos = int(free[0, 9 + 3])  # make the 4th generated token of row 0 an "EOS"
    hf = _hf_from_kinetic(model, tmp_path, transformers_mod)
    ours = model.generate(prompt, max_new_tokens=12, eos_token_id=eos)
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert ours.tolist() == theirs.tolist()
    assert ours[0, 9 + 4:].eq(config.pad_token_id).all()
