"""The trainer: exact resume, crash-safe checkpoints, skip-and-log on non-finite loss, MoE
balancing, the WSD schedule, TOML configs, and a 2-process gloo run matching 1 process."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kinetic.train import Trainer, load_config
from kinetic.train import checkpoint as ckpt
from kinetic.train.config import from_dict
from kinetic.train.schedule import wsd_lr


def make_cfg(out_dir, **sections):
    base = {"model": {"preset": "tiny"}, "data": {"seq_len": 32},
            "train": {"steps": 6, "micro_batch": 4, "seed": 3, "device": "cpu"},
            "run": {"out_dir": str(out_dir), "log_every": 1, "eval_every": 3, "eval_batches": 2,
                    "save_every": 3, "progress": False}}
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return from_dict(base)


class Interrupt(Exception):
    pass


def train_until_interrupted(cfg, micro_batches: int) -> None:
    """Train with ``cfg`` until the process "dies" in the loss of micro-batch ``micro_batches + 1``."""
    trainer = Trainer(cfg)
    inner, calls = trainer.loss_fn, {"n": 0}

    def dies(model, batch):
        calls["n"] += 1
        if calls["n"] > micro_batches:
            raise Interrupt
        return inner(model, batch)

    trainer.loss_fn = dies
    with pytest.raises(Interrupt):
        trainer.train()


def assert_same_weights(a: Trainer, b: Trainer) -> None:
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    full = Trainer(make_cfg(tmp_path / "full", train={"grad_accum": 2}))
    full.train()

    cfg = make_cfg(tmp_path / "resumed", train={"grad_accum": 2})
    train_until_interrupted(cfg, 3 * 2)  # 3 optimizer steps x 2 micro-batches, checkpoint at step 3
    assert ckpt.latest_checkpoint(tmp_path / "resumed").name == "step_000003"

    second = Trainer(cfg)
    second.train(resume=True)
    assert second.resumed_from == 3 and second.step == 6
    assert_same_weights(full, second)
    runs = [r for r in map(json.loads, (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines())
            if r["type"] == "run"]
    assert [r["resumed_from_step"] for r in runs] == [None, 3]


def test_compiled_training_equals_eager(tmp_path, compile_backend):
    """train.compile = true: the same losses and weights as eager training (MoE grouped matmuls, MTP
    loss, expert-bias updates, evaluation included), and checkpoints under the eager names."""
    runs = {}
    for name, compile in (("eager", False), ("compiled", True)):
        cfg = make_cfg(tmp_path / name, train={"steps": 3, "compile": compile},
                       model={"overrides": {"hybrid_override_pattern": "M*E"}},  # + MTP "*E"
                       run={"eval_every": 0, "save_every": 0})
        trainer = Trainer(cfg)
        summary = trainer.train()
        runs[name] = (trainer, summary, _losses(tmp_path / name))
    (eager, e_sum, e_losses), (compiled, c_sum, c_losses) = runs["eager"], runs["compiled"]
    assert len(c_losses) == 3
    assert c_losses == pytest.approx(e_losses, rel=1e-4)
    assert c_sum["final_val_loss"] == pytest.approx(e_sum["final_val_loss"], rel=1e-4)
    for (name, x), (other, y) in zip(eager.model.state_dict().items(), compiled.model.state_dict().items(),
                                     strict=True):
        assert name == other
        torch.testing.assert_close(y, x, atol=1e-4, rtol=1e-3)
    saved = ckpt.latest_checkpoint(tmp_path / "compiled")
    assert saved is not None and not any("_orig_mod" in k for k in compiled.model.state_dict())


def test_crash_during_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path / "run")
    trainer = Trainer(cfg)
    real = ckpt.save_pretrained
    saves = {"n": 0}

    def flaky(model, path, **kw):
        saves["n"] += 1
        real(model, path, **kw)
        if saves["n"] == 2:  # second checkpoint: files written, then the process "dies"
            raise Interrupt

    monkeypatch.setattr(ckpt, "save_pretrained", flaky)
    with pytest.raises(Interrupt):
        trainer.train()
    good = ckpt.latest_checkpoint(tmp_path / "run")
    assert good.name == "step_000003"
    assert not (tmp_path / "run" / "checkpoints" / "step_000006").exists()
    monkeypatch.setattr(ckpt, "save_pretrained", real)
    resumed = Trainer(cfg)
    resumed.train(resume=True)
    assert resumed.resumed_from == 3
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step_000006"
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp_*"))


def test_nonfinite_loss_is_skipped_and_logged(tmp_path):
    trainer = Trainer(make_cfg(tmp_path / "run", train={"steps": 3}))
    inner = trainer.loss_fn
    calls = {"n": 0}

    def nan_on_second(model, batch):
        calls["n"] += 1
        loss, metrics = inner(model, batch)
        return (loss * float("nan"), metrics) if calls["n"] == 2 else (loss, metrics)

    trainer.loss_fn = nan_on_second
    before = {}

    def snapshot(_record=None):
        before.update({k: v.clone() for k, v in trainer.model.state_dict().items()})

    trainer.train_step()
    snapshot()
    record = trainer.train_step()
    assert record.get("skipped") is True and trainer.skipped == 1
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k  # no update on the skipped step
    assert all(p.grad is None for p in trainer.model.parameters())
    assert trainer.train_step().get("skipped") is None


def test_training_learns_and_writes_a_report(tmp_path):
    cfg = make_cfg(tmp_path / "run", train={"steps": 60, "micro_batch": 8},
                   run={"eval_every": 30, "save_every": 0, "log_every": 10})
    summary = Trainer(cfg).train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    header = records[0]
    assert header["type"] == "run" and "torch" in header["versions"] and "config" in header
    train = [r for r in records if r["type"] == "train"]
    assert train[-1]["lm_loss"] < train[0]["lm_loss"] - 1.0  # the synthetic Markov chain is learnable
    assert summary["final_val_loss"] < math.log(512) - 1.0
    assert (tmp_path / "run" / "loss.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 60
    assert any("expert_load_max_over_mean" in r for r in train)


def test_expert_bias_moves_toward_balance(tmp_path):
    trainer = Trainer(make_cfg(tmp_path / "run", loss={"expert_bias_rate": 0.01}))
    moe = trainer.balancer.layers[0][1]
    moe.gate.e_score_correction_bias[0] = 5.0  # expert 0 gets every token at first
    trainer.train_step()
    bias = moe.gate.e_score_correction_bias
    assert bias[0].item() == pytest.approx(5.0 - 0.01)  # overloaded: pushed down by the rate
    changes = bias[1:].tolist()
    assert all(c in (pytest.approx(0.01), pytest.approx(-0.01), 0.0) for c in changes)
    assert max(changes) == pytest.approx(0.01)  # under-loaded experts are pushed up


def test_wsd_schedule_shape():
    lrs = [wsd_lr(s, 100, 1.0, warmup=10, decay_fraction=0.2, min_ratio=0.01) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(lr == 1.0 for lr in lrs[10:80])
    assert lrs[-1] == pytest.approx(0.01) and lrs[85] < lrs[80]


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key train\.stepz"):
        from_dict({"train": {"stepz": 3}})
    with pytest.raises(ValueError, match=r"optim\.lr='fast' has type str"):
        from_dict({"optim": {"lr": "fast"}})
    with pytest.raises(ValueError, match=r"unknown config section \[trian\]"):
        from_dict({"trian": {}})
    with pytest.raises(ValueError, match=r"train\.micro_batch=0"):
        from_dict({"train": {"micro_batch": 0}})
    with pytest.raises(ValueError, match=r"train\.compile=True .* combined with precision\.recipe='fp8'"):
        from_dict({"train": {"compile": True}, "precision": {"recipe": "fp8"}})
    path = tmp_path / "c.toml"
    path.write_text('[train]\nsteps = 5\n[run]\nout_dir = "x"\n')
    cfg = load_config(path, ["train.steps=7", "run.out_dir=y", "optim.lr=1e-3"])
    assert (cfg.train.steps, cfg.run.out_dir, cfg.optim.lr) == (7, "y", 1e-3)


def test_shipped_configs_parse():
    from pathlib import Path

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))
    assert configs
    for path in configs:
        load_config(path)


def test_speculative_recipe_is_the_quickstart_model_deeper():
    """configs/speculative.toml (make speculative) must stay the quickstart recipe with more blocks:
    same corpus, widths, MTP depth and training, its own run directory, and an MTP depth that is a
    small share of the model (what the speculative benchmark on it is meant to show)."""
    root = Path(__file__).parent.parent / "configs"
    quick, deep = load_config(root / "quickstart.toml"), load_config(root / "speculative.toml")
    for section in ("data", "train", "optim", "schedule", "loss", "precision"):
        assert getattr(deep, section) == getattr(quick, section), section
    q_model, d_model = dict(quick.model.overrides), dict(deep.model.overrides)
    q_pattern, d_pattern = q_model.pop("hybrid_override_pattern"), d_model.pop("hybrid_override_pattern")
    assert d_model == q_model and deep.model.preset == quick.model.preset
    assert len(d_pattern) >= 3 * len(q_pattern) and set(d_pattern) == set(q_pattern)
    assert len(d_model["mtp_hybrid_override_pattern"]) / len(d_pattern) < 0.1
    assert deep.run.out_dir != quick.run.out_dir


# ---------------------------------------------------------------------- 2 processes on gloo
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pretrain_args(out_dir, micro_batch: int) -> list[str]:
    sets = {"train.steps": 4, "train.micro_batch": micro_batch, "train.grad_accum": 2, "train.seed": 3,
            "train.device": "cpu",
            "data.seq_len": 32, "run.log_every": 1, "run.progress": "false", "run.save_every": 0,
            "run.out_dir": str(out_dir)}
    args = ["pretrain", "--config", str(Path(__file__).parent.parent / "configs" / "tiny-synthetic.toml")]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args


def _losses(run_dir) -> list[float]:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["lm_loss"] for r in records if r["type"] == "train"]


def test_two_gloo_processes_match_one_process(tmp_path):
    """torchrun launches 2 processes (DDP on gloo, micro-batch 2 each) against 1 process with
    micro-batch 4: same global batch, so the same loss trajectory."""
    from kinetic.cli import main

    main(_pretrain_args(tmp_path / "single", micro_batch=4))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), "-m", "kinetic.cli",
           *_pretrain_args(tmp_path / "ddp", micro_batch=2)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world size 2" in done.stdout
    expected, got = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    assert len(got) == len(expected) == 4
    assert got == pytest.approx(expected, rel=1e-4)
    assert expected[-1] < expected[0]


def test_training_device_is_resolved_with_errors_that_name_the_setting(monkeypatch):
    """train.device: 'auto' takes this process's GPU (LOCAL_RANK) when one is visible, else the CPU;
    a GPU that is not there is a ValueError naming the setting and the way out."""
    from kinetic.device import resolve_device
    from kinetic.train.distributed import backend_for

    with pytest.raises(ValueError, match=r"train\.device='gpu' is invalid: use 'auto'"):
        from_dict({"train": {"device": "gpu"}})
    assert from_dict({"train": {"device": "cuda:1"}}).train.device == "cuda:1"  # checked when resolved
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", local_rank=1) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"train\.device='cuda' needs a GPU.*use train\.device='cpu'"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
    assert resolve_device("cuda:1", local_rank=0) == torch.device("cuda", 1)
    assert resolve_device("cpu", local_rank=1) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"LOCAL_RANK 2 asks for GPU 2, but this machine shows 2"):
        resolve_device("auto", local_rank=2)
    with pytest.raises(ValueError, match=r"train\.device='cuda:5' asks for GPU 5"):
        resolve_device("cuda:5")
    assert (backend_for(torch.device("cpu")), backend_for(torch.device("cuda", 0))) == ("gloo", "nccl")


@pytest.mark.parametrize("device,backend", [("cpu", "gloo"), ("auto", "nccl")])
def test_process_group_backend_follows_the_training_device(device, backend, monkeypatch):
    """Under torchrun a process that trains on the CPU joins with gloo even on a machine with GPUs
    (NCCL cannot reduce CPU tensors); one that trains on its GPU selects it and joins with NCCL."""
    import torch.distributed as dist

    from kinetic.train.distributed import init_from_env

    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.__setitem__("device", d))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda b: calls.__setitem__("backend", b))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    info = init_from_env(device)
    assert (info.rank, info.world_size, info.local_rank) == (1, 2, 1)
    assert calls["backend"] == backend
    assert calls.get("device") == (torch.device("cuda", 1) if backend == "nccl" else None)


def test_reductions_in_a_gloo_group_leave_their_input_alone():
    import torch.distributed as dist

    from kinetic.train.distributed import all_gather, all_reduce_mean, all_reduce_sum

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        t = torch.tensor([1.5, 2.0])
        total = all_reduce_sum(t)
        total += 1
        assert t.tolist() == [1.5, 2.0] and total.tolist() == [2.5, 3.0]
        assert all_reduce_mean(0.25) == 0.25
        assert [x.tolist() for x in all_gather(t)] == [[1.5, 2.0]]
    finally:
        dist.destroy_process_group()


def test_low_precision_recipe_trains_switches_and_resumes(tmp_path):
    cfg = make_cfg(tmp_path / "run", precision={"recipe": "nvfp4", "overrides": {"switch_to_bf16_at": 0.5}})
    trainer = Trainer(cfg)
    assert trainer.precision is not None and trainer.precision.quantized
    summary = trainer.train()
    assert trainer._switch_step is None  # the switch to bf16 happened at step 3 of 6
    assert math.isfinite(summary["final_val_loss"])
    header = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert header["precision"]["recipe"]["format"] == "nvfp4"
    resumed = Trainer(make_cfg(tmp_path / "run", train={"steps": 7},
                               precision={"recipe": "nvfp4", "overrides": {"switch_to_bf16_at": 0.5}}))
    resumed.train(resume=True)
    assert resumed.step == 7
    with pytest.raises(ValueError, match="unknown precision recipe"):
        Trainer(make_cfg(tmp_path / "bad", precision={"recipe": "fp5"}))


def test_nvfp4_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, one_thread):
    """The stochastic-rounding stream is part of the checkpoint: without it the resumed run rounds
    its gradients with fresh draws and drifts from the uninterrupted one."""
    precision = {"recipe": "nvfp4"}
    full = Trainer(make_cfg(tmp_path / "full", precision=precision))
    full.train()

    cfg = make_cfg(tmp_path / "resumed", precision=precision)
    train_until_interrupted(cfg, 3)  # checkpoint at step 3
    rng = torch.load(ckpt.latest_checkpoint(tmp_path / "resumed") / "rng.pt", weights_only=True)
    assert list(rng["generators"]) == ["stochastic_rounding/rank0"]
    second = Trainer(cfg)
    second.train(resume=True)
    assert second.resumed_from == 3 and second.step == 6
    assert_same_weights(full, second)
