"""Model-only entry points over the decoder (:mod:`kinetic.infer.decoder`): ``generate``, a batch of
prompts' continuations with transformers' ``generate`` conventions (what
``NemotronHForCausalLM.generate`` runs), and ``speculative_generate``, one prompt's continuation
drafted by the MTP layers, with the round statistics."""

from __future__ import annotations

import torch

from kinetic.infer.decoder import Decoder, SpecStats
from kinetic.infer.execution import Compiled
from kinetic.infer.sampling import SamplingParams, sequence_seed


def _seed(seed: int | None, generator: torch.Generator | None) -> int:
    if seed is None and generator is not None:
        seed = int(torch.randint(2**62, (), generator=generator))
    return sequence_seed(seed)


def _run(decoder: Decoder, seqs, stop: set[int]) -> list[list[int]]:
    """Step until every sequence has ended (the decoder stops each at its ``max_new_tokens``),
    ending one at its first ``stop`` id; their token ids."""
    live = {id(s) for s in seqs}
    while decoder.busy:
        for s, tokens in decoder.step():
            if id(s) in live and any(t.id in stop for t in tokens):
                cut = next(k for k, t in enumerate(s.tokens) if t.id in stop)
                del s.tokens[cut + 1:]
                live.discard(id(s))
                decoder.cancel(s)
    return [[t.id for t in s.tokens] for s in seqs]


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int = 20,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    min_p: float = 0.0,
    eos_token_id: int | list[int] | None = -1,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    compile: bool = False,
    speculative: bool = False,
    draft_tokens: int = 2,
) -> torch.Tensor:
    """Prompt + up to ``max_new_tokens`` tokens for each row of ``input_ids`` (batch, seq): greedy by
    default. A row that emits EOS is padded with ``pad_token_id`` afterwards; ``eos_token_id=-1``
    means the config's EOS ids, ``None`` disables stopping. Sampling draws row i with seed ``seed + i``
    (``seed`` defaults to one drawn from ``generator``, or from fresh randomness). The rows are
    decoded together by the
    decoder; ``compile=True`` runs its decode steps through ``torch.compile`` (CUDA graphs on CUDA;
    the first call compiles, which takes seconds), ``speculative=True`` drafts ``draft_tokens`` tokens
    per step with the MTP layers (greedy output unchanged)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 when do_sample=True")
    config = model.config
    eos = config.eos_token_ids if eos_token_id == -1 else (
        [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int)
        else list(eos_token_id))
    pad = config.pad_token_id if config.pad_token_id is not None else (eos or [0])[0]
    if max_new_tokens == 0:
        return input_ids
    was_training = model.training
    model.eval()
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                            top_k=top_k or 0, top_p=top_p, min_p=min_p)
    rows = input_ids.shape[0]
    decoder = Decoder(model, max_batch=rows, speculative=speculative, draft_tokens=draft_tokens,
                      execution=Compiled() if compile else None)
    base = _seed(seed, generator)
    seqs = [decoder.add(row, params, seeds=[base + i])[0] for i, row in enumerate(input_ids.tolist())]
    try:
        new = _run(decoder, seqs, set(eos))
    finally:
        model.train(was_training)
    width = max(map(len, new))
    tail = torch.full((rows, width), pad, dtype=input_ids.dtype, device=input_ids.device)
    for i, ids in enumerate(new):
        tail[i, :len(ids)] = torch.tensor(ids, dtype=input_ids.dtype)
    return torch.cat([input_ids, tail], dim=1)


@torch.inference_mode()
def speculative_generate(model: torch.nn.Module, prompt: list[int], max_new_tokens: int, *,
                         draft_tokens: int = 3, temperature: float = 0.0, top_k: int = 0,
                         top_p: float = 1.0, generator: torch.Generator | None = None,
                         seed: int | None = None, prefill_chunk: int = 8192) -> tuple[list[int], SpecStats]:
    """Up to ``max_new_tokens`` new tokens for one prompt (no stop tokens), drafting ``draft_tokens``
    tokens per step with MTP (``draft_tokens=0``: plain decoding), and the rounds' statistics. With a
    ``seed`` (or a ``generator`` to draw one from) sampled tokens equal plain decoding's."""
    model.eval()
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    decoder = Decoder(model, max_batch=1, speculative=draft_tokens > 0, draft_tokens=draft_tokens,
                      prefill_chunk=prefill_chunk)
    if max_new_tokens <= 0:
        return [], decoder.stats
    (seq,) = decoder.add(prompt, params, seeds=[_seed(seed, generator)])
    (tokens,) = _run(decoder, [seq], set())
    return tokens, decoder.stats
