"""SlotCache: the decode state of a batch of sequences at different positions, one slot each.

Every tensor has the slot as its first dimension: Mamba conv windows (slots, conv, kernel-1) and SSM
states (slots, h, p, n), and, for attention layers only, keys and values (slots, kv_heads, capacity,
d) with a token count per slot. A forward covers a contiguous range of slots (``open(rows, width)``
... ``close()``), so the layers read and write views, never gathered copies; the decoder keeps its
running sequences in slots 0 .. R-1 and moves a slot down when one before it is freed.

Each row of a forward writes its new keys at its own positions and attends over the keys up to its
own (``start`` is one int when every row is at the same position, so batch-1 decoding takes the same
fast attention paths as before; else a (rows,) tensor, see :func:`kinetic.ops.cached_attention`).

Speculative verification: ``open(rows, width, tracking=True)`` makes the Mamba layers report every
position's state, and ``keep(n)`` (one count per row) keeps the first ``n[i]`` positions of row i,
as if only they had been fed. ``snapshot(rows)`` / ``restore(snapshot)`` undo a few draft steps.

With ``fixed_shape=True`` a forward attends over the whole capacity with a tensor ``start`` and rows
outside ``active`` write nothing: the shapes then depend only on the number of rows, which is what
``torch.compile`` and CUDA graphs need (:mod:`kinetic.infer.execution`).
"""

from __future__ import annotations

import torch


class SlotCache:
    def __init__(self, ssm_dtype: torch.dtype = torch.float32) -> None:
        self.ssm_dtype = ssm_dtype
        self.conv: dict[str, torch.Tensor] = {}
        self.ssm: dict[str, torch.Tensor] = {}
        self.k: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        self.slots = 0  # allocated slots (grown on demand)
        self.capacity = 0  # allocated KV positions per slot (grown on demand)
        self.lengths: list[int] = []  # tokens each slot holds
        self.rows = slice(0, 0)  # the slots of the current forward
        self.width = 0  # tokens per row of the current forward
        self.start: int | torch.Tensor = 0  # position of each row's first new token
        self._end = 0  # keys a row of the current forward may see
        self.is_tracking = False
        self._pending: dict[str, tuple] = {}
        self.fixed_shape = False
        self.active: torch.Tensor | None = None  # (rows,) bool: rows that write (fixed shapes)
        self._device: torch.device | None = None

    # ---- slots
    def ensure(self, slots: int, capacity: int) -> None:
        """Room for ``slots`` slots of ``capacity`` tokens each (grows by doubling)."""
        if slots > self.slots:
            new = max(slots, 2 * self.slots)
            grow = new - self.slots
            for d in (self.conv, self.ssm, self.k, self.v):
                for key, t in d.items():
                    d[key] = torch.cat([t, t.new_zeros(grow, *t.shape[1:])])
            self.lengths += [0] * grow
            self.slots = new
        if capacity > self.capacity:
            new = max(capacity, 2 * self.capacity, 16)
            for d in (self.k, self.v):
                for key, t in d.items():
                    d[key] = torch.cat([t, t.new_zeros(t.shape[0], t.shape[1], new - t.shape[2], t.shape[3])],
                                       dim=2)
            self.capacity = new

    def reset(self, slot: int) -> None:
        """Empty ``slot`` for a new sequence."""
        for d in (self.conv, self.ssm):
            for t in d.values():
                t[slot].zero_()
        self.lengths[slot] = 0

    def copy(self, src: int, dst: int) -> None:
        """Make slot ``dst`` hold what slot ``src`` holds (a fork, or a move)."""
        if src == dst:
            return
        n = self.lengths[src]
        for d in (self.conv, self.ssm):
            for t in d.values():
                t[dst].copy_(t[src])
        for d in (self.k, self.v):
            for t in d.values():
                t[dst, :, :n].copy_(t[src, :, :n])
        self.lengths[dst] = n

    # ---- a forward over a range of slots
    def open(self, rows: slice, width: int, *, tracking: bool = False) -> None:
        """The next forward feeds ``width`` tokens to each slot of ``rows``."""
        self.ensure(rows.stop, 0)
        lengths = self.lengths[rows]
        end = max(lengths) + width
        self.ensure(rows.stop, end + (1 if self.fixed_shape else 0))
        self.rows, self.width, self.is_tracking = rows, width, tracking
        first = lengths[0]
        if self._device is None:
            self._device = next(iter([*self.conv.values(), *self.k.values()]), torch.empty(0)).device
        if self.fixed_shape:  # one row: a 0-d position, which CUDA's static split-KV path takes
            self.start = torch.tensor(lengths if len(lengths) > 1 else first, device=self._device)
            self._end = self.capacity
        else:
            same = all(n == first for n in lengths)
            self.start = first if same else torch.tensor(lengths, device=self._device)
            self._end = end
        self._pending.clear()

    def close(self) -> None:
        """After the forward (untracked): every row advances by ``width`` tokens."""
        if self.is_tracking:
            raise RuntimeError("a tracked forward ends with keep(n), not close()")
        for slot in range(self.rows.start, self.rows.stop):
            self.lengths[slot] += self.width
        self.width = 0

    def keep(self, n: list[int]) -> None:
        """After a tracked forward: row i keeps its first ``n[i]`` new positions (1 <= n[i] <= width)."""
        rows, width = self.rows, self.width
        if len(n) != rows.stop - rows.start or not all(1 <= m <= width for m in n):
            raise ValueError(f"keep({n}) needs one count in [1, {width}] per row of {rows}")
        same = n[0] if all(m == n[0] for m in n) else None  # one count: plain slicing
        counts = None if same else torch.tensor(n, device=self._device)
        for key, (window, states, kernel) in self._pending.items():
            if same:
                self.conv[key][rows].copy_(window[..., same:same + kernel - 1])
                self.ssm[key][rows].copy_(states[:, same - 1])
                continue
            taps = (counts[:, None] + torch.arange(kernel - 1, device=counts.device))  # (b, kernel-1)
            conv = window.gather(-1, taps[:, None, :].expand(-1, window.shape[1], -1))
            self.conv[key][rows].copy_(conv)
            last = states[torch.arange(len(n), device=counts.device), counts - 1]
            self.ssm[key][rows].copy_(last)
        for i, slot in enumerate(range(rows.start, rows.stop)):
            self.lengths[slot] += n[i]
        self._pending.clear()
        self.is_tracking = False
        self.width = 0

    def snapshot(self, rows: slice) -> tuple:
        """A copy of the rows' Mamba states and lengths, for ``restore`` (keys past a restored length are
        masked and later overwritten, so they need no copy)."""
        return (rows, {k: t[rows].clone() for k, t in self.conv.items()},
                {k: t[rows].clone() for k, t in self.ssm.items()}, list(self.lengths[rows]))

    def restore(self, snap: tuple) -> None:
        rows, conv, ssm, lengths = snap
        for key, t in conv.items():
            self.conv[key][rows].copy_(t)
        for key, t in ssm.items():
            self.ssm[key][rows].copy_(t)
        self.lengths[rows] = lengths

    # ---- the interface the layers use (kinetic.model.cache.Cache)
    def has_state(self, key: str) -> bool:
        return key in self.ssm

    def mamba_state(self, key: str, conv_shape: tuple, ssm_shape: tuple, like: torch.Tensor):
        if key not in self.ssm:
            self.conv[key] = like.new_zeros(self.slots, *conv_shape[1:])
            self.ssm[key] = torch.zeros(self.slots, *ssm_shape[1:], dtype=self.ssm_dtype, device=like.device)
            self._device = like.device
        return self.conv[key][self.rows], self.ssm[key][self.rows]

    def _write(self, target: torch.Tensor, value: torch.Tensor) -> None:
        if self.active is None:
            target.copy_(value)
        else:
            target.copy_(torch.where(self.active.view(-1, *[1] * (value.dim() - 1)), value, target))

    def set_conv_state(self, key: str, state: torch.Tensor) -> None:
        if not self.is_tracking:  # a tracked forward's states are written by keep(n)
            self._write(self.conv[key][self.rows], state.detach())

    def set_ssm_state(self, key: str, state: torch.Tensor) -> None:
        if not self.is_tracking:
            self._write(self.ssm[key][self.rows], state.detach().to(self.ssm_dtype))

    def track_mamba(self, key: str, window: torch.Tensor, states: torch.Tensor, kernel: int) -> None:
        self._pending[key] = (window.detach(), states.detach(), kernel)

    def append_kv(self, key: str, k: torch.Tensor, v: torch.Tensor):
        """Write each row's new keys/values (b, kv_heads, width, d) at its own positions; return the
        keys/values the rows attend over and ``start``."""
        if key not in self.k:
            self.k[key] = k.new_zeros(self.slots, k.shape[1], self.capacity, k.shape[3])
            self.v[key] = v.new_zeros(self.k[key].shape)
            self._device = k.device
        keys, values = self.k[key][self.rows], self.v[key][self.rows]
        width = k.shape[2]
        if isinstance(self.start, int):
            keys[:, :, self.start:self.start + width] = k.detach()
            values[:, :, self.start:self.start + width] = v.detach()
        else:
            positions = self.start.reshape(-1, 1) + torch.arange(width, device=k.device)  # (b, width)
            if self.active is not None:  # rows that do not write, write to the spare last position
                positions = torch.where(self.active[:, None], positions, self.capacity - 1)
            batch = torch.arange(k.shape[0], device=k.device)[:, None]
            keys[batch, :, positions] = k.detach().transpose(1, 2)
            values[batch, :, positions] = v.detach().transpose(1, 2)
        return keys[:, :, :self._end], values[:, :, :self._end], self.start

    def nbytes(self) -> int:
        """Bytes held, KV capacity included."""
        tensors = [*self.conv.values(), *self.ssm.values(), *self.k.values(), *self.v.values()]
        return sum(t.numel() * t.element_size() for t in tensors)
