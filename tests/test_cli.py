"""The ``kinetic`` command, run in-process: ``params`` on presets and files, user errors (one line,
exit 2), and ``demo`` end to end on the tiny preset."""

from __future__ import annotations

import json

import pytest
import torch

from kinetic.cli import main
from kinetic.cli.model import human
from kinetic.config import PRESETS, ModelConfig, preset


def test_human_units():
    assert human(31_577_937_344) == "31.58B"
    assert human(120_668_687_360) == "120.67B"
    assert human(16_125_888) == "16.13M"
    assert human(999) == "999"
    assert human(0) == "0"


def test_params_preset_table(capsys):
    assert main(["params", "tiny"]) == 0
    out = capsys.readouterr().out
    counts = preset("tiny").param_counts()
    for key in ("total", "active", "active + embeddings", "mtp"):
        assert key in out
    assert f"{counts['total']:,}" in out and human(counts["total"]) in out
    assert f"{counts['mtp']:,}" in out
    assert "6 layers: 2 M (Mamba-2), 1 * (attention), 1 - (MLP), 2 E (MoE)" in out
    assert "M*EM-E" in out


def test_params_json(capsys):
    assert main(["params", "nano-30b-a3b", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"total", "active", "active_with_embeddings", "mtp", "layers", "pattern"} <= set(data)
    assert 31e9 < data["total"] < 32.5e9
    assert data["active"] < data["active_with_embeddings"] < data["total"]
    assert data["layers"] == {"M": 23, "*": 6, "-": 0, "E": 23}
    assert data["num_hidden_layers"] == 52


@pytest.mark.parametrize("target", ["file", "dir"])
def test_params_on_a_written_config(tmp_path, capsys, target):
    config = preset("small").replace(hybrid_override_pattern="M-*E")
    file = config.save_pretrained(tmp_path, "transformers")
    assert main(["params", str(file if target == "file" else tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total"] == config.param_counts()["total"]
    assert data["layers"] == {"M": 1, "*": 1, "-": 1, "E": 1}


def _user_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_params_bad_argument(capsys):
    err = _user_error(["params", "no-such-thing.json"], capsys)
    assert "no-such-thing.json" in err
    assert all(name in err for name in PRESETS)


def test_params_invalid_config_file(tmp_path, capsys):
    data = ModelConfig().to_dict()
    data["hidden_size"] = "64"
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert "hidden_size" in _user_error(["params", str(tmp_path)], capsys)


def test_params_directory_without_config(tmp_path, capsys):
    assert "config.json" in _user_error(["params", str(tmp_path)], capsys)


@pytest.mark.parametrize("argv, needle", [
    ([], "command"),
    (["demo"], "--out"),
    (["demo", "--out", "x", "--preset", "huge"], "huge"),
    (["demo", "--out", "x", "--preset", "nano-30b-a3b"], "nano-30b-a3b"),
    (["demo", "--out", "x", "--new-tokens", "0"], "--new-tokens"),
])
def test_usage_errors_are_one_line(argv, needle, capsys):
    assert needle in _user_error(argv, capsys)


def test_demo_out_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert "not a directory" in _user_error(["demo", "--out", str(tmp_path / "f")], capsys)


def test_demo(tmp_path, capsys):
    out = tmp_path / "quickstart"
    argv = ["demo", "--out", str(out), "--prompt-len", "5", "--new-tokens", "6", "--seed", "3"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "reloaded logits match exactly" in text
    assert "prefill 5 tok" in text and "decode 5 tok" in text
    generated = json.loads(text.split("generated")[-1].strip())
    assert len(generated) == 6 and all(0 <= t < preset("tiny").vocab_size for t in generated)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generated"] == generated and summary["versions"]["torch"]

    assert main(argv) == 0  # same seed, same tokens; an existing --out is overwritten
    assert json.loads(capsys.readouterr().out.split("generated")[-1].strip()) == generated


def test_pretrain_runs_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["pretrain", "--config", "configs/tiny-synthetic.toml", "--set", "train.steps=4",
            "--set", f"run.out_dir={out}", "--set", "run.progress=false", "--set", "run.save_every=2",
            "--set", "data.seq_len=32"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "done: 4 steps" in text and (out / "checkpoints" / "step_000004" / "model.safetensors").is_file()
    assert main([*args[:-2], "--set", "train.steps=6", "--resume", "--set", "data.seq_len=32"]) == 0
    assert "done: 6 steps" in capsys.readouterr().out


def test_pretrain_config_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["pretrain", "--config", "configs/tiny-synthetic.toml", "--set", "optim.lr=fast"])
    assert err.value.code == 2
    assert "optim.lr='fast'" in capsys.readouterr().err
    # --compile is train.compile: refused with a low-precision recipe, the error naming both
    with pytest.raises(SystemExit) as err:
        main(["pretrain", "--config", "configs/tiny-synthetic.toml", "--compile", "--precision", "nvfp4"])
    assert err.value.code == 2
    assert ("train.compile=True is invalid: cannot be combined with precision.recipe='nvfp4'"
            in capsys.readouterr().err)
    if not torch.cuda.is_available():  # a GPU asked for where there is none: named, with the way out
        with pytest.raises(SystemExit) as err:
            main(["pretrain", "--config", "configs/tiny-synthetic.toml", "--set", "train.device=cuda"])
        assert err.value.code == 2
        assert "train.device='cuda' needs a GPU" in capsys.readouterr().err
