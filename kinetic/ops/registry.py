"""The operation table: one named function per compute-heavy operation, a plain-torch reference for
each, and the faster implementations that may take a call instead.

An operation is declared by decorating its reference::

    @operation("rms_norm")
    def rms_norm(x, weight, eps): ...   # plain torch: the definition of what the operation computes

Calling ``rms_norm(...)`` then asks each registered implementation, in order, whether it fits the
call (device, dtype, shapes, autograd, the CPU's instruction set, ``torch.compile``) and runs the
first that does; the reference runs when none does. Implementations live in :mod:`kinetic.kernels`
(C CPU kernels, torch fusions with hand-written backward passes, attention paths over SDPA) and are
loaded on the first call of any operation, so importing the model builds nothing.

One switch gives the references everywhere: ``KINETIC_FAST_OPS=0`` in the environment (read once,
at the first call), or ``with reference_only(): ...`` in code. ``KINETIC_CPU_KERNELS=0`` turns off
only the C kernels. Tests compare every implementation with its reference, forward and backward.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator

from kinetic.kernels import Implementation

_REFERENCES: dict[str, Callable] = {}
_TABLE: dict[str, list[Implementation]] = {}
_CALLS: dict[str, list[tuple[Callable, Callable]]] = {}  # op -> its implementations' (fits, fn)


class _State:
    loaded = False
    env = True  # KINETIC_FAST_OPS, read at the first call
    depth = 0  # nesting of reference_only() contexts
    fast: bool | None = None  # env and depth == 0; None until the first call


_state = _State()


def _load() -> None:
    """Register the implementations in kinetic.kernels and read the switch (once per process)."""
    if _state.loaded:
        return
    _state.loaded = True
    from kinetic.kernels import cpu_ops, sdpa, torch_ops

    for module in (cpu_ops, sdpa, torch_ops):
        for impl in module.IMPLEMENTATIONS:
            _TABLE.setdefault(impl.op, []).append(impl)
    for op, impls in _TABLE.items():
        impls.sort(key=lambda impl: impl.priority)  # stable: a module's own order breaks ties
        _CALLS.setdefault(op, [])[:] = [(impl.fits, impl.fn) for impl in impls]
    value = os.environ.get("KINETIC_FAST_OPS", "1").strip().lower()
    _state.env = value not in ("0", "false", "no", "off")
    _state.fast = _state.env and _state.depth == 0


def fast_enabled() -> bool:
    """Whether implementations other than the references may run now."""
    _load()
    return bool(_state.fast)


@contextlib.contextmanager
def reference_only() -> Iterator[None]:
    """Within this context every operation runs its plain-torch reference."""
    _load()
    _state.depth += 1
    _state.fast = False
    try:
        yield
    finally:
        _state.depth -= 1
        _state.fast = _state.env and _state.depth == 0


def implementations(op: str) -> list[Implementation]:
    """The registered implementations of ``op``, in the order they are asked."""
    if op not in _REFERENCES:
        raise KeyError(f"no operation named {op!r}; known: {sorted(_REFERENCES)}")
    _load()
    return list(_TABLE.get(op, []))


def operations() -> dict[str, Callable]:
    """Every declared operation's name and reference."""
    return dict(_REFERENCES)


def chosen(op: str, *args, **kwargs) -> str:
    """The name of what would run for this call: an implementation's, or ``"reference"``."""
    _load()
    if _state.fast:
        for impl in _TABLE.get(op, ()):
            if impl.fits(*args, **kwargs):
                return impl.name
    return "reference"


def operation(name: str) -> Callable[[Callable], Callable]:
    """Declare operation ``name`` with the decorated function as its reference (see the module
    docstring). The returned function dispatches; ``.reference`` is the reference itself."""

    def declare(reference: Callable) -> Callable:
        if name in _REFERENCES:
            raise ValueError(f"operation {name!r} is declared twice")
        _REFERENCES[name] = reference
        calls = _CALLS.setdefault(name, [])  # filled by _load(), read on every call
        state = _state

        @functools.wraps(reference)
        def dispatch(*args, **kwargs):
            fast = state.fast
            if fast is None:
                _load()
                fast = state.fast
            if fast:
                for fits, fn in calls:
                    if fits(*args, **kwargs):
                        return fn(*args, **kwargs)
            return reference(*args, **kwargs)

        dispatch.reference = reference
        dispatch.op_name = name
        return dispatch

    return declare
