"""Teacher-forced scoring: the log-probs a model gives to given tokens.

:func:`sequence_logprobs` is the differentiable core -- one forward over a batch, then
:func:`kinetic.infer.sampling.token_logprobs` at every position -- for training losses (policy
gradients, distillation) and for :func:`score`, which scores continuations in batches without
gradients. The sampler reports its tokens' log-probs through the same ``token_logprobs`` on the logits
that chose them, so a sampled sequence scored here gets back the numbers it was sampled with (up to
the float rounding of a cached step against a full forward).
"""

from __future__ import annotations

import torch

from kinetic.infer.decoder import Token
from kinetic.infer.sampling import SamplingParams, token_logprobs, top_logprobs


def sequence_logprobs(model, input_ids: torch.Tensor, params: SamplingParams | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (b, seq-1) of tokens 1.. of each row of ``input_ids`` (b, seq) given the tokens
    before them: under the raw distribution and under the one ``params`` samples from (temperature,
    top-k, top-p, min-p; the raw one when None). Differentiable."""
    logits = model(input_ids, return_mtp=False).logits[:, :-1]
    return token_logprobs(logits, input_ids[:, 1:], params)


@torch.no_grad()
def score(model, sequences: list[list[int]], start: int | list[int] = 1, *,
          params: SamplingParams | None = None, top: int = 0, batch_size: int = 8) -> list[list[Token]]:
    """For each sequence, its tokens from position ``start`` (one per sequence, or shared; >= 1) on,
    each with its log-probs given everything before it (and its ``top`` most likely alternatives).
    Sequences are right-padded into batches of ``batch_size``: a causal model's positions do not see
    the padding after them."""
    starts = [start] * len(sequences) if isinstance(start, int) else list(start)
    if len(starts) != len(sequences):
        raise ValueError(f"{len(starts)} starts for {len(sequences)} sequences")
    for i, (seq, s) in enumerate(zip(sequences, starts, strict=True)):
        if not 1 <= s <= len(seq):
            raise ValueError(f"start={s} of sequence {i} must be in [1, {len(seq)}] (its first token has "
                             "no context to be scored in)")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[list[Token]] = []
    try:
        for b in range(0, len(sequences), batch_size):
            batch, first = sequences[b:b + batch_size], starts[b:b + batch_size]
            width = max(map(len, batch))
            ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
            for i, seq in enumerate(batch):
                ids[i, :len(seq)] = torch.tensor(seq, device=device)
            logits = model(ids, return_mtp=False).logits[:, :-1]
            raw, processed = token_logprobs(logits, ids[:, 1:], params)
            for i, seq in enumerate(batch):
                span = slice(first[i] - 1, len(seq) - 1)  # position p-1 predicts token p
                tops = ([list(zip(t.tolist(), v.tolist(), strict=True)) for v, t in
                         zip(*top_logprobs(logits[i, span], top), strict=True)] if top
                        else [None] * (span.stop - span.start))
                out.append([Token(t, a, p, k) for t, a, p, k in
                            zip(seq[first[i]:], raw[i, span].tolist(), processed[i, span].tolist(), tops,
                                strict=True)])
    finally:
        model.train(was_training)
    return out
