"""The batched decoder: sequences at different positions in one forward per step equal their solo
(and uncached) greedy continuations, with continuous batching (prompts waiting for a slot, chunked
prefills between decode steps, sequences leaving and their slots reused); n samples of one prompt are
prefilled once and each equals a solo run with its seed; the sampler's reported log-probs equal the
teacher-forced scorer's; the sampling module's filters and the tiny-temperature case."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import drain, make_config, randomize, uncached_greedy

from kinetic import NemotronHForCausalLM
from kinetic.infer.decoder import Decoder
from kinetic.infer.execution import Eager
from kinetic.infer.sampling import (
    SamplingParams,
    min_p_filter,
    processed_logprobs,
    sample,
    token_logprobs,
)
from kinetic.infer.scoring import score, sequence_logprobs
from kinetic.model.moe import count_per_expert

GREEDY = SamplingParams(temperature=0)


def _model(name="latent-grouped-mtp", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = randomize(NemotronHForCausalLM(make_config(name)), seed=seed, dt_bias=0.5)
    return model.to(dtype).eval()


def _prompts(model, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]


# ---------------------------------------------------------------------- batching
@pytest.mark.parametrize("name,speculative", [("latent-grouped-mtp", False), ("dense-moe-1group", False),
                                              ("mtp-two-depths", True)])
def test_continuous_batching_equals_solo_uncached_greedy(name, speculative, one_thread):
    """Six prompts of different lengths through two slots, prefilled in chunks of 4 between decode
    steps, leaving after different numbers of tokens: each equals its own uncached greedy run."""
    model = _model(name)
    prompts = _prompts(model, (5, 11, 1, 17, 9, 3))
    limits = [12, 4, 9, 12, 1, 7]
    refs = [uncached_greedy(model, p, n) for p, n in zip(prompts, limits, strict=True)]
    for max_batch, spec_batch in ((2, 1), (6, None)):  # speculative steps alone, or for every batch
        decoder = Decoder(model, max_batch=max_batch, speculative=speculative, draft_tokens=2,
                          prefill_chunk=4, speculative_max_batch=spec_batch)
        seqs = [decoder.add(p, GREEDY)[0] for p in prompts]
        assert drain(decoder, seqs, limits) == refs, max_batch
        assert not decoder.running and not decoder.waiting


def test_sequences_end_at_their_max_new_tokens(one_thread):
    """The decoder ends each sequence at its own max_new_tokens, speculative rounds that overshoot
    included (their extra tokens dropped): run() needs no stop logic from the caller."""
    model = _model("mtp-two-depths")
    prompts = _prompts(model, (5, 9, 3))
    decoder = Decoder(model, max_batch=3, speculative=True, draft_tokens=3, speculative_max_batch=3)
    seqs = [decoder.add(p, SamplingParams(temperature=0, max_new_tokens=n))[0]
            for p, n in zip(prompts, (7, 1, 4), strict=True)]
    decoder.run()
    assert [len(s.tokens) for s in seqs] == [7, 1, 4] and all(s.done for s in seqs)
    assert [[t.id for t in s.tokens] for s in seqs] == [uncached_greedy(model, p, n)
                                                        for p, n in zip(prompts, (7, 1, 4), strict=True)]


def test_a_batch_decodes_in_one_forward_per_step(monkeypatch):
    """Four running sequences: each plain step is one forward of batch 4 x 1 token."""
    model = _model()
    widths = []
    real = Eager.decode

    def spy(self, model, ids, cache):
        widths.append(tuple(ids.shape))
        return real(self, model, ids, cache)

    monkeypatch.setattr(Eager, "decode", spy)
    decoder = Decoder(model, max_batch=4)
    seqs = [decoder.add(p, GREEDY)[0] for p in _prompts(model, (3, 8, 5, 2))]
    drain(decoder, seqs, [10] * 4)
    assert set(widths) <= {(1, 1), (2, 1), (3, 1), (4, 1)}
    assert len([w for w in widths if w == (4, 1)]) >= 4


def test_cancel_during_a_prefill_moves_it_down(one_thread):
    """A sequence leaves while another prompt is half prefilled in the slot after the running ones:
    the prefill moves down with the last running sequence, and every answer is still exact."""
    model = _model()
    prompts = _prompts(model, (4, 6, 30), seed=3)
    refs = [uncached_greedy(model, p, 8) for p in prompts]
    decoder = Decoder(model, max_batch=3, prefill_chunk=5)
    a, b = decoder.add(prompts[0], GREEDY)[0], decoder.add(prompts[1], GREEDY)[0]
    while len(decoder.running) < 2:
        decoder.step()
    c = decoder.add(prompts[2], GREEDY)[0]
    decoder.step()  # c: first chunk prefilled in slot 2
    assert decoder.waiting and decoder.waiting[0].fed == 5
    early = [t.id for t in a.tokens]
    decoder.cancel(a)  # b moves to slot 0, c's half prefill to slot 1
    assert b.slot == 0 and decoder.running == [b]
    out = drain(decoder, [b, c], [8, 8])
    assert early == refs[0][:len(early)] and out == refs[1:]


def test_the_decoders_chunked_prefill_memory_is_the_cache_plus_a_chunk_of_activations():
    """A long prompt prefilled by the decoder: peak tensor memory minus the cache budget of its slot
    is the same at 2K and 8K tokens of context and grows with the chunk (the 1M-token prefill's bound)."""
    from kinetic.infer.cache import cache_budget
    from kinetic.infer.memory import PeakTensorMemory

    config = make_config("latent-grouped-mtp").replace(max_position_embeddings=8192)
    model = randomize(NemotronHForCausalLM(config), seed=71).eval()
    ids = torch.randint(0, config.vocab_size, (8192,), generator=torch.Generator().manual_seed(72)).tolist()

    def excess(tokens: int, chunk: int) -> int:
        decoder = Decoder(model, max_batch=1, prefill_chunk=chunk)
        with PeakTensorMemory() as mem:
            decoder.add(ids[:tokens], SamplingParams(temperature=0, max_new_tokens=1))
            decoder.run()  # the prefill, and the one token it draws
        return mem.peak_bytes - cache_budget(config, decoder.capacity(tokens, 1))["total"]

    short, long, wide = excess(2048, 64), excess(8192, 64), excess(8192, 128)
    assert short > 0
    assert abs(long - short) <= 16 * 1024
    assert long < wide < 3 * long


# ---------------------------------------------------------------------- n samples of one prompt
def test_samples_of_one_prompt_share_the_prefill_and_equal_solo_runs(monkeypatch):
    """n=4 samples: one prefill (forwards of the prompt counted), then each sample's tokens equal a
    solo run seeded with seed + j (float64, so batching cannot flip a draw by rounding)."""
    model = _model(dtype=torch.float64)
    prompt = _prompts(model, (13,))[0]
    params = SamplingParams(temperature=0.9, top_k=40, seed=11)
    prefills = []
    real = Eager.forward

    def spy(self, model, ids, cache, logits_to_keep=1):
        prefills.append(ids.shape[1])
        return real(self, model, ids, cache, logits_to_keep)

    monkeypatch.setattr(Eager, "forward", spy)
    decoder = Decoder(model, max_batch=4)
    together = drain(decoder, decoder.add(prompt, params, n=4), [10] * 4)
    assert prefills == [13]
    solo = []
    for j in range(4):
        one = Decoder(model, max_batch=1)
        solo += drain(one, one.add(prompt, SamplingParams(temperature=0.9, top_k=40, seed=11 + j)), [10])
    assert together == solo
    assert len({tuple(t) for t in together}) > 1  # different seeds, different samples


# ---------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("speculative", [False, True])
def test_sampler_logprobs_equal_the_scorer(speculative, one_thread):
    """The log-probs the sampler reports for its tokens, raw and processed (temperature, top-k, top-p,
    min-p; greedy), equal teacher-forced scoring of the same tokens, up to the float32 rounding of a
    cached decode step against a full forward (measured up to 2e-5 on these realistic-scale random
    weights; docs/performance.md). A token outside the processed distribution would give -inf."""
    model = _model()
    for params in (SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=1),
                   SamplingParams(temperature=1.3, min_p=0.05, seed=2), GREEDY):
        decoder = Decoder(model, max_batch=4, speculative=speculative, draft_tokens=2,
                          speculative_max_batch=4)
        seqs = [s for p in _prompts(model, (5, 11)) for s in decoder.add(p, params, n=2)]
        drain(decoder, seqs, [15] * 4)
        scored = score(model, [s.prompt + [t.id for t in s.tokens[:15]] for s in seqs],
                       [len(s.prompt) for s in seqs], params=params)
        for s, row in zip(seqs, scored, strict=True):
            got = torch.tensor([[t.logprob, t.processed_logprob] for t in s.tokens[:15]])
            want = torch.tensor([[t.logprob, t.processed_logprob] for t in row])
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
            assert torch.isfinite(got).all()
            if params.greedy:
                assert (got[:, 1] == 0).all()
            else:
                assert (got[:, 1] < 0).all()


def test_prompt_logprobs_and_top_alternatives_equal_the_scorer():
    model = _model()
    prompt = _prompts(model, (12,))[0]
    decoder = Decoder(model, max_batch=1)
    (seq,) = decoder.add(prompt, SamplingParams(temperature=0, prompt_logprobs=3, logprobs=2))
    drain(decoder, [seq], [3])
    assert seq.prompt_logprobs[0] is None and len(seq.prompt_logprobs) == len(prompt)
    (want,) = score(model, [prompt], top=3)
    for got, ref in zip(seq.prompt_logprobs[1:], want, strict=True):
        assert got.id == ref.id and math.isclose(got.logprob, ref.logprob, abs_tol=1e-5)
        assert [i for i, _ in got.top] == [i for i, _ in ref.top]
    first = seq.tokens[0]
    assert len(first.top) == 2 and first.top[0][0] == first.id  # greedy: the top alternative
    assert first.top[0][1] == first.logprob


def test_cancelling_the_first_of_a_group_mid_prefill_keeps_the_scored_prompt():
    model = _model()
    prompt = _prompts(model, (20,))[0]
    decoder = Decoder(model, max_batch=2, prefill_chunk=8)
    a, b = decoder.add(prompt, SamplingParams(temperature=0, prompt_logprobs=0), n=2)
    decoder.step()  # 8 of 20 prompt tokens scored, on a
    decoder.cancel(a)
    drain(decoder, [b], 2)
    (want,) = score(model, [prompt])
    assert b.prompt_logprobs[0] is None and [t.id for t in b.prompt_logprobs[1:]] == prompt[1:]
    torch.testing.assert_close(torch.tensor([t.logprob for t in b.prompt_logprobs[1:]]),
                               torch.tensor([t.logprob for t in want]), atol=1e-5, rtol=0)


def test_sequence_logprobs_is_differentiable_and_equals_score():
    model = _model()
    ids = torch.tensor(_prompts(model, (9, 9)))
    raw, processed = sequence_logprobs(model, ids, SamplingParams(temperature=0.5))
    (raw.sum() + processed.sum()).backward()
    assert model.lm_head.weight.grad is not None
    scored = score(model, ids.tolist())
    torch.testing.assert_close(raw.detach(), torch.tensor([[t.logprob for t in row] for row in scored]))


# ---------------------------------------------------------------------- sampling
def test_tiny_temperature_is_greedy_and_never_nan():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0 - 1e-6]])
    for t in (1e-45, 1e-30, 1e-6):
        params = SamplingParams(temperature=t)
        assert params.greedy
        choice = sample(logits, [params], [(0, 0)])
        assert int(choice.tokens[0]) == 1 and choice.processed_logprob[0] == 0
    # just above the threshold the distribution is sharp but finite
    lp = processed_logprobs(logits[0] * 1e4, SamplingParams(temperature=2e-5))
    assert torch.isfinite(lp.exp()).all() and math.isclose(float(lp.exp().sum()), 1.0, rel_tol=1e-6)


def test_sample_draws_the_processed_distribution():
    """20,000 draws (Gumbel-max over the processed log-probs, the noise of draws 0 .. 19,999 of one
    seed): every token's count within 4.5 standard
    errors of its probability, none outside the top-k/top-p set, and each draw's reported processed
    log-prob is its probability's log."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    params = SamplingParams(temperature=0.7, top_k=4, top_p=0.95)
    want = processed_logprobs(logits, params).exp()
    rows = 20_000
    choice = sample(logits.expand(rows, -1), [params] * rows, [(7, i) for i in range(rows)])
    counts = torch.bincount(choice.tokens, minlength=6).float()
    assert counts[want == 0].sum() == 0 and (want > 0).sum() < 6
    sd = torch.sqrt(rows * want * (1 - want)).clamp(min=1.0)
    assert bool(((counts - rows * want).abs() <= 4.5 * sd).all()), (counts / rows, want)
    torch.testing.assert_close(choice.processed_logprob, want.log()[choice.tokens])


def test_min_p_and_processed_logprobs():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = min_p_filter(probs.log(), 0.2) > -math.inf
    assert kept.tolist() == [True, True, True, False]  # 0.05 < 0.2 * 0.5
    lp = processed_logprobs(probs.log(), SamplingParams(min_p=0.2))
    torch.testing.assert_close(lp.exp(), torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    raw, proc = token_logprobs(probs.log().expand(2, -1), torch.tensor([0, 1]), SamplingParams(temperature=0))
    assert math.isclose(float(raw[1]), math.log(0.3), rel_tol=1e-6)
    assert proc.tolist() == [0.0, -math.inf]  # greedy: a point mass on the argmax
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=-0.1)


def test_count_per_expert_matches_bincount():
    flat = torch.randint(0, 7, (50,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(count_per_expert(flat, 9), torch.bincount(flat, minlength=9))
