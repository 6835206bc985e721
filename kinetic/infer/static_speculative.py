"""MTP speculative decoding on fixed shapes, so that ``torch.compile`` can fuse its steps (the CPU
fast path; the same fixed-address steps are what a CUDA graph would capture).

The algorithm is :mod:`kinetic.infer.speculative`'s; only the state lives in two
:class:`~kinetic.infer.static_cache.StaticCache` objects (the main model's and the MTP layer's), and
every step has one shape for the whole generation:

* verify: the main model over ``[x_T, d_1 .. d_k]`` -- always k+1 tokens -- as a tracked forward;
  ``keep(1 + n)`` then commits the accepted prefix;
* commit: the MTP layer over the same k+1 positions (main hidden state, token after it), also
  tracked, then ``keep(1 + n)``. Positions past the accepted ones carry whatever token; causal
  attention keeps them from touching the kept positions, and their cache entries lie past ``pos``,
  masked until overwritten;
* draft: one MTP position at a time, fed its own block output (as in the dynamic version); the MTP
  cache's position and any Mamba states of the MTP pattern are put back afterwards.

Greedy rounds are one call (``_greedy_round``): the accept rule runs on the device too, so the host
reads the round's tokens once, and ``torch.compile`` fuses the whole round. Sampled rounds run verify,
commit and the draft steps as separate calls, with the speculative-sampling rule on the host. The
compiled functions are kept on the model, one set per draft length, and compiled on first use. The
last round may produce more tokens than asked; the caller truncates.
"""

from __future__ import annotations

import torch

from kinetic import ops
from kinetic.infer.speculative import SpecStats, SpeculativeDecoder, accept_drafts
from kinetic.infer.static_cache import StaticCache, capture_stream, compile_step


def _verify(model, ids: torch.Tensor, cache: StaticCache):
    out = model(ids, cache, return_mtp=False)
    return out.logits[0].float(), out.hidden_states


def _commit(model, hidden: torch.Tensor, next_ids: torch.Tensor, cache: StaticCache):
    x, normed = model.mtp.forward_depth(0, hidden, model.backbone.embeddings(next_ids), cache)
    return x, ops.lm_head_logits(normed, model.lm_head.weight)[0].float()


def _draft(model, x: torch.Tensor, token: torch.Tensor, cache: StaticCache):
    x, normed = model.mtp.forward_depth(0, x, model.backbone.embeddings(token), cache)
    cache.advance()
    return x, model.lm_head(normed[:, -1])[0].float()


def _greedy_round(model, ids: torch.Tensor, main: StaticCache, mtp: StaticCache):
    """A whole greedy round without reading anything back to the host: verify ``ids`` = [last
    token, k drafts] (1, k+1), accept on the device, commit the kept positions to the MTP cache and
    draft the next k tokens. Returns the round's tokens (k+1; the first n+1 are the new ones), n (a
    0-d tensor) and the next round's ids [next token, k drafts]."""
    k = ids.shape[1] - 1
    main.is_tracking = True
    out = model(ids, main, return_mtp=False)
    main.is_tracking = False
    target = out.logits[0].argmax(-1)  # (k+1,)
    drafts = ids[0, 1:]
    n = (target[:k] == drafts).long().cumprod(0).sum()  # length of the agreeing prefix
    main.keep(n + 1)
    nxt = target.gather(0, n.view(1))
    steps = torch.arange(k + 1, device=ids.device)
    tokens = torch.where(steps < n, torch.cat([drafts, nxt]), nxt)  # drafts[:n], nxt, padding
    mtp.is_tracking = True
    x, normed = model.mtp.forward_depth(0, out.hidden_states, model.backbone.embeddings(tokens.view(1, -1)),
                                        mtp)
    mtp.is_tracking = False
    mtp.keep(n + 1)
    x, normed = x.index_select(1, n.view(1)), normed.index_select(1, n.view(1))
    saved = mtp.snapshot()  # the drafts below are undone
    token = model.lm_head(normed[:, -1]).argmax(-1, keepdim=True)  # (1, 1)
    nexts = [nxt.view(1, 1), token]
    for _ in range(k - 1):
        x, normed = model.mtp.forward_depth(0, x, model.backbone.embeddings(token), mtp)
        mtp.advance()
        token = model.lm_head(normed[:, -1]).argmax(-1, keepdim=True)
        nexts.append(token)
    mtp.restore(saved)
    return tokens, n, torch.cat(nexts, dim=1)


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy with canonical strides: a compiled step guards on its inputs' strides (size-1
    dimensions included), and slices of different outputs would each compile it again."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


_EAGER = (_verify, _commit, _draft, _greedy_round)


def _functions(model, draft_tokens: int, compile: bool, device: torch.device) -> tuple:
    if not compile:
        return _EAGER
    store = model.__dict__.setdefault("_compiled_speculative", {})
    if draft_tokens not in store:
        store[draft_tokens] = tuple(compile_step(f, device) for f in _EAGER)
    return store[draft_tokens]


class StaticSpeculativeDecoder:
    """Continues a prefilled :class:`SpeculativeDecoder` (main cache, MTP cache and first token)
    with fixed-shape rounds of ``draft_tokens`` drafts. ``capacity`` bounds the tokens the caches
    will hold (prompt + new tokens + draft_tokens + 1 is enough); the compiled steps are shaped by
    it, so round it up (``bucket_capacity``) to share them between prompts."""

    def __init__(self, dec: SpeculativeDecoder, draft_tokens: int, capacity: int,
                 compile: bool = True, fused: bool | None = None, graph: bool = False) -> None:
        if draft_tokens < 1:
            raise ValueError(f"draft_tokens must be >= 1 for fixed-shape speculative decoding, got "
                             f"{draft_tokens}")
        self.model, self.k, self.dec = dec.model, draft_tokens, dec
        track = draft_tokens + 1
        self.main = StaticCache(dec.cache, capacity, track=track)
        self.mtp = StaticCache(dec.drafter.cache, capacity, track=track)
        x, normed = dec.drafter._last
        self.x = _fresh(x)
        self.logits = self.model.lm_head(normed[0, -1]).float()  # the MTP's logits for draft 1
        self.verify_fn, self.commit_fn, self.draft_fn, self.round_fn = _functions(
            self.model, draft_tokens, compile, self.main.pos.device)
        self._compile = compile
        self.pick = dec.pick  # logits -> (draft token, its distribution or None)
        # greedy: each round is one call (_greedy_round); else verify, commit and k-1 draft steps
        self.fused = dec.distribution is None if fused is None else fused
        if self.fused and dec.distribution is not None:
            raise ValueError("fused rounds are greedy: sampling needs fused=False")
        self.ids: torch.Tensor | None = None  # fused: [next token, its k drafts]
        # graph=True: the fused round is captured once as a CUDA graph and replayed (not yet run on a
        # GPU in this project's tests at the time of writing: see tests/test_cuda.py)
        if graph and not self.fused:
            raise ValueError("CUDA graphs capture greedy (fused) rounds only; sampling needs graph=False")
        if graph and self.main.pos.device.type != "cuda":
            raise ValueError("CUDA graphs need the model and caches on a CUDA device")
        self.graph = graph
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_out: torch.Tensor | None = None  # [n, the round's k+1 tokens]

    def _call(self, name: str, *args):
        fn = getattr(self, name)
        try:
            return fn(self.model, *args)
        except Exception as err:
            if not self._compile:
                raise
            import warnings

            warnings.warn(f"torch.compile failed ({type(err).__name__}: {str(err)[:200]}); speculative "
                          "decoding runs eagerly", stacklevel=3)
            self._compile = False
            self.model.__dict__.pop("_compiled_speculative", None)
            self.verify_fn, self.commit_fn, self.draft_fn, self.round_fn = _EAGER
            return getattr(self, name)(self.model, *args)

    def round(self) -> list[int]:
        """One draft + verify + commit round; returns the new tokens (1 .. draft_tokens + 1)."""
        return self._fused_round() if self.fused else self._stepwise_round()

    def _fused_round(self) -> list[int]:
        dec = self.dec
        if self.ids is None:  # the first drafts come from the prefill's MTP output
            drafts, _ = self._draft_tokens(eager=True)  # once: not worth compiling the draft step
            self.ids = torch.tensor([[dec.last_token, *drafts]], device=self.main.pos.device)
        if self.graph:
            if self._graph is None:
                self._capture()
            self._graph.replay()  # also writes the next round's ids into self.ids
            out = self._graph_out.tolist()  # the round's one read back
            n, new = out[0], out[1:out[0] + 2]
        else:
            tokens, n, self.ids = self._call("round_fn", self.ids, self.main, self.mtp)
            n = int(n)
            new = tokens[:n + 1].tolist()
        dec.last_token = new[-1]
        self._count(n)
        return new

    def _capture(self, warmup: int = 2) -> None:
        """Capture one fused round reading and rewriting ``self.ids`` (as CUDAGraphDecoder does for
        a plain step: warm-up rounds on a side stream, whose state changes are then undone)."""
        device = self.main.pos.device
        saved = self.main.snapshot(), self.mtp.snapshot()
        ids = self.ids.clone()
        stream = capture_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(warmup):
                    _greedy_round(self.model, self.ids, self.main, self.mtp)
        finally:
            torch.cuda.current_stream(device).wait_stream(stream)
            self.main.restore(saved[0])
            self.mtp.restore(saved[1])
            self.ids.copy_(ids)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream), torch.inference_mode():
            tokens, n, nxt = _greedy_round(self.model, self.ids, self.main, self.mtp)
            self.ids.copy_(nxt)
            self._graph_out = torch.cat([n.view(1), tokens])
        self._graph = graph

    def _count(self, accepted: int) -> None:
        this = SpecStats(rounds=1, drafted=self.k, accepted=accepted, emitted=accepted + 1)
        self.dec.stats.add(this)
        if self.dec.totals is not None:
            self.dec.totals.add(this)

    def _draft_tokens(self, eager: bool = False) -> tuple[list[int], torch.Tensor | None]:
        """k drafts from the MTP state after the last commit (one step each); the MTP cache is put
        back afterwards."""
        k, dev = self.k, self.main.pos.device
        saved = self.mtp.snapshot()
        x, logits = self.x, self.logits
        drafts, dists = [], []
        for j in range(k):
            token, dist = self.pick(logits)
            drafts.append(token)
            dists.append(dist)
            if j + 1 < k:
                token = torch.tensor([[token]], device=dev)
                x, logits = (_draft(self.model, _fresh(x), token, self.mtp) if eager
                             else self._call("draft_fn", _fresh(x), token, self.mtp))
        self.mtp.restore(saved)
        return drafts, (torch.stack(dists) if dists[0] is not None else None)

    def _stepwise_round(self) -> list[int]:
        dec, k, dev = self.dec, self.k, self.main.pos.device
        # 1. draft k tokens
        drafts, q = self._draft_tokens()
        # 2. verify them with the main model; keep the accepted prefix
        ids = torch.tensor([[dec.last_token, *drafts]], device=dev)
        with self.main.tracking():
            target, hidden = self._call("verify_fn", ids, self.main)
        p = None if dec.distribution is None else dec.distribution(target)
        n, nxt = accept_drafts(drafts, p, q, target, dec.generator)
        self.main.keep(1 + n)
        new = drafts[:n] + [nxt]
        # 3. commit the kept positions to the MTP cache; its output at the last one drafts next
        next_ids = torch.tensor([new + [nxt] * (k - n)], device=dev)
        with self.mtp.tracking():
            xs, logits = self._call("commit_fn", hidden, next_ids, self.mtp)
        self.mtp.keep(1 + n)
        self.x, self.logits = _fresh(xs[:, n:n + 1]), logits[n]
        dec.last_token = nxt
        self._count(n)
        return new
