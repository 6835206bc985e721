"""Model-only entry points for decoding: ``generate``, a batch of prompts' continuations, greedy or
sampled, with transformers' ``generate`` conventions (what ``NemotronHForCausalLM.generate`` runs),
and ``speculative_generate``, one prompt's continuation drafted by the MTP layers. The engine
(:mod:`kinetic.infer.engine`) adds text, stop conditions and streaming to the same decoders."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kinetic.infer.cache import InferenceCache
from kinetic.infer.sampling import top_k_filter
from kinetic.infer.speculative import SpecStats, SpeculativeDecoder, prefill, target_distribution
from kinetic.infer.static_cache import bucket_capacity, static_decoder
from kinetic.infer.static_speculative import StaticSpeculativeDecoder


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int = 20,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_token_id: int | list[int] | None = -1,
    generator: torch.Generator | None = None,
    cuda_graph: bool | None = None,
    compile: bool = False,
) -> torch.Tensor:
    """Prompt + up to ``max_new_tokens`` tokens: greedy by default, decoding with an InferenceCache. A
    sequence that emits EOS is padded with ``pad_token_id`` afterwards; generation stops when all have
    finished. ``eos_token_id=-1`` means the config's EOS ids; ``None`` disables stopping.
    ``cuda_graph`` (default: on for CUDA models) replays each decode step as one captured CUDA graph
    (see :mod:`kinetic.infer.static_cache`); if capture fails it warns and runs eagerly.
    ``compile=True`` (for CPU; ignored when a CUDA graph is used) runs decode steps through
    ``torch.compile``: faster per token after a compilation of some seconds, which later calls with
    the same batch size and capacity bucket reuse."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 when do_sample=True")
    config = model.config
    eos = config.eos_token_ids if eos_token_id == -1 else (
        [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int)
        else list(eos_token_id))
    pad = config.pad_token_id if config.pad_token_id is not None else (eos or [0])[0]
    was_training = model.training
    model.eval()
    cache = InferenceCache()
    capacity = input_ids.shape[1] + max_new_tokens
    if compile:  # a bucketed capacity lets later calls reuse the compiled step
        capacity = bucket_capacity(capacity)
    cache.reserve(capacity)
    ids = input_ids
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    eos_t = torch.tensor(eos, device=ids.device, dtype=ids.dtype)
    step_input = ids
    graph = cuda_graph if cuda_graph is not None else input_ids.is_cuda
    decoder = None
    for i in range(max_new_tokens):
        if i == 1 and (graph or compile):
            decoder = static_decoder(model, cache, capacity, ids.shape[0], graph)
        if decoder is not None:
            logits = decoder.step(step_input)
        else:
            logits = model(step_input, cache, return_mtp=False, logits_to_keep=1).logits[:, -1]
        token = pick(logits, do_sample, temperature, top_k, generator)
        token = torch.where(finished, torch.full_like(token, pad), token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        if eos:
            finished |= torch.isin(token, eos_t)
            if bool(finished.all()):
                break
        step_input = token[:, None]
    model.train(was_training)
    return ids


def pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
         generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row of ``logits`` (b, vocab): the argmax, or a sample at
    ``temperature`` from the ``top_k`` best."""
    if not do_sample:
        return logits.argmax(-1)
    probs = F.softmax(top_k_filter(logits / temperature, top_k or 0), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.inference_mode()
def speculative_generate(model: torch.nn.Module, prompt: list[int], max_new_tokens: int, *,
                         draft_tokens: int = 3, temperature: float = 0.0, top_k: int = 0,
                         top_p: float = 1.0, generator: torch.Generator | None = None,
                         prefill_chunk: int = 0, compile: bool = False, static: bool | None = None,
                         cuda_graph: bool = False) -> tuple[list[int], SpecStats]:
    """Up to ``max_new_tokens`` new tokens for one prompt (no stop tokens), drafting with MTP.
    A model-only entry point for tests and benchmarks; :class:`kinetic.infer.Engine` uses the same
    :class:`SpeculativeDecoder` with text, stop conditions and streaming.

    ``compile=True`` runs the rounds on fixed shapes through ``torch.compile``
    (:mod:`kinetic.infer.static_speculative`; the first call compiles, which takes seconds);
    ``static=True`` uses those fixed-shape rounds without compiling them, and ``cuda_graph=True``
    (greedy, on CUDA) replays each round as one captured CUDA graph."""
    model.eval()
    static = (compile or cuda_graph) if static is None else static
    capacity = len(prompt) + max_new_tokens + draft_tokens + 1
    cache = InferenceCache()
    cache.reserve(capacity)
    dec = SpeculativeDecoder(model, cache, target_distribution(temperature, top_k, top_p), generator)
    first = prefill(model, cache, prompt, prefill_chunk, dec)
    if max_new_tokens <= 0:
        return [], dec.stats
    out = [first]
    if static and draft_tokens > 0 and len(out) < max_new_tokens:
        capacity = bucket_capacity(capacity)  # one compiled shape for prompts of similar lengths
        fixed = StaticSpeculativeDecoder(dec, draft_tokens, capacity, compile=compile and not cuda_graph,
                                         graph=cuda_graph)
        while len(out) < max_new_tokens:
            out += fixed.round()
        return out[:max_new_tokens], dec.stats
    while len(out) < max_new_tokens:
        out += dec.round(min(draft_tokens, max_new_tokens - len(out) - 1))
    return out[:max_new_tokens], dec.stats
