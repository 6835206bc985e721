"""How the decoder's forwards run: :class:`Eager`, or :class:`Compiled` (``torch.compile`` of the
plain decode step; on CUDA in Inductor's "reduce-overhead" mode, which replays it as a CUDA graph).

The decoder asks an execution for five things -- a prefill ``forward``, a plain ``decode`` step over
the running rows, a speculative ``verify`` forward, an MTP ``mtp`` forward and the LM ``head`` -- and
each execution runs the same model code for them. A compiled step needs fixed shapes: it runs the
batch padded to a power-of-two number of rows, attends over the cache's whole capacity (which grows
by doubling, so capacities come in powers of two too), and the padded rows write nothing (the
SlotCache's ``fixed_shape`` mode). Each (rows, capacity) pair compiles once per model, in seconds;
later steps and later calls reuse it.
"""

from __future__ import annotations

import warnings

import torch

from kinetic import ops
from kinetic.infer.slots import SlotCache


class Eager:
    """Every forward as a plain call of the model."""

    def forward(self, model, ids: torch.Tensor, cache: SlotCache, logits_to_keep: int = 1):
        return model(ids, cache, return_mtp=False, logits_to_keep=logits_to_keep)

    def decode(self, model, ids: torch.Tensor, cache: SlotCache) -> torch.Tensor:
        """One token per running row (rows 0 .. len(ids)-1): their next-token logits (b, vocab)."""
        cache.open(slice(0, ids.shape[0]), 1)
        logits = model(ids, cache, return_mtp=False, logits_to_keep=1).logits[:, -1]
        cache.close()
        return logits

    def verify(self, model, ids: torch.Tensor, cache: SlotCache):
        return model(ids, cache, return_mtp=False)

    def mtp(self, model, hidden: torch.Tensor, embeds: torch.Tensor, cache: SlotCache):
        return model.mtp.forward_depth(0, hidden, embeds, cache)

    def head(self, model, normed: torch.Tensor) -> torch.Tensor:
        return ops.lm_head_logits(normed, model.lm_head.weight).float()


def _fixed_step(model, ids: torch.Tensor, cache: SlotCache) -> torch.Tensor:
    return model(ids, cache, return_mtp=False, logits_to_keep=1).logits[:, -1]


def compile_step(fn, device: torch.device):
    """``torch.compile`` for a fixed-shape step: on CPU with Inductor's C++ wrapper (a decode step runs
    a few hundred small kernels, cheaper to call from generated C++ than from Python); on CUDA in
    "reduce-overhead" mode (CUDA graphs)."""
    if device.type == "cpu":
        return torch.compile(fn, dynamic=False, options={"cpp_wrapper": True})
    return torch.compile(fn, dynamic=False, mode="reduce-overhead")


def _bucket(rows: int) -> int:
    return 1 << (rows - 1).bit_length()


class Compiled(Eager):
    """The plain decode step through ``torch.compile`` on fixed shapes (see the module docstring);
    prefill, verification and drafting run eagerly. If compilation fails it warns and runs eagerly."""

    def __init__(self) -> None:
        self.failed = False

    def decode(self, model, ids: torch.Tensor, cache: SlotCache) -> torch.Tensor:
        if self.failed:
            return super().decode(model, ids, cache)
        rows = ids.shape[0]
        padded = _bucket(rows)
        if padded > rows:
            ids = torch.cat([ids, ids.new_zeros(padded - rows, 1)])
        cache.fixed_shape = True
        cache.open(slice(0, padded), 1)
        cache.active = torch.arange(padded, device=ids.device) < rows if padded > rows else None
        fn = model.__dict__.get("_compiled_decode_step")
        if fn is None:
            fn = model.__dict__["_compiled_decode_step"] = compile_step(_fixed_step, ids.device)
        try:
            logits = fn(model, ids, cache)
        except Exception as err:  # no C++ compiler, an unsupported backend...: decode eagerly
            warnings.warn(f"torch.compile failed ({type(err).__name__}: {str(err)[:200]}); decoding "
                          "eagerly", stacklevel=2)
            self.failed = True
            model.__dict__.pop("_compiled_decode_step", None)
            logits = _fixed_step(model, ids, cache)
        finally:
            cache.fixed_shape, cache.active = False, None
        cache.rows = slice(0, rows)
        cache.close()
        return logits[:rows]
