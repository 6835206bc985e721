"""MTP speculative decoding as the decoder's policy: the slot cache's tracked forward + ``keep`` equals
feeding only the kept tokens, row by row; speculative greedy equals plain greedy on random,
partially-accepted (oracle drafts) and trained checkpoints, alone and in a batch; the acceptance rule
and the whole sampler reproduce the target distribution; engine integration."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from conftest import drain, make_config, randomize, uncached_greedy

from kinetic import NemotronHForCausalLM, preset
from kinetic.data.tokenizer import EOS_ID, train_tokenizer
from kinetic.infer import Engine, SamplingParams
from kinetic.infer.cache import cache_budget
from kinetic.infer.decoder import Decoder
from kinetic.infer.generate import speculative_generate
from kinetic.infer.sampling import processed_logprobs
from kinetic.infer.slots import SlotCache
from kinetic.model.mamba2 import ssd_chunk_scan, ssd_recurrence


def _model(name="latent-grouped-mtp", seed=0, **overrides):
    torch.manual_seed(seed)
    return randomize(NemotronHForCausalLM(make_config(name, **overrides)), seed=seed, dt_bias=0.5).eval()


def _prompt(model, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(model.config.vocab_size, (n,), generator=g).tolist()


# ---------------------------------------------------------------------- cache rollback
def test_ssd_recurrence_matches_the_chunked_scan():
    g = torch.Generator().manual_seed(0)
    b, seq, h, p, gr, n = 2, 7, 6, 4, 3, 5
    x, B, C = torch.randn(b, seq, h, p, generator=g), torch.randn(b, seq, gr, n, generator=g), \
        torch.randn(b, seq, gr, n, generator=g)
    dt = torch.rand(b, seq, h, generator=g) * 0.5
    A = -torch.rand(h, generator=g) * 3
    init = torch.randn(b, h, p, n, generator=g)
    y_ref, final_ref = ssd_chunk_scan(x, dt, A, B, C, chunk_size=4, initial_state=init)
    y, states = ssd_recurrence(x, dt, A, B, C, init)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(states[:, -1], final_ref, atol=1e-5, rtol=1e-5)
    for t in range(1, seq):  # the state after t positions is the final state of the first t positions
        final_t = ssd_chunk_scan(x[:, :t], dt[:, :t], A, B[:, :t], C[:, :t], 4, init)[1]
        torch.testing.assert_close(states[:, t - 1], final_t, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["latent-grouped-mtp", "mtp-two-depths"])
def test_keep_equals_feeding_only_the_kept_tokens_per_row(name):
    """Three slots at different lengths verify 5 tokens each in one tracked forward and keep 1, 3
    and 5 of them: each slot then equals a slot that was fed only its kept tokens."""
    model = _model(name)
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    prompts = [torch.randint(vocab, (1, n), generator=g) for n in (9, 4, 13)]
    extra = torch.randint(vocab, (3, 5), generator=g)
    probe = torch.randint(vocab, (3, 1), generator=g)
    keep = [1, 3, 5]

    def fill(cache, feeds):
        for slot, ids in enumerate(feeds):
            cache.open(slice(slot, slot + 1), ids.shape[1])
            model(ids, cache)
            cache.close()

    with torch.no_grad():
        tracked = SlotCache()
        fill(tracked, prompts)
        tracked.open(slice(0, 3), 5, tracking=True)
        model(extra, tracked)
        tracked.keep(keep)
        ref = SlotCache()
        fill(ref, [torch.cat([p, extra[i:i + 1, :keep[i]]], 1) for i, p in enumerate(prompts)])
        assert tracked.lengths[:3] == ref.lengths[:3] == [10, 7, 18]
        for key in ref.ssm:
            torch.testing.assert_close(tracked.conv[key][:3], ref.conv[key][:3])
            torch.testing.assert_close(tracked.ssm[key][:3], ref.ssm[key][:3], atol=1e-5, rtol=1e-5)
        # and the caches continue identically (KV entries past the kept lengths are masked, then overwritten)
        outs = []
        for cache in (tracked, ref):
            cache.open(slice(0, 3), 1)
            outs.append(model(probe, cache).logits)
            cache.close()
        torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="keep"):
        tracked.open(slice(0, 3), 2, tracking=True)
        tracked.keep([1, 3, 1])


def test_snapshot_restore_undoes_draft_steps():
    model = _model("mtp-two-depths")
    ids = torch.randint(model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache, ref = SlotCache(), SlotCache()
        for c in (cache, ref):
            c.open(slice(0, 2), 8)
            model(ids[:, :8], c)
            c.close()
        snap = cache.snapshot(slice(0, 2))
        for t in range(8, 12):  # four single-token steps, then undo them
            cache.open(slice(0, 2), 1)
            model(ids[:, t:t + 1], cache)
            cache.close()
        cache.restore(snap)
        assert cache.lengths[:2] == [8, 8]
        outs = []
        for c in (cache, ref):
            c.open(slice(0, 2), 2)
            outs.append(model(ids[:, 8:10], c).logits)
            c.close()
    torch.testing.assert_close(outs[0], outs[1])


# ---------------------------------------------------------------------- greedy is lossless
@pytest.mark.parametrize("name", ["latent-grouped-mtp", "mtp-two-depths"])
def test_speculative_greedy_equals_plain_greedy_random_weights(name, one_thread):
    model = _model(name)
    prompt = _prompt(model, 17, seed=3)
    ref = uncached_greedy(model, prompt, 30)
    for k in (1, 3, 6):
        out, stats = speculative_generate(model, prompt, 30, draft_tokens=k)
        assert out == ref, k
        assert stats.drafted > 0 and stats.emitted >= 29
        assert min(stats.draft_s, stats.verify_s, stats.commit_s) > 0
        assert "verify_s" not in stats.as_dict()
    out, _ = speculative_generate(model, prompt, 30, draft_tokens=3, prefill_chunk=5)
    assert out == ref


def test_partially_accepted_drafts_roll_back_exactly(monkeypatch, one_thread):
    """Drafts that agree with the target for a varying number of tokens (an oracle drafter that
    corrupts one position per round, differently in each row of a batch of three prompts) exercise
    every accept length, per row, and the rollback after it."""
    model = _model()
    prompts = [_prompt(model, n, seed=4 + n) for n in (11, 6, 14)]
    refs = [uncached_greedy(model, p, 40) for p in prompts]
    accepted = set()
    rounds = [0]

    def oracle(self, seqs, rows, k):  # replaces Decoder._draft
        drafts = []
        for i, s in enumerate(seqs):
            ref, done = refs[prompts.index(s.prompt)], len(s.tokens)
            bad = (rounds[0] + i) % (k + 1)  # the first wrong draft; == k means all k are right
            accepted.add(bad)
            drafts.append([ref[done + j] if j < bad else (ref[done + j] + 1) % model.config.vocab_size
                           for j in range(k)])
        rounds[0] += 1
        return torch.tensor(drafts)

    monkeypatch.setattr(Decoder, "_draft", oracle)
    decoder = Decoder(model, max_batch=3, speculative=True, draft_tokens=4, speculative_max_batch=3)
    seqs = [decoder.add(p, SamplingParams(temperature=0))[0] for p in prompts]
    assert drain(decoder, seqs, 35) == [r[:35] for r in refs]
    assert accepted == {0, 1, 2, 3, 4}
    assert decoder.stats.accepted > 0 and decoder.stats.mean_accepted_length > 2


@pytest.fixture(scope="module")
def trained():
    """A tiny MTP model trained for a few seconds on a repeating 12-token pattern with noise, so its
    MTP layer drafts well and the main model's predictions are confident but not trivial."""
    torch.manual_seed(0)
    cfg = replace(preset("tiny"), vocab_size=32, num_nextn_predict_layers=1)
    model = NemotronHForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    pattern = torch.randint(3, 32, (12,), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for _ in range(60):
        start = torch.randint(0, 12, (8,), generator=g)
        rows = torch.stack([pattern.roll(-int(s)).repeat(6)[:65] for s in start])
        noise = torch.rand(rows.shape, generator=g) < 0.05
        rows = torch.where(noise, torch.randint(3, 32, rows.shape, generator=g), rows)
        out = model(rows[:, :-1], labels=rows)
        loss = out.loss + 0.5 * sum(out.mtp_losses)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return model.eval(), pattern


def _trained_case(trained, new_tokens=40):
    """The trained model, a prompt of its pattern and plain greedy's continuation."""
    model, pattern = trained
    prompt = pattern.repeat(2).tolist()[:19]
    return model, prompt, uncached_greedy(model, prompt, new_tokens)


def test_speculative_greedy_equals_plain_greedy_trained(trained, one_thread):
    model, prompt, ref = _trained_case(trained)
    out, stats = speculative_generate(model, prompt, 40, draft_tokens=4)
    assert out == ref
    assert stats.acceptance_rate > 0.5, stats.as_dict()  # the MTP layer learned to draft
    assert stats.mean_accepted_length > 2.5
    # in a batch with other prompts, rows accepting different numbers of drafts per step
    model, pattern = trained
    prompts = [prompt, pattern.tolist()[3:10], [5, 9, 30, 2]]
    refs = [ref] + [uncached_greedy(model, p, 40) for p in prompts[1:]]
    out = model.generate(torch.tensor([prompts[0]]), 40, speculative=True, draft_tokens=4, eos_token_id=None)
    assert out[0, len(prompt):].tolist() == ref
    decoder = Decoder(model, max_batch=3, speculative=True, draft_tokens=4, speculative_max_batch=3)
    seqs = [decoder.add(p, SamplingParams(temperature=0))[0] for p in prompts]
    assert drain(decoder, seqs, 40) == refs
    # by default a batch of more than one sequence takes plain steps, and a sequence's MTP layer
    # catches up on them when it drafts again: still the same tokens, and the drafts stay good
    decoder = Decoder(model, max_batch=3, speculative=True, draft_tokens=4)
    seqs = [decoder.add(p, SamplingParams(temperature=0, max_new_tokens=70))[0] for p in prompts]
    limits = [70, 25, 20]  # the first runs alone after the others leave
    assert drain(decoder, seqs, limits) == [uncached_greedy(model, p, n) for p, n in zip(prompts, limits,
                                                                                        strict=True)]
    assert decoder.stats.rounds >= 5 and decoder.stats.acceptance_rate > 0.5, decoder.stats.as_dict()


# ---------------------------------------------------------------------- sampling is lossless
@pytest.mark.parametrize("name", ["latent-grouped-mtp", "trained"])
def test_speculative_sampling_equals_plain_sampling_draw_for_draw(name, trained, one_thread):
    """A seeded sampled sequence is the same with and without drafting (each token is the draw of
    its own index, and verification keeps drafts only up to the first that differs), alone and in a
    batch whose rows accept different numbers of drafts."""
    model = trained[0] if name == "trained" else _model(name)
    prompts = [_prompt(model, n, seed=n) for n in (9, 4, 13)]
    for params in (SamplingParams(temperature=0.9, seed=5), SamplingParams(temperature=0.6, top_k=5, seed=8)):
        plain = Decoder(model, max_batch=3)
        want = drain(plain, [plain.add(p, params)[0] for p in prompts], 30)
        for k in (1, 3):
            spec = Decoder(model, max_batch=3, speculative=True, draft_tokens=k, speculative_max_batch=3)
            assert drain(spec, [spec.add(p, params)[0] for p in prompts], 30) == want, (k, params)
            assert spec.stats.rounds > 0
            if name == "trained":
                assert spec.stats.acceptance_rate > 0.3, spec.stats.as_dict()  # drafts share the noise


def _assert_matches(counts: torch.Tensor, probs: torch.Tensor, z: float = 4.5) -> None:
    """Every cell within z standard errors of its expected count (binomial); a deterministic check
    given the fixed seeds, loose enough for the sample size and tight enough to catch a wrong rule."""
    n = counts.sum()
    expected = n * probs
    sd = torch.sqrt(n * probs * (1 - probs)).clamp(min=1.0)
    assert bool(((counts - expected).abs() <= z * sd).all()), (counts / n, probs)


def test_speculative_sampling_has_the_target_distribution_end_to_end(one_thread):
    """A random model with a 6-token vocabulary: the second and third generated tokens (decided by
    verification rounds with rejections and acceptances) follow the exact distribution computed
    by enumerating the target model's conditionals."""
    model = _model(vocab_size=6)
    temperature = 1.3
    params = SamplingParams(temperature=temperature)
    prompt = [1, 4, 2, 5]
    with torch.no_grad():
        def probs(seq):
            logits = model(torch.tensor([seq]), return_mtp=False).logits[0, -1]
            return processed_logprobs(logits, params).exp()

        exact = torch.zeros(6, 6)
        p1 = probs(prompt)
        for a in range(6):
            p2 = probs(prompt + [a])
            for b in range(6):
                exact[b] += p1[a] * p2[b] * probs(prompt + [a, b])
    exact = exact.flatten()  # joint of (second, third) marginalised over the first token
    counts = torch.zeros(36)
    drafted = accepted = 0
    for seed in range(1000):
        out, st = speculative_generate(model, prompt, 3, draft_tokens=2, temperature=temperature,
                                       seed=seed)
        counts[out[1] * 6 + out[2]] += 1
        drafted, accepted = drafted + st.drafted, accepted + st.accepted
    assert 0 < accepted < drafted  # both acceptances and rejections happened
    _assert_matches(counts, exact)
    assert math.isclose(float(exact.sum()), 1.0, rel_tol=1e-5)


# ---------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["The quick brown fox jumps over the lazy dog. " * 20], vocab_size=300)


def test_engine_speculative_by_default_and_equal_to_plain(tok, one_thread):
    torch.manual_seed(0)
    model = NemotronHForCausalLM(replace(preset("tiny"), vocab_size=tok.get_vocab_size()))
    spec = Engine(model, tok, prefill_chunk=3)
    plain = Engine(model, tok, speculative=False)
    assert spec.speculative and not plain.speculative
    params = SamplingParams(max_new_tokens=23, temperature=0, ignore_eos=True)
    a, b = spec.generate(["The quick", "lazy"], params), plain.generate(["The quick", "lazy"], params)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert all(len(r.token_ids) == 23 for r in a)
    assert spec.spec_stats.rounds > 0 and plain.spec_stats.rounds == 0
    # a stop token inside an accepted run ends the sequence there
    stop = b[0].token_ids[5]
    res = spec.generate(["The quick"], replace(params, stop_token_ids=(stop,)))[0]
    assert res.token_ids == b[0].token_ids[:b[0].token_ids.index(stop) + 1] and res.finish_reason == "stop"
    # seeded sampling is reproducible with speculation on
    sp = SamplingParams(max_new_tokens=15, temperature=0.9, seed=7)
    assert spec.generate(["fox"], sp) == spec.generate(["fox"], sp)
    budget = spec.memory_budget(100)
    assert budget["weights"] == sum(p.numel() * 4 for p in model.parameters())
    assert "cache budget for 100 tokens" in spec.describe_budget(100)
    assert spec.capacity(5, 40) == 45 + 3 + 1 and plain.capacity(5, 40) == 45 + 1  # + k + 1 drafting
    # the budget --show-budget prints is what a sequence's main cache really holds after its prefill
    for engine in (Engine(model, tok), Engine(model, tok, speculative=False)):  # fresh caches
        (seq,) = engine.start("The quick brown fox", replace(params, max_new_tokens=40))
        engine.step()
        reserved = engine.capacity(len(seq.prompt_ids), 40)
        assert engine.decoder.cache.nbytes() == cache_budget(model.config, reserved)["total"]
        engine.cancel(seq)
    small = Engine(model, tok, max_context=30, speculative=False)
    (seq,) = small.start("The quick brown fox", replace(params, max_new_tokens=1000))
    small.step()  # the context limit, not max_new_tokens, bounds the reservation
    assert small.decoder.cache.capacity == small.capacity(len(seq.prompt_ids), 1000) == 31


def test_engine_speculative_options_are_checked(tok):
    model = NemotronHForCausalLM(replace(preset("tiny"), vocab_size=tok.get_vocab_size(),
                                         num_nextn_predict_layers=0))
    assert not Engine(model, tok).speculative
    with pytest.raises(ValueError, match="MTP"):
        Engine(model, tok, speculative=True)
    with pytest.raises(ValueError, match="draft_tokens"):
        Engine(model, tok, draft_tokens=-1)
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(model, tok, prefill_chunk=0)
    assert EOS_ID in Engine(model, tok).eos_token_ids
