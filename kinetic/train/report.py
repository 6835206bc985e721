"""Run records: ``metrics.jsonl`` (first line: config, versions, git commit), ``summary.json`` and a
PNG of train/validation loss and learning rate, so a run can be understood without rerunning it."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    import kinetic

    out = {"python": platform.python_version(), "torch": torch.__version__, "kinetic": kinetic.__version__}
    try:
        import numpy

        out["numpy"] = numpy.__version__
    except ImportError:
        pass
    return out


class MetricsWriter:
    """Appends JSON lines; the first line of a new file records what produced the run. A resumed run
    (``header["resumed_from_step"]`` set) first drops the step records past that step, which the
    resumed run writes again, so each step appears once."""

    def __init__(self, run_dir: Path, header: dict[str, Any], enabled: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fresh = not self.path.exists() or self.path.stat().st_size == 0
            if not fresh and header.get("resumed_from_step") is not None:
                self._drop_after(header["resumed_from_step"])
            if fresh or header.get("resumed_from_step") is not None:
                self.write({"type": "run", "time": time.time(), "versions": versions(),
                            "git_commit": git_commit(), **header})

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def _drop_after(self, step: int) -> None:
        """Rewrite the file (atomically) without the train/eval records of steps after ``step``; a
        line cut short by a kill is dropped too."""
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not (isinstance(record, dict) and record.get("type") in ("train", "eval")
                    and record.get("step", 0) > step):
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a line cut short by a kill is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def summary_from_metrics(run_dir: Path, step: int, tokens: int, skipped: int) -> dict[str, Any]:
    """A run's summary rebuilt from ``metrics.jsonl`` up to ``step`` (for a run killed after its final
    checkpoint, before its summary): the final train loss is the last logged line's mean, and the
    wall time of the lost session is unknown (None)."""
    records = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    train = [r for r in records if r.get("type") == "train" and "lm_loss" in r]
    val = [r for r in records if r.get("type") == "eval"]
    return {"steps": step, "tokens": tokens, "skipped_steps": skipped,
            "final_train_lm_loss": train[-1]["lm_loss"] if train else None,
            "final_val_loss": val[-1]["val_loss"] if val else None, "wall_s": None,
            "tokens_per_s": train[-1].get("tokens_per_s") if train else None,
            "rebuilt_from": "metrics.jsonl"}


def plot_run(run_dir: Path) -> Path | None:
    """Train/validation loss (an RL run: rewards, clipped share, log-prob gap) and learning rate
    against step; returns the PNG path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("type") == "train"]
    val = [r for r in records if r.get("type") == "eval"]
    if not train:
        return None
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=[3, 1])
    if not any("lm_loss" in r for r in train):  # an RL run: its rewards instead of a loss
        for key, label in (("reward_mean", "mean reward"), ("clip_fraction", "clipped tokens"),
                           ("logprob_mismatch", "sampler/learner |log-prob| gap")):
            pts = [(r["step"], r[key]) for r in train if key in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=label)
        ax.set_ylabel("per step")
        val = []
    else:
        ax.plot([r["step"] for r in train], [r["lm_loss"] for r in train], label="train LM loss")
        ax.set_ylabel("cross-entropy (nats/token)")
    if any("mtp_loss" in r for r in train):
        pts = [(r["step"], r["mtp_loss"]) for r in train if "mtp_loss" in r]
        ax.plot(*zip(*pts, strict=True), label="train MTP loss", alpha=0.7)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.legend()
    ax.grid(alpha=0.3)
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:gray")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(run_dir) / "loss.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
