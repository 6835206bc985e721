"""The code sandbox: correct programs pass and failing ones score 0 with a reason; runaway CPU, fork
bombs and huge allocations are contained; nothing outside the work directory can be written; no
network where the host has network namespaces; a killed worker raises instead of scoring 0. The
limits are tight so that a broken sandbox cannot take the test machine down."""

from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from kinetic.posttrain import sandbox as sandbox_module
from kinetic.posttrain.sandbox import (
    SLOTS,
    Isolation,
    Limits,
    Sandbox,
    SandboxError,
    probe,
    run_tests,
    slot_uid,
)

LIMITS = Limits(wall_s=2.0, cpu_s=1, memory_mb=256, processes=8, file_mb=1, open_files=32)


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(LIMITS, workers=2)


def test_correct_solution_passes_and_failing_one_does_not(sandbox):
    program = "def add(a, b):\n    return a + b\n"
    assert run_tests(sandbox, program, "assert add(2, 3) == 5\nassert add(-1, 1) == 0").ok
    failed = run_tests(sandbox, program.replace("a + b", "a - b"), "assert add(2, 3) == 5")
    assert not failed.ok and failed.reason == "exit status 1" and "AssertionError" in failed.stderr


def test_early_exit_does_not_pass_the_tests(sandbox):
    for exit_call in ("import sys; sys.exit(0)", "import os; os._exit(0)"):
        result = run_tests(sandbox, f"def add(a, b):\n    return 0\n{exit_call}\n", "assert add(2, 3) == 5")
        assert not result.ok and result.reason == "exited before the tests finished"


def test_tests_pass_after_long_output_and_are_hidden(sandbox):
    program = "import os\nprint('x' * 200_000)\nLISTING = sorted(os.listdir('.'))\n"
    result = run_tests(sandbox, program, "assert LISTING == ['solution.py'], LISTING")
    assert result.ok, result.stderr
    assert "bytes cut" in result.stdout and len(result.stdout) < 70_000  # output_kb=64 keeps both ends


def test_a_candidate_that_kills_itself_scores_zero(sandbox):
    result = run_tests(sandbox, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", "assert False")
    assert not result.ok and result.reason == "killed by SIGKILL"  # not a SandboxError: no way out of a 0


def test_output_and_exit_status(sandbox):
    result = sandbox.run({"main.py": "import sys\nprint('hello')\nsys.exit(3)"})
    assert (result.ok, result.returncode, result.stdout) == (False, 3, "hello\n")
    assert result.reason == "exit status 3"


def test_busy_loop_is_killed_within_timeout_plus_one_second(sandbox):
    limits = Limits(wall_s=1.0, cpu_s=30, memory_mb=256, processes=8)  # the wall clock, not the CPU limit
    start = time.monotonic()
    result = sandbox.run({"main.py": "while True:\n    pass\n"}, limits)
    assert time.monotonic() - start < limits.wall_s + 1.0
    assert not result.ok and result.reason.startswith("timeout")
    cpu = sandbox.run({"main.py": "while True:\n    pass\n"})  # cpu_s=1 < wall_s=2: the CPU limit
    assert not cpu.ok and cpu.reason == "killed by SIGXCPU (CPU limit)"
    stubborn = "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass\n"
    cpu = sandbox.run({"main.py": stubborn}, dataclasses.replace(LIMITS, wall_s=4.0))  # hard limit: 1 s later
    assert not cpu.ok and cpu.reason == "killed by SIGKILL (CPU limit)"


def test_sleeping_past_the_wall_clock_times_out(sandbox):
    limits = dataclasses.replace(LIMITS, wall_s=0.5)
    start = time.monotonic()
    result = sandbox.run({"main.py": "import time\ntime.sleep(30)\n"}, limits)
    assert result.reason == "timeout after 0.5 s" and time.monotonic() - start < limits.wall_s + 1.0


def test_fork_bomb_is_contained(sandbox):
    bomb = "import os\nwhile True:\n    os.fork()\n"
    start = time.monotonic()
    result = sandbox.run({"main.py": bomb})
    assert time.monotonic() - start < LIMITS.wall_s + 1.0
    assert result.reason == "exit status 1" and "BlockingIOError" in result.stderr  # RLIMIT_NPROC hit
    assert not _sandbox_processes()  # nothing of it survives
    # And the slots' process limits are free again: a fresh run can still start processes.
    spawn = "import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'pass'], check=True)\n"
    assert all(r.ok for r in sandbox.map([{"main.py": spawn}] * 2))


def _sandbox_processes() -> list[str]:
    """Processes running under a sandbox slot's uid (only meaningful as root)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        if slot_uid(0) <= uid < slot_uid(SLOTS):
            found.append(pid)
    return found


def test_ten_gigabyte_allocation_is_contained(sandbox):
    result = sandbox.run({"main.py": "x = bytearray(10 * 2**30)\n"})
    assert not result.ok and "MemoryError" in result.stderr


def test_writing_outside_the_work_directory_fails(sandbox):
    name = f"kinetic-sandbox-escape-{secrets.token_hex(4)}"
    targets = [f"/tmp/{name}", f"/dev/shm/{name}", os.path.expanduser(f"~root/{name}"), f"../{name}",
               os.path.join(os.path.dirname(os.path.abspath(__file__)), name)]
    program = (
        "import sys\n"
        f"for path in {targets!r}:\n"
        "    try:\n"
        "        open(path, 'w').write('x')\n"
        "    except OSError:\n"
        "        continue\n"
        "    sys.exit('wrote ' + path)\n"
        "open('inside.txt', 'w').write('ok')\n"  # the work directory itself is writable
        "print(open('inside.txt').read())\n"
    )
    result = sandbox.run({"main.py": program})
    assert result.ok, result.stderr
    assert result.stdout == "ok\n"
    assert not any(os.path.exists(t) for t in targets if os.path.isabs(t))


def test_file_size_and_open_file_limits(sandbox):
    big = sandbox.run({"main.py": "open('big', 'wb').write(bytes(2 * 2**20))\n"})  # file_mb=1
    assert not big.ok and "File too large" in big.stderr
    many = sandbox.run({"main.py": "fs = [open('f%d' % i, 'w') for i in range(100)]\n"})  # open_files=32
    assert not many.ok and "Too many open files" in many.stderr


def test_environment_is_scrubbed(sandbox, monkeypatch):
    monkeypatch.setenv("KINETIC_SECRET_TOKEN", "do-not-leak")
    result = sandbox.run({"main.py": "import os\nprint(sorted(os.environ))\n"})
    assert result.ok and "KINETIC_SECRET_TOKEN" not in result.stdout


def test_candidate_has_no_root_uid_nor_capabilities(sandbox):
    program = (
        "import ctypes, os\n"
        "print(os.getuid(), os.geteuid())\n"
        "print([line.split()[1] for line in open('/proc/self/status') if line.startswith('CapEff')][0])\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.mount(None, b'/tmp', None, 32 | 4096, None))\n"  # remount,bind (rw): refused
    )
    result = sandbox.run({"main.py": program})
    assert result.ok, result.stderr
    ids, caps, remount = result.stdout.splitlines()
    assert int(caps, 16) == 0 and remount == "-1"
    if os.geteuid() == 0:
        assert sandbox.isolation.user == "uid" and "0" not in ids.split()


@pytest.mark.skipif(os.geteuid() != 0, reason="the uid fallback applies when the sandbox runs as root")
def test_shared_nobody_uid_fallback_still_confines():
    sandbox = Sandbox(LIMITS, workers=1)
    sandbox.isolation = dataclasses.replace(sandbox.isolation, user="nobody")  # as if the range were unmapped
    program = f"import os\nprint(os.getuid())\nopen('/tmp/kinetic-sandbox-{secrets.token_hex(4)}', 'w')\n"
    result = sandbox.run({"main.py": program})
    assert result.stdout == "65534\n" and not result.ok and "OSError" in result.stderr


def test_socket_to_localhost_fails(sandbox):
    if not sandbox.isolation.network:
        pytest.skip(f"no network namespace here: {sandbox.isolation.notes}")
    import socket

    with socket.socket() as server:  # a listener on the host the candidate must not reach
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
        result = sandbox.run({"main.py": program})
    assert not result.ok and "OSError" in result.stderr


def test_killing_a_worker_raises():
    sandbox = Sandbox(LIMITS, workers=1)

    def kill_the_worker():
        deadline = time.monotonic() + 5
        while not sandbox.launcher_pids() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        os.kill(sandbox.launcher_pids()[0], signal.SIGKILL)

    thread = threading.Thread(target=kill_the_worker)
    thread.start()
    with pytest.raises(SandboxError, match="worker failed"):
        sandbox.run({"main.py": "import time\ntime.sleep(1.5)\n"})
    thread.join()


def test_workers_are_bounded():
    sandbox = Sandbox(LIMITS, workers=2)
    peak, lock = [0], threading.Lock()

    def watch(stop):
        while not stop.is_set():
            with lock:
                peak[0] = max(peak[0], len(sandbox.launcher_pids()))
            time.sleep(0.005)

    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(stop,))
    watcher.start()
    sleeper = {"main.py": "import time\ntime.sleep(0.3)\n"}
    with ThreadPoolExecutor(5) as pool:  # more callers than workers
        results = list(pool.map(lambda _: sandbox.run(sleeper), range(5)))
    stop.set()
    watcher.join()
    assert all(r.ok for r in results) and peak[0] == 2


def test_probe_is_cached_and_reported(monkeypatch):
    assert probe() is probe()
    assert probe().network or probe().notes  # when a feature is off, the notes say why
    # A host without namespaces: a warning once, the reason kept, and require_isolation refuses.
    bare = Isolation(False, False, False, "nobody", ("net: unshare refused",))
    monkeypatch.setattr(sandbox_module, "_PROBED", None)
    monkeypatch.setattr(sandbox_module, "_probe", lambda: bare)
    with pytest.warns(RuntimeWarning, match="no network namespace.*unshare refused"):
        assert Sandbox(LIMITS).isolation is bare
    with pytest.raises(SandboxError, match="unshare refused"):
        Sandbox(LIMITS, require_isolation=True)


def test_bad_arguments():
    with pytest.raises(ValueError, match="workers"):
        Sandbox(workers=0)
    with pytest.raises(ValueError, match="cpu_s"):
        Limits(cpu_s=0)
    with pytest.raises(ValueError, match="main.py"):
        Sandbox(LIMITS).run({"other.py": ""})
    with pytest.raises(ValueError, match="leaves the work directory"):
        Sandbox(LIMITS).run({"main.py": "", "../x.py": ""})
