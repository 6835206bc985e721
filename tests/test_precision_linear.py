"""Tests for kinetic.precision.linear: the emulated quantized GEMM against products of operands
quantized directly with the codecs (fprop, dgrad, wgrad; NVFP4 2-D and 1-D weights, RHT, FP8, BF16;
token counts and widths that are not multiples of 16), the RHT cancelling in wgrad, stochastic
rounding's reproducibility, QuantLinear/QuantExperts wrapping the same parameters, idle experts, the
Transformer Engine stub, and amaxes all-reduced across two data-parallel ranks (torchrun on gloo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kinetic.config import preset
from kinetic.model.mlp import relu2
from kinetic.model.moe import Experts
from kinetic.precision import fp8, get_recipe, linear, nvfp4
from kinetic.precision.linear import GemmConfig, QuantExperts, QuantLinear, QuantState

NO_SR = dict(stochastic_rounding=False)


# tiny GEMMs: one torch thread (see the fixture's docstring in conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def pad(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return F.pad(x, (0, -x.shape[1] % cols, 0, -x.shape[0] % rows))


def nv(x: torch.Tensor, block=(1, 16)) -> torch.Tensor:
    """Independent NVFP4 round trip (RNE) of a 2-D tensor, zero-padded to whole blocks and cut back."""
    q = nvfp4.quantize(pad(x, *block), block).dequantize()
    return q[: x.shape[0], : x.shape[1]]


def operands(n: int, k: int, m: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) * torch.exp(torch.randn(n, 1, generator=g))  # uneven row scales
    w = torch.randn(m, k, generator=g) / k**0.5
    dy = torch.randn(n, m, generator=g) * 1e-3
    return x, w, dy


def run_gemm(x, w, dy, cfg, state=None):
    """y, dx, dW of the emulated GEMM with upstream gradient dy."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = linear.quant_linear(x, w, None, cfg, state or QuantState(0))
    y.backward(dy)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("n,k,m", [(64, 64, 48), (37, 40, 24)])
def test_nvfp4_gemms_equal_products_of_codec_quantized_operands(n, k, m):
    x, w, dy = operands(n, k, m)
    y, dx, dw = run_gemm(x, w, dy, GemmConfig("nvfp4", rht=False, **NO_SR))
    w_q = nv(w, (16, 16))
    assert torch.equal(y, nv(x) @ w_q.T)
    assert torch.equal(dx, nv(dy) @ w_q)  # 16x16 blocks: Q(Wᵀ) is Q(W)ᵀ
    assert torch.equal(nv(w.T.contiguous(), (16, 16)), w_q.T)
    assert torch.equal(dw, nv(dy.T.contiguous()) @ nv(x.T.contiguous()).T)


@pytest.mark.parametrize("n", [48, 37])
def test_nvfp4_wgrad_with_rht_transforms_both_operands_along_tokens(n):
    x, w, dy = operands(n, 32, 16, seed=1)
    state = QuantState(5)
    _, _, dw = run_gemm(x, w, dy, GemmConfig("nvfp4", rht=True, **NO_SR), state)
    signs = nvfp4.rht_signs(torch.Generator().manual_seed(5))
    assert torch.equal(state.signs, signs)
    a = nvfp4.random_hadamard_transform(pad(dy.T, 1, 16), signs)
    b = nvfp4.random_hadamard_transform(pad(x.T, 1, 16), signs)
    assert torch.equal(dw, nv(a) @ nv(b).T)
    assert not torch.equal(dw, nv(dy.T.contiguous()) @ nv(x.T.contiguous()).T)


def test_rht_cancels_in_wgrad_when_nothing_is_quantized(monkeypatch):
    monkeypatch.setattr(linear, "quantize_operand", lambda t, cfg, role, state: t.detach().float())
    for n in (64, 37):
        x, w, dy = operands(n, 32, 24, seed=2)
        y, dx, dw = run_gemm(x, w, dy, GemmConfig("nvfp4", rht=True, **NO_SR))
        assert torch.equal(y, x @ w.T) and torch.equal(dx, dy @ w)
        torch.testing.assert_close(dw, dy.T @ x, rtol=1e-5, atol=1e-7)


def test_nvfp4_1d_weight_blocks_quantize_the_transposed_weight_again():
    x, w, dy = operands(32, 48, 32, seed=3)
    y, dx, dw = run_gemm(x, w, dy, GemmConfig("nvfp4", rht=False, weight_block=(1, 16), **NO_SR))
    assert torch.equal(y, nv(x) @ nv(w).T)
    w_t_q = nv(w.T.contiguous())  # blocks along the dgrad reduction dim (out features)
    assert torch.equal(dx, nv(dy) @ w_t_q.T)
    assert not torch.equal(w_t_q.T, nv(w))  # the forward and backward copies differ: the ablation


@pytest.mark.parametrize("grad_fmt", ["e5m2", "e4m3"])
def test_fp8_gemms_use_per_tensor_current_scaling(grad_fmt):
    x, w, dy = operands(37, 40, 24, seed=4)
    y, dx, dw = run_gemm(x, w, dy, GemmConfig("fp8", rht=False, stochastic_rounding=False,
                                               fp8_grad_format=grad_fmt))
    q = lambda t, fmt: fp8.quantize(t, fmt).dequantize()
    assert torch.equal(y, q(x, "e4m3") @ q(w, "e4m3").T)
    assert torch.equal(dx, q(dy, grad_fmt) @ q(w, "e4m3"))
    assert torch.equal(dw, q(dy.T, grad_fmt) @ q(x.T, "e4m3").T)


def test_bf16_gemms_round_operands_to_nearest_even():
    x, w, dy = operands(20, 24, 8, seed=5)
    y, dx, dw = run_gemm(x, w, dy, GemmConfig("bf16", rht=False, stochastic_rounding=False))
    b = lambda t: t.to(torch.bfloat16).float()
    assert torch.equal(y, b(x) @ b(w).T)
    assert torch.equal(dx, b(dy) @ b(w))
    assert torch.equal(dw, b(dy).T @ b(x))


def test_stochastic_rounding_is_random_but_reproducible_from_the_seed():
    x, w, dy = operands(32, 32, 16, seed=6)
    cfg = GemmConfig("nvfp4", rht=True, stochastic_rounding=True)
    state = QuantState(1)
    first, second = run_gemm(x, w, dy, cfg, state), run_gemm(x, w, dy, cfg, state)
    assert torch.equal(first[0], second[0])  # the forward rounds to nearest
    assert not torch.equal(first[2], second[2])  # the gradients draw fresh random bits
    again = run_gemm(x, w, dy, cfg, QuantState(1))
    assert torch.equal(first[1], again[1]) and torch.equal(first[2], again[2])
    other_rank = QuantState(1, rank=1)  # data-parallel ranks: same RHT signs, own rounding stream
    assert torch.equal(other_rank.signs, state.signs)
    assert not torch.equal(run_gemm(x, w, dy, cfg, other_rank)[2], first[2])



def test_stochastic_rounding_state_round_trips_for_checkpoints():
    x, w, dy = operands(32, 32, 16, seed=6)
    cfg = GemmConfig("nvfp4", rht=True, stochastic_rounding=True)
    state = QuantState(1)
    run_gemm(x, w, dy, cfg, state)
    saved = state.state_dict()
    assert list(saved) == ["cpu"] and saved["cpu"].dtype == torch.uint8
    after = run_gemm(x, w, dy, cfg, state)
    fresh = QuantState(1)
    fresh.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(after, run_gemm(x, w, dy, cfg, fresh), strict=True))


def test_reduce_amax_needs_a_process_group():
    x, w, dy = operands(16, 16, 16)
    with pytest.raises(RuntimeError, match="reduce_amax=True needs an initialized"):
        run_gemm(x, w, dy, GemmConfig("fp8", rht=False, **NO_SR), QuantState(reduce_amax=True))
    y, _, _ = run_gemm(x, w, dy, GemmConfig("bf16", rht=False, **NO_SR), QuantState(reduce_amax=True))
    assert torch.equal(y, x.bfloat16().float() @ w.bfloat16().float().T)  # bf16 has no scale to reduce

def test_quant_linear_wraps_the_same_parameters():
    lin = nn.Linear(40, 24, bias=True)
    q = QuantLinear(lin, GemmConfig(), QuantState())
    assert q.weight is lin.weight and q.bias is lin.bias and q.original is lin
    assert list(q.state_dict()) == list(lin.state_dict()) == ["weight", "bias"]
    assert [p is r for p, r in zip(q.parameters(), lin.parameters(), strict=True)] == [True, True]
    x = torch.randn(2, 19, 40)
    y = q(x)
    assert y.shape == (2, 19, 24)
    expected = (nv(x.reshape(-1, 40)) @ nv(lin.weight.detach(), (16, 16)).T).view(2, 19, 24) + lin.bias
    assert torch.equal(y, expected)
    y.sum().backward()
    assert lin.weight.grad.shape == (24, 40) and torch.equal(lin.bias.grad, torch.full((24,), 38.0))


def make_experts(num: int = 4, width: int = 32, inter: int = 24) -> Experts:
    e = Experts(num, width, inter)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        e.up_proj.copy_(torch.randn(e.up_proj.shape, generator=g) / width**0.5)
        e.down_proj.copy_(torch.randn(e.down_proj.shape, generator=g) / inter**0.5)
    return e


def routing(tokens: int = 21, k: int = 2, idle: int = 3):
    """Top-k assignments over 4 experts in which expert ``idle`` receives no token."""
    g = torch.Generator().manual_seed(1)
    busy = [e for e in range(4) if e != idle]
    indices = torch.stack([torch.randperm(3, generator=g)[:k] for _ in range(tokens)])
    indices = torch.tensor(busy)[indices]
    return torch.randn(tokens, 32, generator=g), indices, torch.rand(tokens, k, generator=g)


def test_quant_experts_quantize_each_expert_slice_and_leave_idle_experts_alone():
    experts = make_experts()
    q = QuantExperts(experts, GemmConfig("nvfp4", rht=False, **NO_SR), QuantState())
    assert q.up_proj is experts.up_proj and q.down_proj is experts.down_proj
    assert list(q.state_dict()) == list(experts.state_dict())
    x, indices, weights = routing()
    y = q(x, indices, weights)

    expected = torch.zeros_like(x)
    up, down = experts.up_proj.detach(), experts.down_proj.detach()
    for e in range(3):
        rows, slot = (indices == e).nonzero(as_tuple=True)
        if len(rows) == 0:
            continue
        h = relu2(nv(x[rows]) @ nv(up[e], (16, 16)).T)
        out = nv(h) @ nv(down[e], (16, 16)).T
        expected.index_add_(0, rows, out * weights[rows, slot, None])
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)

    y.square().sum().backward()
    assert experts.up_proj.grad[3].abs().sum() == 0 and experts.down_proj.grad[3].abs().sum() == 0
    assert experts.up_proj.grad[:3].abs().sum() > 0 and torch.isfinite(experts.down_proj.grad).all()


def test_quant_experts_match_the_reference_experts_without_quantization(monkeypatch):
    monkeypatch.setattr(linear, "quantize_operand", lambda t, cfg, role, state: t.detach().float())
    experts = make_experts()
    q = QuantExperts(experts, GemmConfig("nvfp4", rht=True, **NO_SR), QuantState())
    x, indices, weights = routing(idle=0)
    results = []
    for module in (experts, q):
        experts.zero_grad()
        xi = x.clone().requires_grad_()
        out = module(xi, indices, weights)
        out.square().sum().backward()
        results.append((out.detach(), xi.grad, experts.up_proj.grad.clone(),
                        experts.down_proj.grad.clone()))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # fp32 rounding of the RHT


def test_empty_inputs_give_empty_outputs_and_zero_weight_gradients():
    lin = nn.Linear(32, 16, bias=False)
    q = QuantLinear(lin, GemmConfig(), QuantState())
    x = torch.zeros(0, 32, requires_grad=True)
    y = q(x)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert torch.equal(lin.weight.grad, torch.zeros(16, 32))


def test_gemm_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="format"):
        GemmConfig("int8")
    with pytest.raises(ValueError, match="weight_block"):
        GemmConfig(weight_block=(16, 1))
    with pytest.raises(ValueError, match="fp8_grad_format"):
        GemmConfig("fp8", fp8_grad_format="e2m1")
    with pytest.raises(ValueError, match="bf16"):
        GemmConfig("bf16")  # rht and stochastic rounding default on


def test_transformer_engine_backend_is_a_capability_checked_stub():
    assert linear.resolve_backend("emulated", "nvfp4")[0] == "emulated"
    assert linear.resolve_backend("auto", "nvfp4")[0] == "emulated"
    ok, why = linear.te_status("nvfp4")
    with pytest.raises(NotImplementedError if ok else RuntimeError, match="backend='te'"):
        linear.resolve_backend("te", "nvfp4")
    with pytest.raises(ValueError, match="backend"):
        linear.resolve_backend("cuda", "nvfp4")


# ---------------------------------------------------------------------- 2 ranks on gloo
REDUCE_CFGS = {"fp8": GemmConfig("fp8", rht=False, **NO_SR), "nvfp4": GemmConfig("nvfp4", rht=True, **NO_SR)}


def rank_operands():
    """64 tokens, 32 per rank. Rank 1's activations and rank 0's gradients are 8x larger, so every
    per-tensor amax (before and after the RHT) differs by rank."""
    x, w, dy = operands(64, 48, 32, seed=7)
    x[32:] *= 8
    dy[:32] *= 8
    return x, w, dy


def rank_routing(rank: int):
    """Tokens for the expert stack: expert 3 idles on rank 0, expert 2 on rank 1; rank 1's 8x larger."""
    x, indices, weights = routing(idle=3 - rank)
    return x * (1 + 7 * rank), indices, weights


def run_experts(x, indices, weights, state):
    experts = make_experts()
    q = QuantExperts(experts, REDUCE_CFGS["fp8"], state)
    x = x.clone().requires_grad_()
    y = q(x, indices, weights)
    y.square().sum().backward()
    return {"y": y.detach(), "dx": x.grad, "dup": experts.up_proj.grad, "ddown": experts.down_proj.grad}


def _reduce_amax_worker(out: Path) -> None:
    """One of two torchrun ranks: GEMMs and an expert stack with and without amax reduction, then two
    DDP steps of the trainer with the nvfp4 recipe and its checkpoint. Writes rank<r>.safetensors."""
    from safetensors.torch import save_file

    from kinetic.train import Trainer
    from kinetic.train.config import from_dict
    from kinetic.train.distributed import init_from_env, shutdown

    torch.set_num_threads(1)
    info = init_from_env()
    rank = info.rank
    rows = slice(32 * rank, 32 * (rank + 1))
    x, w, dy = rank_operands()
    results = {"auto": torch.tensor(get_recipe("fp8").resolve(preset("tiny")).reduce_amax)}
    for name, cfg in REDUCE_CFGS.items():
        for reduce in (True, False):
            y, dx, dw = run_gemm(x[rows], w, dy[rows], cfg, QuantState(0, rank, reduce_amax=reduce))
            results.update({f"{name}/{reduce}/y": y, f"{name}/{reduce}/dx": dx, f"{name}/{reduce}/dw": dw})
    experts = run_experts(*rank_routing(rank), QuantState(0, rank, reduce_amax=True))
    results.update({f"experts/{k}": v for k, v in experts.items()})

    cfg = from_dict({"model": {"preset": "tiny"}, "data": {"seq_len": 32},
                     "train": {"steps": 2, "micro_batch": 2, "seed": 3},
                     "run": {"out_dir": str(out / "run"), "eval_batches": 1, "progress": False},
                     "precision": {"recipe": "nvfp4"}})
    trainer = Trainer(cfg, dist_info=info)
    trainer.train()
    results["trainer/reduce_amax"] = torch.tensor(trainer.quant_state.reduce_amax)
    results["trainer/sr_state"] = trainer.quant_state.state_dict()["cpu"]
    save_file({k: v.contiguous() for k, v in results.items()}, out / f"rank{rank}.safetensors")
    shutdown()


def test_amax_is_reduced_across_two_gloo_ranks(tmp_path):
    """Two torchrun ranks quantize their halves of a batch with the scales of the whole batch: each
    rank's GEMM results equal the matching slice of one process quantizing the full tensors (the same
    amax), and differ from it without the reduction. An expert stack whose idle experts differ by rank
    matches the 1-process run too, and the trainer resolves the recipe's reduce_amax on by itself."""
    from safetensors.torch import load_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
           "127.0.0.1", "--master-port", str(port), __file__, str(tmp_path)]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    assert all(r["auto"].item() and r["trainer/reduce_amax"].item() for r in ranks)
    assert get_recipe("fp8").resolve(preset("tiny")).reduce_amax is False  # one process: nothing to reduce

    x, w, dy = rank_operands()
    for name, cfg in REDUCE_CFGS.items():
        state = QuantState(0)
        w_q = linear.quantize_operand(w, cfg, "weight", state)
        x_q = linear.quantize_operand(x, cfg, "act", state)  # the full tensors: the global amax
        dy_q = linear.quantize_operand(dy, cfg, "grad", state)
        a, b = linear.wgrad_operands(dy, x, cfg, state)  # amax after the RHT over all 64 tokens
        for rank, got in enumerate(ranks):
            rows = slice(32 * rank, 32 * (rank + 1))
            assert torch.equal(got[f"{name}/True/y"], x_q[rows] @ w_q.T), (name, rank)
            assert torch.equal(got[f"{name}/True/dx"], dy_q[rows] @ w_q), (name, rank)
            assert torch.equal(got[f"{name}/True/dw"], a[:, rows] @ b[:, rows].T), (name, rank)
            local = run_gemm(x[rows], w, dy[rows], cfg)  # each rank on its own amax
            for key, value in zip(("y", "dx", "dw"), local, strict=True):
                assert torch.equal(got[f"{name}/False/{key}"], value), (name, rank, key)
        # without the reduction the rank with the smaller amax quantizes differently
        assert not torch.equal(ranks[0][f"{name}/False/y"], ranks[0][f"{name}/True/y"]), name
        assert not torch.equal(ranks[1][f"{name}/False/dx"], ranks[1][f"{name}/True/dx"]), name

    # the 1-process expert stack differs only in GEMM shapes, so in float32 summation order: an
    # operand now and then lands on the other side of an FP8 rounding midpoint (a few per 1000 at most)
    parts = [rank_routing(r) for r in range(2)]
    full = run_experts(*(torch.cat(t) for t in zip(*parts, strict=True)), QuantState(0))
    unreduced = [run_experts(*parts[r], QuantState(0)) for r in range(2)]
    for key in ("y", "dx", "dup", "ddown"):
        merge = torch.cat if key in ("y", "dx") else sum  # DDP sums the ranks' weight gradients
        got = merge([ranks[0][f"experts/{key}"], ranks[1][f"experts/{key}"]])
        torch.testing.assert_close(got, full[key], rtol=1e-3, atol=1e-5)
        if key in ("y", "dx"):
            off = merge([unreduced[0][key], unreduced[1][key]])
            assert not torch.allclose(off, full[key], rtol=1e-3, atol=1e-5), key

    rng = torch.load(tmp_path / "run" / "checkpoints" / "step_000002" / "rng.pt", weights_only=True)
    saved = [rng["generators"][f"stochastic_rounding/rank{r}"] for r in range(2)]
    for rank, got in enumerate(ranks):  # each rank's stochastic-rounding stream is in the checkpoint
        assert torch.equal(saved[rank], got["trainer/sr_state"])
    assert not torch.equal(saved[0], saved[1])


if __name__ == "__main__":  # a rank of test_amax_is_reduced_across_two_gloo_ranks, started by torchrun
    _reduce_amax_worker(Path(sys.argv[1]))
