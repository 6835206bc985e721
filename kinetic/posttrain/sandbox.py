"""A sandbox for untrusted Python programs: each run gets a fresh subprocess in a fresh temporary
directory, resource limits, a scrubbed environment, a wall-clock timeout and, where the host allows
it, Linux namespaces that take away the network and the rest of the file system.

Three processes per run (this file is also their program, so it imports only the standard library):

- the *launcher* (``python -I -S sandbox.py``, started by :class:`Sandbox` in a new session) enters
  new namespaces (network, PID, mount; plus a user namespace when not root), bind-mounts the work
  directory read-write and remounts every other mount read-only, and reports how the run ended on a
  pipe. It is the sandbox's own worker: if it fails or dies without reporting, the run raises
  :class:`SandboxError` — a broken sandbox never scores a candidate 0.
- the namespace's *init* (PID 1, forked by the launcher, dies with it) forks the candidate and waits;
  when it exits, every process left in the PID namespace dies with it (fork bombs included).
- the *candidate* sets ``resource`` limits (address space, CPU seconds, processes, file size, open
  files, no core dumps), empties its capability bounding set, drops to an unprivileged uid when
  started as root (one uid per worker slot and process, so one candidate's fork bomb cannot use up
  another's process limit; as root neither RLIMIT_NPROC nor file permissions would bind), asks for
  SIGKILL when its parent dies, and execs ``python -I -S main.py`` in the work directory.

A candidate that fails, times out or exceeds a limit gets a :class:`RunResult` whose ``ok`` is
False and whose ``reason`` says why. ``Sandbox.isolation`` records what the host allowed, probed
once per process; a missing network namespace is also reported with a warning.

    sandbox = Sandbox(Limits(wall_s=5), workers=4)
    result = sandbox.run({"main.py": "print(2 + 2)"})
    assert result.ok and result.stdout == "4\\n"

:func:`run_tests` runs a program followed by its tests and counts it as passing only when the tests
ran to their end (a program that calls ``sys.exit(0)`` early does not pass).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import queue
import resource
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
KEEP_MOUNT_FLAGS = 2 | 4 | 8 | 1024 | 2048 | 4096  # nosuid, nodev, noexec, noatime, nodiratime, relatime
PR_SET_PDEATHSIG, PR_CAPBSET_DROP = 1, 24
# As root, slot i of the sandbox in process p runs as uid/gid UID_BASE + (p % PROCESSES) * SLOTS + i:
# its own RLIMIT_NPROC count, also beside other processes' sandboxes (torchrun ranks, pytest workers).
UID_BASE, PROCESSES, SLOTS = 2_000_000_000, 1_000_000, 256
NOBODY = 65534  # the fallback when that range is not mapped (a container's user namespace)


class SandboxError(RuntimeError):
    """The sandbox itself failed (could not start, its worker died, ...): no verdict on the
    candidate, which must not be scored."""


@dataclasses.dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0  # wall-clock timeout, seconds
    cpu_s: int = 10  # CPU seconds (RLIMIT_CPU; SIGXCPU when exceeded)
    memory_mb: int = 512  # address space (RLIMIT_AS)
    processes: int = 16  # processes/threads of the candidate's uid (RLIMIT_NPROC)
    file_mb: int = 16  # largest file the candidate may write (RLIMIT_FSIZE), stdout/stderr included
    open_files: int = 64  # RLIMIT_NOFILE
    output_kb: int = 64  # stdout/stderr kept in the result (the rest is cut)

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if getattr(self, field.name) <= 0:
                raise ValueError(f"Limits.{field.name}={getattr(self, field.name)} must be positive")


@dataclasses.dataclass(frozen=True)
class Isolation:
    """What the host lets the sandbox enforce, beyond the resource limits (always applied)."""

    network: bool  # candidate in an empty network namespace (no interface up, not even loopback)
    pid: bool  # candidate is PID 1 of its own PID namespace (its processes die with it)
    mounts: bool  # everything but the work directory read-only
    user: str  # "uid" (root dropped to a per-slot uid), "nobody" (root dropped to 65534 for every
    # slot), "userns" (not root, own user namespace), "none"
    notes: tuple[str, ...] = ()  # why a feature is off


@dataclasses.dataclass(frozen=True)
class RunResult:
    ok: bool  # exited with status 0 within every limit
    reason: str  # "ok", "exit status 1", "timeout after 2.0 s", "killed by SIGXCPU (CPU limit)", ...
    returncode: int | None  # exit status, or -signal when killed by one (None on timeout)
    stdout: str
    stderr: str
    wall_s: float

    @property
    def info(self) -> dict:
        return {"reason": self.reason, "returncode": self.returncode, "wall_s": round(self.wall_s, 3),
                "stderr": self.stderr[-2000:]}


SIGNAL_REASONS = {signal.SIGXCPU: "CPU limit", signal.SIGXFSZ: "file size limit",
                  signal.SIGSEGV: "often the memory limit"}


class Sandbox:
    """Runs programs in isolated subprocesses, at most ``workers`` at a time (``run`` may be called
    from many threads; ``map`` does that for you)."""

    def __init__(self, limits: Limits | None = None, workers: int = 2, require_isolation: bool = False):
        if not 1 <= workers <= SLOTS:
            raise ValueError(f"workers={workers} must lie in [1, {SLOTS}]")
        self.limits = limits or Limits()
        self.workers = workers
        self.isolation = probe()
        if require_isolation and not (self.isolation.network and self.isolation.pid):
            raise SandboxError(f"namespaces unavailable: {'; '.join(self.isolation.notes)}")
        self._slots: queue.Queue[int] = queue.Queue()
        for slot in range(workers):
            self._slots.put(slot)
        self._running: dict[int, int] = {}  # slot -> launcher pid
        self._lock = threading.Lock()

    def launcher_pids(self) -> list[int]:
        """The running launchers' pids (the sandbox's own worker processes)."""
        with self._lock:
            return list(self._running.values())

    def map(self, jobs: list[dict[str, str]], limits: Limits | None = None) -> list[RunResult]:
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(lambda files: self.run(files, limits), jobs))

    def run(self, files: dict[str, str], limits: Limits | None = None, main: str = "main.py") -> RunResult:
        """Write ``files`` (name -> text) into a fresh directory and run ``python main.py`` there."""
        if main not in files:
            raise ValueError(f"files has no {main!r} (names: {sorted(files)}); pass the program as {main!r}")
        for name in files:
            if os.path.isabs(name) or ".." in name.split("/"):
                raise ValueError(f"file name {name!r} leaves the work directory; use a relative path")
        limits = limits or self.limits
        slot = self._slots.get()
        try:
            root = tempfile.mkdtemp(prefix="kinetic-sandbox-")
        except OSError as e:
            self._slots.put(slot)
            raise SandboxError(f"cannot make the sandbox's temporary directory: {e}") from e
        try:
            return self._run(slot, root, files, limits, main)
        except OSError as e:  # writing the files, handing them to the slot's uid, ...
            raise SandboxError(f"sandbox setup failed: {e}") from e
        finally:
            shutil.rmtree(root, ignore_errors=True)
            self._slots.put(slot)

    def _run(self, slot: int, root: str, files: dict[str, str], limits: Limits, main: str) -> RunResult:
        work = os.path.join(root, "work")
        os.mkdir(work, 0o700)
        for name, text in files.items():
            path = os.path.join(work, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
        uid = {"uid": slot_uid(slot), "nobody": NOBODY}.get(self.isolation.user)
        if uid is not None:
            os.chmod(root, 0o711)  # the candidate may pass through root to work, not list it
            for dirpath, _, names in os.walk(work):
                for name in [dirpath, *(os.path.join(dirpath, n) for n in names)]:
                    os.chown(name, uid, uid)
        config = {"work": work, "main": main, "uid": uid, "python": os.path.realpath(sys.executable),
                  "prefix": sys.base_prefix,
                  "limits": dataclasses.asdict(limits), "isolation": dataclasses.asdict(self.isolation)}
        out_path, err_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
        with open(out_path, "w+b") as out, open(err_path, "w+b") as err:
            start = time.monotonic()
            returncode, timed_out, report = self._launch(slot, config, out, err, limits.wall_s)
            wall = time.monotonic() - start
            stdout, stderr = (_read_ends(f, limits.output_kb * 1024) for f in (out, err))
        if timed_out:
            return RunResult(False, f"timeout after {limits.wall_s} s", None, stdout, stderr, wall)
        if report is None or "error" in report or returncode != 0:
            detail = report.get("error") if report else f"launcher ended with status {returncode}"
            raise SandboxError(f"sandbox worker failed: {detail}; stderr: {stderr[-500:]}")
        status = report["status"]
        reason = _ending(status, report["cpu_s"], limits)
        return RunResult(status == 0, reason, status, stdout, stderr, wall)

    def _launch(self, slot, config, out, err, wall_s) -> tuple[int, bool, dict | None]:
        read_end, write_end = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(config), str(write_end)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=scrubbed_env(config["work"]),
                cwd=config["work"], start_new_session=True, pass_fds=(write_end,))
        except OSError as e:
            raise SandboxError(f"cannot start the sandbox launcher: {e}") from e
        finally:
            os.close(write_end)
        with self._lock:
            self._running[slot] = proc.pid
        try:
            timed_out = False
            try:
                proc.wait(timeout=wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            # The launcher's group: on a timeout it goes, and the candidate with it (parent-death
            # signal, then the end of its PID namespace).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return proc.returncode, timed_out, _read_report(read_end)
        finally:
            os.close(read_end)
            with self._lock:
                self._running.pop(slot, None)


def _ending(status: int, cpu_s: float, limits: Limits) -> str:
    """Why the candidate ended. The sandbox's own processes never die here (that raises); a candidate
    killed by a signal scores 0 whoever sent it, itself included, so that dying is never a way out
    of a 0."""
    if status >= 0:
        return "ok" if status == 0 else f"exit status {status}"
    sig = signal.Signals(-status)
    if sig == signal.SIGKILL and cpu_s >= limits.cpu_s:
        return "killed by SIGKILL (CPU limit)"  # the hard limit, one second after an ignored SIGXCPU
    return f"killed by {sig.name}" + (f" ({SIGNAL_REASONS[sig]})" if sig in SIGNAL_REASONS else "")


def slot_uid(slot: int, pid: int | None = None) -> int:
    return UID_BASE + ((os.getpid() if pid is None else pid) % PROCESSES) * SLOTS + slot


def run_tests(sandbox: Sandbox, program: str, tests: str, limits: Limits | None = None) -> RunResult:
    """Run ``program`` then ``tests`` (plain asserts) in one fresh interpreter. It passes only if the
    tests reach their end: the harness prints a random token after them, and the run counts as ``ok``
    only when that token is the last line of stdout. The harness and the tests are deleted from the
    disk before the program runs (a program could still dig the token out of the interpreter's
    memory; this stops accidental passes such as an early ``sys.exit(0)``, not a determined one)."""
    token = secrets.token_hex(16)
    harness = (
        "import os, sys\n"
        "def _load(name):\n"
        "    with open(name) as f:\n"
        "        return f.read()\n"
        "_program, _tests = _load('solution.py'), _load('tests.py')\n"
        "os.remove('tests.py')\n"
        "os.remove(__file__)\n"
        "_ns = {'__name__': 'solution'}\n"
        "exec(compile(_program, 'solution.py', 'exec'), _ns)\n"
        "exec(compile(_tests, 'tests.py', 'exec'), _ns)\n"
        f"sys.stdout.write('\\n{token}\\n')\n"
    )
    result = sandbox.run({"main.py": harness, "solution.py": program, "tests.py": tests}, limits)
    if not result.ok:
        return result
    lines = result.stdout.rstrip("\n").rsplit("\n", 1)
    if lines[-1] != token:
        return dataclasses.replace(result, ok=False, reason="exited before the tests finished")
    return dataclasses.replace(result, stdout=result.stdout[: -len(token) - 2])


def scrubbed_env(work: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}


def _read_ends(f, limit: int) -> str:
    """The first and last ``limit / 2`` bytes of a long output (the end says how a run ended)."""
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    if size <= limit:
        return f.read().decode("utf-8", errors="replace")
    head = f.read(limit // 2)
    f.seek(size - limit // 2)
    cut = f"\n[... {size - 2 * (limit // 2)} bytes cut ...]\n".encode()
    return (head + cut + f.read()).decode("utf-8", errors="replace")


def _read_report(fd: int) -> dict | None:
    chunks = []
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks).decode())
    except ValueError:
        return None


# ---- probing the host (once per process) ------------------------------------------------------------

_PROBED: Isolation | None = None


def probe() -> Isolation:
    """Which namespaces a child may enter here: tried once in a throwaway launcher, then cached."""
    global _PROBED
    if _PROBED is None:
        _PROBED = _probe()
        if not _PROBED.network:
            warnings.warn(f"kinetic sandbox: no network namespace, candidates can reach the network "
                          f"({'; '.join(_PROBED.notes)})", RuntimeWarning, stacklevel=3)
    return _PROBED


def _probe() -> Isolation:
    root = os.geteuid() == 0
    if sys.platform != "linux":
        return Isolation(False, False, False, "none", (f"namespaces need Linux, not {sys.platform}",))
    with tempfile.TemporaryDirectory(prefix="kinetic-sandbox-probe-") as work:
        cmd = [sys.executable, "-I", "-S", os.path.abspath(__file__), "--probe", work]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=scrubbed_env(work))
            found = json.loads(done.stdout)
        except (OSError, ValueError, subprocess.TimeoutExpired) as e:
            raise SandboxError(f"cannot probe the host for namespaces: {e}") from e
    notes = [f"{k}: {v}" for k, v in found.items() if v is not True]
    if root and found["user"] is not True:
        notes.append("every slot runs as uid 65534: one candidate's processes count against the "
                     "others' process limit")
    if root:
        user = "uid" if found["user"] is True else "nobody"
    else:
        user = "userns" if found["user"] is True else "none"
    if not root:
        notes.append("not root: the candidate runs as the calling user" +
                     (" inside its own user namespace" if user == "userns" else ""))
    return Isolation(found["net"] is True, found["pid"] is True, found["mounts"] is True, user, tuple(notes))


# ---- the launcher and the candidate (run as `python -I -S sandbox.py`) ----------------------------------

_libc = None


def _syscall(name: str, *args) -> None:
    global _libc
    _libc = _libc or ctypes.CDLL(None, use_errno=True)
    if getattr(_libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}: {os.strerror(errno)}")


def _enter_namespaces(net: bool, pid: bool, mounts: bool, work: str) -> None:
    """Unshare in the launcher (a PID namespace takes effect for its next child, the candidate)."""
    flags = (CLONE_NEWNET if net else 0) | (CLONE_NEWPID if pid else 0) | (CLONE_NEWNS if mounts else 0)
    if os.geteuid() != 0 and flags:
        uid, gid = os.geteuid(), os.getegid()
        _syscall("unshare", CLONE_NEWUSER | flags)
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    elif flags:
        _syscall("unshare", flags)
    if mounts:
        _syscall("mount", None, b"/", None, MS_REC | MS_PRIVATE, None)  # nothing propagates out


def _expose_interpreter(prefix: str, scratch: str) -> None:
    """The candidate's uid may not traverse to the interpreter (a pyenv Python under a 0700 /root):
    in this mount namespace, cover the first closed ancestor with a tmpfs that holds only the
    interpreter's prefix, bind-mounted at its own path (so its rpath and stdlib resolve)."""
    parts = prefix.strip("/").split("/")
    closed = next((a for a in ("/" + "/".join(parts[:i]) for i in range(1, len(parts)))
                   if not os.stat(a).st_mode & 0o001), None)
    if closed is None:
        return
    if scratch.startswith(closed + "/"):
        raise OSError(f"the sandbox's temporary directory {scratch} lies under {closed}, which the "
                      f"candidate cannot enter; set TMPDIR to a directory outside it (e.g. /tmp)")
    stage = os.path.join(scratch, "python")
    os.mkdir(stage, 0o755)
    _syscall("mount", prefix.encode(), stage.encode(), None, MS_BIND | MS_REC, None)
    _syscall("mount", b"tmpfs", closed.encode(), b"tmpfs", 2 | 4, b"mode=0755,size=64k")
    os.makedirs(prefix, exist_ok=True)
    _syscall("mount", stage.encode(), prefix.encode(), None, MS_BIND | MS_REC, None)


def _readonly_except(work: str) -> None:
    """In this (new, private) mount namespace: ``work`` stays writable, every other mount becomes
    read-only."""
    _syscall("mount", work.encode(), work.encode(), None, MS_BIND | MS_REC, None)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].encode().decode("unicode_escape") for line in f]
    for point in points:
        if point == work or point.startswith(work + "/"):
            continue
        try:
            keep = os.statvfs(point).f_flag & KEEP_MOUNT_FLAGS
            _syscall("mount", None, point.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep, None)
        except OSError:
            if point == "/":
                raise  # the one that matters; overmounted or special mounts may refuse


def _become_candidate(config: dict) -> None:
    """In the forked candidate, before exec: limits, then the uid (a change of uid clears the
    parent-death signal, so it is set after)."""
    limits = config["limits"]
    mb = 1024 * 1024
    for res, value in ((resource.RLIMIT_AS, limits["memory_mb"] * mb),
                       (resource.RLIMIT_CPU, limits["cpu_s"]),
                       (resource.RLIMIT_NPROC, limits["processes"]),
                       (resource.RLIMIT_FSIZE, limits["file_mb"] * mb),
                       (resource.RLIMIT_NOFILE, limits["open_files"]),
                       (resource.RLIMIT_CORE, 0)):
        hard = value + 1 if res == resource.RLIMIT_CPU else value  # SIGXCPU at the soft limit
        resource.setrlimit(res, (value, hard))
    # Empty the capability bounding set, so that exec grants no capability even to uid 0 of a user
    # namespace (which could otherwise remount the read-only mounts).
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    for cap in range(last_cap + 1):
        _syscall("prctl", PR_CAPBSET_DROP, cap, 0, 0, 0)
    if config["uid"] is not None:
        os.setgroups([])
        os.setgid(config["uid"])
        os.setuid(config["uid"])
    _syscall("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.chdir(config["work"])


def _launcher(config: dict, report_fd: int) -> None:
    """Enter the namespaces, then fork the namespace's init, which forks the candidate. The init
    (PID 1) stays root and unkillable by the candidate; when it exits every process left in the
    namespace dies."""
    report = os.fdopen(report_fd, "w")
    iso = config["isolation"]
    try:
        _enter_namespaces(iso["network"], iso["pid"], iso["mounts"], config["work"])
        if iso["mounts"] and config["uid"] is not None:
            _expose_interpreter(config["prefix"], os.path.dirname(config["work"]))
        if iso["mounts"]:
            _readonly_except(config["work"])
        init = os.fork()
    except OSError as e:
        report.write(json.dumps({"error": f"launcher: {e}"}))
        return
    if init == 0:
        code = 1
        try:
            _syscall("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            report.write(json.dumps(_init(config, report)))
            report.close()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(init, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        report.write(json.dumps({"error": f"namespace init ended with {os.waitstatus_to_exitcode(status)}"}))
    report.close()


def _init(config: dict, report) -> dict:
    err_read, err_write = os.pipe()  # close-on-exec: EOF without a message means the exec succeeded
    child = os.fork()
    if child == 0:
        try:
            os.close(err_read)
            report.close()
            _become_candidate(config)
            python = config["python"]
            os.execve(python, [python, "-I", "-S", config["main"]], scrubbed_env(config["work"]))
        except BaseException as e:  # noqa: BLE001 - anything before exec is the sandbox's failure
            os.write(err_write, f"candidate setup: {e!r}".encode())
        finally:
            os._exit(127)
    os.close(err_write)
    with os.fdopen(err_read, "rb") as f:
        setup_error = f.read().decode()
    _, status, usage = os.wait4(child, 0)
    if setup_error:
        return {"error": setup_error}
    return {"status": os.waitstatus_to_exitcode(status), "cpu_s": usage.ru_utime + usage.ru_stime}


def _probe_child(work: str) -> dict:
    """Try each namespace in a throwaway child; True or the reason it failed."""
    found = {}
    for key, args in (("net", (True, False, False)), ("pid", (False, True, False)),
                      ("mounts", (False, False, True)), ("user", None)):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                if args is None and os.geteuid() == 0:  # can the per-slot uids be used?
                    for uid in (slot_uid(0, 0), slot_uid(SLOTS - 1, PROCESSES - 1)):
                        _fork_and(lambda u=uid: (os.setgid(u), os.setuid(u)))
                elif args is None:
                    _syscall("unshare", CLONE_NEWUSER)
                else:
                    _enter_namespaces(*args, work)
                    if args[2]:
                        _readonly_except(work)
                os._exit(0)
            except BaseException as e:  # noqa: BLE001
                os.write(write_end, str(e)[:200].encode())
                os._exit(1)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as f:
            why = f.read().decode()
        _, status = os.waitpid(pid, 0)
        found[key] = True if os.waitstatus_to_exitcode(status) == 0 else (why or "unshare refused")
    return found


def _fork_and(action) -> None:
    """Run ``action`` in a forked child; OSError if it fails there."""
    pid = os.fork()
    if pid == 0:
        try:
            action()
            os._exit(0)
        except BaseException:  # noqa: BLE001
            os._exit(1)
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
        raise OSError("cannot switch to the sandbox uids (not mapped here?)")


if __name__ == "__main__":
    if sys.argv[1] == "--probe":
        sys.stdout.write(json.dumps(_probe_child(sys.argv[2])))
    else:
        _launcher(json.loads(sys.argv[1]), int(sys.argv[2]))
