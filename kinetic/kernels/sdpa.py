"""Attention through torch's ``scaled_dot_product_attention`` and its flash kernels: the fast paths of
:func:`kinetic.ops.causal_attention` and :func:`kinetic.ops.cached_attention`.

- whole sequences: SDPA with ``is_causal`` (grouped heads in the kernel, or, for CPU training, keys
  and values repeated per query head, whose flash backward is faster);
- a decode step: on CPUs the query heads sharing a KV head stacked as its rows (each cached key read
  once); on CUDA in float32 over a long cache, split-KV ("flash decoding") partitions merged by their
  log-sum-exp;
- a chunk after cached tokens: two flash passes (over the cache, over the chunk causally) merged by
  their log-sum-exp, so no (chunk, context) mask is built; a few queries over a short context: one
  call with a small mask;
- a fixed-capacity cache (CUDA graphs): split-KV over the whole buffer with no host reads, or a
  boolean mask of the written positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kinetic.kernels import Implementation, always

# A few queries over a short context (a speculative verification, an MTP commit) take one SDPA call
# with a small explicit mask: on CPU faster than the two flash passes below up to about this many
# keys, slower beyond, where the masked call reads the cache once per query head (benchmarks/ops.py).
SMALL_MASK_QUERIES = 16
SMALL_MASK_KEYS = 1024

# CPU flash attention that also returns the log-sum-exp of each query's scores (private ATen op; when
# a torch build lacks it, chunks fall back to an explicit mask)
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _two_passes(q: torch.Tensor) -> bool:
    """Whether a chunk after cached tokens runs as two attention passes merged by their log-sum-exp
    (no (chunk, context) mask): on CPU, and on CUDA in float32, where SDPA cannot take a lower-right
    causal bias without building it (flash attention, which can, is half precision only)."""
    if q.is_cuda:
        return q.dtype == torch.float32
    return _FLASH_CPU is not None


def _attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool):
    """Attention of q (b, h, s, d) over k, v with the same number of heads, and the log-sum-exp of
    each query's scaled scores (b, h, s): the CPU flash kernel, or on CUDA the memory-efficient one
    (float32 included; its log-sum-exp may be padded past s)."""
    if q.is_cuda:
        efficient = torch.ops.aten._scaled_dot_product_efficient_attention
        out, lse = efficient(q, k, v, None, True, 0.0, causal)[:2]  # (attn_bias, compute_log_sumexp, ...)
        return out, lse[..., :q.shape[2]]
    out, lse = _FLASH_CPU(q, k, v, 0.0, causal)[:2]
    return out, lse


def _chunk_after_past(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> torch.Tensor:
    """Queries of a prefill chunk, q (b, heads, s, d), over ``past`` cached keys plus the chunk's own s
    keys causally, as two attention passes merged by their log-sum-exp -- no (s, past + s) mask, so a
    chunk's memory does not grow with the context. In the pass over the cache every query sees every
    key, so the query heads sharing a KV head are stacked as its rows (each cached key read once; on
    CUDA the cache is cut into partitions, see ``_grouped_attention_lse``)."""
    b, heads, s, d = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    o_past, lse_past = _grouped_attention_lse(q, k[:, :, :past], v[:, :, :past],
                                              _split_kv_partitions(q, kv_heads, past))
    k_new, v_new = k[:, :, past:], v[:, :, past:]
    if group > 1:  # chunk-sized copies only
        k_new, v_new = k_new.repeat_interleave(group, 1), v_new.repeat_interleave(group, 1)
    o_new, lse_new = _attention_lse(q, k_new, v_new, True)
    lse_new = lse_new.unsqueeze(-1)
    top = torch.maximum(lse_past, lse_new)
    w_past, w_new = (lse_past - top).exp_(), (lse_new - top).exp_()
    out = (o_past.float() * w_past).add_(o_new.float() * w_new).div_(w_past + w_new)
    return out.to(q.dtype)


def _lower_right_causal(q_len: int, kv_len: int, q: torch.Tensor):
    """Mask for queries at the last ``q_len`` of ``kv_len`` positions. On CUDA in half precision a
    ``CausalBias`` lets SDPA run a flash kernel without building the (q_len, kv_len) mask, so a chunk
    of a long prefill needs memory for the chunk only; elsewhere the boolean mask is built -- for the
    few queries over a short context that ``SMALL_MASK_QUERIES`` / ``SMALL_MASK_KEYS`` bound, or where
    ``_two_passes`` is false. Other chunks take ``_chunk_after_past`` and need no mask."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from torch.nn.attention.bias import causal_lower_right

        return causal_lower_right(q_len, kv_len)
    kv_pos = torch.arange(kv_len, device=q.device)
    q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
    return kv_pos[None, :] <= q_pos[:, None]


# cuDNN's attention builds an execution plan per shape; a decode step or prefill chunk has a new KV
# length every call, and the rebuild costs more than the whole decode step (benchmarks/decode.py on a
# GPU). The other CUDA backends have no per-shape setup.
_CUDA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# CUDA float32 decode over a long cache, and CUDA-graph steps in any dtype (their capacity-wide mask):
# no SDPA kernel takes grouped-query heads there, and its fallback copies the whole cache per step
# (keys and values repeated per query head; benchmarks/long_context.py); the split-KV path reads it
# in place. From this many cached keys on (below, SDPA is faster for small heads and its copies are
# small).
SPLIT_KV_MIN_KEYS = 8192
SPLIT_KV_BLOCK = 4096  # keys per partition at least


def _grouped_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           partitions: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries q (b, heads, s, d) over every key of k, v (b, kv_heads, L, d), which may be a slice of a
    larger cache buffer: the query heads sharing a KV head are stacked as that head's rows, so each
    key is read once and nothing is repeated per head. Returns the output (b, heads, s, d) and the
    log-sum-exp of each query's scores (b, heads, s, 1), both float32 where merged.

    ``partitions`` > 1 ("flash decoding"): the keys are cut into that many equal parts (plus the
    remainder), which run as the batch of one kernel call and are merged by their log-sum-exp --
    on CUDA a few query rows over a long cache otherwise occupy a thread block per KV head."""
    b, heads, s, d = q.shape
    kv_heads = k.shape[1]
    rows = q.reshape(b, kv_heads, heads // kv_heads * s, d)
    if partitions <= 1:
        out, lse = _attention_lse(rows, k, v, False)
        return out.reshape(b, heads, s, d), lse.reshape(b, heads, s, 1)
    # the batch and KV-head dims of a cache slice merge into one (a view), which becomes the kernel's
    # head dim, so the parts of every entry are views of the buffer in one call
    o, lse = _merge_parts(*_partition_lse(rows.flatten(0, 1)[None], k.flatten(0, 1), v.flatten(0, 1),
                                          partitions))
    return o.reshape(b, heads, s, d), lse.reshape(b, heads, s, 1)


def _partition_lse(rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, partitions: int):
    """rows (1, H, R, d) over k, v (H, L, d) -- H = batch x KV heads -- cut into ``partitions`` equal
    parts of keys (views, one batched call) plus the remainder: each part's output (parts, H, R, d),
    float32, and log-sum-exp (parts, H, R)."""
    length = k.shape[1]
    block = length // partitions
    main = partitions * block
    parts = []
    if block > 0:
        kp = k[:, :main].unflatten(1, (partitions, block)).transpose(0, 1)  # (P, H, block, d)
        vp = v[:, :main].unflatten(1, (partitions, block)).transpose(0, 1)
        parts.append(_attention_lse(rows.expand(partitions, -1, -1, -1).contiguous(), kp, vp, False))
    if main < length:
        parts.append(_attention_lse(rows, k[None, :, main:], v[None, :, main:], False))
    return torch.cat([p[0].float() for p in parts]), torch.cat([p[1] for p in parts])


def _merge_parts(o: torch.Tensor, lse: torch.Tensor):
    """Attention over the union of the parts' keys from each part's output o (parts, ..., d) and
    log-sum-exp (parts, ...): returns both, float32. A part with log-sum-exp -inf adds nothing."""
    lse = lse.unsqueeze(-1)
    top = lse.amax(0)
    w = (lse - top).exp_()
    total = w.sum(0)
    return (o.float() * w).sum(0).div_(total), (total.log_() + top).squeeze(-1)


def _split_kv_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, partitions: int) -> torch.Tensor:
    """One query per head, q (b, heads, 1, d), over all of k, v: split-KV attention in q's dtype."""
    return _grouped_attention_lse(q, k, v, partitions)[0].to(q.dtype)


def _split_kv_partitions(q: torch.Tensor, kv_heads: int, length: int) -> int:
    """Partitions of the keys for ``_grouped_attention_lse`` on CUDA: about two thread blocks per
    multiprocessor (a block per partition, KV head and 64 query rows), each partition at least
    SPLIT_KV_BLOCK keys. One elsewhere (the CPU kernel parallelizes over the heads it is given)."""
    if not q.is_cuda:
        return 1
    row_blocks = -(-(q.shape[1] // kv_heads * q.shape[2]) // 64)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    return max(1, min(-(-2 * sms // (kv_heads * row_blocks)), length // SPLIT_KV_BLOCK))


def _static_split_kv(q: torch.Tensor, capacity: int) -> bool:
    """Whether a static-cache step (CUDA graph) attends by ``_static_split_kv_attention``: on CUDA from
    SPLIT_KV_MIN_KEYS of capacity. There SDPA would take the boolean mask, which no CUDA kernel with
    grouped heads accepts, and its fallback repeats the whole KV buffer per query head every step."""
    return q.is_cuda and capacity >= SPLIT_KV_MIN_KEYS and not torch.is_grad_enabled()


def _masked_lse(rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor):
    """Attention with an additive bias, written out (for a block of keys): rows (kv, R, d) over
    k, v (kv, N, d); returns the output (kv, R, d) and log-sum-exp (kv, R), float32, both 0 / -inf
    for rows whose keys are all masked."""
    scores = rows.float() @ k.float().transpose(-1, -2) * rows.shape[-1] ** -0.5 + bias
    lse = scores.logsumexp(-1)
    finite = torch.isfinite(lse).unsqueeze(-1)
    probs = torch.where(finite, (scores - lse.unsqueeze(-1)).exp(), 0.0)
    return probs @ v.float(), lse


def _static_split_kv_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                               k_buf: torch.Tensor, v_buf: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """A static-cache step's attention without a (queries, capacity) mask and without host reads:
    the L new queries q (b, heads, L, d), at positions pos .. pos + L - 1 (``pos`` a device tensor),
    see every cached key before ``pos`` and the new keys k_new, v_new (b, kv, L, d) causally. The
    full-capacity buffers (the new keys already written) are cut into equal partitions attended
    without a mask in one batched call; partitions past ``pos`` get zero weight, the one holding
    ``pos`` is redone with its keys from ``pos`` on masked, and the new keys are a small causal
    block; all are merged by their log-sum-exp. Fixed shapes, so a CUDA graph can capture it; the
    work covers the whole capacity, as the masked attention did."""
    b, heads, length, d = q.shape
    kv_heads, capacity = k_buf.shape[1], k_buf.shape[2]
    group = heads // kv_heads
    rows = q.reshape(b, kv_heads, group * length, d)  # row g * L + i: query i of head kv * group + g
    partitions = _split_kv_partitions(q, kv_heads, capacity)
    block = capacity // partitions
    device = q.device
    keys = torch.arange(block, device=device)
    edge = torch.div(pos, block, rounding_mode="floor")  # the partition that holds pos
    start = edge * block
    prefix_bias = torch.where(start + keys < pos, 0.0, float("-inf"))  # (block,)
    block_keys = (start + keys).clamp_(max=capacity - 1)
    query_of_row = torch.arange(group * length, device=device) % length
    new_bias = torch.where(torch.arange(length, device=device) <= query_of_row[:, None], 0.0, float("-inf"))
    rows, k_buf, v_buf = rows.flatten(0, 1), k_buf.flatten(0, 1), v_buf.flatten(0, 1)  # views
    o_parts, lse_parts = _partition_lse(rows[None], k_buf, v_buf, partitions)
    index = torch.arange(lse_parts.shape[0], device=device)
    lse_parts = lse_parts.masked_fill((index >= edge).view(-1, 1, 1), float("-inf"))  # from pos on
    o_edge, lse_edge = _masked_lse(rows, k_buf.index_select(1, block_keys), v_buf.index_select(1, block_keys),
                                   prefix_bias)
    o_new, lse_new = _masked_lse(rows, k_new.flatten(0, 1), v_new.flatten(0, 1), new_bias)
    o, _ = _merge_parts(torch.cat([o_parts, o_edge[None], o_new[None]]),
                        torch.cat([lse_parts, lse_edge[None], lse_new[None]]))
    return o.reshape(b, heads, length, d).to(q.dtype)


def _sdpa_kernel(q, k, v, mask, causal, gqa):
    if q.is_cuda:
        with sdpa_kernel(_CUDA_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


# ---------------------------------------------------------------------- the implementations
def causal_sdpa(q, k, v):
    """Whole-sequence causal attention, q (b, l, heads, d), k/v (b, l, kv_heads, d)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads > kv_heads and not q.is_cuda and torch.is_grad_enabled() and q.requires_grad:
        # CPU training: the flash kernel's backward is faster over keys and values repeated per query
        # head than with grouped heads (benchmarks/ops.py)
        k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        return _sdpa_kernel(q, k, v, None, True, False).transpose(1, 2)
    return _sdpa_kernel(q, k, v, None, True, True).transpose(1, 2)


def _decode(q, start, k):
    return isinstance(start, int) and q.shape[2] == 1 and k.shape[2] == start + 1


def _split_kv_decode_fits(q, k, v, start):
    return (_decode(q, start, k) and q.is_cuda and q.dtype == torch.float32
            and k.shape[2] >= SPLIT_KV_MIN_KEYS and not torch.is_grad_enabled())


def split_kv_decode(q, k, v, start):
    return _split_kv_decode(q, k, v, _split_kv_partitions(q, k.shape[1], k.shape[2]))


def _grouped_decode_fits(q, k, v, start):
    return ((_decode(q, start, k) or (torch.is_tensor(start) and q.shape[2] == 1)) and not q.is_cuda
            and q.shape[1] > k.shape[1])


def _row_mask(start: torch.Tensor, s: int, n: int) -> torch.Tensor:
    """(b or 1, 1, s, n): key j is visible to query i of a row when j <= that row's start + i."""
    position = start.reshape(-1, 1) + torch.arange(s, device=start.device)  # (b or 1, s)
    return (torch.arange(n, device=start.device) <= position[..., None]).unsqueeze(1)


def grouped_decode(q, k, v, start):
    """One query per head on CPU: the query heads that share a KV head become that head's rows, so
    each cached key/value is read once per step instead of once per query head (a fixed-capacity
    buffer's unwritten tail masked). Not on CUDA, where it leaves the float32 kernel a block per KV
    head."""
    b, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    mask = _row_mask(start, 1, k.shape[2]) if torch.is_tensor(start) else None
    out = _sdpa_kernel(q.reshape(b, kv_heads, heads // kv_heads, dim), k, v, mask, False, False)
    return out.reshape(b, heads, 1, dim)


def _small(q, start, n):
    return q.shape[2] <= SMALL_MASK_QUERIES and n <= SMALL_MASK_KEYS


def _two_pass_fits(q, k, v, start):
    # the log-sum-exp that merges the passes carries no gradient: inference only
    return (not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and isinstance(start, int) and start > 0 and q.shape[2] > 1 and k.shape[2] == start + q.shape[2]
            and _two_passes(q) and not _small(q, start, k.shape[2]))


def two_pass_chunk(q, k, v, start):
    return _chunk_after_past(q, k, v, start)


def _static_split_kv_fits(q, k, v, start):
    return torch.is_tensor(start) and start.dim() == 0 and _static_split_kv(q, k.shape[2])


def static_split_kv(q, k, v, start):
    """A fixed-capacity buffer's step: the new keys (just written at ``start``) are read back out of
    it, without a host read, for the causal block among the new queries."""
    index = start + torch.arange(q.shape[2], device=k.device)
    return _static_split_kv_attention(q, k.index_select(2, index), v.index_select(2, index), k, v, start)


def masked_sdpa(q, k, v, start):
    """SDPA with the mask of what each query sees (none for a prefill into an empty cache, a
    lower-right causal one after cached tokens, the written positions of a fixed-capacity buffer)."""
    s, n = q.shape[2], k.shape[2]
    if isinstance(start, int) and n == start + s:
        if start == 0 or s == 1:
            return _sdpa_kernel(q, k, v, None, s > 1 and start == 0, True)
        return _sdpa_kernel(q, k, v, _lower_right_causal(s, n, q), False, True)
    if isinstance(start, int):
        start = torch.tensor(start, device=q.device)
    return _sdpa_kernel(q, k, v, _row_mask(start, s, n), False, True)


IMPLEMENTATIONS = [
    Implementation("causal_attention", "sdpa.causal", causal_sdpa, always),
    Implementation("cached_attention", "sdpa.static-split-kv", static_split_kv, _static_split_kv_fits),
    Implementation("cached_attention", "sdpa.split-kv-decode", split_kv_decode, _split_kv_decode_fits),
    Implementation("cached_attention", "sdpa.grouped-decode", grouped_decode, _grouped_decode_fits),
    Implementation("cached_attention", "sdpa.two-pass-chunk", two_pass_chunk, _two_pass_fits),
    Implementation("cached_attention", "sdpa.masked", masked_sdpa, always),
]
