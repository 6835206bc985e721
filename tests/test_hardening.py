"""Issue #24 outside the server: every bad input a user can give a command is one line on stderr and
exit code 2; resume never loses a finished run, falls back past a damaged checkpoint and logs each
step once; checkpoints are self-contained and respect the umask; ``--help`` shows defaults."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import kinetic
from kinetic.train import Trainer
from kinetic.train import checkpoint as ckpt
from kinetic.train import trainer as trainer_module
from tests.test_data_cli import SELECT, built, main  # noqa: F401 (built: the corpus fixture)
from tests.test_train import Interrupt, assert_same_weights, make_cfg, train_until_interrupted

SYNTHETIC = ["--config", "configs/tiny-synthetic.toml", "--set", "data.seq_len=32",
             "--set", "train.micro_batch=2", "--set", "run.progress=false"]


@pytest.fixture(scope="module")
def run(built):  # noqa: F811 (the imported fixture)
    """A corpus-backed tiny pretraining run (tokenizer and corpus from test_data_cli's ``built``)
    with checkpoints at steps 2 and 4."""
    root = built
    assert main(["pretrain", *SYNTHETIC, "--set", f"data.corpus='{root / 'corpus'}'",
                 "--set", "train.steps=4", "--set", "run.save_every=2", "--set", "run.eval_every=2",
                 "--set", "run.eval_batches=1", "--set", f"run.out_dir='{root / 'run'}'"]) == 0
    return root


def one_line_error(argv: list[str], capsys) -> str:
    """Run a command that must fail on a user mistake: exit code 2, one stderr line, no traceback."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("kinetic "), err
    return err


# ---------------------------------------------------------------------- #24 item 4 and 7: bad inputs
def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _empty(file: Path) -> None:
    file.write_bytes(b"")


def _garbage(file: Path) -> None:
    file.write_bytes(b"\x80not json\xff{")


# (command, file damaged in a copy of the final checkpoint, damage, text the error must hold)
DAMAGED = [
    ("generate", "model.safetensors", _truncate, "model.safetensors is truncated or corrupt"),
    ("generate", "model.safetensors", _empty, "model.safetensors is empty"),
    ("serve", "model.safetensors", _truncate, "model.safetensors is truncated or corrupt"),
    ("eval", "model.safetensors", _truncate, "model.safetensors is truncated or corrupt"),
    ("eval", "model.safetensors", _empty, "model.safetensors is empty"),
    ("generate", "config.json", _truncate, "config.json is not valid JSON"),
    ("eval", "config.json", _garbage, "config.json is not valid JSON"),
    ("generate", "tokenizer.json", _truncate, "tokenizer.json is not a valid tokenizer.json"),
    ("generate", "tokenizer.json", _empty, "tokenizer.json is not a valid tokenizer.json"),
    ("data build", "tokenizer.json", _garbage, "tokenizer.json is not a valid tokenizer.json"),
    ("generate", "tokenizer_config.json", _garbage, "tokenizer_config.json is not valid JSON"),
]


@pytest.mark.parametrize("command, name, damage, needle", DAMAGED,
                         ids=[f"{c}-{n}-{d.__name__[1:]}" for c, n, d, _ in DAMAGED])
def test_a_damaged_checkpoint_file_is_named_in_one_line(command, name, damage, needle, run, tmp_path,
                                                        capsys):
    ck = tmp_path / "ck"
    shutil.copytree(run / "run" / "checkpoints" / "step_000004", ck)
    damage(ck / name)
    argv = {"generate": ["generate", "--checkpoint", str(ck), "--prompt", "hi", "--max-new-tokens", "2"],
            "serve": ["serve", "--checkpoint", str(ck), "--port", "1"],
            "eval": ["eval", "--checkpoint", str(ck), "--corpus", str(run / "corpus"), "--max-tokens", "64"],
            "data build": ["data", "build", "--out", str(tmp_path / "c"), "--tokenizer", str(ck), *SELECT],
            }[command]
    err = one_line_error(argv, capsys)
    assert str(ck / name) in err and needle in err, err


def test_pretrain_resume_with_every_checkpoint_damaged_names_the_file(run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run / "run", out)
    for step in ("step_000002", "step_000004"):
        _truncate(out / "checkpoints" / step / "model.safetensors")
    err = one_line_error(["pretrain", *SYNTHETIC, "--set", f"run.out_dir='{out}'", "--resume",
                          "--set", "train.steps=6"], capsys)
    assert "no intact checkpoint" in err, err
    assert "step_000004/model.safetensors" in err and "step_000002/model.safetensors" in err, err


# (argv with {bad} = a non-UTF-8 file, {dir} = a directory, {corpus} = a corpus whose index.json is garbage,
#  text the error must hold)
BAD_FILES = [
    (["pretrain", "--config", "{bad}"], "{bad} is not valid TOML"),
    (["pretrain", "--config", "{dir}"], "config file {dir} is a directory"),
    (["pretrain", *SYNTHETIC, "--set", "model.config='{bad}'"], "{bad} is not valid JSON"),
    (["pretrain", *SYNTHETIC, "--set", "data.corpus='{corpus}'"], "{corpus}/index.json is not valid JSON"),
    (["eval", "--checkpoint", "{ck}", "--corpus", "{corpus}"], "{corpus}/index.json is not valid JSON"),
    (["params", "{bad}"], "{bad} is not valid JSON"),
    (["data", "build", "--out", "{dir}/c", "--tokenizer", "{bad}"], "{bad} is not a valid tokenizer.json"),
]


@pytest.mark.parametrize("argv, needle", BAD_FILES, ids=[" ".join(a[:2]) + f"-{i}"
                                                         for i, (a, _) in enumerate(BAD_FILES)])
def test_bad_input_files_are_named_in_one_line(argv, needle, run, tmp_path, capsys):
    places = {"bad": tmp_path / "bad.toml", "dir": tmp_path / "dir", "corpus": tmp_path / "corpus",
              "ck": run / "run" / "checkpoints" / "step_000004"}
    _garbage(places["bad"])
    places["dir"].mkdir()
    places["corpus"].mkdir()
    _garbage(places["corpus"] / "index.json")
    err = one_line_error([a.format(**places) for a in argv], capsys)
    assert needle.format(**places) in err, err


# (generate/chat/serve argv after the checkpoint, text the error must hold): every flag named as typed
BAD_FLAGS = [
    (["generate", "--prompt", "x", "--temperature", "-1"], "--temperature=-1.0 is invalid"),
    (["generate", "--prompt", "x", "--temperature", "nan"], "--temperature=nan is invalid"),
    (["generate", "--prompt", "x", "--top-p", "0"], "--top-p=0.0 is invalid"),
    (["generate", "--prompt", "x", "--top-k", "-3"], "--top-k=-3 is invalid"),
    (["generate", "--prompt", "x", "--min-p", "1.5"], "--min-p=1.5 is invalid"),
    (["generate", "--prompt", "x", "--max-new-tokens", "-1"], "--max-new-tokens=-1 is invalid"),
    (["generate", "--prompt", "x", "--draft-tokens", "-1"], "--draft-tokens=-1 must be"),
    (["generate", "--prompt", "x", "--prefill-chunk", "0"], "--prefill-chunk=0 must be"),
    (["generate", "--prompt", "x", "--max-context", "1"], "--max-context=1 must be >= 2"),
    (["generate", "--prompt", "x", "--speculative-max-batch", "-1"], "--speculative-max-batch=-1 must be"),
    (["generate", "--prompt", ""], "empty"),
    (["chat", "--top-p", "2"], "--top-p=2.0 is invalid"),
    (["serve", "--port", "70000"], "--port 70000 is not a TCP port"),
    (["serve", "--max-active", "0"], "--max-active=0: limits must be >= 1"),
]


@pytest.mark.parametrize("argv, needle", BAD_FLAGS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_FLAGS])
def test_bad_decoding_flags_are_named_in_one_line(argv, needle, run, capsys):
    ck = run / "run" / "checkpoints" / "step_000004"
    err = one_line_error([argv[0], "--checkpoint", str(ck), "--device", "cpu", *argv[1:]], capsys)
    assert needle in err, err


# the other commands' bad arguments ({tmp} = a fresh directory)
BAD_ARGS = [
    (["tokenizer", "train", "--out", "{tmp}/t", "--vocab-size", "0", "--domains", "python_code"],
     "vocab_size=0 is too small"),
    (["tokenizer", "train", "--out", "{tmp}/t", "--domains", "nosuch"], "unknown domain 'nosuch'"),
    (["tokenizer", "train", "--out", "{tmp}/t", "--max-bytes-per-domain", "-5"], "--max-bytes-per-domain"),
    (["demo", "--preset", "nosuch"], "invalid choice: 'nosuch'"),
    (["data", "build", "--out", "{tmp}/d", "--tokenizer", "{tmp}/none"], "no tokenizer at {tmp}/none"),
    (["params", "nosuch"], "'nosuch' is neither an existing config.json"),
]


@pytest.mark.parametrize("argv, needle", BAD_ARGS,
                         ids=[" ".join(a[:2]) + f"-{i}" for i, (a, _) in enumerate(BAD_ARGS)])
def test_bad_arguments_of_the_other_commands(argv, needle, tmp_path, capsys):
    err = one_line_error([a.format(tmp=tmp_path) for a in argv], capsys)
    assert needle.format(tmp=tmp_path) in err, err


BAD_SETTINGS = [
    ("run.log_every=0", "config run.log_every=0 is invalid: must be >= 1"),
    ("run.eval_batches=0", "config run.eval_batches=0 is invalid: must be >= 1"),
    ("run.save_every=-1", "config run.save_every=-1 is invalid: must be >= 0"),
    ("run.eval_every=-5", "config run.eval_every=-5 is invalid: must be >= 0"),
    ("run.keep_checkpoints=0", "config run.keep_checkpoints=0 is invalid: must be >= 1"),
    ("schedule.warmup_steps=-1", "config schedule.warmup_steps=-1 is invalid: must be >= 0"),
    ("optim.grad_clip=-1.0", "config optim.grad_clip=-1.0 is invalid"),
    ("model.overrides={hiden_size=64}", "'hiden_size' is not a ModelConfig field (did you mean "
                                        "'hidden_size'?)"),
    ("model.overrides={mamba_n_groups=2}", "older name of 'n_groups'"),
    ("model.overrides={hidden_size='64'}", "ModelConfig.hidden_size='64' has type str"),
]


@pytest.mark.parametrize("setting, needle", BAD_SETTINGS, ids=[s for s, _ in BAD_SETTINGS])
def test_pretrain_settings_that_cannot_work_are_refused(setting, needle, tmp_path, capsys):
    err = one_line_error(["pretrain", *SYNTHETIC, "--set", f"run.out_dir='{tmp_path}'", "--set", setting],
                         capsys)
    assert needle in err, err
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before anything ran


def test_a_misspelled_override_in_a_toml_file_is_named(tmp_path, capsys):
    config = tmp_path / "x.toml"
    config.write_text('[model]\npreset = "tiny"\noverrides = {num_attention_head = 4}\n')
    err = one_line_error(["pretrain", "--config", str(config)], capsys)
    assert "[model] overrides: 'num_attention_head'" in err and "'num_attention_heads'" in err, err


# ---------------------------------------------------------------------- #24 item 5: finished runs
def test_resuming_a_finished_run_is_a_no_op_with_a_message(tmp_path, capsys):
    args = ["pretrain", *SYNTHETIC, "--set", "train.steps=4", "--set", "run.save_every=2",
            "--set", f"run.out_dir='{tmp_path}'"]
    assert main(args) == 0
    summary, metrics = (tmp_path / "summary.json").read_text(), (tmp_path / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "nothing to do" in out and "already finished at step 4" in out and "0.0 s" not in out
    assert (tmp_path / "summary.json").read_text() == summary
    assert (tmp_path / "metrics.jsonl").read_text() == metrics
    assert json.loads(summary)["final_train_lm_loss"] is not None


def test_a_kill_between_the_final_save_and_the_summary_is_recovered(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path / "run")

    def killed(run_dir):
        raise Interrupt

    monkeypatch.setattr(trainer_module, "plot_run", killed)  # dies after the final save
    with pytest.raises(Interrupt):
        Trainer(cfg).train()
    assert not (tmp_path / "run" / "summary.json").exists()
    monkeypatch.undo()
    summary = Trainer(cfg).train(resume=True)
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert summary["already_finished"] and written["steps"] == 6
    assert written["final_train_lm_loss"] == train[-1]["lm_loss"]
    assert written["final_val_loss"] == evals[-1]["val_loss"] and evals[-1]["step"] == 6
    assert written["checkpoint"].endswith("step_000006") and (tmp_path / "run" / "loss.png").is_file()
    assert [r["step"] for r in train] == list(range(1, 7))  # nothing was re-run


# ---------------------------------------------------------------------- #24 item 6: damaged checkpoints
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run: the weights a resumed run must reproduce."""
    trainer = Trainer(make_cfg(tmp_path_factory.mktemp("reference") / "run"))
    trainer.train()
    return trainer


DAMAGES = [("model.safetensors", _truncate), ("model.safetensors", _empty), ("config.json", _garbage),
           ("optimizer.pt", _truncate), ("rng.pt", _garbage), ("state.json", _truncate)]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch.load reading the garbage rng.pt
@pytest.mark.parametrize("name, damage", DAMAGES, ids=[f"{n}-{d.__name__[1:]}" for n, d in DAMAGES])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(name, damage, reference, tmp_path,
                                                                   capsys):
    cfg = make_cfg(tmp_path / "run")
    Trainer(cfg).train()  # checkpoints at steps 3 and 6
    damage(tmp_path / "run" / "checkpoints" / "step_000006" / name)
    capsys.readouterr()
    resumed = Trainer(cfg)
    resumed.train(resume=True)
    err = capsys.readouterr().err
    assert f"warning: skipping damaged checkpoint step_000006: {tmp_path}" in err and name in err, err
    assert "resuming from the older checkpoint" in err and resumed.resumed_from == 3
    assert_same_weights(resumed, reference)
    assert ckpt.read_newest_intact(tmp_path / "run")[0].name == "step_000006"  # rewritten whole


@pytest.mark.parametrize("damage", [_garbage, _empty, Path.unlink], ids=["garbage", "empty", "missing"])
def test_a_damaged_latest_pointer_resumes_from_the_newest_checkpoint(damage, tmp_path):
    cfg = make_cfg(tmp_path / "run", train={"steps": 4}, run={"save_every": 2})
    Trainer(cfg).train()
    damage(tmp_path / "run" / "checkpoints" / "latest")
    assert [p.name for p in ckpt.checkpoints_newest_first(tmp_path / "run")] == ["step_000004", "step_000002"]
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step_000004"  # what generate/eval open
    resumed = Trainer(make_cfg(tmp_path / "run", train={"steps": 6}, run={"save_every": 2}))
    resumed.train(resume=True)
    assert resumed.resumed_from == 4 and ckpt.latest_checkpoint(tmp_path / "run").name == "step_000006"


def test_resuming_with_another_model_is_refused_by_name(tmp_path):
    cfg = make_cfg(tmp_path / "run", train={"steps": 3})
    Trainer(cfg).train()
    other = make_cfg(tmp_path / "run", train={"steps": 6}, model={"overrides": {"hidden_size": 48}})
    with pytest.raises(ckpt.CheckpointError, match="holds another model .*hidden_size"):
        Trainer(other).train(resume=True)


# ---------------------------------------------------------------------- #24 item 10: metrics once
def test_metrics_hold_each_step_once_after_a_resume(tmp_path):
    cfg = make_cfg(tmp_path / "run")
    train_until_interrupted(cfg, micro_batches=5)  # steps 1-5 logged, checkpoint at 3
    Trainer(cfg).train(resume=True)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, 7))
    assert [r["step"] for r in records if r["type"] == "eval"] == [3, 6]
    assert [r.get("resumed_from_step") for r in records if r["type"] == "run"] == [None, 3]


# ---------------------------------------------------------------------- #24 items 8 and 9: checkpoints
def test_every_checkpoint_is_self_contained(run, capsys):
    from transformers import AutoTokenizer

    steps = sorted((run / "run" / "checkpoints").glob("step_*"))
    assert [p.name for p in steps] == ["step_000002", "step_000004"]
    for path in steps:
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
            f.name for f in path.iterdir()}
        hf = AutoTokenizer.from_pretrained(path)
        assert hf.eos_token == "<eos>"
        assert hf.model_max_length == kinetic.preset("tiny").max_position_embeddings
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(steps[0]), "--prompt", "The", "--max-new-tokens", "2",
                 "--temperature", "0"]) == 0
    assert "--- 'The'" in capsys.readouterr().out


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_respect_the_umask(umask, run, tmp_path):
    old = os.umask(umask)
    try:
        trainer = Trainer(make_cfg(tmp_path / "run", train={"steps": 1}), tokenizer=run / "tok")
        trainer.step = 1
        path = trainer.save()
        kinetic.from_pretrained(path).save_pretrained(tmp_path / "exported", max_shard_size=2**14)
    finally:
        os.umask(old)
    files = [*path.iterdir(), *(tmp_path / "exported").iterdir()]
    assert {f.name for f in files} >= {"config.json", "model.safetensors", "tokenizer.json", "optimizer.pt",
                                       "model.safetensors.index.json", "tokenizer_config.json"}
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
    assert path.stat().st_mode & 0o777 == 0o777 & ~umask


# ---------------------------------------------------------------------- #24 item 10: --help, --version
HELP = [(["generate"], "--top-k", "(default: 40)"), (["eval"], "--seq-len", "default: 256"),
        (["demo"], "--preset", "default: tiny"), (["serve"], "--port", "default: 8000"),
        (["chat"], "--max-new-tokens", "default: 256"), (["tokenizer", "train"], "--vocab-size", "8192"),
        (["data", "build"], "--shard-tokens", "(default: 100000000)"), (["params"], "--json", "--json"),
        (["pretrain"], "--config", "--config"), (["data", "sources"], "--json", "--json")]


@pytest.mark.parametrize("command, flag, needle", HELP, ids=[" ".join(c) for c, _, _ in HELP])
def test_help_shows_defaults(command, flag, needle, capsys):
    assert main([*command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert flag in text and needle in text, text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"kinetic {kinetic.__version__}"


def test_damaged_safetensors_error_in_the_library_names_the_file(tmp_path):
    model = kinetic.NemotronHForCausalLM(kinetic.preset("tiny"))
    model.save_pretrained(tmp_path)
    _truncate(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=f"{tmp_path / 'model.safetensors'} is truncated or corrupt"):
        kinetic.from_pretrained(tmp_path)
    assert torch.get_default_dtype() == torch.float32
