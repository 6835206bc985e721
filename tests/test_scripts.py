"""scripts/gpu_check.sh, the CUDA checks a session runs on a lent GPU, run here with a stand-in Python
that records its arguments: every step runs, with its log, the checkpoint reaches decode.py, and a
failing step is reported without stopping the next."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, fail: str = "", *args: str) -> subprocess.CompletedProcess:
    fake = tmp_path / "python"
    pattern = fail or "@none@"
    fake.write_text(f'#!/usr/bin/env bash\necho "args: $*"\ncase "$*" in *{pattern}*) exit 3;; esac\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(tmp_path / "out")}
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_gpu_check_runs_every_step(tmp_path):
    done = _run(tmp_path, "", "ckpt/quickstart")
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "out"
    steps = [line.split()[0] for line in (out / "summary.txt").read_text().splitlines()]
    assert steps == ["env", "test_cuda", "decode", "decode_attention", "train_speed", "long_context_fp32"]
    assert len(list(out.iterdir())) <= 8  # what a lent machine returns
    assert "benchmarks/train_speed.py --device cuda" in (out / "train_speed.log").read_text()
    decode = (out / "decode.log").read_text()
    assert "benchmarks/decode.py --device cuda --compile --checkpoint ckpt/quickstart" in decode
    assert "--tokens 1048576" in (out / "long_context_fp32.log").read_text()


def test_gpu_check_reports_a_failing_step_and_goes_on(tmp_path):
    done = _run(tmp_path, "tests/test_cuda.py")
    assert done.returncode != 0
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "test_cuda exit=3" in summary and "long_context_fp32 exit=0" in summary
    assert "--checkpoint" not in (tmp_path / "out" / "decode.log").read_text()
