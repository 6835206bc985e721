"""The CUDA paths, run only where a GPU is present (never in CI): chunked prefill through the cache
(flash attention with a lower-right causal bias in half precision, two memory-efficient passes merged
by their log-sum-exp in float32, no mask either way) equals a one-shot forward, cached
decode equals the full forward, speculative greedy equals plain greedy on the GPU, the decoder's
compiled (CUDA-graph) step equals eager, a compiled forward+backward equals eager, the trainer
trains and resumes on the GPU, and its reductions work in an NCCL group."""

from __future__ import annotations

import pytest
import torch

from kinetic import NemotronHForCausalLM, ops, preset
from kinetic.infer.cache import InferenceCache
from kinetic.infer.generate import speculative_generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model(dtype):
    torch.manual_seed(0)
    return NemotronHForCausalLM(preset("tiny")).to(device="cuda", dtype=dtype).eval()


def _prefilled(model, ids: torch.Tensor, capacity: int, chunk: int = 4096) -> InferenceCache:
    """A cache holding ``ids`` (1, n), prefilled in chunks, with room for ``capacity`` tokens."""
    cache = InferenceCache()
    cache.reserve(capacity)
    for s in range(0, ids.shape[1], chunk):
        model(ids[:, s:s + chunk], cache, return_mtp=False, logits_to_keep=1)
    return cache


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)])
@torch.no_grad()
def test_chunked_prefill_equals_one_shot(dtype, tol, monkeypatch):
    """... and builds no (chunk, context) mask: half precision passes a lower-right CausalBias to
    flash attention, float32 runs two memory-efficient passes merged by their log-sum-exp."""
    from torch.nn.attention.bias import CausalBias

    from kinetic.kernels import sdpa

    real, masks = sdpa._lower_right_causal, []

    def spy(q_len, kv_len, q):
        out = real(q_len, kv_len, q)
        if isinstance(out, torch.Tensor) and not isinstance(out, CausalBias):  # CausalBias is a Tensor
            masks.append((q_len, kv_len))
        return out

    monkeypatch.setattr(sdpa, "_lower_right_causal", spy)
    model = _model(dtype)
    ids = torch.randint(3, model.config.vocab_size, (1, 700), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))
    full = model(ids, return_mtp=False).logits
    cache = InferenceCache()
    cache.reserve(700)
    parts = [model(ids[:, s:s + 128], cache, return_mtp=False).logits for s in range(0, 700, 128)]
    chunked = torch.cat(parts, dim=1)
    scale = full.abs().max()
    assert (chunked - full).abs().max() <= tol * scale
    assert masks == []
    # then single steps continue from the chunked cache as from a fresh full forward
    nxt = torch.randint(3, model.config.vocab_size, (1, 4), device="cuda")
    steps = torch.cat([model(nxt[:, i:i + 1], cache, return_mtp=False).logits for i in range(4)], dim=1)
    ref = model(torch.cat([ids, nxt], dim=1), return_mtp=False).logits[:, -4:]
    assert (steps - ref).abs().max() <= tol * scale


@torch.no_grad()
def test_float32_decode_at_long_context_reads_the_cache_in_place():
    """A float32 decode step over 16K cached tokens takes the split-KV path: logits equal a full
    forward's, and the step allocates far less than the KV cache (SDPA's grouped-query fallback
    repeats the cached keys and values per query head, about twice the cache, every step)."""
    from kinetic.kernels import sdpa

    model = _model(torch.float32)
    n = 16384
    assert n >= sdpa.SPLIT_KV_MIN_KEYS
    config = model.config
    q = torch.zeros(1, config.num_attention_heads, 1, config.head_dim, device="cuda")
    kv = torch.zeros(1, config.num_key_value_heads, n + 1, config.head_dim, device="cuda")
    assert ops.chosen("cached_attention", q, kv, kv, n) == "sdpa.split-kv-decode"
    ids = torch.randint(3, model.config.vocab_size, (1, n + 2), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(2))
    cache = _prefilled(model, ids[:, :n], n + 2)
    kv_bytes = cache.nbytes()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    steps = torch.cat([model(ids[:, n + i:n + i + 1], cache, return_mtp=False).logits for i in range(2)], 1)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < kv_bytes / 4, (extra, kv_bytes)
    ref = model(ids, return_mtp=False).logits[:, -2:]
    assert (steps - ref).abs().max() <= 1e-4 * ref.abs().max()


@torch.no_grad()
def test_speculative_greedy_equals_plain_greedy_on_cuda():
    model = _model(torch.float32)
    prompt = list(range(3, 40))
    plain = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=40,
                           eos_token_id=None)[0, len(prompt):].tolist()
    for k in (1, 4):
        out, stats = speculative_generate(model, prompt, 40, draft_tokens=k)
        assert out == plain and stats.rounds > 0


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_compiled_generate_equals_eager(dtype, rows):
    """The decoder's compiled step on CUDA (Inductor's reduce-overhead mode: CUDA graphs): one row (a
    0-d position: the static split-KV attention), and three padded to four rows (per-row masks)."""
    model = _model(dtype)
    ids = torch.randint(3, model.config.vocab_size, (rows, 30), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(1))
    eager = model.generate(ids, max_new_tokens=40, eos_token_id=None)
    compiled = model.generate(ids, max_new_tokens=40, eos_token_id=None, compile=True)
    if dtype == torch.float32:  # in bf16 the gathered and grouped expert GEMMs round differently, and
        assert torch.equal(compiled, eager)  # a random model's near-ties then flip
    assert compiled.shape == eager.shape


def test_engine_graph_decode_equals_eager_on_cuda():
    from dataclasses import replace

    from kinetic.data.tokenizer import train_tokenizer
    from kinetic.infer import Engine, SamplingParams

    tok = train_tokenizer(["The quick brown fox jumps over the lazy dog. " * 20], vocab_size=300)
    torch.manual_seed(0)
    model = NemotronHForCausalLM(replace(preset("tiny"), vocab_size=tok.get_vocab_size())).cuda()
    params = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    prompts = ["The quick", "lazy dog"]
    graphs = Engine(model, tok, compile_decode=True)
    assert not graphs.speculative  # the compiled step is the plain one
    graph = graphs.generate(prompts, params)
    eager = Engine(model, tok, speculative=False).generate(prompts, params)
    assert [r.token_ids for r in graph] == [r.token_ids for r in eager]
    with pytest.raises(ValueError, match="compile_decode"):
        Engine(model, tok, compile_decode=True, speculative=True)


def test_training_step_on_cuda_matches_cpu():
    """Loss and every parameter gradient of a float32 training step agree between CUDA and CPU
    (the hand-written backwards of the conv, gated norm, SSD scores and fused loss on both)."""
    torch.manual_seed(0)
    cpu = NemotronHForCausalLM(preset("tiny"))
    gpu = NemotronHForCausalLM(preset("tiny")).cuda()
    gpu.load_state_dict(cpu.state_dict())
    ids = torch.randint(3, cpu.config.vocab_size, (2, 77), generator=torch.Generator().manual_seed(1))
    losses = []
    for model, x in ((cpu, ids), (gpu, ids.cuda())):
        model.train()
        out = model(x, labels=x)
        loss = out.loss + 0.3 * sum(out.mtp_losses)  # the trainer's objective: main + MTP
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) <= 1e-4 * abs(losses[0])
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None, name
        scale = p.grad.abs().max().clamp(min=1e-6)
        assert (q.grad.cpu() - p.grad).abs().max() <= 1e-3 * scale, name


def _loss_and_grads(model, ids: torch.Tensor, compile: bool = False) -> tuple[float, dict[str, torch.Tensor]]:
    out = (torch.compile(model, fullgraph=True) if compile else model)(ids, labels=ids)
    loss = out.loss + 0.3 * sum(out.mtp_losses)  # the trainer's objective: main + MTP
    loss.backward()
    return loss.float().item(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_forward_backward_equals_eager_on_cuda(dtype):
    """train.compile on a GPU: torch.compile of the whole model (no graph breaks allowed) gives the
    eager loss and gradients. In float32 the MoE's per-expert matmuls run inside the graph through
    kinetic's grouped-matmul op; in bfloat16 on Hopper through torch's grouped matmul, and there the
    compiled gradients must be about as close to float32 ones as eager bfloat16 gradients are (the
    two round different intermediates, and a token whose top experts nearly tie may switch expert,
    which moved a few MoE gradients by 5-10% in a CPU trial, against ~1% for the rest)."""
    torch.manual_seed(0)
    config = preset("tiny").replace(hybrid_override_pattern="M*E")
    reference = NemotronHForCausalLM(config).cuda().train()
    ids = torch.randint(3, config.vocab_size, (2, 96), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(1))
    runs = {}
    for name in ("eager", "compiled"):
        model = NemotronHForCausalLM(config).to(device="cuda", dtype=dtype).train()
        model.load_state_dict(reference.state_dict())
        runs[name] = _loss_and_grads(model, ids, compile=name == "compiled")
    (e_loss, eager), (c_loss, compiled) = runs["eager"], runs["compiled"]
    assert set(compiled) == set(eager) == {n for n, _ in reference.named_parameters()}
    if dtype == torch.float32:
        assert c_loss == pytest.approx(e_loss, rel=1e-4)
        for name, want in eager.items():
            assert (compiled[name] - want).abs().max() <= 1e-3 * want.abs().max().clamp(min=1e-6), name
        return
    r_loss, exact = _loss_and_grads(reference, ids)
    assert abs(c_loss - r_loss) <= 2 * abs(e_loss - r_loss) + 2e-3 * abs(r_loss)
    for name, want in exact.items():
        norm = want.norm().clamp(min=1e-12)
        e_err, c_err = (eager[name] - want).norm() / norm, (compiled[name] - want).norm() / norm
        assert c_err <= 2 * e_err + 0.1, (name, c_err.item(), e_err.item())


def _train_config(out_dir):
    from kinetic.train.config import from_dict

    return from_dict({"model": {"preset": "tiny"}, "data": {"seq_len": 32},
                      "train": {"steps": 4, "micro_batch": 4, "seed": 3, "device": "cuda"},
                      "run": {"out_dir": str(out_dir), "log_every": 1, "eval_every": 2, "eval_batches": 1,
                              "save_every": 2, "progress": False}})


def test_trainer_trains_on_the_gpu_and_resumes(tmp_path):
    """train.device='cuda': the weights, every batch and the optimizer state live on the GPU, the loss
    falls, and a run killed after its step-2 checkpoint resumes to the uninterrupted run's weights
    (within rounding: GPU reductions need not be bit-reproducible)."""
    import json

    from kinetic.train import Trainer

    full = Trainer(_train_config(tmp_path / "full"))
    assert full.device == torch.device("cuda", torch.cuda.current_device())
    full.train()
    assert all(p.device.type == "cuda" for p in full.model.parameters())
    moments = [v for state in full.optimizer.state.values() for k, v in state.items()
               if k in ("exp_avg", "exp_avg_sq")]
    assert moments and all(v.device.type == "cuda" for v in moments)
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["lm_loss"] for r in records if r["type"] == "train"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    from kinetic.eval.perplexity import model_nll  # scores CPU token windows on the model's device

    total, scored = model_nll(full.model.eval(), torch.arange(200).numpy() % 64, seq_len=32, batch_size=2)
    assert scored == 6 * 32 and total == total and total > 0

    class Interrupt(Exception):
        pass

    crashed = Trainer(_train_config(tmp_path / "resumed"))
    inner, seen = crashed.loss_fn, []

    def dies(model, batch):
        seen.append(batch.device.type)
        if len(seen) > 2:  # after the step-2 checkpoint
            raise Interrupt
        return inner(model, batch)

    crashed.loss_fn = dies
    with pytest.raises(Interrupt):
        crashed.train()
    assert set(seen) == {"cuda"}
    resumed = Trainer(_train_config(tmp_path / "resumed"))
    resumed.train(resume=True)
    assert resumed.resumed_from == 2
    for (name, want), got in zip(full.model.state_dict().items(), resumed.model.state_dict().values(),
                                 strict=True):
        if want.is_floating_point():
            assert (got - want).float().norm() <= 1e-3 * want.float().norm().clamp(min=1e-6), name


def test_nccl_reductions_take_the_trainers_cpu_tensors():
    """The trainer reduces CPU tensors and Python floats (skip flags, metrics, expert loads); NCCL only
    reduces CUDA tensors, so the helpers move them to the current GPU and back."""
    import socket

    import torch.distributed as dist

    from kinetic.train.distributed import all_gather, all_reduce_mean, all_reduce_sum

    if not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    try:
        flag = torch.tensor([1.0])
        total = all_reduce_sum(flag)
        assert total.device.type == "cpu" and total.tolist() == [1.0]
        loads = torch.arange(4.0, device="cuda")
        assert all_reduce_sum(loads).device.type == "cuda"
        assert all_reduce_mean(0.5) == 0.5
        assert [x.device.type for x in all_gather(flag)] == ["cpu"]
    finally:
        dist.destroy_process_group()
