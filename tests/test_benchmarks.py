"""Benchmarks run end to end on the tiny preset (smoke tests of the scripts, not timing assertions):
model_speed (both implementations compute the same logits, every mode reports a rate, the per-kind
forward breakdown accounts for the whole forward; with --compile, compiled rows), long_context
(tensor peak and resident-set growth reported), decode (speculative rows with identical tokens,
latency rows), decode_attention (every way of attending agrees with a float64 reference),
train_speed (eager and compiled trainer rows), ops (a row per implementation that takes a call),
batch_decode (batched and one-at-a-time rows, identical tokens) and serve (a live server's rows)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

import kinetic
from kinetic.kernels.cpu import decode_attention_available, mamba_kernels_available

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_model_speed_runs_and_breaks_down_the_forward(tmp_path, capsys, monkeypatch):
    import model_speed

    import kinetic.kernels.cpu as kc

    # every logits tensor takes the huge-page path, which bypasses the lm_head module: still timed
    monkeypatch.setattr(kc, "HUGE_PAGE_MIN_BYTES", 1)
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
        kinds = {model_speed.BLOCK_KINDS[c] for c in kinetic.preset("tiny").hybrid_override_pattern}
        blocks = report["block_fwd_bwd_ms"][impl]
        assert set(blocks) == kinds and min(blocks.values()) > 0
    saved = json.loads(out.read_text())
    assert saved["forward_breakdown_ms"] == report["forward_breakdown_ms"]
    assert saved["block_fwd_bwd_ms"] == report["block_fwd_bwd_ms"]
    printed = capsys.readouterr().out
    assert "forward ms per kind of layer" in printed and "forward+backward ms of one block" in printed


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_model_speed_compiled_rows(tmp_path, capsys, monkeypatch):
    """--compile adds both models wrapped by torch.compile, with a compiled-vs-compiled ratio and the
    compile (first iteration) time; torch.compile is an identity wrapper here (compiling both models
    in three modes would take minutes), so this checks the rows, not the compiler."""
    import model_speed
    import torch

    wrapped = []
    monkeypatch.setattr(torch, "compile", lambda m: wrapped.append(type(m).__name__) or m)
    report = model_speed.main(["--preset", "tiny", "--batch", "1", "--seq", "40", "--iters", "2",
                               "--warmup", "1", "--peak-size", "128", "--peak-repeats", "2", "--compile"])
    assert sorted(wrapped) == ["NemotronHForCausalLM", "NemotronHForCausalLM"]  # one of each library
    assert set(report["results"]) == {"kinetic", "transformers", "kinetic compiled", "transformers compiled"}
    for mode in model_speed.MODES:
        r = report["results"]
        assert report["ratio_compiled"][mode] == pytest.approx(
            r["kinetic compiled"][mode]["tokens_per_s"] / r["transformers compiled"][mode]["tokens_per_s"])
        assert r["kinetic compiled"][mode]["first_s"] > 0
    assert "first s" in capsys.readouterr().out


def test_model_speed_times_kinetic_without_its_kernels(monkeypatch, capsys, count_calls):
    """--torch-ops adds kinetic with its C kernels stepped aside, and the kernels' gain over it."""
    import model_speed
    import torch

    import kinetic.kernels.cpu as kc

    calls = count_calls(kc, "ssd_chunk_forward")
    model = kinetic.NemotronHForCausalLM(kinetic.preset("tiny")).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    with torch.no_grad():
        model_speed.TorchOps(model)(ids)
        assert not calls  # stepped aside
        model(ids)
    mamba_layers = model.config.hybrid_override_pattern.count("M")
    assert len(calls) == (mamba_layers if kc.mamba_kernels_available() else 0)

    report = model_speed.main(["--preset", "tiny", "--batch", "1", "--seq", "40", "--iters", "2", "--warmup",
                               "1", "--peak-size", "128", "--peak-repeats", "2", "--no-transformers",
                               "--torch-ops", "--breakdown"])
    for parts in report["forward_breakdown_ms"].values():  # the wrapped model's layers are found too
        assert min(parts["mamba"], parts["moe"], parts["attention"], parts["lm_head"]) > 0
    assert set(report["block_fwd_bwd_ms"]) == {"kinetic", "kinetic torch ops"}
    r = report["results"]
    assert set(r) == {"kinetic", "kinetic torch ops"}
    for mode in model_speed.MODES:
        assert report["kernels_gain"][mode] == pytest.approx(
            r["kinetic"][mode]["tokens_per_s"] / r["kinetic torch ops"][mode]["tokens_per_s"])
    assert "with torch's operators only" in capsys.readouterr().out


def test_long_context_reports_tensor_peak_and_rss(tmp_path, capsys):
    import long_context

    out = tmp_path / "lc.json"
    report = long_context.main(["--tokens", "2048", "--chunk", "256", "--decode-steps", "2",
                                "--json", str(out)])
    assert report["cache_bytes"] >= report["budget_bytes"] - 64 * 1024  # KV buffers of the budget
    # tensors: at least cache + weights (that the excess is constant in the context is tested in
    # test_model.py)
    expected = report["budget_bytes"] + report["weights_bytes"]
    assert expected <= report["peak_bytes"]
    assert report["peak_over_budget"] == report["peak_bytes"] / expected - 1
    assert report["rss_growth_bytes"] is not None and report["decode_ms"] > 0
    assert json.loads(out.read_text())["peak_bytes"] == report["peak_bytes"]
    printed = capsys.readouterr().out
    assert "peak tensor memory" in printed
    assert "keeps this context within 10%" in printed  # 2K tokens: a 256-token chunk is too big


def test_decode_benchmark_speculative_and_latency_sections(capsys):
    import decode
    import torch

    from kinetic import NemotronHForCausalLM, preset

    torch.manual_seed(0)
    model = NemotronHForCausalLM(preset("tiny")).eval()
    prompts = [list(range(3, 12)), list(range(20, 26))]
    spec = decode.speculative_speed(model, prompts, 8, [1, 2], 1, torch.device("cpu"))
    assert [r["draft_tokens"] for r in spec["rows"]] == [1, 2]
    assert all(r["identical_tokens"] and r["tokens_per_s"] > 0 for r in spec["rows"])
    assert spec["plain_compiled_tokens_per_s"] is None
    for r in spec["rows"]:  # a round's cost split into its three phases, each timed
        phases = r["verify_steps"] + r["draft_steps"] + r["commit_steps"]
        assert min(r["verify_steps"], r["draft_steps"], r["commit_steps"]) > 0
        assert phases == pytest.approx(r["round_steps"])
    spec["checkpoint"] = "random tiny"
    decode.print_speculative(spec, torch.device("cpu"))
    printed = capsys.readouterr().out
    assert "where an eager round's time goes" in printed and "ceiling" in printed
    row = decode.step_latency(model, 300, 2, 128, torch.device("cpu"))
    assert row["context"] == 300 and row["step_ms"] > 0
    rows = decode.step_latencies(model, [200, 500], 5, 128, torch.device("cpu"), block=2)
    assert [(r["context"], r["steps"]) for r in rows] == [(200, 5), (500, 5)]
    assert min(r["step_ms"] for r in rows) > 0
    assert rows[1]["cache_mib"] > rows[0]["cache_mib"]
    ways = decode.attention_ways(torch.device("cpu"))
    assert ways == (["kernel", "torch"] if decode_attention_available() else ["torch"])
    rows = decode.step_latencies(model, [200], 3, 128, torch.device("cpu"), ways=["kernel", "torch"])
    assert rows[0]["attention"] == "kernel" and rows[0]["steps"] == 3
    assert rows[0]["step_ms"] > 0 and rows[0]["step_ms_torch"] > 0


def test_decode_attention_compares_the_ways_against_a_reference(tmp_path, capsys):
    import decode_attention

    out = tmp_path / "attn.json"
    rows = decode_attention.main(["--shapes", "tiny", "nano", "--contexts", "300", "9000", "--repeats", "2",
                                  "--json", str(out)])
    ways = ("sdpa", "rows", "split") + (("kernel",) if decode_attention_available() else ())
    assert {(r["shape"], r["context"], r["variant"]) for r in rows} == {
        (shape, n, way) for shape in ("tiny", "nano") for n in (300, 9000) for way in ways}
    for r in rows:
        assert r["max_err"] < 1e-5 and r["ms"] > 0, r
        assert r["kv_mib"] == 2 * r["context"] * 2 * decode_attention.SHAPES[r["shape"]][2] * 4 / 2**20
    assert json.loads(out.read_text())["rows"] == rows
    assert "max err" in capsys.readouterr().out


def test_train_speed_times_eager_and_compiled_trainers(tmp_path, capsys, monkeypatch):
    """The eager and the train.compile trainer rows, the model taken from a recipe's [model] section.
    Compilation itself is replaced by a no-op here (tests/test_train.py compiles a trainer; compiling
    the benchmark's model again would add a minute): this checks the rows and the break-even line."""
    import torch
    import train_speed

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, *args, **kwargs: compiled.append(type(self).__name__))
    recipe = Path(__file__).resolve().parents[1] / "configs" / "quickstart.toml"
    out = tmp_path / "train.json"
    report = train_speed.main(["--recipe", str(recipe), "--seq", "32", "--micro-batch", "2", "--steps", "2",
                               "--warmup", "1", "--compile", "--json", str(out)])
    assert compiled == ["NemotronHForCausalLM"]  # the compiled trainer's model, once
    assert report["pattern"] == "MEM*EME"  # the recipe's model, not the default preset's
    assert report["device"] == "cpu"  # the default: the trainers and the peak on the CPU
    for mode in ("eager", "compiled"):
        row = report["modes"][mode]
        assert len(row["times"]) == 2 and row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1
    assert json.loads(out.read_text())["modes"].keys() == {"eager", "compiled"}
    text = capsys.readouterr().out
    assert "compiling pays for itself after" in text and "compiled" in text


def test_ops_benchmark_times_every_implementation_that_fits(tmp_path, capsys):
    """One operation at tiny shapes, one sample: each (shape, mode) has the reference and a row per
    implementation that takes the call there, exactly one of them marked as what runs now."""
    import ops as ops_benchmark

    out = tmp_path / "ops.json"
    report = ops_benchmark.main(["--ops", "gated_rms_norm", "--preset", "tiny", "--batch", "1", "--seq", "16",
                                 "--contexts", "64", "--repeats", "1", "--min-time", "0", "--json", str(out)])
    groups: dict[tuple[str, str], set[str]] = {}
    for r in report["rows"]:
        assert r["op"] == "gated_rms_norm" and r["ms"] > 0 and r["max_err"] < 1e-5, r
        assert len(r["samples_ms"]) == 1
        groups.setdefault((r["shape"], r["mode"]), set()).add(r["implementation"])
    for r in report["rows"]:
        if r["implementation"] == "reference":
            assert r["vs_reference"] == 1 and r["fallback"] is None
        else:  # what runs without it: another row of its group
            others = groups[(r["shape"], r["mode"])] - {r["implementation"]}
            assert r["vs_fallback"] > 0 and r["fallback"] in others
    kernel = {"cpu.c"} if mamba_kernels_available() else set()
    want = {("train 1x16", "fwd+bwd"): {"reference", "torch.gated-norm-backward"} | kernel}
    if kernel:  # without autograd only the C kernel takes the call
        want.update({(shape, "fwd"): {"reference", "cpu.c"}
                     for shape in ("train 1x16", "decode 1", "verify 4")})
    assert groups == want
    for shape, mode in groups:
        rows = [r for r in report["rows"] if (r["shape"], r["mode"]) == (shape, mode)]
        assert sum(r["chosen"] for r in rows) == 1
    assert json.loads(out.read_text())["rows"] == report["rows"]
    printed = capsys.readouterr().out
    assert "vs fallback" in printed and printed.count("gated_rms_norm  ") >= len(report["rows"])


def test_batch_decode_benchmark_compares_batched_and_sequential(tmp_path, capsys):
    import batch_decode

    out = tmp_path / "batch.json"
    report = batch_decode.main(["--samples", "4", "--new-tokens", "6", "--repeats", "1", "--json", str(out)])
    for key in ("samples", "prompts"):
        row = report[key]
        assert row["sequences"] == 4 and row["tokens"] == 24 and row["identical_tokens"]
        assert row["batched_tokens_per_s"] > 0 and row["speedup"] > 0
    assert json.loads(out.read_text())["samples"]["sequences"] == 4
    assert "4 samples of one prompt" in capsys.readouterr().out


def test_serve_benchmark_against_a_live_server(tmp_path, capsys):
    """The script starts ``kinetic serve`` on a tiny checkpoint and reports every row; greedy and
    seeded answers under concurrency equal the same requests sent alone."""
    from dataclasses import replace

    import serve
    import torch

    from kinetic import NemotronHForCausalLM, preset
    from kinetic.data.tokenizer import save_tokenizer, train_tokenizer

    text = "The Congress shall make no law. def parse_args(): return 1\n"
    tok = train_tokenizer([text * 30], vocab_size=300)
    torch.manual_seed(0)
    NemotronHForCausalLM(replace(preset("tiny"), vocab_size=tok.get_vocab_size())).save_pretrained(tmp_path)
    save_tokenizer(tok, tmp_path)
    report = serve.main(["--checkpoint", str(tmp_path), "--clients", "1", "3", "--requests", "1",
                         "--max-tokens", "5", "--json", str(tmp_path / "serve.json")])
    for mode in ("greedy", "sampled"):
        rows = report["modes"][mode]
        assert [r["clients"] for r in rows] == [1, 3]
        assert all(r["tokens"] == 5 * r["requests"] and r["tokens_per_s"] > 0 for r in rows)
        assert all(r["identical_to_alone"] for r in rows), rows
        assert rows[0]["latency_p50_s"] <= rows[0]["latency_p99_s"]
    assert "same as alone" in capsys.readouterr().out


def test_rl_step_benchmark_splits_a_step(tmp_path, capsys):
    import rl_step

    report = rl_step.main(["--tiny", "--steps", "1", "--group-size", "2", "--prompts", "1",
                           "--new-tokens", "3", "--json", str(tmp_path / "rl.json")])
    shares = report["sampling_share"] + report["scoring_share"] + report["update_share"]
    assert abs(shares - 1) < 1e-9 and min(report["sampling_share"], report["scoring_share"]) > 0
    assert report["rollout_tokens_per_s"] > 0 and report["decoder_tokens_per_s"] > 0
    assert "backward + optimizer" in capsys.readouterr().out
