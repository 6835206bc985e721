"""CPU kernels written in C, compiled on first use with the machine's C compiler and loaded by ctypes.

One so far: :func:`decode_attention` (``decode_attention.c``), a few query rows per KV head over a
long KV cache -- the attention of a decode step -- for x86-64 CPUs with AVX-512. It is an optional
fast path: :func:`decode_attention_available` says whether it can run here and everything else
takes ``scaled_dot_product_attention``, which the tests compare it with.

The library is built once per source, compiler and CPU with ``cc -O3 -march=native -fopenmp`` into
``$KINETIC_KERNEL_CACHE`` (default ``~/.cache/kinetic/kernels``), which takes about a second; a
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
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]


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
    text = source.read_bytes()
    cpu = sorted(_cpu_flags())
    key = hashlib.sha256(b"\0".join([text, " ".join(FLAGS).encode(), compiler.encode(),
                                     " ".join(cpu).encode(), platform.machine().encode()])).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)  # then renamed: concurrent builds are safe
    os.close(fd)
    try:
        done = subprocess.run([*shlex.split(compiler), *FLAGS, str(source), "-o", tmp, "-lm"],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {source.name}: {done.stderr.strip()[-800:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The decode-attention library, or None where it cannot run (not x86-64 Linux with AVX-512, or
    turned off) or could not be built (warned once)."""
    if not (enabled() and platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")
            and "avx512f" in _cpu_flags()):
        return None
    try:
        lib = ctypes.CDLL(str(build(_SOURCE)))
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        warnings.warn(f"kinetic's CPU decode-attention kernel is unavailable ({err}); using torch's "
                      "attention", stacklevel=2)
        return None
    if lib.kinetic_simd_width() != 16:  # the compiler did not target AVX-512
        return None
    fn = lib.kinetic_decode_attention
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_int] * 3 + [
        ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p]
    return lib


def decode_attention_available(device: torch.device | str = "cpu",
                               dtype: torch.dtype = torch.float32) -> bool:
    """Whether the kernel runs for tensors of ``device`` and ``dtype`` here (CPU float32, built)."""
    return torch.device(device).type == "cpu" and dtype == torch.float32 and _library() is not None


# query rows per KV head x head size up to which the kernel beats torch's (measured on this project's
# 2-core AMD EPYC machines: 3x at 4 query / 2 KV heads of 16 and 128K keys; even at 32 / 2 heads of
# 128 it only matched SDPA at 128K and lost at 1K, where SDPA's GEMMs pay off)
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
