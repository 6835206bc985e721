"""CPU kernels written in C, compiled on first use with the machine's C compiler and loaded by ctypes.

Four libraries so far. :mod:`kinetic.kernels.cpu_ops` registers them as implementations of the
operations in :mod:`kinetic.ops`, whose references (and the torch implementations) run where they
cannot:

- :func:`decode_attention` (``decode_attention.c``): a few query rows per KV head over a long KV
  cache -- the attention of a decode step -- for x86-64 CPUs with AVX-512;
  :func:`decode_attention_available` says whether it can run here.
- :func:`ssd_chunk_forward` / :func:`ssd_chunk_backward` (``mamba.c``): each chunk's outputs of
  Mamba-2's chunked scan without its (heads x chunks x L x L) tensor, :func:`ssd_states_forward` /
  :func:`ssd_states_backward`, the state each chunk adds, :func:`conv_silu_forward`
  / :func:`conv_silu_backward`, its causal depthwise convolution with the SiLU in one pass each way,
  and :func:`gated_norm_forward` / :func:`gated_norm_backward`, the mixer's closing gated RMSNorm;
  for x86-64 Linux CPUs, in C vectorized at the SIMD width the compiler targets (AVX-512, AVX2 or
  SSE2). :func:`mamba_kernels_available` says whether they can run here.
- :func:`experts_forward` / :func:`experts_backward` (``experts.c``): the routed experts of a MoE
  layer (gathering each expert's token rows, up projection, squared ReLU, down projection, the
  combine weights), a thread per expert with the GEMMs through the BLAS torch links (its
  ``sgemm_``), and :func:`route` / :func:`dispatch`, the router's choice of experts and the sort of
  assignments by expert; for x86-64 Linux. :func:`experts_kernel_available` says whether they can
  run here.
- :func:`attention_forward` / :func:`attention_backward` (``attention.c``): causal self-attention
  over whole sequences (training, and forward passes without a cache), a thread per (batch, query
  head), blocks of queries through the same BLAS with the softmax in between; for x86-64 Linux.
  :func:`attention_kernel_available` says whether it can run here.

Each library is built once per source, compiler and CPU with ``cc -O3 -march=native -fopenmp`` into
``$KINETIC_KERNEL_CACHE`` (default ``~/.cache/kinetic/kernels``), which takes about a second
(``KINETIC_KERNEL_MARCH`` replaces ``native``, e.g. ``haswell`` to build for AVX2 on an AVX-512
machine, as benchmarks/ops.py does to see what a CPU without AVX-512 gets); a
build that fails warns once and leaves torch's kernels in place. ``KINETIC_CPU_KERNELS=0`` turns
the kernels off (read at their first use in a process). The C code's OpenMP is the one torch's CPU
build loads (``libgomp.so.1``, already in the process when kinetic imports torch), so it uses the
threads ``torch.set_num_threads`` sets.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("decode_attention.c")
_MAMBA_SOURCE = Path(__file__).with_name("mamba.c")
_EXPERTS_SOURCE = Path(__file__).with_name("experts.c")
_ATTENTION_SOURCE = Path(__file__).with_name("attention.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]


def compiler_flags() -> list[str]:
    """:data:`FLAGS` with the target of ``-march`` taken from ``KINETIC_KERNEL_MARCH`` when it is set
    (read at every build; the default, ``native``, is the CPU this runs on)."""
    march = os.environ.get("KINETIC_KERNEL_MARCH", "").strip()
    if not march:
        return list(FLAGS)
    return [f"-march={march}" if flag.startswith("-march=") else flag for flag in FLAGS]


def enabled() -> bool:
    return os.environ.get("KINETIC_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


_stepped_aside = 0  # depth of torch_only() contexts


@contextlib.contextmanager
def torch_only():
    """Within this context the kernels step aside and torch's operators run (for A/B comparisons in
    one process, e.g. ``benchmarks/decode.py``'s latency section)."""
    global _stepped_aside
    _stepped_aside += 1
    try:
        yield
    finally:
        _stepped_aside -= 1


def stepped_aside() -> bool:
    """Whether a :func:`torch_only` context is open."""
    return _stepped_aside > 0


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cache_dir() -> Path:
    if os.environ.get("KINETIC_KERNEL_CACHE"):
        return Path(os.environ["KINETIC_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kinetic" / "kernels"


def build(source: Path, compiler: str | None = None) -> Path:
    """Compile ``source`` into a shared library in :func:`cache_dir` (reused when already built for
    this source, compiler and CPU) and return its path; raises RuntimeError if the compiler fails."""
    compiler = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    # the source and the headers beside it (a change to either is a new build)
    text = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    cpu = sorted(_cpu_flags())
    flags = compiler_flags()
    key = hashlib.sha256(b"\0".join([text, " ".join(flags).encode(), compiler.encode(),
                                     " ".join(cpu).encode(), platform.machine().encode()])).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)  # then renamed: concurrent builds are safe
    os.close(fd)
    try:
        done = subprocess.run([*shlex.split(compiler), *flags, str(source), "-o", tmp, "-lm"],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {source.name}: {done.stderr.strip()[-800:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load(source: Path, what: str) -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(str(build(source)))
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        warnings.warn(f"kinetic's CPU {what} kernel is unavailable ({err}); using torch's operators",
                      stacklevel=3)
        return None


def _linux_x86() -> bool:
    return platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The decode-attention library, or None where it cannot run (not x86-64 Linux with AVX-512, or
    turned off) or could not be built (warned once)."""
    if not (enabled() and _linux_x86() and "avx512f" in _cpu_flags()):
        return None
    lib = _load(_SOURCE, "decode-attention")
    if lib is None or lib.kinetic_simd_width() != 16:  # the compiler did not target AVX-512
        return None
    fn = lib.kinetic_decode_attention
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_int] * 3 + [
        ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p]
    return lib


@functools.cache
def _mamba_library() -> ctypes.CDLL | None:
    """The Mamba-2 library (the scan's chunks, the causal conv + SiLU), or None where it cannot run
    (not x86-64 Linux, or turned off) or could not be built (warned once). x86-64 only because that
    is where it has been benchmarked."""
    if not (enabled() and _linux_x86()):
        return None
    lib = _load(_MAMBA_SOURCE, "Mamba-2")
    if lib is None:
        return None
    if lib.kinetic_ssd_chunk_strides() != 31:  # the stride table _strides() packs
        return None
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.kinetic_ssd_chunk_forward.restype = ctypes.c_int
    lib.kinetic_ssd_chunk_forward.argtypes = [ptr] * 9 + [i64] + [i32] * 6 + [ctypes.c_float]
    lib.kinetic_ssd_chunk_backward.restype = ctypes.c_int
    lib.kinetic_ssd_chunk_backward.argtypes = [ptr] * 16 + [i64] + [i32] * 6 + [ctypes.c_float]
    lib.kinetic_ssd_states_forward.restype = ctypes.c_int
    lib.kinetic_ssd_states_forward.argtypes = [ptr] * 6 + [i64] + [i32] * 6 + [ctypes.c_float]
    lib.kinetic_ssd_states_backward.restype = ctypes.c_int
    lib.kinetic_ssd_states_backward.argtypes = [ptr] * 10 + [i64] + [i32] * 6 + [ctypes.c_float]
    lib.kinetic_conv_silu_forward.restype = ctypes.c_int
    lib.kinetic_conv_silu_forward.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, i64, i64, i32]
    lib.kinetic_conv_silu_backward.restype = ctypes.c_int
    lib.kinetic_conv_silu_backward.argtypes = [ptr, i64, i64] + [ptr] * 4 + [i64, i64, ptr, ptr] + [
        i64, i64, i64, i32]
    lib.kinetic_gated_norm_forward.restype = ctypes.c_int
    lib.kinetic_gated_norm_forward.argtypes = [ptr, i64, i64, ptr, i64, i64] + [ptr] * 3 + [i64] * 4 + [
        ctypes.c_float]
    lib.kinetic_gated_norm_backward.restype = ctypes.c_int
    lib.kinetic_gated_norm_backward.argtypes = ([ptr, i64, i64, ptr, i64, i64] + [ptr] * 5 + [i64, i64, ptr]
                                                + [i64] * 4)
    return lib


@functools.cache
def wide_simd() -> bool:
    """Whether the kernels were built for AVX-512 (16 floats a register). Some of them pay only there
    (kinetic.kernels.cpu_ops.PAYS_WITHOUT_AVX512)."""
    lib = _mamba_library()
    return lib is not None and lib.kinetic_mamba_simd_width() == 16


def decode_attention_available(device: torch.device | str = "cpu",
                               dtype: torch.dtype = torch.float32) -> bool:
    """Whether the kernel runs for tensors of ``device`` and ``dtype`` here (CPU float32, built)."""
    return torch.device(device).type == "cpu" and dtype == torch.float32 and _library() is not None


# query rows per KV head x head size up to which the kernel beats torch's; wider rows are GEMMs that
# SDPA does better (benchmarks/decode_attention.py)
MAX_ROW_WIDTH = 256


def decode_attention_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`decode_attention` takes these: float32 CPU tensors outside autograd and
    ``torch.compile``, one query per head, head size a multiple of 16, keys/values of each head
    contiguous (a cache buffer sliced along the positions is), and the kernel available."""
    b, heads, q_len, dim = q.shape
    kv_heads = k.shape[1]
    if _stepped_aside:
        return False
    if not (q_len == 1 and q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.float32
            and dim % 16 == 0 and heads % kv_heads == 0 and heads // kv_heads * dim <= MAX_ROW_WIDTH
            and k.shape[2] >= 1 and k.shape == v.shape):
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    if torch.compiler.is_compiling():
        return False
    for t in (k, v):
        if t.stride(3) != 1 or t.stride(2) != dim or (b > 1 and t.stride(0) != kv_heads * t.stride(1)):
            return False
    return decode_attention_available()


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for one query per head: q (b, heads, 1, d) over k, v (b, kv_heads,
    n, d) with grouped query heads (heads a multiple of kv_heads), no mask. Check
    :func:`decode_attention_fits` first."""
    b, heads, _, dim = q.shape
    kv_heads, n = k.shape[1], k.shape[2]
    rows = heads // kv_heads
    lib = _library()
    qc = q.reshape(b * kv_heads, rows, dim).contiguous()
    out = torch.empty(b * kv_heads, rows, dim, dtype=torch.float32)
    # enough parts for the threads to share the work evenly, none shorter than 1024 keys
    parts = max(1, min(-(-4 * torch.get_num_threads() // (b * kv_heads)), n // 1024))
    err = lib.kinetic_decode_attention(qc.data_ptr(), k.data_ptr(), v.data_ptr(), k.stride(1), v.stride(1),
                                       b * kv_heads, rows, dim, n, parts, dim ** -0.5, out.data_ptr())
    if err:
        raise RuntimeError(f"kinetic_decode_attention failed with code {err} (heads={heads}, "
                           f"kv_heads={kv_heads}, head_dim={dim}, keys={n})")
    return out.view(b, heads, 1, dim)


def mamba_kernels_available(device: torch.device | str = "cpu",
                            dtype: torch.dtype = torch.float32) -> bool:
    """Whether the Mamba-2 kernels (scan, conv and gated norm) run for tensors of ``device`` and
    ``dtype`` here."""
    return torch.device(device).type == "cpu" and dtype == torch.float32 and _mamba_library() is not None


SSD_MAX_DIM = 256  # MAX_DIM in mamba.c: chunk length, head size and state size


def ssd_chunk_fits(x: torch.Tensor, C: torch.Tensor, chunk: int | None = None) -> bool:
    """Whether :func:`ssd_chunk_forward` takes a scan of inputs ``x`` (..., L, p) and rows ``C``
    (..., n) in chunks of ``chunk`` positions (default: L): float32 CPU tensors outside
    ``torch.compile``, chunk length up to 256, head and state sizes multiples of 16 up to 256, and the
    kernel available."""
    if _stepped_aside or torch.compiler.is_compiling():
        return False
    L, p, n = chunk or x.shape[-2], x.shape[-1], C.shape[-1]
    if not (x.device.type == C.device.type == "cpu" and x.dtype == C.dtype == torch.float32
            and 1 <= L <= SSD_MAX_DIM and all(d % 16 == 0 and 16 <= d <= SSD_MAX_DIM for d in (p, n))):
        return False
    return mamba_kernels_available()


def _ssd_check(cb, a_cs, x, dt, C, S, D) -> tuple[int, int, int, int, int, int, int]:
    b, g, r, c, L, p = x.shape
    n = C.shape[-1]
    want = {"cb": (b, g, c, L, L), "a_cs": (b, g, r, c, L), "dt": (b, g, r, c, L), "C": (b, g, c, L, n),
            "S": (b, g, r, c, p, n), "D": (g * r,)}
    for name, t in (("cb", cb), ("a_cs", a_cs), ("dt", dt), ("C", C), ("S", S), ("D", D)):
        if t is None:
            continue
        if tuple(t.shape) != want[name]:
            raise ValueError(f"ssd_chunk: {name} has shape {tuple(t.shape)}, expected {want[name]} for x "
                             f"of shape {tuple(x.shape)} (b, g, r, c, L, p)")
    for name, t in (("x", x), ("dt", dt), ("C", C), ("S", S), ("D", D)):
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
            raise ValueError(f"ssd_chunk: {name} must be a float32 CPU tensor, got {t.dtype} on {t.device}")
    return b, g, r, c, L, p, n


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if its innermost dimension is contiguous, else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(*groups: tuple[torch.Tensor, int]) -> torch.Tensor:
    """The kernel's stride table: the first ``k`` strides of each tensor, in order."""
    return torch.tensor([s for t, k in groups for s in t.stride()[:k]], dtype=torch.int64)


def _ptr(t: torch.Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


def ssd_chunk_forward(cb: torch.Tensor, a_cs: torch.Tensor, x: torch.Tensor, dt: torch.Tensor,
                      C: torch.Tensor, S: torch.Tensor, D: torch.Tensor | None, min_log_decay: float
                      ) -> torch.Tensor:
    """Each chunk's SSD outputs: for every (batch b, group g, head r, chunk c) and position l,
    ``y[l] = sum_{s<=l} cb[l, s] exp(max(a[l] - a[s], m)) dt[s] x[s] + exp(max(a[l], m)) S C[l]^T + D x[l]``
    with m = ``min_log_decay``. cb (b, g, c, L, L) are the group's C B^T scores, a_cs (b, g, r, c, L)
    each head's cumulative log-decay, dt (b, g, r, c, L) its step sizes, x (b, g, r, c, L, p) its
    inputs, C (b, g, c, L, n) the group's C rows, S (b, g, r, c, p, n) the state entering each chunk
    and D (g * r,) the heads' skip weights (None: no skip term). x, C and S may be strided views.
    Returns y (b, g, r, c, L, p), a view of a tensor laid out (b, c, L, g, r, p) -- the mixer's
    (batch, position, head, p). Check :func:`ssd_chunk_fits` first."""
    b, g, r, c, L, p, n = _ssd_check(cb, a_cs, x, dt, C, S, D)
    cb, a_cs, dt, x, C = cb.contiguous(), a_cs.contiguous(), dt.contiguous(), _rows(x), _rows(C)
    D = D.contiguous() if D is not None else None
    if S.stride(-1) != 1 or S.stride(-2) != n:
        S = S.contiguous()
    y = torch.empty(b, c, L, g, r, p).permute(0, 3, 4, 1, 2, 5)
    st = _strides((x, 5), (y, 5), (x, 5), (C, 4), (C, 4), (S, 4), (S, 4))
    err = _mamba_library().kinetic_ssd_chunk_forward(
        cb.data_ptr(), a_cs.data_ptr(), x.data_ptr(), dt.data_ptr(), _ptr(D), C.data_ptr(), S.data_ptr(),
        y.data_ptr(), st.data_ptr(), b, g, r, c, L, p, n, min_log_decay)
    if err:
        raise RuntimeError(f"kinetic_ssd_chunk_forward failed with code {err} (chunk {L}, head size {p}, "
                           f"state size {n})")
    return y


def ssd_chunk_backward(cb: torch.Tensor, a_cs: torch.Tensor, x: torch.Tensor, dt: torch.Tensor,
                       C: torch.Tensor, S: torch.Tensor, D: torch.Tensor | None, grad: torch.Tensor,
                       min_log_decay: float, d_S: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The gradients of :func:`ssd_chunk_forward`'s output (given ``grad`` of it) with respect to
    cb, a_cs, x, dt (through the dt factor only; a_cs's own dependence on dt is the caller's), C, S and
    D (None without D), in that order; the clamps at ``min_log_decay`` pass gradients through (where
    they bind the weights are below 1e-26). S's gradient is written into ``d_S`` when given (S's shape,
    each (p, n) state contiguous, any strides outside: a slice of a larger gradient)."""
    b, g, r, c, L, p, n = _ssd_check(cb, a_cs, x, dt, C, S, D)
    cb, a_cs, dt, x, C = cb.contiguous(), a_cs.contiguous(), dt.contiguous(), _rows(x), _rows(C)
    D, grad = (D.contiguous() if D is not None else None), _rows(grad)
    if S.stride(-1) != 1 or S.stride(-2) != n:
        S = S.contiguous()
    d_cb, d_a, d_dt = torch.empty_like(cb), torch.empty_like(a_cs), torch.empty_like(a_cs)
    d_x = torch.empty(b, c, L, g, r, p).permute(0, 3, 4, 1, 2, 5)  # the mixer's layout, like x's
    d_C = torch.empty(b, c, L, g, n).permute(0, 3, 1, 2, 4)
    if d_S is None:
        d_S = torch.empty(b, g, r, c, p, n)
    elif (d_S.shape != (b, g, r, c, p, n) or d_S.dtype != torch.float32 or d_S.device.type != "cpu"
          or d_S.stride(-1) != 1 or d_S.stride(-2) != n):
        raise ValueError(f"ssd_chunk_backward: d_S {tuple(d_S.shape)} {d_S.dtype} with strides "
                         f"{d_S.stride()}; expected float32 CPU ({b}, {g}, {r}, {c}, {p}, {n}) with "
                         "contiguous states")
    d_D = torch.empty(b, g, r, c) if D is not None else None  # per chunk, summed below
    st = _strides((x, 5), (grad, 5), (d_x, 5), (C, 4), (d_C, 4), (S, 4), (d_S, 4))
    err = _mamba_library().kinetic_ssd_chunk_backward(
        cb.data_ptr(), a_cs.data_ptr(), x.data_ptr(), dt.data_ptr(), _ptr(D), C.data_ptr(), S.data_ptr(),
        grad.data_ptr(), d_cb.data_ptr(), d_a.data_ptr(), d_x.data_ptr(), d_dt.data_ptr(), _ptr(d_D),
        d_C.data_ptr(), d_S.data_ptr(), st.data_ptr(), b, g, r, c, L, p, n, min_log_decay)
    if err:
        raise RuntimeError(f"kinetic_ssd_chunk_backward failed with code {err} (chunk {L}, head size {p}, "
                           f"state size {n})")
    return d_cb, d_a, d_x, d_dt, d_C, d_S, (d_D.sum((0, 3)).reshape(g * r) if D is not None else None)


def _states_check(a_cs: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, B: torch.Tensor
                  ) -> tuple[int, int, int, int, int, int, int]:
    b, g, r, c, L, p = x.shape
    n = B.shape[-1]
    if a_cs.shape != (b, g, r, c, L) or dt.shape != (b, g, r, c, L) or B.shape != (b, g, c, L, n):
        raise ValueError(f"ssd_states: a_cs {tuple(a_cs.shape)}, dt {tuple(dt.shape)} and B {tuple(B.shape)} "
                         f"do not fit x of shape {tuple(x.shape)}; expected a_cs and dt (b, g, r, c, L) and "
                         "B (b, g, c, L, n)")
    return b, g, r, c, L, p, n


def ssd_states_forward(a_cs: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, B: torch.Tensor,
                       min_log_decay: float) -> torch.Tensor:
    """The state each chunk adds by its end:
    ``states[j] = sum_l exp(max(a[L-1] - a[l], m)) dt[l] x[l, j] B[l]`` for every (batch, group, head,
    chunk), m = ``min_log_decay``; a_cs and dt (b, g, r, c, L), x (b, g, r, c, L, p) (may be a strided
    view), B (b, g, c, L, n). Returns (b, g, r, c, p, n), contiguous. Check :func:`ssd_chunk_fits` first."""
    b, g, r, c, L, p, n = _states_check(a_cs, x, dt, B)
    a_cs, dt, x, B = a_cs.contiguous(), dt.contiguous(), _rows(x), B.contiguous()
    states = torch.empty(b, g, r, c, p, n)
    st = _strides((x, 5), (x, 5), (x, 5), (B, 4), (B, 4), (states, 4), (states, 4))
    err = _mamba_library().kinetic_ssd_states_forward(
        a_cs.data_ptr(), x.data_ptr(), dt.data_ptr(), B.data_ptr(), states.data_ptr(), st.data_ptr(),
        b, g, r, c, L, p, n, min_log_decay)
    if err:
        raise RuntimeError(f"kinetic_ssd_states_forward failed with code {err} (chunk {L}, head size {p}, "
                           f"state size {n})")
    return states


def ssd_states_backward(a_cs: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, B: torch.Tensor,
                        grad: torch.Tensor, min_log_decay: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of :func:`ssd_states_forward`'s output (given ``grad`` of it) with respect to
    a_cs, x (laid out (b, c, L, g, r, p), like the mixer's), dt (through the dt factor) and B."""
    b, g, r, c, L, p, n = _states_check(a_cs, x, dt, B)
    a_cs, dt, x, B, grad = a_cs.contiguous(), dt.contiguous(), _rows(x), B.contiguous(), grad.contiguous()
    d_a, d_dt, d_B = torch.empty_like(a_cs), torch.empty_like(a_cs), torch.empty_like(B)
    d_x = torch.empty(b, c, L, g, r, p).permute(0, 3, 4, 1, 2, 5)
    st = _strides((x, 5), (x, 5), (d_x, 5), (B, 4), (B, 4), (grad, 4), (grad, 4))
    err = _mamba_library().kinetic_ssd_states_backward(
        a_cs.data_ptr(), x.data_ptr(), dt.data_ptr(), B.data_ptr(), grad.data_ptr(), d_a.data_ptr(),
        d_x.data_ptr(), d_dt.data_ptr(), d_B.data_ptr(), st.data_ptr(), b, g, r, c, L, p, n, min_log_decay)
    if err:
        raise RuntimeError(f"kinetic_ssd_states_backward failed with code {err} (chunk {L}, head size {p}, "
                           f"state size {n})")
    return d_a, d_x, d_dt, d_B


CONV_MAX_TAPS = 8  # MAX_K in mamba.c


def conv_silu_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`conv_silu_forward` takes ``x`` (b, l, c) and ``weight`` (c, k): float32 CPU
    tensors outside ``torch.compile``, channels contiguous, at most 8 taps, the kernels available."""
    if _stepped_aside or torch.compiler.is_compiling():
        return False
    if not (x.device.type == weight.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and x.dim() == 3 and x.stride(-1) == 1 and x.shape[1] >= 1 and x.shape[2] >= 1
            and 1 <= weight.shape[-1] <= CONV_MAX_TAPS):
        return False
    return mamba_kernels_available()


def _conv_check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x's rows with contiguous channels (a copy only if they are not)."""
    c = x.shape[-1]
    if weight.shape[0] != c or (bias is not None and bias.shape != (c,)):
        raise ValueError(f"conv_silu: weight {tuple(weight.shape)} / bias "
                         f"{None if bias is None else tuple(bias.shape)} do not fit x of {c} channels; "
                         "expected weight (channels, taps) and bias (channels,)")
    return _rows(x)


def _destination(out: torch.Tensor | None, shape: torch.Size, name: str) -> torch.Tensor:
    """A new (b, l, c) float32 tensor, or ``out`` checked to be one a kernel can write rows into."""
    if out is None:
        return torch.empty(shape)
    if (out.shape != shape or out.dtype != torch.float32 or out.device.type != "cpu" or out.dim() != 3
            or out.stride(-1) != 1):
        raise ValueError(f"{name}: got {tuple(out.shape)} {out.dtype} on {out.device} with strides "
                         f"{out.stride()}; expected a float32 CPU tensor of shape {tuple(shape)} with "
                         "contiguous channels (stride 1 in the last dimension)")
    return out


def conv_silu_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``silu(causal depthwise conv(x))`` for x (b, l, c) channels last and weight (c, k) (tap k-1
    meets x[t] at output t), plus ``bias`` (c,) if given. Returns (b, l, c), contiguous. Check
    :func:`conv_silu_fits` first."""
    x = _conv_check(x, weight, bias)
    b, seqlen, c = x.shape
    k = weight.shape[-1]
    wT = weight.t().contiguous()
    bias = bias.contiguous() if bias is not None else None
    y = torch.empty(b, seqlen, c)
    err = _mamba_library().kinetic_conv_silu_forward(
        x.data_ptr(), x.stride(0), x.stride(1), wT.data_ptr(), bias.data_ptr() if bias is not None else None,
        y.data_ptr(), b, seqlen, c, k)
    if err:
        raise RuntimeError(f"kinetic_conv_silu_forward failed with code {err} ({k} taps, {c} channels)")
    return y


def conv_silu_backward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, grad: torch.Tensor,
                       gx: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The gradients of :func:`conv_silu_forward`'s output (given ``grad`` of it) with respect to x,
    weight and bias (None without a bias). x's gradient is written into ``gx`` when given (x's shape,
    channels contiguous, rows at any stride: a slice of a larger gradient), else into a new tensor."""
    x = _conv_check(x, weight, bias)
    b, seqlen, c = x.shape
    k = weight.shape[-1]
    wT = weight.t().contiguous()
    bias = bias.contiguous() if bias is not None else None
    grad = grad.contiguous()
    gx = _destination(gx, x.shape, "gx")
    gwT = torch.empty(k, c)
    gb = torch.empty(c) if bias is not None else None
    err = _mamba_library().kinetic_conv_silu_backward(
        x.data_ptr(), x.stride(0), x.stride(1), wT.data_ptr(), bias.data_ptr() if bias is not None else None,
        grad.data_ptr(), gx.data_ptr(), gx.stride(0), gx.stride(1), gwT.data_ptr(),
        gb.data_ptr() if gb is not None else None, b, seqlen, c, k)
    if err:
        raise RuntimeError(f"kinetic_conv_silu_backward failed with code {err} ({k} taps, {c} channels)")
    return gx, gwT.t(), gb


@functools.cache
def _blas() -> tuple[int, int | None] | None:
    """Addresses of the Fortran ``sgemm_`` that torch's CPU library exports (MKL in torch's x86-64
    builds) and of ``MKL_Set_Num_Threads_Local`` (None if absent); None if there is no ``sgemm_``."""
    lib_dir = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch.so"):
        try:
            lib = ctypes.CDLL(str(lib_dir / name))
        except OSError:
            continue
        try:
            gemm = ctypes.cast(lib.sgemm_, ctypes.c_void_p).value
        except AttributeError:
            continue
        try:
            local = ctypes.cast(lib.MKL_Set_Num_Threads_Local, ctypes.c_void_p).value
        except AttributeError:
            local = None
        return gemm, local
    return None


@functools.cache
def _experts_library() -> ctypes.CDLL | None:
    """The MoE experts library, or None where it cannot run (not x86-64 Linux, turned off, or torch
    exports no ``sgemm_``) or could not be built (warned once)."""
    if not (enabled() and _linux_x86()) or _blas() is None:
        return None
    lib = _load(_EXPERTS_SOURCE, "MoE experts")
    if lib is None or lib.kinetic_experts_version() != 4:
        return None
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.kinetic_route.restype = ctypes.c_int
    lib.kinetic_route.argtypes = [ptr, ptr, i64, i32, i32, i32, i32, ptr]
    lib.kinetic_dispatch.restype = ctypes.c_int
    lib.kinetic_dispatch.argtypes = [ptr, i64, i32, i32, ptr, ptr, ptr]
    lib.kinetic_experts_forward.restype = ctypes.c_int
    lib.kinetic_experts_forward.argtypes = [ptr, ptr, i64, ptr, i32, i32, i32] + [ptr] * 7
    lib.kinetic_experts_backward.restype = ctypes.c_int
    lib.kinetic_experts_backward.argtypes = [ptr, ptr, i64, ptr, i32, i32, i32] + [ptr] * 11
    return lib


def experts_kernel_available(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> bool:
    """Whether the MoE experts kernel runs for tensors of ``device`` and ``dtype`` here."""
    return torch.device(device).type == "cpu" and dtype == torch.float32 and _experts_library() is not None


def experts_fit(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether :func:`experts_forward` takes rows ``x`` and expert weights ``up`` / ``down``: float32
    CPU tensors outside ``torch.compile``, and the kernel available."""
    if _stepped_aside or torch.compiler.is_compiling():
        return False
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (x, up, down)):
        return False
    return experts_kernel_available()


def _experts_check(x, up, down, ends) -> tuple[int, int, int]:
    num, inter, width = up.shape
    if x.dim() != 2 or x.shape[1] != width or down.shape != (num, width, inter) or ends.shape != (num,):
        raise ValueError(f"experts: x {tuple(x.shape)}, up {tuple(up.shape)}, down {tuple(down.shape)} and "
                         f"ends {tuple(ends.shape)} do not fit; expected x (rows, W), up (E, I, W), "
                         "down (E, W, I), ends (E,)")
    if ends.dtype != torch.int64:
        raise ValueError(f"experts: ends must be int64, got {ends.dtype}")
    return num, width, inter


def _big_rows(rows: int) -> int:
    """Experts with more rows than a thread's share run alone with all threads in their GEMMs (one
    thread would otherwise work on such an expert while the others wait)."""
    return max(64, rows // max(1, torch.get_num_threads()))


def _routing_check(x: torch.Tensor, token_of: torch.Tensor | None, weight: torch.Tensor | None,
                   ends: torch.Tensor) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
    """The number of rows (assignments), and token_of / weight made contiguous."""
    rows = token_of.shape[0] if token_of is not None else x.shape[0]
    if token_of is not None and (token_of.dim() != 1 or token_of.dtype != torch.int64):
        raise ValueError(f"experts: token_of must be a 1-D int64 tensor, got {tuple(token_of.shape)} "
                         f"{token_of.dtype}")
    if token_of is not None and rows and (int(token_of.min()) < 0 or int(token_of.max()) >= x.shape[0]):
        raise ValueError(f"experts: token_of names rows outside x's 0 .. {x.shape[0] - 1}")
    if weight is not None and (weight.shape != (rows,) or weight.dtype != torch.float32):
        raise ValueError(f"experts: weight must be float32 of shape ({rows},) (one per row), got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    if ends.numel() and int(ends[-1]) != rows:
        raise ValueError(f"experts: ends[-1] = {int(ends[-1])} but there are {rows} rows")
    return (rows, token_of.contiguous() if token_of is not None else None,
            weight.contiguous() if weight is not None else None)


def experts_forward(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, ends: torch.Tensor,
                    keep: bool, token_of: torch.Tensor | None = None, weight: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Routed experts over rows sorted by expert, expert e owning rows ``ends[e-1]`` to ``ends[e]``:
    ``relu(x_e up_e^T)^2 down_e^T`` with up (E, I, W) and down (E, W, I). Row i's input is ``x[i]``
    (x: rows, W) or, with ``token_of`` (rows,), ``x[token_of[i]]`` (x: tokens, W), gathered inside the
    kernel; with ``weight`` (rows,) row i's output is scaled by ``weight[i]``. Returns y (rows, W) and,
    with ``keep`` (for :func:`experts_backward`), the pre-activation u (rows, I), else None. Check
    :func:`experts_fit` first."""
    num, width, inter = _experts_check(x, up, down, ends)
    x, up, down, ends = x.contiguous(), up.contiguous(), down.contiguous(), ends.contiguous()
    rows, token_of, weight = _routing_check(x, token_of, weight, ends)
    y = torch.empty(rows, width)
    u = torch.empty(rows, inter) if keep else None
    gemm, local = _blas()
    err = _experts_library().kinetic_experts_forward(
        gemm, local, _big_rows(rows), ends.data_ptr(), num, width, inter, _ptr(token_of), x.data_ptr(),
        _ptr(weight), up.data_ptr(), down.data_ptr(), _ptr(u), y.data_ptr())
    if err:
        raise RuntimeError(f"kinetic_experts_forward failed with code {err} ({num} experts, W={width}, "
                           f"I={inter})")
    return y, u


def experts_backward(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, ends: torch.Tensor,
                     u: torch.Tensor, grad: torch.Tensor, token_of: torch.Tensor | None = None,
                     weight: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The gradients of :func:`experts_forward`'s y (given ``grad`` of it) with respect to x's rows, up,
    down and weight (None without one), from the pre-activation u that forward kept; with ``token_of``
    (as forward had it) ``grad`` is (tokens, W) and row i reads ``grad[token_of[i]]`` -- the caller
    summed each token's rows, so that is each row's gradient. x's gradient comes per row (rows, W),
    for the caller to sum into tokens."""
    num, width, inter = _experts_check(x, up, down, ends)
    x, up, down, ends = x.contiguous(), up.contiguous(), down.contiguous(), ends.contiguous()
    rows, token_of, weight = _routing_check(x, token_of, weight, ends)
    u, grad = u.contiguous(), grad.contiguous()
    if grad.shape != x.shape:
        raise ValueError(f"experts: grad {tuple(grad.shape)} does not match x {tuple(x.shape)}")
    dx = torch.empty(rows, width)
    dw = torch.empty(rows) if weight is not None else None
    dup, ddown = torch.empty(num, inter, width), torch.empty(num, width, inter)
    gemm, local = _blas()
    err = _experts_library().kinetic_experts_backward(
        gemm, local, _big_rows(rows), ends.data_ptr(), num, width, inter, _ptr(token_of), x.data_ptr(),
        _ptr(weight), up.data_ptr(), down.data_ptr(), u.data_ptr(), grad.data_ptr(), dx.data_ptr(), _ptr(dw),
        dup.data_ptr(), ddown.data_ptr())
    if err:
        raise RuntimeError(f"kinetic_experts_backward failed with code {err} ({num} experts, W={width}, "
                           f"I={inter})")
    return dx, dup, ddown, dw


def routing_fits(scores: torch.Tensor) -> bool:
    """Whether :func:`route` and :func:`dispatch` take router ``scores`` (tokens, experts): a float32
    CPU tensor outside ``torch.compile``, the MoE library available."""
    if _stepped_aside or torch.compiler.is_compiling():
        return False
    return (scores.device.type == "cpu" and scores.dtype == torch.float32 and scores.dim() == 2
            and experts_kernel_available())


def route(scores: torch.Tensor, bias: torch.Tensor | None, n_group: int, topk_group: int, k: int
          ) -> torch.Tensor:
    """The NemotronH router's choice in C: ``choice = scores + bias``; with group-limited routing
    (``n_group`` > 1 and ``topk_group`` < ``n_group``) only the ``topk_group`` groups with the best
    sum of their two best choices stay eligible; returns the ``k`` eligible experts with the highest
    choice per token, best first, (tokens, k) int64. Ties go to the lower index (torch's topk leaves
    their order unspecified). Check :func:`routing_fits` first."""
    tokens, num = scores.shape
    if bias is not None and (bias.shape != (num,) or bias.dtype != torch.float32):
        raise ValueError(f"route: bias must be float32 of shape ({num},), got {tuple(bias.shape)} "
                         f"{bias.dtype}")
    scores = scores.detach().contiguous()
    bias = bias.detach().contiguous() if bias is not None else None
    indices = torch.empty(tokens, k, dtype=torch.int64)
    err = _experts_library().kinetic_route(scores.data_ptr(), _ptr(bias), tokens, num, n_group, topk_group, k,
                                           indices.data_ptr())
    if err:
        raise ValueError(f"route: {num} experts in {n_group} groups, {topk_group} kept, top {k}: no such "
                         "routing (k larger than the eligible experts, or groups of fewer than 2 experts)"
                         if err == 1 else f"route: kinetic_route failed with code {err}")
    return indices


def dispatch(indices: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (token, slot) assignments of ``indices`` (tokens, k) sorted by expert, stably, with a
    counting sort in C: returns order (the flat index ``token * k + slot`` of each sorted row),
    token_of (its token) and ends (each expert's last row + 1), all int64 -- what
    ``indices.flatten().argsort(stable=True)``, ``order // k`` and the cumulative counts give."""
    if indices.dim() != 2 or indices.dtype != torch.int64:
        raise ValueError(f"dispatch: indices must be (tokens, k) int64, got {tuple(indices.shape)} "
                         f"{indices.dtype}")
    indices = indices.contiguous()
    rows = indices.numel()
    order, token_of = torch.empty(rows, dtype=torch.int64), torch.empty(rows, dtype=torch.int64)
    ends = torch.empty(num_experts, dtype=torch.int64)
    err = _experts_library().kinetic_dispatch(indices.data_ptr(), rows, max(1, indices.shape[1]), num_experts,
                                              order.data_ptr(), token_of.data_ptr(), ends.data_ptr())
    if err:
        raise ValueError(f"dispatch: an expert index outside 0 .. {num_experts - 1}" if err == 1
                         else f"dispatch: kinetic_dispatch failed with code {err}")
    return order, token_of, ends


def gated_norm_fits(x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor,
                    group_size: int) -> bool:
    """Whether :func:`gated_norm_forward` takes ``x`` and ``gate`` (b, l, W; gate None: a plain
    RMSNorm) and ``weight`` (W,): float32 CPU tensors outside ``torch.compile``, channels contiguous,
    W a multiple of ``group_size``, the kernels available."""
    if _stepped_aside or torch.compiler.is_compiling():
        return False
    tensors = (x, weight) if gate is None else (x, gate, weight)
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return False
    if not (x.dim() == 3 and x.stride(-1) == 1 and weight.shape == x.shape[-1:] and x.shape[1] >= 1
            and x.shape[-1] % group_size == 0):
        return False
    if gate is not None and not (gate.shape == x.shape and gate.stride(-1) == 1):
        return False
    return mamba_kernels_available()


def _norm_rows(x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor, group_size: int):
    if (x.dim() != 3 or (gate is not None and gate.shape != x.shape) or weight.shape != x.shape[-1:]
            or x.shape[-1] % group_size):
        gate_shape = None if gate is None else tuple(gate.shape)
        raise ValueError(f"gated_norm: x {tuple(x.shape)}, gate {gate_shape} and weight "
                         f"{tuple(weight.shape)} do not fit groups of {group_size}; expected x and gate "
                         "(b, l, W), weight (W,), W a multiple of the group size")
    return _rows(x), (_rows(gate) if gate is not None else None), weight.contiguous()


def _gate_args(gate: torch.Tensor | None) -> tuple[int | None, int, int]:
    return (gate.data_ptr(), gate.stride(0), gate.stride(1)) if gate is not None else (None, 0, 0)


def gated_norm_forward(x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor, group_size: int,
                       eps: float, keep: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``weight * rmsnorm_groups(x * silu(gate))`` for x and gate (b, l, W) (strided rows allowed),
    groups of ``group_size`` channels; without a gate ``weight * rmsnorm_groups(x)``. Returns the
    output (b, l, W) and, with ``keep`` (for :func:`gated_norm_backward`), each group's 1/rms (b, l,
    W / group_size), else None. Check :func:`gated_norm_fits` first."""
    x, gate, weight = _norm_rows(x, gate, weight, group_size)
    b, seqlen, width = x.shape
    out = torch.empty(b, seqlen, width)
    rstd = torch.empty(b, seqlen, width // group_size) if keep else None
    err = _mamba_library().kinetic_gated_norm_forward(
        x.data_ptr(), x.stride(0), x.stride(1), *_gate_args(gate), weight.data_ptr(), out.data_ptr(),
        _ptr(rstd), b, seqlen, width, group_size, eps)
    if err:
        raise RuntimeError(f"kinetic_gated_norm_forward failed with code {err} (width {width}, groups of "
                           f"{group_size})")
    return out, rstd


def gated_norm_backward(x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor, rstd: torch.Tensor,
                        grad: torch.Tensor, group_size: int, dgate: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The gradients of :func:`gated_norm_forward`'s output (given ``grad`` of it) with respect to x,
    gate (None without one) and weight, from the 1/rms it kept. The gate's gradient is written into
    ``dgate`` when given (the gate's shape, channels contiguous, rows at any stride), else into a new
    tensor."""
    x, gate, weight = _norm_rows(x, gate, weight, group_size)
    b, seqlen, width = x.shape
    rstd, grad = rstd.contiguous(), grad.contiguous()
    dx, dweight = torch.empty(b, seqlen, width), torch.empty(width)
    dgate = _destination(dgate, x.shape, "dgate") if gate is not None else None
    dz_strides = (dgate.stride(0), dgate.stride(1)) if dgate is not None else (0, 0)
    err = _mamba_library().kinetic_gated_norm_backward(
        x.data_ptr(), x.stride(0), x.stride(1), *_gate_args(gate), weight.data_ptr(), rstd.data_ptr(),
        grad.data_ptr(), dx.data_ptr(), _ptr(dgate), *dz_strides, dweight.data_ptr(), b, seqlen, width,
        group_size)
    if err:
        raise RuntimeError(f"kinetic_gated_norm_backward failed with code {err} (width {width}, groups of "
                           f"{group_size})")
    return dx, dgate, dweight


@functools.cache
def _attention_library() -> ctypes.CDLL | None:
    """The causal-attention library, or None where it cannot run (not x86-64 Linux, turned off, or
    torch exports no ``sgemm_``) or could not be built (warned once)."""
    if not (enabled() and _linux_x86()) or _blas() is None:
        return None
    lib = _load(_ATTENTION_SOURCE, "causal-attention")
    if lib is None or lib.kinetic_attention_version() != 2:
        return None
    ptr, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.kinetic_attention_forward.restype = ctypes.c_int
    lib.kinetic_attention_forward.argtypes = [ptr, ptr, ptr, i64, i64, ptr, ptr, i64, i64, i64, i64, i32,
                                              i32, i32, f32, ptr, ptr]
    lib.kinetic_attention_backward.restype = ctypes.c_int
    lib.kinetic_attention_backward.argtypes = [ptr, ptr, ptr, i64, i64, ptr, ptr, i64, i64, ptr, ptr, ptr,
                                               i64, i64, i32, i32, i32, f32, ptr, ptr, ptr]
    return lib


def attention_kernel_available(device: torch.device | str = "cpu",
                               dtype: torch.dtype = torch.float32) -> bool:
    """Whether the causal-attention kernel runs for tensors of ``device`` and ``dtype`` here."""
    return torch.device(device).type == "cpu" and dtype == torch.float32 and _attention_library() is not None


ATTENTION_MAX_LEN = 16384  # the kernel's per-thread buffers hold 2 x 64 x L floats


def attention_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`attention_forward` takes q (b, l, heads, d) and k, v (b, l, kv_heads, d):
    float32 CPU tensors outside ``torch.compile``, heads a multiple of kv_heads, at most
    ``ATTENTION_MAX_LEN`` positions, the kernel available."""
    if _stepped_aside or torch.compiler.is_compiling():
        return False
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 4 for t in (q, k, v)):
        return False
    b, seqlen, heads, dim = q.shape
    if not (k.shape == v.shape and k.shape[:2] == (b, seqlen) and k.shape[3] == dim
            and heads % k.shape[2] == 0 and 1 <= seqlen <= ATTENTION_MAX_LEN):
        return False
    return attention_kernel_available()


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, keep: bool
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention of q (b, l, heads, d) over k, v (b, l, kv_heads, d) -- query head h reads KV
    head h // (heads // kv_heads) -- with scores ``scale * q . k``. Returns the output (b, l, heads,
    d) and, with ``keep`` (for :func:`attention_backward`), each query's log-sum-exp of its scores
    (b, heads, l), else None. Check :func:`attention_fits` first."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, seqlen, heads, dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(b, heads, seqlen) if keep else None
    gemm, local = _blas()
    err = _attention_library().kinetic_attention_forward(
        gemm, local, q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), v.data_ptr(), k.stride(0),
        k.stride(1), b, seqlen, heads, k.shape[2], dim, scale, out.data_ptr(), _ptr(lse))
    if err:
        raise RuntimeError(f"kinetic_attention_forward failed with code {err} ({heads} heads over "
                           f"{k.shape[2]}, head size {dim}, {seqlen} positions)")
    return out, lse


def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, grad: torch.Tensor, scale: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of :func:`attention_forward`'s output (given ``grad`` of it) with respect to q, k
    and v, from the output and log-sum-exp it returned."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out, grad = out.contiguous(), grad.contiguous()
    b, seqlen, heads, dim = q.shape
    kv_heads = k.shape[2]
    dq = torch.empty_like(q)
    dk, dv = torch.empty(b, heads, seqlen, dim), torch.empty(b, heads, seqlen, dim)  # per query head
    gemm, local = _blas()
    err = _attention_library().kinetic_attention_backward(
        gemm, local, q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), v.data_ptr(), k.stride(0),
        k.stride(1), out.data_ptr(), grad.data_ptr(), lse.contiguous().data_ptr(), b, seqlen, heads, kv_heads,
        dim, scale, dq.data_ptr(), dk.data_ptr(), dv.data_ptr())
    if err:
        raise RuntimeError(f"kinetic_attention_backward failed with code {err} ({heads} heads over "
                           f"{kv_heads}, head size {dim}, {seqlen} positions)")
    if heads != kv_heads:  # sum each KV head's query heads
        dk = dk.view(b, kv_heads, heads // kv_heads, seqlen, dim).sum(2)
        dv = dv.view(b, kv_heads, heads // kv_heads, seqlen, dim).sum(2)
    return dq, dk.transpose(1, 2), dv.transpose(1, 2)


# Fresh allocations of at least this many bytes come straight from mmap (glibc's largest dynamic
# threshold is 32 MiB), so every 4 KiB page faults on first touch; asking for transparent huge pages
# first makes that one fault per 2 MiB (benchmarks/ops.py, lm_head_logits "cpu.huge-pages"). Where
# THP is "always" the advice changes nothing, where it is "never" it is ignored.
HUGE_PAGE_MIN_BYTES = 32 << 20
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


@functools.cache
def _madvise():
    if platform.system() != "Linux":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def empty_huge(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``torch.empty(shape)`` on the CPU, with transparent huge pages requested for its whole 2 MiB
    pages when it is at least ``HUGE_PAGE_MIN_BYTES`` (on Linux; elsewhere a plain ``empty``)."""
    out = torch.empty(*shape, dtype=dtype)
    size = out.numel() * out.element_size()
    madvise = _madvise() if size >= HUGE_PAGE_MIN_BYTES else None
    if madvise is not None:
        start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        end = (out.data_ptr() + size) // _HUGE_PAGE * _HUGE_PAGE
        if end > start:
            madvise(start, end - start, _MADV_HUGEPAGE)  # advice only: a failure changes nothing
    return out
