"""The model-speed benchmark runs end to end on the tiny preset (a smoke test of the script, not a
timing assertion): both implementations compute the same logits, every mode reports a rate, and the
per-layer-kind forward breakdown accounts for the whole forward."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_model_speed_runs_and_breaks_down_the_forward(tmp_path, capsys):
    import model_speed

    out = tmp_path / "speed.json"
    report = model_speed.main(["--preset", "tiny", "--batch", "1", "--seq", "40", "--iters", "2",
                               "--warmup", "1", "--peak-size", "128", "--peak-repeats", "2",
                               "--breakdown", "--json", str(out)])
    assert report["max_logit_diff"] < 1e-4
    for impl in ("kinetic", "transformers"):
        for mode in model_speed.MODES:
            assert report["results"][impl][mode]["tokens_per_s"] > 0
        parts = report["forward_breakdown_ms"][impl]
        assert set(parts) == {"mamba", "moe", "attention", "lm_head", "other", "total"}
        assert min(parts["mamba"], parts["moe"], parts["attention"], parts["lm_head"]) > 0
        inside = parts["mamba"] + parts["moe"] + parts["attention"] + parts["lm_head"]
        assert inside <= parts["total"]
    assert json.loads(out.read_text())["forward_breakdown_ms"] == report["forward_breakdown_ms"]
    assert "forward ms per kind of layer" in capsys.readouterr().out
