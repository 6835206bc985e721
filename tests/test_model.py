"""Model internals against independent references: the SSD scan against a step-by-step
recurrence, MoE dispatch against a per-token loop, the router's group limit, cached decoding
against a full forward, and MTP against a composition built from transformers' own blocks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kinetic import ops
from kinetic.infer.cache import InferenceCache
from kinetic.model import NemotronHForCausalLM
from kinetic.model.moe import MoE
from tests.conftest import CONFIGS, make_config, randomize


def naive_scan(x, dt, A, B, C, state=None):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T ; y_t = h_t C_t — one step at a time."""
    b, seqlen, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    rep = h // g
    state = torch.zeros(b, h, p, n) if state is None else state.clone()
    ys = []
    for t in range(seqlen):
        Bt = B[:, t].repeat_interleave(rep, dim=1)  # (b, h, n)
        Ct = C[:, t].repeat_interleave(rep, dim=1)
        decay = torch.exp(dt[:, t] * A)  # (b, h)
        state = state * decay[..., None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ct))
    return torch.stack(ys, 1), state


def _implementations(op: str, *args) -> list[tuple[str, object]]:
    """An operation's reference and every registered implementation that takes these arguments (the
    dispatcher runs the first of them), as (name, function)."""
    found = [("reference", ops.operations()[op])]
    return found + [(impl.name, impl.fn) for impl in ops.implementations(op) if impl.fits(*args)]


@pytest.mark.parametrize("seqlen,chunk", [(1, 4), (13, 4), (16, 4), (37, 16), (5, 64)])
@pytest.mark.parametrize("with_state", [False, True])
def test_ssd_scan_matches_recurrence(seqlen, chunk, with_state):
    g = torch.Generator().manual_seed(seqlen)
    b, h, p, n, groups = 2, 6, 4, 5, 3
    x = torch.randn(b, seqlen, h, p, generator=g)
    dt = F.softplus(torch.randn(b, seqlen, h, generator=g))
    A = -torch.rand(h, generator=g) * 4 - 0.1
    B = torch.randn(b, seqlen, groups, n, generator=g)
    C = torch.randn(b, seqlen, groups, n, generator=g)
    init = torch.randn(b, h, p, n, generator=g) if with_state else None
    y_ref, final_ref = naive_scan(x, dt, A, B, C, init)
    for name, scan in _implementations("ssd_chunk_scan", x, dt, A, B, C, chunk, init):
        y, final = scan(x, dt, A, B, C, chunk, init)
        torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4, msg=name)
        torch.testing.assert_close(final, final_ref, atol=1e-4, rtol=1e-4, msg=name)



@pytest.mark.parametrize("chunk", [8, 64])
def test_ssd_scan_with_strong_decay_matches_recurrence(chunk):
    """Heads that forget fast (log-decays far below -60 within a chunk, where the scan clamps its
    exponents) still give the recurrence's outputs, final state and gradients."""
    g = torch.Generator().manual_seed(61)
    b, seqlen, h, p, n, groups = 2, 70, 4, 3, 5, 2
    x = torch.randn(b, seqlen, h, p, generator=g, requires_grad=True)
    dt = (F.softplus(torch.randn(b, seqlen, h, generator=g)) + 0.5).requires_grad_()
    A = torch.tensor([-0.05, -2.0, -30.0, -200.0], requires_grad=True)
    B = torch.randn(b, seqlen, groups, n, generator=g, requires_grad=True)
    C = torch.randn(b, seqlen, groups, n, generator=g, requires_grad=True)
    init = torch.randn(b, h, p, n, generator=g, requires_grad=True)
    inputs = (x, dt, A, B, C, init)
    y_ref, final_ref = naive_scan(x, dt, A, B, C, init)
    wy, wf = torch.randn(b, seqlen, h, p, generator=g), torch.randn(b, h, p, n, generator=g)
    ref = torch.autograd.grad((y_ref * wy).sum() + (final_ref * wf).sum(), inputs)
    for scan_name, scan in _implementations("ssd_chunk_scan", x, dt, A, B, C, chunk, init):
        y, final = scan(x, dt, A, B, C, chunk, init)
        torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4, msg=scan_name)
        torch.testing.assert_close(final, final_ref, atol=1e-4, rtol=1e-4, msg=scan_name)
        grads = torch.autograd.grad((y * wy).sum() + (final * wf).sum(), inputs)
        for name, a, r in zip(["x", "dt", "A", "B", "C", "init"], grads, ref, strict=True):
            torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4, msg=f"{scan_name}: {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_rms_norm_matches_composite_reference(dtype):
    from kinetic.model.norm import GatedRMSNorm

    g = torch.Generator().manual_seed(62)
    norm = GatedRMSNorm(12, 4, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(12, generator=g) + 0.5)
    base = torch.randn(2, 7, 20, generator=g).to(dtype).requires_grad_()
    x = torch.randn(2, 7, 12, generator=g).to(dtype).requires_grad_()
    gate = base[..., 3:15]  # a strided slice, as the in_proj split produces
    out_grad = torch.randn(2, 7, 12, generator=g).to(dtype)
    args = (norm.weight, norm.group_size, norm.eps)
    ref = ops.gated_rms_norm.reference(x, gate, *args)
    ref_grads = torch.autograd.grad(ref, (x, base, norm.weight), out_grad)
    tol = {} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    # the module (whichever implementation it takes) and every implementation that fits the call
    paths = [("module", lambda x, gate, *args: norm(x, gate))]
    paths += _implementations("gated_rms_norm", x, gate, *args)[1:]
    grad_tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else tol
    for name, fn in paths:
        mine = fn(x, gate, *args)
        assert mine.dtype == ref.dtype == dtype, name
        torch.testing.assert_close(mine, ref, **tol, msg=name)
        for a, r in zip(torch.autograd.grad(mine, (x, base, norm.weight), out_grad), ref_grads, strict=True):
            assert a.dtype == r.dtype, name
            torch.testing.assert_close(a, r, **grad_tol, msg=name)
        with torch.no_grad():  # inference takes a path without the autograd.Function
            torch.testing.assert_close(fn(x, gate, *args), ref.detach(), **tol, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_autograd_rms_norm(dtype):
    """RMSNorm's hand-written backward (the C kernel in float32 where it runs) gives autograd's
    F.rms_norm gradients (input and weight), the same output in training and inference, and grads
    for a non-leaf strided input."""
    from kinetic.model.norm import RMSNorm

    g = torch.Generator().manual_seed(65)
    norm = RMSNorm(24, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(24, generator=g) + 0.5)
    base = (torch.randn(3, 5, 30, generator=g) * 3).to(dtype).requires_grad_()
    x = base[..., 2:26]  # strided, like a slice of a bigger activation
    out_grad = torch.randn(3, 5, 24, generator=g).to(dtype)
    mine = norm(x)
    ref = (F.rms_norm(x.float(), (24,), norm.weight.float(), 1e-5)).to(dtype)
    import kinetic.kernels.cpu as kc

    # float32 on CPUs with kinetic's kernels: the C kernel's function, else the torch one
    c_kernel = dtype == torch.float32 and kc.mamba_kernels_available()
    expected = "_RMSNormC" if c_kernel else "_RMSNormFn"
    assert ops.chosen("rms_norm", x, norm.weight, 1e-5) == ("cpu.c" if c_kernel
                                                            else "torch.rms-norm-backward")
    assert mine.dtype == dtype and type(mine.grad_fn).__name__.startswith(expected)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(mine, ref, **tol)
    for a, r in zip(torch.autograd.grad(mine, (base, norm.weight), out_grad),
                    torch.autograd.grad(ref, (base, norm.weight), out_grad), strict=True):
        assert a.dtype == r.dtype
        torch.testing.assert_close(a, r, **tol)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), ref.detach(), **tol)
    frozen = RMSNorm(24).to(dtype).requires_grad_(False)  # no grad anywhere: the plain path
    assert frozen(x.detach()).grad_fn is None


def reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per-token loop straight from the NemotronH description."""
    gate = moe.gate
    out = []
    for tok in x.reshape(-1, x.shape[-1]):
        scores = torch.sigmoid(gate.weight @ tok)
        choice = scores + gate.e_score_correction_bias
        per_group = gate.num_experts // gate.n_group
        group_score = torch.stack([choice[i * per_group:(i + 1) * per_group].topk(2).values.sum()
                                   for i in range(gate.n_group)])
        allowed = torch.zeros_like(choice, dtype=torch.bool)
        for gi in group_score.topk(gate.topk_group).indices.tolist():
            allowed[gi * per_group:(gi + 1) * per_group] = True
        chosen = choice.masked_fill(~allowed, -math.inf).topk(gate.top_k).indices
        w = scores[chosen]
        if gate.norm_topk_prob:
            w = w / w.sum()
        w = w * gate.scaling
        lat = moe.fc1_latent_proj(tok) if moe.fc1_latent_proj is not None else tok
        y = sum(wi * (moe.experts.down_proj[e] @ F.relu(moe.experts.up_proj[e] @ lat).square())
                for wi, e in zip(w, chosen.tolist(), strict=True))
        if moe.fc2_latent_proj is not None:
            y = moe.fc2_latent_proj(y)
        if moe.shared_experts is not None:
            y = y + moe.shared_experts(tok)
        out.append(y)
    return torch.stack(out).view_as(x)


@pytest.mark.parametrize("name", ["latent-grouped-mtp", "dense-moe-1group", "unnormed-topk"])
def test_moe_matches_per_token_reference(name):
    config = make_config(name)
    model = randomize(NemotronHForCausalLM(config), seed=11)
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    x = torch.randn(3, 7, config.hidden_size, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        torch.testing.assert_close(moe(x), reference_moe(moe, x), atol=1e-5, rtol=1e-5)
    assert int(moe.last_tokens_per_expert.sum()) == 3 * 7 * config.num_experts_per_tok


def test_both_ways_of_combining_expert_outputs_agree():
    """The CPU's index_add combine and the GPUs' atomic-free unsort + sum both give each token the sum
    of its k expert outputs, with the same gradient (both run here, so CI covers the GPU path too)."""
    from kinetic.kernels.torch_ops import combine_assignments

    g = torch.Generator().manual_seed(68)
    tokens, k, width = 11, 3, 5
    flat = torch.randint(0, 4, (tokens * k,), generator=g)  # (token, slot) assignments to experts
    order = flat.argsort(stable=True)
    ys = torch.randn(tokens * k, width, generator=g, requires_grad=True)  # sorted by expert
    ref = torch.zeros(tokens, width)
    for row, assignment in enumerate(order.tolist()):  # row j is assignment order[j] of token order[j] // k
        ref[assignment // k] += ys[row].detach()
    weights = torch.randn(tokens, width, generator=g)
    grads = []
    for atomic_free in (False, True):
        y = combine_assignments(ys, order, k, atomic_free)
        torch.testing.assert_close(y, ref)
        grads.append(torch.autograd.grad((y * weights).sum(), ys)[0])
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(grads[0], weights[order // k])


def test_router_respects_group_limit_and_bias_only_steers():
    config = make_config("latent-grouped-mtp")  # 8 experts, 4 groups of 2, 2 groups allowed
    model = randomize(NemotronHForCausalLM(config), seed=13)
    gate = next(m for m in model.modules() if isinstance(m, MoE)).gate
    x = torch.randn(64, config.hidden_size, generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        _, weights, idx = gate(x)
        groups = idx // (config.n_routed_experts // config.n_group)
        assert all(len(set(row)) <= config.topk_group for row in groups.tolist())
        torch.testing.assert_close(weights.sum(-1), torch.full((64,), config.routed_scaling_factor))
        gate.e_score_correction_bias.zero_()
        gate.e_score_correction_bias[5] = 10.0  # a huge bias forces expert 5 into every choice
        _, w2, idx2 = gate(x)
        assert (idx2 == 5).any(-1).all()
        # the combine weight of expert 5 comes from the unbiased sigmoid score
        scores = torch.sigmoid(x @ gate.weight.T)
        picked = scores.gather(1, idx2)
        torch.testing.assert_close(w2, picked / picked.sum(-1, keepdim=True) * config.routed_scaling_factor)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_decoding_matches_full_forward(name):
    # default HF-style Δt init: many Δt fall below time_step_min and get clamped in every path
    model = randomize(NemotronHForCausalLM(make_config(name)), seed=15).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 29), generator=torch.Generator().manual_seed(16))
    with torch.no_grad():
        full = model(ids).logits
        cache = InferenceCache()
        pieces = [model(ids[:, :11], cache).logits]  # prefill
        pieces.append(model(ids[:, 11:20], cache).logits)  # a second chunk continues the states
        for t in range(20, 29):  # then one token at a time through the recurrent step
            pieces.append(model(ids[:, t:t + 1], cache).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-4, rtol=1e-4)
    assert cache.seqlen == 29 or "*" not in model.config.hybrid_override_pattern


def test_cache_holds_states_only_where_needed():
    config = make_config("latent-grouped-mtp")
    model = NemotronHForCausalLM(config).eval()
    cache = InferenceCache()
    with torch.no_grad():
        model(torch.zeros(1, 5, dtype=torch.long), cache)
    mamba = {f"layers.{i}" for i, c in enumerate(config.hybrid_override_pattern) if c == "M"}
    attn = {f"layers.{i}" for i, c in enumerate(config.hybrid_override_pattern) if c == "*"}
    assert set(cache.ssm) == set(cache.conv) == mamba
    assert set(cache._k) == attn
    assert cache.ssm["layers.0"].shape == (1, config.mamba_num_heads, config.mamba_head_dim,
                                           config.ssm_state_size)
    assert cache.conv["layers.0"].shape == (1, config.mamba_conv_dim, config.conv_kernel - 1)


def test_mtp_matches_independent_composition(transformers_mod):
    """MTP logits rebuilt from the description with transformers' NemotronH blocks as the layers."""
    from transformers.models.nemotron_h import modeling_nemotron_h as hf_mod

    config = make_config("latent-grouped-mtp")  # MTP pattern "*E"
    model = randomize(NemotronHForCausalLM(config), seed=17).eval()
    ids = torch.randint(0, config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(18))
    hf_cfg = transformers_mod.NemotronHConfig(
        **{k: v for k, v in config.to_dict("transformers").items()
           if k not in ("time_step_limit", "architectures")},
        time_step_limit=[0.0, math.inf])
    hf_cfg.layers_block_type = config.mtp_layers_block_type  # blocks indexed like the MTP layers
    hf_cfg._attn_implementation = "sdpa"
    mtp_state = {k[len("mtp."):]: v for k, v in model.state_dict().items() if k.startswith("mtp.")}
    with torch.no_grad():
        out = model(ids)
        h = out.hidden_states  # final-normed main hidden state
        emb = model.backbone.embeddings(ids[:, 1:])
        sd = mtp_state

        def rms(x, w):
            return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.layer_norm_epsilon))

        x = torch.cat([rms(emb, sd["layers.0.enorm.weight"]),
                       rms(h[:, :-1], sd["layers.0.hnorm.weight"])], -1)
        x = x @ sd["layers.0.eh_proj.weight"].T
        for j in range(2):
            block = hf_mod.NemotronHBlock(hf_cfg, layer_idx=j)
            prefix = f"layers.{j}."
            weights = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)
                       and not any(s in k for s in ("enorm", "hnorm", "eh_proj", "final_layernorm"))}
            block.load_state_dict(weights, strict=True)
            mask = torch.full((x.shape[1], x.shape[1]), -math.inf).triu(1)[None, None]
            x = block(x, attention_mask=mask if j == 0 else None)
        logits = rms(x, sd["layers.1.final_layernorm.weight"]) @ model.lm_head.weight.T
    assert len(out.mtp_logits) == 1 and out.mtp_logits[0].shape == (2, 20, config.vocab_size)
    torch.testing.assert_close(out.mtp_logits[0], logits, atol=1e-4, rtol=1e-4)


def test_mtp_depths_chain_and_shapes():
    config = make_config("mtp-two-depths")
    model = randomize(NemotronHForCausalLM(config), seed=19).eval()
    ids = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        out = model(ids)
        assert [t.shape[1] for t in out.mtp_logits] == [11, 10]
        # depth 2 depends on depth 1's output: perturbing depth-1 weights changes depth-2 logits
        model.mtp.layers[1].mixer.o_proj.weight.mul_(1.5)
        out2 = model(ids)
    assert not torch.allclose(out.mtp_logits[1], out2.mtp_logits[1])
    assert torch.equal(out.logits, out2.logits)  # the main model does not see MTP


def test_backward_reaches_every_parameter():
    config = make_config("latent-grouped-mtp")
    model = randomize(NemotronHForCausalLM(config), seed=20)
    ids = torch.randint(0, config.vocab_size, (2, 19))
    out = model(ids)
    loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss = loss + F.cross_entropy(out.mtp_logits[0][:, :-1].flatten(0, 1), ids[:, 2:].flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # routed experts that received tokens have gradients; the router weight too
    assert model.backbone.layers[2].mixer.gate.weight.grad.abs().sum() > 0


def test_bfloat16_forward_close_to_float32():
    config = make_config("dense-moe-1group")
    model = randomize(NemotronHForCausalLM(config), seed=21).eval()
    ids = torch.randint(0, config.vocab_size, (1, 24))
    with torch.no_grad():
        ref = model(ids).logits
        model.to(torch.bfloat16)
        low = model(ids).logits
    assert low.dtype == torch.float32  # logits are returned in float32
    # a bf16 rounding can flip a near-tied expert choice at a few positions, so compare typical error
    assert (low - ref).abs().median() < 0.05 * ref.std()
    assert (low.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no grouped matmul")
@pytest.mark.parametrize("native", [True, False], ids=["grouped-kernel", "loop-fallback"])
def test_grouped_experts_compile_and_equal_eager(native, monkeypatch):
    """torch.compile traces the grouped expert matmuls through kinetic's custom ops (torch's own shape
    function refuses float32, and the per-expert loop's slice sizes are data): the ops pass torch's
    custom-op checks (shape function, autograd) both with torch's grouped kernel and with the
    one-matmul-per-group fallback used where that kernel does not run (e.g. CUDA float32), and
    compiled experts (which take "torch.sorted" there) give eager's outputs and gradients, with an
    idle expert: eager's module (the C kernel where it runs) and eager "torch.sorted" forced."""
    from kinetic.kernels import torch_ops
    from kinetic.model import moe

    torch._dynamo.reset()
    if not native:  # as on a device/dtype without torch's grouped kernel: eager takes the loop
        monkeypatch.setattr(torch_ops, "use_grouped_mm", lambda x: False)
    g = torch.Generator().manual_seed(5)
    a = torch.randn(10, 16, generator=g, requires_grad=True)
    b = torch.randn(3, 24, 16, generator=g).transpose(1, 2).requires_grad_()  # (groups, in, out) view
    offs = torch.tensor([3, 3, 10], dtype=torch.int32)  # group 1 is empty
    torch.library.opcheck(torch_ops._grouped_mm_op, (a, b, offs))
    torch.library.opcheck(torch_ops._grouped_mm_weight_grad,
                          (a.detach(), torch.randn(10, 24, generator=g), offs))
    want = torch.cat([a[:3] @ b[0], a[3:] @ b[2]])
    torch.testing.assert_close(torch_ops._grouped_mm_op(a, b, offs), want)

    experts = moe.Experts(num_experts=6, width=16, intermediate=24)
    with torch.no_grad():
        experts.up_proj.normal_(0, 0.25, generator=g)
        experts.down_proj.normal_(0, 0.2, generator=g)
    x = torch.randn(12, 16, generator=g, requires_grad=True)
    indices = torch.tensor([[0, 2], [2, 5], [5, 0]] * 4)  # experts 1, 3, 4 get nothing
    weights = torch.rand(12, 2, generator=g)
    sorted_impl = next(i for i in ops.implementations("routed_experts") if i.name == "torch.sorted")

    def forced_sorted(x, indices, weights):
        return sorted_impl.fn(x, indices, weights, experts.up_proj, experts.down_proj)

    compiled = torch.compile(experts, fullgraph=True)
    results = []
    for module in (experts, forced_sorted, compiled):
        out = module(x, indices, weights)
        params = (x, experts.up_proj, experts.down_proj)
        results.append((out, *torch.autograd.grad(out.square().sum(), params)))
    for want, *got in zip(*results, strict=True):
        for each in got:
            torch.testing.assert_close(each, want, atol=1e-5, rtol=1e-5)


def test_grouped_and_loop_expert_paths_agree_with_idle_experts(monkeypatch):
    """The module (the C kernel where it runs), "torch.sorted" through torch's grouped matmul and
    through its per-expert loop, and the reference give the same outputs and gradients with idle
    experts; inference on few assignments takes "torch.gather", which also holds at any size."""
    from kinetic.kernels import torch_ops
    from kinetic.model.moe import Experts

    experts = Experts(num_experts=6, width=16, intermediate=24)
    with torch.no_grad():
        experts.up_proj.normal_(0, 0.25)
        experts.down_proj.normal_(0, 0.2)
    x = torch.randn(10, 16, requires_grad=True)
    indices = torch.tensor([[0, 2], [2, 5], [5, 0]] * 3 + [[2, 0]])  # experts 1, 3, 4 get nothing
    weights = torch.rand(10, 2)
    impls = {impl.name: impl for impl in ops.implementations("routed_experts")}
    up, down = experts.up_proj, experts.down_proj

    def run(fn):
        out = fn(x, indices, weights, up, down)
        return (out, *torch.autograd.grad(out.square().sum(), (x, up, down)))

    results = {"module": run(lambda x, i, w, up, down: experts(x, i, w)),
               "reference": run(ops.routed_experts.reference),
               "torch.sorted": run(impls["torch.sorted"].fn)}
    if impls["cpu.c"].fits(x, indices, weights, up, down):
        results["cpu.c"] = run(impls["cpu.c"].fn)
    with monkeypatch.context() as patch:  # the per-expert loop, as where torch has no grouped kernel
        patch.setattr(torch_ops, "use_grouped_mm", lambda x: False)
        loop = results["torch.sorted/loop"] = run(impls["torch.sorted"].fn)
    for name, result in results.items():
        for a, b in zip(result, loop, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
        assert result[2][1].abs().sum() == 0, name  # an idle expert gets a zero gradient
    assert torch_ops.use_grouped_mm(x) == hasattr(torch, "_grouped_mm")
    # inference on few assignments (decode/verify) gathers the chosen experts' weights instead; a
    # static cache or a compiled step takes that path at any size (forced here)
    with torch.no_grad():
        for n in (1, 3, 10):
            assert ops.chosen("routed_experts", x[:n], indices[:n], weights[:n], up, down) == "torch.gather"
            few = experts(x[:n], indices[:n], weights[:n])
            torch.testing.assert_close(few, loop[0][:n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(impls["torch.gather"].fn(x, indices, weights, up, down), loop[0],
                                   atol=1e-5, rtol=1e-5)


def test_head_logits_swaps_operands_for_a_few_rows_only(monkeypatch):
    """The logits of 2-4 positions in CPU float32 inference come from W @ h^T (faster there, see
    SWAPPED_HEAD_ROWS) and equal lm_head(h); other row counts, gradients and bfloat16 take the
    reference (F.linear)."""
    from kinetic.kernels.cpu_ops import SWAPPED_HEAD_ROWS

    g = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(16, 50, bias=False)
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(a[0].shape) or real_mm(*a, **k))
    with torch.no_grad():
        for rows in range(1, 7):
            h = torch.randn(1, rows, 16, generator=g)
            calls.clear()
            swapped = ops.chosen("lm_head_logits", h, head.weight) == "cpu.swapped-gemm"
            assert swapped == (rows in SWAPPED_HEAD_ROWS), rows
            got = ops.lm_head_logits(h, head.weight)
            assert got.shape == (1, rows, 50) and got.is_contiguous()
            torch.testing.assert_close(got, head(h), rtol=1e-6, atol=1e-6)
            assert (calls == [(50, 16)]) == (rows in SWAPPED_HEAD_ROWS), rows
        calls.clear()
        ops.lm_head_logits(torch.randn(1, 3, 16).bfloat16(), head.to(torch.bfloat16).weight)
        assert calls == []
    h = torch.randn(1, 3, 16, requires_grad=True)
    ops.lm_head_logits(h, head.float().weight).sum().backward()  # grad mode: the reference
    assert calls == [] and h.grad is not None


def test_large_logits_go_into_huge_pages(monkeypatch):
    """Inference logits of at least HUGE_PAGE_MIN_BYTES (CPU float32) are written into a buffer advised
    for transparent huge pages -- the advice covers whole 2 MiB pages inside it -- with the values of
    lm_head(h); smaller logits, and training, take the reference."""
    import kinetic.kernels.cpu as kc

    advised = []
    monkeypatch.setattr(kc, "_madvise", lambda: lambda start, length, advice: advised.append(
        (start, length, advice)) or 0)
    g = torch.Generator().manual_seed(5)
    head = torch.nn.Linear(16, 8192, bias=False)
    rows = kc.HUGE_PAGE_MIN_BYTES // (8192 * 4)  # exactly the threshold
    h = torch.randn(1, rows, 16, generator=g)
    with torch.no_grad():
        assert ops.chosen("lm_head_logits", h, head.weight) == "cpu.huge-pages"
        got = ops.lm_head_logits(h, head.weight)
        assert len(advised) == 1
        start, length, advice = advised[0]
        size = rows * 8192 * 4
        assert advice == 14 and start % (2 << 20) == 0 and length % (2 << 20) == 0
        assert got.data_ptr() <= start and start + length <= got.data_ptr() + size
        assert length >= size - (4 << 20)
        torch.testing.assert_close(got, head(h), rtol=1e-6, atol=1e-6)
        assert ops.chosen("lm_head_logits", h[:, :rows - 1], head.weight) == "reference"
        ops.lm_head_logits(h[:, :rows - 1], head.weight)  # one row under the threshold: the reference
    ops.lm_head_logits(h.requires_grad_(), head.weight)  # training: the reference
    assert len(advised) == 1


def test_fused_loss_matches_cross_entropy_on_logits(monkeypatch):
    from kinetic.kernels import torch_ops

    g = torch.Generator().manual_seed(40)
    hidden = torch.randn(2, 23, 16, generator=g, requires_grad=True)
    weight = (torch.randn(50, 16, generator=g) / 4).requires_grad_()
    targets = torch.randint(0, 50, (2, 23), generator=g)
    targets[0, ::3] = -100
    ref = F.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten())
    ref_grads = torch.autograd.grad(ref * 3, (hidden, weight))
    assert ops.chosen("linear_cross_entropy", hidden, weight, targets) == "torch.chunked"
    monkeypatch.setattr(torch_ops, "LOSS_CHUNK", 7)  # chunks not dividing 46
    fused = ops.linear_cross_entropy(hidden, weight, targets)
    grads = torch.autograd.grad(fused * 3, (hidden, weight))
    torch.testing.assert_close(fused, ref)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    all_ignored = ops.linear_cross_entropy(hidden, weight, torch.full((2, 23), -100))
    assert all_ignored.item() == 0.0


def test_fused_loss_on_large_logits_in_huge_pages(monkeypatch):
    """A chunk of logits of at least HUGE_PAGE_MIN_BYTES goes into one buffer advised for huge pages,
    reused by every chunk; the in-place log-sum-exp stays exact for logits in the hundreds (float64
    reference)."""
    import kinetic.kernels.cpu as kc
    from kinetic.kernels import torch_ops

    advised = []
    monkeypatch.setattr(kc, "_madvise", lambda: lambda start, length, advice: advised.append(advice) or 0)
    g = torch.Generator().manual_seed(41)
    rows = kc.HUGE_PAGE_MIN_BYTES // (8192 * 4)
    hidden = torch.randn(2 * rows + 5, 8, generator=g, requires_grad=True)  # three chunks, one short
    weight = (torch.randn(8192, 8, generator=g) * 40).requires_grad_()  # logits up to a few hundred
    targets = torch.randint(0, 8192, (2 * rows + 5,), generator=g)
    monkeypatch.setattr(torch_ops, "LOSS_CHUNK", rows)
    fused = ops.linear_cross_entropy(hidden, weight, targets)
    assert advised == [14]
    grads = torch.autograd.grad(fused, (hidden, weight))
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = F.cross_entropy(h64 @ w64.T, targets)
    ref_grads = torch.autograd.grad(ref, (h64, w64))
    torch.testing.assert_close(fused.double(), ref, rtol=1e-5, atol=1e-4)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def test_labels_give_shifted_losses_for_main_and_mtp_heads():
    config = make_config("mtp-two-depths")
    model = randomize(NemotronHForCausalLM(config), seed=41)
    ids = torch.randint(0, config.vocab_size, (2, 15), generator=torch.Generator().manual_seed(42))
    labels = ids.clone()
    labels[1, :4] = -100  # e.g. a prompt that does not count
    out = model(ids, labels=labels, return_logits=True)
    ref = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(out.loss, ref)
    assert len(out.mtp_losses) == 2
    for d, (mtp_logits, mtp_loss) in enumerate(zip(out.mtp_logits, out.mtp_losses, strict=True)):
        target = labels[:, 2 + d:]
        ref_d = F.cross_entropy(mtp_logits[:, : target.shape[1]].flatten(0, 1), target.flatten())
        torch.testing.assert_close(mtp_loss, ref_d)
    assert model(ids, labels=labels).logits is None  # the fused path never builds the logits
    (out.loss + sum(out.mtp_losses)).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_fused_relu2_matches_autograd_reference():
    from kinetic.model.mlp import relu2

    g = torch.Generator().manual_seed(50)
    x = torch.randn(3, 11, 7, generator=g, requires_grad=True)
    out_grad = torch.randn(3, 11, 7, generator=g)
    ours = torch.autograd.grad(relu2(x), x, out_grad)[0]
    ref = torch.autograd.grad(F.relu(x).pow(2), x, out_grad)[0]
    torch.testing.assert_close(ours, ref)
    with torch.no_grad():  # the in-place inference path leaves its input alone
        before = x.clone()
        torch.testing.assert_close(relu2(x), F.relu(x).pow(2))
        assert torch.equal(x, before)

@pytest.mark.parametrize("seqlen, with_bias", [(11, True), (11, False), (2, True), (1, False)])
def test_causal_conv_matches_conv1d(seqlen, with_bias):
    """Values and all three gradients, including sequences shorter than the kernel: the reference
    and every implementation that takes the call (the C kernel, torch's channels-last one)."""
    g = torch.Generator().manual_seed(51)
    base = torch.randn(3, seqlen, 12, generator=g, requires_grad=True)
    weight = torch.randn(7, 1, 4, generator=g, requires_grad=True)  # nn.Conv1d's layout
    bias = torch.randn(7, generator=g, requires_grad=True) if with_bias else None
    out_grad = torch.randn(3, seqlen, 7, generator=g)
    xs = base[..., 2:9]  # a strided slice, as the in_proj split produces
    ref = F.conv1d(xs.transpose(1, 2), weight, bias, padding=3, groups=7)[..., :seqlen]
    ref = F.silu(ref).transpose(1, 2)
    inputs = (base, weight, bias) if with_bias else (base, weight)
    ref_grads = torch.autograd.grad(ref, inputs, out_grad)
    paths = _implementations("causal_conv1d_silu", xs, weight[:, 0], bias)
    assert len(paths) > 1
    for name, conv in paths:
        mine = conv(xs, weight[:, 0], bias)
        torch.testing.assert_close(mine, ref, msg=name)
        for a, b in zip(torch.autograd.grad(mine, inputs, out_grad), ref_grads, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_ssd_scan_gradients_match_recurrence():
    g = torch.Generator().manual_seed(60)
    b, seqlen, h, p, n, groups = 2, 19, 4, 3, 5, 2
    x = torch.randn(b, seqlen, h, p, generator=g, requires_grad=True)
    dt = F.softplus(torch.randn(b, seqlen, h, generator=g)).requires_grad_()
    A = (-torch.rand(h, generator=g) * 3 - 0.1).requires_grad_()
    B = torch.randn(b, seqlen, groups, n, generator=g, requires_grad=True)
    C = torch.randn(b, seqlen, groups, n, generator=g, requires_grad=True)
    init = torch.randn(b, h, p, n, generator=g, requires_grad=True)
    wy, wf = torch.randn(b, seqlen, h, p, generator=g), torch.randn(b, h, p, n, generator=g)
    inputs = (x, dt, A, B, C, init)
    y_ref, final_ref = naive_scan(x, dt, A, B, C, init)
    ref = torch.autograd.grad((y_ref * wy).sum() + (final_ref * wf).sum(), inputs)
    for scan_name, scan in _implementations("ssd_chunk_scan", x, dt, A, B, C, 8, init):
        y, final = scan(x, dt, A, B, C, 8, init)
        grads = torch.autograd.grad((y * wy).sum() + (final * wf).sum(), inputs)
        for name, a, r in zip(["x", "dt", "A", "B", "C", "init"], grads, ref, strict=True):
            torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4, msg=f"{scan_name}: {name}")


def test_labels_one_token_longer_use_every_position():
    config = make_config("latent-grouped-mtp")
    model = randomize(NemotronHForCausalLM(config), seed=43)
    window = torch.randint(0, config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(44))
    out = model(window[:, :-1], labels=window, return_logits=True)
    ref = F.cross_entropy(out.logits.flatten(0, 1), window[:, 1:].flatten())
    torch.testing.assert_close(out.loss, ref)
    ref_mtp = F.cross_entropy(out.mtp_logits[0].flatten(0, 1), window[:, 2:].flatten())
    torch.testing.assert_close(out.mtp_losses[0], ref_mtp)
    with pytest.raises(ValueError, match="labels shape"):
        model(window[:, :-1], labels=window[:, :5])


def test_training_attention_repeats_kv_heads_like_grouped_sdpa(monkeypatch):
    """On CPU in training the SDPA implementation repeats the keys/values per query head before the
    flash kernel (its grouped-head backward is slower); output and gradients equal SDPA's own
    grouped-query path, with "sdpa.causal" forced and through the layer (which takes the C kernel
    where it runs)."""
    from kinetic.kernels import sdpa
    from kinetic.model.attention import Attention

    config = make_config("latent-grouped-mtp")
    layer = randomize(Attention(config), seed=66)
    x = torch.randn(2, 19, config.hidden_size, generator=torch.Generator().manual_seed(67)).requires_grad_()
    b, s, _ = x.shape
    h, kvh, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = layer.q_proj(x).view(b, s, h, d)
    k = layer.k_proj(x).view(b, s, kvh, d)
    v = layer.v_proj(x).view(b, s, kvh, d)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, enable_gqa=True)
    ref = layer.o_proj(ref.transpose(1, 2).reshape(b, s, h * d))
    g = torch.randn_like(ref)
    params = [x, layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight]
    ref_grads = torch.autograd.grad(ref, params, g, retain_graph=True)

    kernel_calls = []
    real_kernel = sdpa._sdpa_kernel

    def spy(q, k, v, mask, causal, gqa):
        kernel_calls.append((k.shape[1], gqa))
        return real_kernel(q, k, v, mask, causal, gqa)

    monkeypatch.setattr(sdpa, "_sdpa_kernel", spy)
    impl = next(i for i in ops.implementations("causal_attention") if i.name == "sdpa.causal")
    forced = layer.o_proj(impl.fn(q, k, v).reshape(b, s, h * d))
    assert kernel_calls == [(h, False)]  # keys/values repeated per query head, no grouped heads
    for out in (forced, layer(x)):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        for a, r in zip(torch.autograd.grad(out, params, g), ref_grads, strict=True):
            torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("small_mask", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_cpu_chunk_attention_over_a_cache(monkeypatch, dtype, tol, small_mask):
    """A prefill chunk after cached tokens (and a few-token verification step) equals attention over
    the whole sequence at once. On CPU it never builds a (chunk, context) mask, except a small one
    for a few queries over a short context (SMALL_MASK_*), which must be used there."""
    from kinetic.kernels import sdpa
    from kinetic.model.attention import Attention

    config = make_config("latent-grouped-mtp")
    assert config.num_attention_heads > config.num_key_value_heads  # grouped-query heads
    layer = randomize(Attention(config, cache_key="a"), seed=63).to(dtype)
    x = torch.randn(2, 45, config.hidden_size, generator=torch.Generator().manual_seed(64)).to(dtype)
    with torch.no_grad():
        full = layer(x)
        masks = []
        real = sdpa._lower_right_causal

        def spy(q_len, kv_len, q):
            if not small_mask:
                raise AssertionError("a mask was built")
            assert q_len <= 16 and kv_len <= 1024
            masks.append((q_len, kv_len))
            return real(q_len, kv_len, q)

        monkeypatch.setattr(sdpa, "_lower_right_causal", spy)
        monkeypatch.setattr(sdpa, "SMALL_MASK_KEYS", 1024 if small_mask else 0)
        cache = InferenceCache()
        cache.reserve(64)
        parts = [layer(x[:, a:b], cache) for a, b in ((0, 17), (17, 40), (40, 41), (41, 45))]
    torch.testing.assert_close(torch.cat(parts, 1).float(), full.float(), atol=tol, rtol=tol)
    assert masks == ([(4, 45)] if small_mask else [])  # the 4-token step; the 23-token chunk takes 2 passes


@pytest.mark.parametrize("batch,heads,kv_heads,length,partitions", [
    (1, 4, 2, 1000, 3),   # grouped heads, a remainder after the equal parts
    (2, 8, 2, 777, 4),    # a batch: entries and KV heads merged into one dim of views
    (1, 4, 4, 64, 1),     # one KV head per query head, one part
    (1, 4, 2, 10, 4),     # parts of two keys
])
@torch.no_grad()
def test_split_kv_decode_equals_attention_over_the_whole_cache(batch, heads, kv_heads, length, partitions):
    """The split-KV decode (CUDA float32 at long context; the merge runs on CPU kernels here) equals
    grouped-query attention of one query over the cached keys, read from a larger cache buffer."""
    from kinetic.kernels.sdpa import _split_kv_decode

    g = torch.Generator().manual_seed(length)
    kb, vb = (torch.randn(batch, kv_heads, length + 50, 16, generator=g) for _ in range(2))
    q = torch.randn(batch, heads, 1, 16, generator=g)
    k, v = kb[:, :, :length], vb[:, :, :length]  # the cache's filled part: a strided view
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(_split_kv_decode(q, k, v, partitions), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("partitions", [1, 3, 8])
@torch.no_grad()
def test_grouped_attention_lse_over_partitions(partitions):
    """Several query rows per head (a prefill chunk's pass over the cache) over keys split into
    partitions: output and log-sum-exp equal the explicit softmax attention, for every split."""
    from kinetic.kernels.sdpa import _grouped_attention_lse

    g = torch.Generator().manual_seed(partitions)
    b, heads, kv_heads, s, length, d = 2, 6, 2, 5, 203, 8
    kb, vb = (torch.randn(b, kv_heads, length + 13, d, generator=g) for _ in range(2))
    k, v = kb[:, :, :length], vb[:, :, :length]
    q = torch.randn(b, heads, s, d, generator=g)
    out, lse = _grouped_attention_lse(q, k, v, partitions)
    scores = q @ k.repeat_interleave(heads // kv_heads, 1).transpose(-1, -2) / math.sqrt(d)
    ref = scores.softmax(-1) @ v.repeat_interleave(heads // kv_heads, 1)
    torch.testing.assert_close(out.float(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, scores.logsumexp(-1, keepdim=True), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_chunk_attention_with_the_cache_split_into_partitions(monkeypatch):
    """A prefill chunk's pass over the cache split into partitions (what CUDA does with few query
    rows over a long cache) gives the same layer output as attention over the whole sequence."""
    from kinetic.kernels import sdpa
    from kinetic.model.attention import Attention

    config = make_config("latent-grouped-mtp")
    layer = randomize(Attention(config, cache_key="a"), seed=68)
    x = torch.randn(2, 70, config.hidden_size, generator=torch.Generator().manual_seed(69))
    full = layer(x)
    calls = []

    def split(q, kv_heads, length):
        calls.append(length)
        return 4

    monkeypatch.setattr(sdpa, "_split_kv_partitions", split)
    monkeypatch.setattr(sdpa, "SMALL_MASK_KEYS", 0)
    cache = InferenceCache()
    cache.reserve(70)
    parts = [layer(x[:, a:b], cache) for a, b in ((0, 30), (30, 33), (33, 70))]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert calls == [30, 33]


@pytest.mark.parametrize("batch", [1, 2])
@torch.no_grad()
def test_split_kv_decode_does_not_copy_the_cache(batch):
    """Its memory is per partition and query row, not per cached key: 64K cached tokens per entry
    (16 MiB of keys and values each), read from a larger cache buffer, take well under 1 MiB more
    (SDPA's grouped-query fallback copies them all)."""
    from kinetic.infer.memory import PeakTensorMemory
    from kinetic.kernels.sdpa import _split_kv_decode

    g = torch.Generator().manual_seed(0)
    kb, vb = (torch.randn(batch, 2, 65536 + 100, 16, generator=g) for _ in range(2))
    k, v = kb[:, :, :65536], vb[:, :, :65536]
    q = torch.randn(batch, 4, 1, 16, generator=g)
    with PeakTensorMemory() as mem:
        out = _split_kv_decode(q, k, v, 16)
    if mem.peak_bytes is None:
        pytest.skip("this torch build's profiler reports no allocations")
    assert mem.peak_bytes < 2**20, mem.peak_bytes
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                               atol=1e-6, rtol=1e-5)


def test_peak_tensor_memory_counts_tensors_alive_at_once():
    from kinetic.infer.memory import PeakTensorMemory

    mib = 2**20
    before = torch.ones(mib)  # alive before: not counted, and freeing it does not lower the count
    with PeakTensorMemory() as mem:
        a = torch.empty(4 * mib, dtype=torch.uint8)
        b = torch.empty(2 * mib, dtype=torch.uint8)
        del a, before
        c = torch.empty(mib, dtype=torch.uint8)  # 3 MiB alive now, 6 MiB at the peak
        del b, c
    assert 6 * mib <= mem.peak_bytes < 6 * mib + 64 * 1024
    with PeakTensorMemory() as again:  # a second session starts from zero again
        d = torch.empty(mib, dtype=torch.uint8)
    del d
    assert mib <= again.peak_bytes < mib + 64 * 1024


def test_chunked_prefill_memory_is_the_cache_plus_a_chunk_of_activations():
    """Peak tensor memory of a chunked prefill = the cache + activations bounded by the chunk: the
    excess over the cache budget is the same at 2K and 8K tokens of context, and grows with the
    chunk (a (chunk, context) mask would add chunk x context bytes at 8K)."""
    from kinetic.infer.cache import cache_budget
    from kinetic.infer.memory import PeakTensorMemory

    config = make_config("latent-grouped-mtp").replace(max_position_embeddings=8192)
    model = randomize(NemotronHForCausalLM(config), seed=71).eval()
    ids = torch.randint(0, config.vocab_size, (1, 8192), generator=torch.Generator().manual_seed(72))

    def excess(tokens: int, chunk: int) -> int:
        with torch.no_grad(), PeakTensorMemory() as mem:
            cache = InferenceCache()
            cache.reserve(tokens)
            for start in range(0, tokens, chunk):
                model(ids[:, start:start + chunk], cache, return_mtp=False, logits_to_keep=1)
        return mem.peak_bytes - cache_budget(config, tokens)["total"]

    short, long, wide = excess(2048, 64), excess(8192, 64), excess(8192, 128)
    assert short > 0
    assert abs(long - short) <= 16 * 1024
    assert long < wide < 3 * long
