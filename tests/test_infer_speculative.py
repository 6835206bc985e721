"""MTP speculative decoding: cache rollback (``tracking``/``keep``, snapshots) equals feeding only the
kept tokens; speculative greedy equals plain greedy on random, partially-accepted (oracle drafts) and
trained checkpoints; the sampling rule and the whole sampler reproduce the target distribution;
chunked prefill; memory budget; engine integration."""

from __future__ import annotations

import itertools
import math
import shutil
from dataclasses import replace

import pytest
import torch
from conftest import make_config, randomize

from kinetic import NemotronHForCausalLM, preset
from kinetic.data.tokenizer import EOS_ID, train_tokenizer
from kinetic.infer import Engine, SamplingParams
from kinetic.infer.cache import InferenceCache, cache_budget
from kinetic.infer.generate import speculative_generate
from kinetic.infer.speculative import (
    MTPDrafter,
    SpecStats,
    SpeculativeDecoder,
    accept_drafts,
    target_distribution,
)
from kinetic.model.mamba2 import ssd_chunk_scan, ssd_recurrence


def _model(name="latent-grouped-mtp", seed=0, **overrides):
    torch.manual_seed(seed)
    return randomize(NemotronHForCausalLM(make_config(name, **overrides)), seed=seed, dt_bias=0.5).eval()


def _prompt(model, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(model.config.vocab_size, (n,), generator=g).tolist()


def _plain_greedy(model, prompt, n):
    ids = model.generate(torch.tensor([prompt]), max_new_tokens=n, eos_token_id=None)
    return ids[0, len(prompt):].tolist()


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
@pytest.mark.parametrize("new", [1, 5])
def test_keep_equals_feeding_only_the_kept_tokens(name, new):
    model = _model(name)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(model.config.vocab_size, (1, 9), generator=g)
    extra = torch.randint(model.config.vocab_size, (1, new), generator=g)
    probe = torch.randint(model.config.vocab_size, (1, 3), generator=g)
    with torch.no_grad():
        for n in range(1, new + 1):
            tracked = InferenceCache()
            model(prompt, tracked)
            with tracked.tracking():
                model(extra, tracked)
            tracked.keep(n)
            ref = InferenceCache()
            model(prompt, ref)
            model(extra[:, :n], ref)
            assert tracked.seqlen == ref.seqlen == 9 + n
            for key in ref.ssm:
                torch.testing.assert_close(tracked.conv[key], ref.conv[key])
                torch.testing.assert_close(tracked.ssm[key], ref.ssm[key], atol=1e-5, rtol=1e-5)
            # and the caches continue identically (KV entries past the kept length are overwritten)
            torch.testing.assert_close(model(probe, tracked).logits, model(probe, ref).logits,
                                       atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="keep"):
        c = InferenceCache()
        with c.tracking():
            model(extra, c)
        c.keep(new + 1)


def test_snapshot_restore_undoes_steps_without_copies():
    model = _model()
    ids = torch.randint(model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = InferenceCache()
        model(ids[:, :8], cache)
        snap = cache.snapshot()
        expected = model(ids[:, 8:9], InferenceCache()).logits  # shape only
        for t in range(8, 12):  # four single-token steps, then undo them
            model(ids[:, t:t + 1], cache)
        cache.restore(snap)
        ref = InferenceCache()
        model(ids[:, :8], ref)
        assert cache.seqlen == 8
        out, want = model(ids[:, 8:10], cache).logits, model(ids[:, 8:10], ref).logits
    assert out.shape[-1] == expected.shape[-1]
    torch.testing.assert_close(out, want)


def test_reserve_and_budget():
    model = _model()
    cfg = model.config
    cache = InferenceCache()
    cache.reserve(40)
    with torch.no_grad():
        model(torch.zeros(1, 25, dtype=torch.long), cache)
    budget = cache_budget(cfg, 25)
    assert cache.nbytes() == budget["total"]
    assert budget["kv"] == cfg.hybrid_override_pattern.count("*") * 2 * cfg.num_key_value_heads \
        * cfg.head_dim * 4 * 25
    key = next(iter(cache._k))
    assert cache._k[key].shape[2] == 40  # allocated once at the reserved size, no doubling slack
    assert cache_budget(cfg, 25, mtp=True)["attention_layers"] == 2  # main "*" + the MTP's "*"


# ---------------------------------------------------------------------- greedy is lossless
@pytest.mark.parametrize("name", ["latent-grouped-mtp", "mtp-two-depths"])
def test_speculative_greedy_equals_plain_greedy_random_weights(name, one_thread):
    model = _model(name)
    prompt = _prompt(model, 17, seed=3)
    ref = _plain_greedy(model, prompt, 30)
    for k in (1, 3, 6):
        out, stats = speculative_generate(model, prompt, 30, draft_tokens=k)
        assert out == ref, k
        assert stats.drafted > 0 and stats.emitted == 29
        # every round's phases are timed and summed; the counts alone make up as_dict()
        assert min(stats.draft_s, stats.verify_s, stats.commit_s) > 0
        assert "verify_s" not in stats.as_dict()
        twice = SpecStats()
        twice.add(stats)
        twice.add(stats)
        assert twice.verify_s == pytest.approx(2 * stats.verify_s) and twice.rounds == 2 * stats.rounds
    out, _ = speculative_generate(model, prompt, 30, draft_tokens=3, prefill_chunk=5)
    assert out == ref


def test_partially_accepted_drafts_roll_back_exactly(monkeypatch, one_thread):
    """Drafts that agree with the target for a varying number of tokens (an oracle drafter that
    corrupts one position per round) exercise every accept length and the rollback after it."""
    model = _model()
    prompt = _prompt(model, 11, seed=4)
    ref = _plain_greedy(model, prompt, 60)
    rounds = itertools.count()
    accepted = set()
    done = [1]  # tokens emitted so far (the prefill emits the first)

    def oracle(self, k, pick):
        bad = next(rounds) % (k + 1)  # the first wrong draft; == k means all k are right
        drafts = [ref[done[0] + j] if j < bad else (ref[done[0] + j] + 1) % model.config.vocab_size
                  for j in range(k)]
        accepted.add(bad)
        return drafts, None

    real_round = SpeculativeDecoder.round

    def counted_round(self, max_drafts):
        new = real_round(self, max_drafts)
        done[0] += len(new)
        return new

    monkeypatch.setattr(MTPDrafter, "draft", oracle)
    monkeypatch.setattr(SpeculativeDecoder, "round", counted_round)
    out, stats = speculative_generate(model, prompt, 60, draft_tokens=4)
    assert out == ref
    assert accepted == {0, 1, 2, 3, 4}
    assert stats.accepted > 0 and stats.mean_accepted_length > 2


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
    return model, prompt, _plain_greedy(model, prompt, new_tokens)


def test_speculative_greedy_equals_plain_greedy_trained(trained, one_thread):
    model, prompt, ref = _trained_case(trained)
    out, stats = speculative_generate(model, prompt, 40, draft_tokens=4)
    assert out == ref
    assert stats.acceptance_rate > 0.5, stats.as_dict()  # the MTP layer learned to draft
    assert stats.mean_accepted_length > 2.5


# ---------------------------------------------------------------------- fixed shapes (compile path)
def _static_decoder(model, prompt, k, capacity, compile=False, fused=None):
    from kinetic.infer.speculative import prefill
    from kinetic.infer.static_speculative import StaticSpeculativeDecoder

    cache = InferenceCache()
    dec = SpeculativeDecoder(model, cache, None)
    first = prefill(model, cache, prompt, 0, dec)
    return first, StaticSpeculativeDecoder(dec, k, capacity, compile=compile, fused=fused)


@pytest.mark.parametrize("name", ["latent-grouped-mtp", "mtp-two-depths"])
def test_fixed_shape_speculative_greedy_equals_plain_greedy(name, one_thread):
    """The fixed-shape rounds (StaticCache tracking, padded MTP commit, drafts undone by resetting
    the MTP position and Mamba states -- "mtp-two-depths" has a Mamba layer in its MTP pattern)."""
    model = _model(name)
    prompt = _prompt(model, 17, seed=3)
    ref = _plain_greedy(model, prompt, 30)
    for k in (1, 3, 6):
        out, stats = speculative_generate(model, prompt, 30, draft_tokens=k, static=True)
        assert out == ref, k
        assert stats.drafted > 0 and stats.emitted >= 29


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("name", ["latent-grouped-mtp", "mtp-two-depths", "trained"])
def test_fixed_shape_drafts_equal_dynamic_drafts(name, fused, trained, one_thread):
    """Round by round the fixed-shape decoder proposes the very drafts of the dynamic one: its MTP
    commit (padded to k+1 positions) and the undoing of each round's drafts leave the MTP cache as
    the dynamic decoder's. (Greedy output is the same whatever the drafts; this checks the drafts.)
    Stepwise rounds pick each draft on the host; fused rounds (one call, accepted on the device)
    hand over the next round's drafts in ``ids``."""
    from kinetic.infer.speculative import prefill

    model, prompt = (trained[0], trained[1].repeat(2).tolist()[:19]) if name == "trained" else \
        (_model(name), None)
    prompt = prompt or _prompt(model, 13, seed=5)
    k, seen = 3, {"dynamic": [], "fixed": []}

    def recorder(pick, into):
        def wrapped(logits):
            token, dist = pick(logits)
            into.append(token)
            return token, dist
        return wrapped

    cache = InferenceCache()
    dec = SpeculativeDecoder(model, cache, None)
    prefill(model, cache, prompt, 0, dec)
    dec.pick = recorder(dec.pick, seen["dynamic"])
    first, fixed = _static_decoder(model, prompt, k, capacity=len(prompt) + 80, fused=fused)
    fixed.pick = recorder(fixed.pick, seen["fixed"])
    for _ in range(12):
        assert dec.round(k) == fixed.round()
        if fused:
            seen["fixed"] += fixed.ids[0, 1:].tolist()  # the next round's (the first k were picked)
    seen["fixed"] = seen["fixed"][:12 * k]
    assert seen["fixed"] == seen["dynamic"] and len(seen["fixed"]) == 12 * k
    assert fixed.dec.stats.as_dict() == dec.stats.as_dict()


def test_fixed_shape_rounds_roll_back_every_accept_length(one_thread):
    """An oracle drafter that is right for 0..k tokens in turn: every accept length, and the MTP
    commit of the kept positions, leave both caches as plain decoding would."""
    model = _model()
    prompt = _prompt(model, 11, seed=4)
    ref = _plain_greedy(model, prompt, 60)
    k = 3
    first, fixed = _static_decoder(model, prompt, k, capacity=len(prompt) + 60 + k + 1, fused=False)
    out, rounds, accepted = [first], itertools.count(), []
    while len(out) < 60:
        bad, j, done = next(rounds) % (k + 1), itertools.count(), len(out)

        def oracle(logits, bad=bad, j=j, done=done):
            i = next(j)
            token = ref[done + i] if done + i < len(ref) else 0
            return (token if i < bad else (token + 1) % model.config.vocab_size), None

        fixed.pick = oracle
        new = fixed.round()
        accepted.append(len(new) - 1)
        out += new
    assert out[:60] == ref
    assert set(accepted) == set(range(k + 1))


def test_fixed_shape_options_are_checked(one_thread):
    from kinetic.infer.speculative import prefill
    from kinetic.infer.static_speculative import StaticSpeculativeDecoder

    model = _model()
    prompt = _prompt(model, 9, seed=6)
    for distribution, fused, graph, match in ((None, None, True, "CUDA device"),
                                               (target_distribution(0.7), True, False, "greedy"),
                                               (target_distribution(0.7), None, True, "greedy"),
                                               (None, None, False, "draft_tokens")):
        cache = InferenceCache()
        dec = SpeculativeDecoder(model, cache, distribution)
        prefill(model, cache, prompt, 0, dec)
        with pytest.raises(ValueError, match=match):
            StaticSpeculativeDecoder(dec, 0 if match == "draft_tokens" else 2, 64, compile=False,
                                     fused=fused, graph=graph)


def test_fixed_shape_speculative_trained_and_sampling(trained, one_thread):
    model, prompt, ref = _trained_case(trained)
    out, stats = speculative_generate(model, prompt, 40, draft_tokens=4, static=True)
    assert out == ref
    assert stats.mean_accepted_length > 2.5, stats.as_dict()
    # sampling: the same rounds as the dynamic decoder draw the same random numbers, so up to the
    # last round (where the dynamic one drafts fewer) the samples are the same
    kw = dict(draft_tokens=3, temperature=0.8, top_k=20)
    a, _ = speculative_generate(model, prompt, 40, generator=torch.Generator().manual_seed(9), **kw)
    b, _ = speculative_generate(model, prompt, 40, generator=torch.Generator().manual_seed(9), static=True,
                                **kw)
    assert a[:40 - 4] == b[:40 - 4]


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_speculative_equals_plain_greedy(trained, one_thread):
    model, prompt, ref = _trained_case(trained)
    out, stats = speculative_generate(model, prompt, 40, draft_tokens=2, compile=True)
    assert out == ref
    assert stats.mean_accepted_length > 2.0, stats.as_dict()
    compiled = model.__dict__["_compiled_speculative"][2]
    out, _ = speculative_generate(model, prompt[:15], 25, draft_tokens=2, compile=True)
    assert out == _plain_greedy(model, prompt[:15], 25)
    assert model.__dict__["_compiled_speculative"][2] is compiled  # reused, not rebuilt


# ---------------------------------------------------------------------- sampling is lossless
def test_acceptance_rule_samples_the_target_distribution(one_thread):
    """Rows of p (target) and q (drafter) fixed: the emitted tokens of one round must be distributed
    as p, whatever q is -- first token exactly p_1, second token p_2 given the first was a draft."""
    g = torch.Generator().manual_seed(5)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0], [0.1, 0.1, 0.2, 0.3, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = torch.tensor([[0.1, 0.1, 0.1, 0.2, 0.5], [0.6, 0.1, 0.1, 0.1, 0.1]])
    n = 20_000
    first = torch.zeros(5)
    second = torch.zeros(5)
    for _ in range(n):
        drafts = [int(torch.multinomial(q[j], 1, generator=g)) for j in range(2)]
        kept, nxt = accept_drafts(drafts, p, q, torch.zeros(3, 5), g)
        emitted = drafts[:kept] + [nxt]
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[1]] += 1
    assert first[4] == 0  # p gives token 4 no mass; q proposes it half the time
    _assert_matches(first, p[0])
    _assert_matches(second, p[1])
    # a drafter equal to the target is always accepted
    kept, _ = accept_drafts([0, 3], p[:3], p[:2], torch.zeros(3, 5), g)
    assert kept == 2 or p[0, 0] < 1


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
    dist = target_distribution(temperature)
    prompt = [1, 4, 2, 5]
    with torch.no_grad():
        def probs(seq):
            return dist(model(torch.tensor([seq]), return_mtp=False).logits[0, -1])

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
        g = torch.Generator().manual_seed(seed)
        out, st = speculative_generate(model, prompt, 3, draft_tokens=2, temperature=temperature,
                                       generator=g)
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
    # the budget --show-budget prints is what a sequence's main cache really holds after its prefill
    for engine in (spec, plain, Engine(model, tok, compile_decode=True)):
        seq = engine.start("The quick brown fox", replace(params, max_new_tokens=40))
        engine.step(seq)
        reserved = engine.capacity(len(seq.prompt_ids), 40)
        assert seq.capacity == reserved
        assert seq.cache.allocated_bytes() == cache_budget(model.config, reserved)["total"]
    assert Engine(model, tok, compile_decode=True).capacity(5, 40) == 256 + 3  # bucket + k + 1


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
