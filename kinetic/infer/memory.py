"""Peak tensor memory of a block of work, on CUDA and on CPU alike.

On CUDA the caching allocator counts it (``torch.cuda.max_memory_allocated``). The CPU allocator
keeps no statistics, and the process's resident set size also counts the C library's allocator slack
and lazily touched library pages, so it only bounds the tensors from above. :class:`PeakTensorMemory`
gets the CPU figure from the PyTorch profiler's allocation records instead: every tensor allocation
and free made while it is active, with the running total of live bytes, whose maximum is the same
quantity CUDA reports. Blocks allocated before it started (weights, for instance) are not counted,
and freeing them does not lower the total.

    with PeakTensorMemory(device) as mem:
        run()
    mem.peak_bytes   # most bytes of tensors alive at once during run(), beyond those alive before
"""

from __future__ import annotations

import warnings

import torch


class PeakTensorMemory:
    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        self._prof = None
        self._base = 0

    def __enter__(self) -> PeakTensorMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._prof.__exit__(*exc)
        self.peak_bytes = _profiled_peak(self._prof)
        self._prof = None


def _profiled_peak(prof) -> int | None:
    """Largest running total of live tensor bytes among the profiler's allocation events (None when
    this torch build does not expose them)."""
    try:
        from torch._C._profiler import _EventType

        roots = prof.profiler.kineto_results.experimental_event_tree()
    except (AttributeError, ImportError, RuntimeError):
        return None
    # the reporter's running total outlives a profiling session (blocks freed after an earlier one
    # stay counted), so the peak is taken relative to the total just before the first event
    first, peak, stack = None, None, list(roots)
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            fields = node.extra_fields
            total = fields.total_allocated
            peak = total if peak is None else max(peak, total)
            if first is None or node.start_time_ns < first[0]:
                first = (node.start_time_ns, total - fields.alloc_size)
        stack.extend(node.children)
    return None if peak is None else max(peak - first[1], 0)
