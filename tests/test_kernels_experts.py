"""The MoE kernels (kinetic/kernels/experts.c, the "cpu.c" implementations of routed_experts and
route_topk): each expert's up projection, squared ReLU and down projection with the dispatch
(gathering each token's row) and the weighted combine, forward and backward, against the per-expert
loop in float64; the router's choice and the sort by expert against
torch's topk and argsort (route_topk's reference)."""

from __future__ import annotations

import pytest
import torch

import kinetic.kernels.cpu as kc
from kinetic import ops
from kinetic.config import preset
from kinetic.model.moe import Experts, MoE, TopKRouter

needs_experts = pytest.mark.skipif(not kc.experts_kernel_available(),
                                   reason="the experts kernel needs x86-64 Linux, a C compiler and a torch "
                                          "that exports sgemm_")


@pytest.fixture
def expert_calls(count_calls):
    """Counts the kernel's forward calls."""
    return count_calls(kc, "experts_forward")


def routing(tokens: int, experts: int, k: int, skew: float, empty: int, seed: int):
    """(tokens, k) distinct experts per token, expert ``empty`` never chosen (if >= 0), and a
    ``skew`` share of the tokens sent to expert 0 first."""
    g = torch.Generator().manual_seed(seed)
    pool = [e for e in range(experts) if e != empty]
    rows = []
    for _ in range(tokens):
        perm = [pool[i] for i in torch.randperm(len(pool), generator=g)[:k].tolist()]
        if torch.rand((), generator=g).item() < skew and 0 not in perm:
            perm[0] = 0
        rows.append(perm)
    return torch.tensor(rows), torch.rand(tokens, k, generator=g)


def run_experts(experts: Experts, x, indices, weights, dtype):
    """Output and gradients (x, up, down, combine weights) of a weighted sum of the experts' output;
    float32 through the implementation that fits first (the kernel where it runs), float64 through
    the per-expert loop ("torch.sorted", which has no grouped matmul in float64; the operation's
    reference sums in float32)."""
    module = Experts(*experts.up_proj.shape[:1], experts.up_proj.shape[2], experts.up_proj.shape[1])
    module.load_state_dict(experts.state_dict())
    module = module.to(dtype)
    x = x.detach().to(dtype, copy=True).requires_grad_(True)
    weights = weights.detach().to(dtype, copy=True).requires_grad_(True)
    if dtype == torch.float64:
        loop = next(i for i in ops.implementations("routed_experts") if i.name == "torch.sorted").fn
        y = loop(x, indices, weights, module.up_proj, module.down_proj)
    else:
        y = module(x, indices, weights)
    probe = torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)
    (y * probe).sum().backward()
    return y.detach(), x.grad, module.up_proj.grad, module.down_proj.grad, weights.grad


@needs_experts
@pytest.mark.parametrize("num,width,inter,tokens,k,skew,empty,threads", [
    (8, 32, 48, 50, 2, 0.0, 7, 2),  # an expert without tokens gets zero gradients
    (64, 128, 256, 512, 4, 0.0, -1, 2),  # the small preset's latent MoE shapes
    (4, 24, 40, 300, 1, 0.8, -1, 2),  # expert 0 has most rows: it runs alone, BLAS-threaded
    (6, 16, 16, 1, 2, 0.0, -1, 2),  # a single token
    (8, 40, 24, 90, 3, 0.3, 2, 1),  # one thread
])
def test_experts_kernel_matches_float64(expert_calls, num, width, inter, tokens, k, skew, empty, threads):
    torch.manual_seed(tokens)
    experts = Experts(num, width, inter)
    torch.nn.init.normal_(experts.up_proj, std=width ** -0.5)
    torch.nn.init.normal_(experts.down_proj, std=inter ** -0.5)
    x = torch.randn(tokens, width)
    indices, weights = routing(tokens, num, k, skew, empty, seed=tokens)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = run_experts(experts, x, indices, weights, torch.float32)
    finally:
        torch.set_num_threads(before)
    assert len(expert_calls) == 1
    want = run_experts(experts, x, indices, weights, torch.float64)
    assert len(expert_calls) == 1  # float64 stays with torch
    for name, a, r in zip(["y", "dx", "dup", "ddown", "dweights"], got, want, strict=True):
        assert a.dtype == torch.float32 and a.shape == r.shape, name
        torch.testing.assert_close(a.double(), r, atol=1e-5 * r.abs().max().item(), rtol=1e-5, msg=name)
    if empty >= 0:
        assert not got[2][empty].any() and not got[3][empty].any()


@needs_experts
def test_experts_kernel_in_inference_matches_training(expert_calls):
    """Under no_grad the kernel keeps no pre-activation (squared in place); same output."""
    torch.manual_seed(0)
    moe = MoE(preset("small")).eval()
    for p in moe.parameters():
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5)
    x = torch.randn(2, 100, moe.gate.weight.shape[1])
    with torch.no_grad():
        fast = moe(x)
    train = moe(x.requires_grad_(True))
    with torch.no_grad(), kc.torch_only():
        ref = moe(x)
    assert len(expert_calls) == 2
    torch.testing.assert_close(fast, train.detach(), atol=0, rtol=0)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


@needs_experts
def test_experts_kernel_rows_in_order_without_weights():
    """The kernel's plain form: rows already gathered and sorted, no combine weights; against the
    per-expert products in float64, and the backward's row gradients summed by the caller."""
    g = torch.Generator().manual_seed(5)
    num, width, inter, rows = 5, 24, 40, 37
    ends = torch.tensor([8, 8, 20, 31, 37])
    x = torch.randn(rows, width, generator=g)
    up = torch.randn(num, inter, width, generator=g) / 5
    down = torch.randn(num, width, inter, generator=g) / 6
    grad = torch.randn(rows, width, generator=g)
    y, u = kc.experts_forward(x, up, down, ends, keep=True)
    dx, dup, ddown, dw = kc.experts_backward(x, up, down, ends, u, grad)
    assert dw is None
    xd, upd, downd = (t.double().requires_grad_() for t in (x, up, down))
    bounds = zip([0, *ends[:-1].tolist()], ends.tolist(), strict=True)
    ref = torch.cat([torch.relu(xd[lo:hi] @ upd[e].t()).square() @ downd[e].t()
                     for e, (lo, hi) in enumerate(bounds)])
    (ref * grad.double()).sum().backward()
    pairs = [("y", y, ref), ("dx", dx, xd.grad), ("dup", dup, upd.grad), ("ddown", ddown, downd.grad)]
    for name, a, r in pairs:
        scale = r.abs().max().item()
        torch.testing.assert_close(a.double(), r.detach(), atol=1e-5 * scale, rtol=1e-5, msg=name)
    assert not dup[1].any() and not ddown[1].any()  # expert 1 has no rows


@needs_experts
@pytest.mark.parametrize("num,n_group,topk_group,k,bias", [
    (64, 8, 4, 4, True),  # the small preset: group-limited
    (64, 8, 4, 4, False),
    (16, 1, 1, 2, True),  # no groups
    (32, 4, 4, 6, True),  # every group kept: plain top-k
    (512, 1, 1, 22, True),  # Nemotron 3 Super's 512 experts, top-22
    (12, 6, 1, 2, False),  # one group of two kept: exactly its two experts
])
def test_route_kernel_matches_torchs_choice(count_calls, num, n_group, topk_group, k, bias):
    config = preset("small").replace(n_routed_experts=num, n_group=n_group, topk_group=topk_group,
                                     num_experts_per_tok=k)
    router = TopKRouter(config)
    g = torch.Generator().manual_seed(num + k)
    if bias:
        router.e_score_correction_bias.copy_(torch.randn(num, generator=g) * 0.1)
    scores = torch.randn(300, num, generator=g).sigmoid()
    got = kc.route(scores, router.e_score_correction_bias, n_group, topk_group, k)
    choose = ops.route_topk.reference
    bias_ = router.e_score_correction_bias
    torch.testing.assert_close(got, choose(scores, bias_, n_group, topk_group, k), rtol=0, atol=0)
    calls = count_calls(kc, "route")
    x = torch.randn(5, config.hidden_size, generator=g)
    router.weight.data.normal_(generator=g).mul_(config.hidden_size ** -0.5)  # no saturated ties
    logits, weights, indices = router(x)
    assert len(calls) == 1
    torch.testing.assert_close(indices, choose(logits.sigmoid(), bias_, n_group, topk_group, k), rtol=0,
                               atol=0)


@needs_experts
def test_route_kernel_breaks_ties_toward_the_lower_index():
    """Saturated sigmoids tie at exactly 1.0: the kernel takes the lowest indices, best first, in
    groups and in experts; the values it picks are the top-k values torch finds."""
    scores = torch.full((3, 16), 0.5)
    scores[0, [3, 5, 9, 12]] = 1.0  # four tie at the top, k = 2
    scores[1, :] = 0.25
    scores[2, [14, 15]] = 1.0
    scores[2, 1] = 0.9
    got = kc.route(scores, None, 1, 1, 2)
    assert got.tolist() == [[3, 5], [0, 1], [14, 15]]
    grouped = kc.route(scores, None, 4, 2, 3)  # groups of 4: rows 1's groups tie, groups 0 and 1 kept
    assert grouped[1].tolist() == [0, 1, 2]
    assert grouped[2].tolist() == [14, 15, 1]  # groups 3 (2.0) and 0 (1.4) kept
    values = scores.gather(1, got)
    torch.testing.assert_close(values, scores.topk(2, dim=-1).values, rtol=0, atol=0)


@needs_experts
def test_dispatch_kernel_sorts_like_a_stable_argsort():
    g = torch.Generator().manual_seed(4)
    indices = torch.stack([torch.randperm(10, generator=g)[:3] for _ in range(57)])  # expert 9 often unused
    indices[indices == 9] = 8
    order, token_of, ends = kc.dispatch(indices, 10)
    flat = indices.flatten()
    want = flat.argsort(stable=True)
    torch.testing.assert_close(order, want, rtol=0, atol=0)
    torch.testing.assert_close(token_of, want // 3, rtol=0, atol=0)
    torch.testing.assert_close(ends, torch.bincount(flat, minlength=10).cumsum(0), rtol=0, atol=0)
    assert ends[-1] == ends[-2] == flat.numel()  # expert 9: no rows
    with pytest.raises(ValueError, match=r"an expert index outside 0 \.\. 7"):
        kc.dispatch(indices, 8)
    with pytest.raises(ValueError, match=r"dispatch: indices must be \(tokens, k\) int64"):
        kc.dispatch(indices.int(), 10)
    with pytest.raises(ValueError, match="no such routing"):
        kc.route(torch.rand(2, 8), None, 4, 1, 3)  # one group of two kept, top 3
    with pytest.raises(ValueError, match=r"bias must be float32 of shape \(8,\)"):
        kc.route(torch.rand(2, 8), torch.zeros(4), 1, 1, 2)


def test_experts_kernel_fits_only_where_it_runs():
    x, up, down = torch.randn(10, 16), torch.randn(4, 24, 16), torch.randn(4, 16, 24)
    assert kc.experts_fit(x, up, down) == kc.experts_kernel_available()
    assert not kc.experts_kernel_available("cpu", torch.float64) and not kc.experts_kernel_available("meta")
    assert not kc.experts_fit(x.double(), up.double(), down.double())
    assert not kc.experts_fit(x, up.bfloat16(), down)
    with kc.torch_only():
        assert not kc.experts_fit(x, up, down)


@needs_experts
def test_experts_kernel_names_a_mismatched_shape():
    x, up, down = torch.randn(10, 16), torch.randn(4, 24, 16), torch.randn(4, 16, 24)
    ends = torch.tensor([2, 5, 5, 10])
    with pytest.raises(ValueError, match=r"down \(4, 24, 16\).*expected x \(rows, W\), up \(E, I, W\)"):
        kc.experts_forward(x, up, down.transpose(1, 2), ends, False)
    with pytest.raises(ValueError, match="ends must be int64"):
        kc.experts_forward(x, up, down, ends.int(), False)
    with pytest.raises(ValueError, match=r"ends\[-1\] = 10 but there are 12 rows"):
        kc.experts_forward(x, up, down, ends, False, token_of=torch.zeros(12, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token_of names rows outside x's 0 \.\. 9"):
        kc.experts_forward(x, up, down, ends, False, token_of=torch.arange(10) + 1)
    with pytest.raises(ValueError, match="token_of must be a 1-D int64 tensor"):
        kc.experts_forward(x, up, down, ends, False, token_of=torch.zeros(10, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"weight must be float32 of shape \(10,\)"):
        kc.experts_forward(x, up, down, ends, False, weight=torch.ones(9))
    y, u = kc.experts_forward(x, up, down, ends, True)
    with pytest.raises(ValueError, match=r"grad \(10, 15\) does not match x \(10, 16\)"):
        kc.experts_backward(x, up, down, ends, u, y[:, :15])


def test_without_a_blas_the_experts_run_through_torch(without_blas):
    """A torch that exports no sgemm_: the kernel is unavailable and the MoE still computes."""
    assert not kc.experts_kernel_available()
    torch.manual_seed(1)
    experts = Experts(4, 16, 32)
    torch.nn.init.normal_(experts.up_proj)
    torch.nn.init.normal_(experts.down_proj)
    x = torch.randn(20, 16)
    indices, weights = routing(20, 4, 2, 0.0, -1, seed=1)
    got = run_experts(experts, x, indices, weights, torch.float32)
    want = run_experts(experts, x, indices, weights, torch.float64)
    scale = want[0].abs().max().item()
    torch.testing.assert_close(got[0].double(), want[0], atol=1e-5 * scale, rtol=1e-5)


@pytest.mark.skipif(not kc._linux_x86() or kc._blas() is None,
                    reason="the experts kernel is only built on x86-64 Linux, with torch's sgemm_")
def test_a_failed_experts_kernel_build_warns_once(failed_build, expert_calls):
    with failed_build(kc._experts_library, "MoE experts kernel is unavailable", kc.experts_kernel_available):
        experts = Experts(4, 16, 32)
        torch.nn.init.normal_(experts.up_proj)
        torch.nn.init.normal_(experts.down_proj)
        indices, weights = routing(20, 4, 2, 0.0, -1, seed=2)
        run_experts(experts, torch.randn(20, 16), indices, weights, torch.float32)
        assert not expert_calls


def test_the_experts_kernel_can_be_turned_off(kernels_off):
    assert not kc.experts_kernel_available()
    assert not kc.experts_fit(torch.randn(4, 16), torch.randn(2, 8, 16), torch.randn(2, 16, 8))
    assert not kc.routing_fits(torch.rand(4, 8))
