"""Fixed-address decoding state and CUDA-graph decode steps.

At batch 1 a decode step of a small hybrid model launches several hundred tiny kernels, and on a GPU
the CPU time to launch them, not the GPU, sets the speed (benchmarks/decode.py shows it). A CUDA
graph replays the whole step with one launch. A graph
replays fixed memory addresses and cannot read values back to the host, so the step it captures must:

* keep every state at a fixed address and update it in place: :class:`StaticCache` holds the Mamba
  conv/SSM states and full-capacity KV buffers, and the current position as a device tensor;
* attend over the whole KV buffer with a mask ``position <= pos`` instead of slicing to a Python
  length (the extra work over the empty tail is the price of a fixed shape);
* route MoE tokens without host synchronization (the experts' implementations that gather the chosen
  experts' weights take the call while a graph is captured or a step compiled).

Speculative decoding verifies several tokens per step: ``with cache.tracking():`` a forward of up
to ``track`` tokens writes their keys/values (each query masked to the positions up to its own) and
leaves every Mamba layer's conv window and per-position SSM states in fixed buffers, and
``keep(n)`` -- n a Python int or a device tensor -- commits the first n positions without reading
anything back to the host (:mod:`kinetic.infer.static_speculative`).

:class:`StaticCache` works eagerly on any device, which is how its equality with
:class:`~kinetic.infer.cache.InferenceCache` decoding is tested on CPU; :class:`CUDAGraphDecoder`
captures one single-token step on CUDA and replays it, and :class:`CompiledDecoder` compiles the
same fixed-shape step with ``torch.compile`` (the fast path on CPU, where graphs do not exist).
"""

from __future__ import annotations

import contextlib

import torch

from kinetic.infer.cache import InferenceCache


class StaticCache:
    """Decode state at fixed addresses for ``capacity`` tokens, taken over from a prefilled
    InferenceCache (its tensors are adopted, not copied, when their KV buffers are big enough)."""

    def __init__(self, cache: InferenceCache, capacity: int, track: int = 0) -> None:
        lengths = set(cache.kv_lengths().values())
        if len(lengths) > 1:
            raise ValueError(f"attention layers hold different lengths {sorted(lengths)}")
        length = lengths.pop() if lengths else 0
        if capacity <= length:
            raise ValueError(f"capacity={capacity} must exceed the {length} tokens already cached")
        self.capacity = capacity
        self.conv = dict(cache.conv)
        self.ssm = dict(cache.ssm)
        self.k, self.v = {}, {}
        for key, (k, v) in cache.kv_buffers(capacity).items():
            self.k[key], self.v[key] = k, v
        device = next(iter([*self.ssm.values(), *self.k.values()]), torch.empty(0)).device
        self.pos = torch.tensor(length, device=device)  # next position to write
        # tracking (speculative verification, see InferenceCache.tracking): a forward of up to
        # ``track`` tokens leaves each Mamba layer's conv window and per-position SSM states in these
        # fixed buffers, and ``keep(n)`` then commits the first n positions without host reads
        self.track = track
        self.is_tracking = False
        self._window, self._states = {}, {}
        if track:
            for key, conv in self.conv.items():
                b, channels, width = conv.shape
                self._window[key] = conv.new_zeros(b, channels, width + track)
                self._states[key] = self.ssm[key].new_zeros(b, track, *self.ssm[key].shape[1:])

    @property
    def length(self) -> int:
        """Tokens cached (reads the device; not for use inside a captured step)."""
        return int(self.pos)

    # ---- the interface the Mamba mixer uses
    def has_state(self, key: str) -> bool:
        return key in self.ssm

    def mamba_state(self, key: str, conv_shape: tuple, ssm_shape: tuple, like: torch.Tensor):
        return self.conv[key], self.ssm[key]

    def set_conv_state(self, key: str, state: torch.Tensor) -> None:
        self.conv[key].copy_(state)

    def set_ssm_state(self, key: str, state: torch.Tensor) -> None:
        self.ssm[key].copy_(state)

    def track_mamba(self, key: str, window: torch.Tensor, states: torch.Tensor, kernel: int) -> None:
        """A Mamba layer's tracked forward of L tokens: its conv window (b, conv, kernel-1+L) and the
        SSM state after each position (b, L, h, p, n), copied into the fixed buffers."""
        length = states.shape[1]
        if length > self.track:
            raise ValueError(f"a tracked forward of {length} tokens needs StaticCache(track>={length}), "
                             f"this one tracks {self.track}")
        self._window[key][..., :window.shape[-1]].copy_(window)
        self._states[key][:, :length].copy_(states)

    @contextlib.contextmanager
    def tracking(self):
        """Like InferenceCache.tracking: the next forward (of at most ``track`` tokens) can be cut
        back with ``keep(n)``."""
        self.is_tracking = True
        try:
            yield self
        finally:
            self.is_tracking = False

    def keep(self, n) -> None:
        """After a tracked forward that wrote at ``pos``: keep its first ``n`` positions (a Python int
        or a one-element device tensor, for a captured step) and advance ``pos`` by n."""
        n = torch.as_tensor(n, device=self.pos.device).reshape(1)
        for key, window in self._window.items():
            kernel = self.conv[key].shape[-1] + 1
            taps = n + torch.arange(kernel - 1, device=n.device)
            self.conv[key].copy_(window.index_select(-1, taps))
            self.ssm[key].copy_(self._states[key].index_select(1, n - 1).squeeze(1))
        self.pos.add_(n[0])

    # ---- attention
    def append_kv(self, key: str, k: torch.Tensor, v: torch.Tensor):
        """Write L tokens' keys/values at ``pos`` .. ``pos + L - 1``; return the full buffers and
        ``pos`` (attention masks the unwritten tail, see kinetic.ops.cached_attention)."""
        if k.shape[2] > 1 and not self.is_tracking:
            raise ValueError("a static cache decodes one token per step, or several in a tracked "
                             "forward (with cache.tracking(): ...; then cache.keep(n))")
        steps = torch.arange(k.shape[2], device=self.pos.device)
        index = self.pos + steps
        self.k[key].index_copy_(2, index, k.to(self.k[key].dtype))
        self.v[key].index_copy_(2, index, v.to(self.v[key].dtype))
        return self.k[key], self.v[key], self.pos

    def advance(self, n: int = 1) -> None:
        self.pos.add_(n)

    def state_tensors(self) -> list[torch.Tensor]:
        return [*self.conv.values(), *self.ssm.values(), self.pos]

    def snapshot(self) -> list[torch.Tensor]:
        """Copies of the Mamba states and the position (KV entries past ``pos`` are masked and later
        overwritten, so they need no copy); ``restore`` writes them back in place."""
        return [t.clone() for t in self.state_tensors()]

    def restore(self, snap: list[torch.Tensor]) -> None:
        for t, saved in zip(self.state_tensors(), snap, strict=True):
            t.copy_(saved)


def _static_step(model: torch.nn.Module, tokens: torch.Tensor, cache: StaticCache) -> torch.Tensor:
    logits = model(tokens, cache, return_mtp=False).logits[:, -1]
    cache.advance()
    return logits


def compile_step(fn, device: torch.device):
    """``torch.compile`` for a fixed-shape decode function. On CPU with Inductor's C++ wrapper: a
    decode step runs a few hundred small kernels, cheaper to call from generated C++ than from Python
    (benchmarks/decode.py, ``--compile``)."""
    options = {"cpp_wrapper": True} if device.type == "cpu" else None
    return torch.compile(fn, dynamic=False, options=options)


class CompiledDecoder:
    """A single-token decode step compiled by ``torch.compile`` (Inductor fuses the step's few
    hundred small operators into a handful of C++/Triton kernels). The static cache's fixed shapes
    make one compilation serve every step; it is kept on the model and reused by later calls with
    the same batch size and cache capacity (round capacities up, e.g. to powers of two, to share it).
    The first call compiles, which takes seconds."""

    def __init__(self, model: torch.nn.Module, cache: StaticCache) -> None:
        self.model, self.cache = model, cache
        compiled = model.__dict__.get("_compiled_decode_step")
        if compiled is None:
            compiled = compile_step(_static_step, cache.pos.device)
            model.__dict__["_compiled_decode_step"] = compiled
        self._fn = compiled
        self._first = compiled is not _static_step
        self._length = cache.length

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self._length >= self.cache.capacity:
            raise ValueError(f"the static cache is full ({self.cache.capacity} tokens)")
        if self._first:  # the first step of a new compiled function compiles it
            self._first = False
            try:
                out = self._fn(self.model, tokens, self.cache)
            except Exception as err:  # no C++ compiler, unsupported backend...: decode eagerly
                import warnings

                warnings.warn(f"torch.compile failed ({type(err).__name__}: {str(err)[:200]}); decoding "
                              "eagerly", stacklevel=3)
                self._fn = self.model.__dict__["_compiled_decode_step"] = _static_step
                out = self._fn(self.model, tokens, self.cache)
            self._length += 1
            return out
        self._length += 1
        return self._fn(self.model, tokens, self.cache)


_CAPTURE_STREAMS: dict[int, torch.cuda.Stream] = {}


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream that every CUDA-graph warm-up and capture on ``device`` runs on: cuBLAS keeps
    a workspace for each stream it has run on, for the life of the process, so one stream for all
    graphs keeps one workspace (benchmarks/long_context.py, its CUDA-graph memory figures)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[index] = torch.cuda.Stream(torch.device("cuda", index))
    return _CAPTURE_STREAMS[index]


class CUDAGraphDecoder:
    """One captured single-token decode step of ``model`` over ``cache`` (a StaticCache on CUDA).

    ``step(tokens)`` (batch, 1) -> logits (batch, vocab) of the new position, advancing the cache."""

    def __init__(self, model: torch.nn.Module, cache: StaticCache, batch: int = 1, warmup: int = 2) -> None:
        self.model, self.cache = model, cache
        device = cache.pos.device
        if device.type != "cuda":
            raise ValueError("CUDA graphs need the model and cache on a CUDA device")
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        saved = cache.snapshot()
        stream = capture_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(stream), torch.inference_mode():  # warm-up: allocators, autotuning
                for _ in range(warmup):
                    self._forward()
        finally:
            torch.cuda.current_stream(device).wait_stream(stream)
            cache.restore(saved)  # undo the warm-up's updates
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=stream), torch.inference_mode():
            self.logits = self._forward()
        self._length = cache.length

    def _forward(self) -> torch.Tensor:
        logits = self.model(self.tokens, self.cache, return_mtp=False).logits[:, -1]
        self.cache.advance()
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self._length >= self.cache.capacity:
            raise ValueError(f"the static cache is full ({self.cache.capacity} tokens)")
        self.tokens.copy_(tokens)
        self.graph.replay()
        self._length += 1
        return self.logits


def bucket_capacity(tokens: int) -> int:
    """A static cache's capacity for ``tokens`` tokens, rounded up so that caches of similar sizes
    share one compiled step: to a power of two up to 8192 (at least 256), above that to a multiple of
    an eighth of the next power of two. A static step attends over its whole capacity, so this keeps
    a long context's padding under 25% (131,073 tokens -> 163,840, not 262,144) at four shapes per
    doubling."""
    tokens = max(tokens, 1)
    power = 1 << (tokens - 1).bit_length()
    if power <= 8192:
        return max(256, power)
    step = power // 8
    return -(-tokens // step) * step


def static_decoder(model: torch.nn.Module, cache: InferenceCache, capacity: int, batch: int = 1,
                   graph: bool | None = None):
    """A fast single-token decoder continuing a prefilled ``cache``: a CUDA graph (``graph``, default on
    CUDA) or a ``torch.compile``d step. If graph capture fails it warns and returns None (decode
    eagerly)."""
    static = StaticCache(cache, capacity)
    if graph if graph is not None else static.pos.is_cuda:
        try:
            return CUDAGraphDecoder(model, static, batch)
        except (RuntimeError, ValueError) as err:
            import warnings

            warnings.warn(f"CUDA graph decoding unavailable ({err}); decoding eagerly", stacklevel=3)
            return None
    return CompiledDecoder(model, static)
