"""``kinetic params`` and ``kinetic demo``: what a config holds, and a model's save -> reload -> generate.

* ``kinetic params CONFIG.json|CHECKPOINT_DIR|PRESET`` — parameter counts (total / active / MTP) and
  the layer mix of a config, computed arithmetically, so it works for 120B models on a laptop.
* ``kinetic demo --out DIR`` — build a random model from a preset, save it, reload it, check the
  reloaded logits are bit-identical, and generate a few tokens greedily; writes ``summary.json``
  (versions, commit, tokens, timings) next to the checkpoint so a run can be reproduced from it.

The number formatting here (:func:`human`) is shared by the other command families.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import kinetic
from kinetic.config import PATTERN_TO_TYPE, PRESETS, ModelConfig, preset
from kinetic.errors import UserError
from kinetic.hf import INDEX_NAME
from kinetic.model import NemotronHForCausalLM

LAYER_NAMES = {"M": "Mamba-2", "*": "attention", "-": "MLP", "E": "MoE"}
COUNT_LABELS = {"total": "total", "active": "active", "active_with_embeddings": "active + embeddings",
                "mtp": "mtp"}
DEMO_MAX_PARAMS = 2e9  # the demo builds the model in fp32 on the CPU; bigger presets do not fit


# ---------------------------------------------------------------------- formatting helpers
def human(n: float) -> str:
    """31577937344 -> '31.58B'; small numbers stay exact."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def human_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def layer_counts(pattern: str) -> dict[str, int]:
    return {c: pattern.count(c) for c in PATTERN_TO_TYPE}


def layer_summary(config: ModelConfig) -> str:
    counts = layer_counts(config.hybrid_override_pattern)
    mix = ", ".join(f"{counts[c]} {c} ({LAYER_NAMES[c]})" for c in PATTERN_TO_TYPE)
    return f"{config.num_hidden_layers} layers: {mix}"


def params_table(config: ModelConfig, source: str) -> str:
    counts = config.param_counts()
    exact = {k: f"{v:,}" for k, v in counts.items()}
    w_label = max(map(len, COUNT_LABELS.values()))
    w_exact = max(map(len, exact.values()))
    lines = [f"{'config':<{w_label}}  {source}", f"{'layers':<{w_label}}  {layer_summary(config)}",
             f"{'pattern':<{w_label}}  {config.hybrid_override_pattern}"]
    if config.num_nextn_predict_layers:
        lines.append(f"{'mtp layers':<{w_label}}  {config.num_nextn_predict_layers} x "
                     f"{config.mtp_hybrid_override_pattern}")
    lines.append("")
    for key, label in COUNT_LABELS.items():
        lines.append(f"{label:<{w_label}}  {exact[key]:>{w_exact}}  {human(counts[key]):>8}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- params
def load_config(arg: str) -> ModelConfig:
    """A preset name, a config.json file or a checkpoint directory."""
    if arg in PRESETS:
        return preset(arg)
    if Path(arg).exists():
        try:
            return ModelConfig.from_pretrained(arg)
        except (ValueError, TypeError, FileNotFoundError) as err:  # a bad config.json, not a bug here
            raise UserError(f"{arg}: {err}") from None
    raise UserError(f"{arg!r} is neither an existing config.json / checkpoint directory nor a preset; "
                    f"presets: {', '.join(PRESETS)}")


def cmd_params(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.json:
        out = dict(config.param_counts())
        out.update(source=args.config, num_hidden_layers=config.num_hidden_layers,
                   layers=layer_counts(config.hybrid_override_pattern),
                   pattern=config.hybrid_override_pattern,
                   num_nextn_predict_layers=config.num_nextn_predict_layers,
                   mtp_pattern=config.mtp_hybrid_override_pattern)
        print(json.dumps(out, indent=2))
    else:
        print(params_table(config, args.config))
    return 0


# ---------------------------------------------------------------------- demo
def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _check_demo_args(args: argparse.Namespace, config: ModelConfig) -> None:
    if args.prompt_len < 1:
        raise UserError(f"--prompt-len={args.prompt_len} must be >= 1")
    if args.new_tokens < 1:
        raise UserError(f"--new-tokens={args.new_tokens} must be >= 1")
    counts = config.param_counts()
    total = counts["total"] + counts["mtp"]
    if total > DEMO_MAX_PARAMS:
        raise UserError(f"preset {args.preset!r} has {human(total)} parameters; the demo builds it in "
                        f"fp32 on the CPU, so use a preset under {human(DEMO_MAX_PARAMS)} "
                        "(e.g. tiny or small)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out={args.out} exists and is not a directory")


def _same_outputs(a, b) -> bool:
    if not a.logits.equal(b.logits):
        return False
    mtp_a, mtp_b = a.mtp_logits or [], b.mtp_logits or []
    return len(mtp_a) == len(mtp_b) and all(x.equal(y) for x, y in zip(mtp_a, mtp_b, strict=True))


def _timed_generate(model, prompt, new_tokens: int) -> tuple:
    """(ids, prefill seconds, decode seconds), all through ``model.generate`` (EOS ignored so exactly
    ``new_tokens`` come out). After a warm-up, a 1-token generate is the prefill; the rest of the
    full generate is the decode of new_tokens - 1 steps."""

    def timed(n: int):
        start = time.perf_counter()
        ids = model.generate(prompt, max_new_tokens=n, eos_token_id=None)
        return ids, time.perf_counter() - start

    timed(2)  # warm-up: first calls pay for allocator and kernel selection
    _, prefill_s = timed(1)
    ids, total_s = timed(new_tokens)
    return ids, prefill_s, max(total_s - prefill_s, 0.0)


def cmd_demo(args: argparse.Namespace) -> int:
    config = preset(args.preset)
    _check_demo_args(args, config)
    torch.manual_seed(args.seed)
    model = NemotronHForCausalLM(config).eval()
    out = Path(args.out)
    model.save_pretrained(out)
    reloaded = kinetic.from_pretrained(out)
    prompt = torch.randint(config.vocab_size, (1, args.prompt_len),
                           generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        if not _same_outputs(model(prompt), reloaded(prompt)):
            print(f"kinetic demo: error: logits of the model reloaded from {out} differ from the "
                  "original's; the checkpoint round trip is broken", file=sys.stderr)
            return 1
    ids, prefill_s, decode_s = _timed_generate(reloaded, prompt, args.new_tokens)
    new_ids = ids[0, args.prompt_len:].tolist()
    size = sum(f.stat().st_size for f in out.iterdir()
               if f.name in ("config.json", INDEX_NAME) or f.suffix == ".safetensors")

    print(params_table(config, f"preset {args.preset} (seed {args.seed})"))
    print(f"\ncheckpoint  {out}  ({human_bytes(size)}); reloaded logits match exactly")
    steps = max(len(new_ids) - 1, 0)
    print(f"timing      prefill {args.prompt_len} tok in {prefill_s * 1e3:.1f} ms "
          f"({args.prompt_len / max(prefill_s, 1e-9):,.0f} tok/s); decode {steps} tok in "
          f"{decode_s * 1e3:.1f} ms ({steps / max(decode_s, 1e-9):,.0f} tok/s)")
    print(f"prompt      {prompt[0].tolist()}")
    print(f"generated   {new_ids}")
    summary = {"command": "demo", "preset": args.preset, "seed": args.seed, "prompt": prompt[0].tolist(),
               "generated": new_ids, "prefill_s": prefill_s, "decode_s": decode_s,
               "checkpoint_bytes": size, "params": config.param_counts(),
               "versions": {"kinetic": kinetic.__version__, "torch": torch.__version__,
                            "python": platform.python_version()}, "git_commit": _git_commit()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


# ---------------------------------------------------------------------- registration
def register(sub: argparse._SubParsersAction) -> None:
    """Add ``params`` and ``demo`` to the ``kinetic`` subparsers."""
    p = sub.add_parser("params", help="parameter counts and layer mix of a config")
    p.add_argument("config", help=f"config.json, checkpoint directory, or preset ({', '.join(PRESETS)})")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("demo", help="random model -> save -> reload -> check -> generate")
    p.add_argument("--out", required=True, help="directory for the checkpoint")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS))
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
