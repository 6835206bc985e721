"""The training loop shared by pretraining and post-training: AdamW, warmup-stable-decay, gradient
accumulation and clipping, MTP loss, MoE balancing, skip-and-log on non-finite loss, atomic
checkpoints with exact resume, DDP, progress bar, metrics and report.

Jobs differ only in their batch source and loss function: ``Trainer(config, train_source=...,
loss_fn=...)``. The default loss is next-token prediction plus the scaled mean MTP loss.

Resuming continues from the newest intact checkpoint (a damaged newer one is skipped with a warning)
and drops the metrics lines of the steps that will be run again, so ``metrics.jsonl`` holds each step
once. Resuming a run that already reached ``train.steps`` trains nothing: it returns the run's summary
(rebuilt from ``metrics.jsonl`` when the process died before writing it) with ``already_finished``.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kinetic.config import ModelConfig, preset
from kinetic.device import resolve_device
from kinetic.model import NemotronHForCausalLM
from kinetic.train import checkpoint as ckpt
from kinetic.train.balance import ExpertBalancer
from kinetic.train.config import TrainConfig
from kinetic.train.distributed import DistInfo, all_gather, all_reduce_mean, all_reduce_sum, unwrap, wrap
from kinetic.train.report import MetricsWriter, plot_run, summary_from_metrics
from kinetic.train.schedule import wsd_lr
from kinetic.train.sources import BatchSource, SyntheticSource

LOSS_KEYS = ("lm_loss", "mtp_loss", "balance_loss")
LossFn = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


def model_config_from(cfg: TrainConfig) -> ModelConfig:
    base = ModelConfig.from_pretrained(cfg.model.config) if cfg.model.config else preset(cfg.model.preset)
    return base.replace(**cfg.model.overrides) if cfg.model.overrides else base


def pretrain_loss(mtp_scale: float) -> LossFn:
    """Next-token cross-entropy over a (batch, seq+1) window plus mtp_scale * mean MTP loss."""

    def loss_fn(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(batch[:, :-1], labels=batch)
        total, metrics = out.loss, {"lm_loss": out.loss.item()}
        if out.mtp_losses:
            mtp = torch.stack(out.mtp_losses).mean()
            metrics["mtp_loss"] = mtp.item()
            if mtp_scale > 0:
                total = total + mtp_scale * mtp
        return total, metrics

    return loss_fn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only; norms, biases, Mamba A/D/dt and other 1-D parameters are not decayed."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Trainer:
    def __init__(self, config: TrainConfig, *, model: NemotronHForCausalLM | None = None,
                 train_source: BatchSource | None = None, val_source: BatchSource | None = None,
                 loss_fn: LossFn | None = None, dist_info: DistInfo | None = None,
                 tokenizer: str | Path | None = None) -> None:
        """``tokenizer``: a tokenizer.json (or a directory with one) copied into every checkpoint."""
        config.validate()
        self.cfg = config
        self.info = dist_info or DistInfo()
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        torch.manual_seed(config.train.seed)
        # the model is built on the CPU (so a seed gives the same weights everywhere) and moved
        self.device = resolve_device(config.train.device, self.info.local_rank)
        self.model = model if model is not None else NemotronHForCausalLM(model_config_from(config))
        self.model.to(self.device)
        self.precision = None  # kinetic.precision RecipeReport when a low-precision recipe is on
        self.quant_state = None  # its QuantState: stochastic-rounding streams to checkpoint
        self._switch_step = None
        if config.precision.recipe:
            from kinetic.precision import apply_recipe, get_recipe, quant_state

            recipe = get_recipe(config.precision.recipe, **config.precision.overrides)
            self.precision = apply_recipe(self.model, recipe, rank=self.info.rank)
            self.model.to(self.device)
            self.quant_state = quant_state(self.model)
            self._switch_step = self.precision.recipe.switch_step(config.train.steps)
        if config.train.compile:
            # in place: parameter names, state dict and checkpoints stay those of the eager model
            self.model.compile()
        self.net = wrap(self.model, self.info, self.device)
        o = config.optim
        self.optimizer = torch.optim.AdamW(param_groups(self.model, o.weight_decay), lr=o.lr,
                                           betas=tuple(o.betas), eps=o.eps)
        self.balancer = ExpertBalancer(self.model, config.loss.expert_bias_rate, config.loss.balance_loss)
        vocab = self.model.config.vocab_size
        seq, mb = config.data.seq_len, config.train.micro_batch
        r, w = self.info.rank, self.info.world_size
        self.train_source = train_source or SyntheticSource(vocab, seq, mb, config.train.seed, r, w)
        self.val_source = val_source or SyntheticSource(vocab, seq, mb, config.train.seed + 7919, r, w)
        self.loss_fn = loss_fn or pretrain_loss(config.loss.mtp_scale)
        self.run_dir = Path(config.run.out_dir)
        self.tokenizer = Path(tokenizer) if tokenizer is not None else None
        self.resumed_path: Path | None = None
        self.step = 0
        self.tokens = 0
        self.skipped = 0
        self.resumed_from: int | None = None

    # ------------------------------------------------------------------ pieces
    @property
    def tokens_per_step(self) -> int:
        c = self.cfg
        return c.train.micro_batch * c.data.seq_len * c.train.grad_accum * self.info.world_size

    def lr_at(self, step: int) -> float:
        s, c = self.cfg.schedule, self.cfg
        return wsd_lr(step, c.train.steps, c.optim.lr, s.warmup_steps, s.decay_fraction,
                      s.min_lr_ratio, s.decay_shape)

    def resume(self) -> bool:
        """Restore the newest intact checkpoint; False when the run has none. CheckpointError when
        every checkpoint is damaged or they hold another model than the config."""
        found = ckpt.read_newest_intact(self.run_dir)
        if found is None:
            return False
        path, parts = found
        state = ckpt.load_checkpoint(path, self.model, self.optimizer, parts)
        self.step, self.tokens, self.skipped = state["step"], state["tokens"], state.get("skipped", 0)
        self.train_source.load_state_dict(state["data"])
        self._load_generators(state["generators"])
        self.resumed_from = self.step
        self.resumed_path = path
        return True

    def _generator_states(self) -> dict[str, torch.Tensor]:
        """Every rank's stochastic-rounding generator state (the generator on the model's device) as
        ``{"stochastic_rounding/rank<r>": uint8 tensor}``; a collective, all ranks call it. Empty
        without a quantized model."""
        if self.quant_state is None:
            return {}
        mine = self.quant_state.generator(next(self.model.parameters()).device).get_state()
        return {f"stochastic_rounding/rank{r}": state for r, state in enumerate(all_gather(mine))}

    def _load_generators(self, states: dict[str, torch.Tensor]) -> None:
        if self.quant_state is None:
            return
        mine = states.get(f"stochastic_rounding/rank{self.info.rank}")
        if mine is None:  # an older checkpoint, or more ranks than were saved
            if self.info.is_main or states:
                print(f"rank {self.info.rank}: the checkpoint holds no stochastic-rounding state for this "
                      "rank; its stream restarts from the recipe seed")
            return
        self.quant_state.generator(next(self.model.parameters()).device).set_state(mine)

    def save(self) -> Path | None:
        path = None
        generators = self._generator_states()
        if self.info.is_main:
            state = {"step": self.step, "tokens": self.tokens, "skipped": self.skipped,
                     "data": self.train_source.state_dict()}
            path = ckpt.save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, state,
                                        keep=self.cfg.run.keep_checkpoints, generators=generators,
                                        tokenizer=self.tokenizer)
        if self.info.enabled:
            torch.distributed.barrier()
        return path

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the same `eval_batches` validation batches every time."""
        was = self.model.training
        self.model.eval()
        start = self.val_source.state_dict()
        losses = []
        for _ in range(self.cfg.run.eval_batches):
            batch = self.val_source.next_batch().to(self.device, non_blocking=True)
            losses.append(self.model(batch[:, :-1], labels=batch, return_mtp=False).loss.item())
        self.val_source.load_state_dict(start)
        self.model.train(was)
        return all_reduce_mean(sum(losses) / max(len(losses), 1))

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches; returns its metrics."""
        if self._switch_step is not None and self.step >= self._switch_step:
            from kinetic.precision import restore_high_precision  # the recipe's final-phase switch

            restore_high_precision(self.model, to="bf16" if self.device.type == "cpu" else "native")
            self._switch_step = None
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum = self.cfg.train.grad_accum
        sums: dict[str, float] = {}
        finite = True
        for micro in range(accum):
            batch = self.train_source.next_batch().to(self.device, non_blocking=True)
            sync = self.info.enabled and micro < accum - 1
            with self.net.no_sync() if sync else contextlib.nullcontext():
                loss, metrics = self.loss_fn(self.net, batch)
                # a loss normalised over the whole step (RL's global token count) is not divided again
                loss = loss if getattr(self.loss_fn, "per_step", False) else loss / accum
                balance = self.balancer.loss()
                if balance is not None:
                    loss = loss + balance / accum
                    metrics["balance_loss"] = balance.item()
                self.balancer.accumulate()
                finite &= bool(torch.isfinite(loss))
                loss.backward()  # every rank runs backward, so DDP never hangs on a skip
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v / accum
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
        bad = all_reduce_sum(torch.tensor([0.0 if finite and torch.isfinite(norm) else 1.0]))
        record = {"type": "train", "step": self.step + 1, "lr": lr, "grad_norm": float(norm),
                  **{k: all_reduce_mean(v) for k, v in sums.items()}}
        if bad.item() > 0:  # skip-and-log: no update, the data stays consumed
            self.optimizer.zero_grad(set_to_none=True)
            self.balancer.reset()
            self.skipped += 1
            record["skipped"] = True
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            loads = self.balancer.step(all_reduce=all_reduce_sum if self.info.enabled else None)
            if loads:
                record["expert_load_max_over_mean"] = loads
        self.step += 1
        self.tokens += self.tokens_per_step
        return record

    # ------------------------------------------------------------------ the loop
    def train(self, resume: bool = False) -> dict[str, Any]:
        cfg = self.cfg
        if resume and not self.resume() and self.info.is_main:
            print(f"no checkpoint in {self.run_dir / 'checkpoints'}; starting from step 0")
        if self.resumed_from is not None and self.step >= cfg.train.steps:
            return self._finished_summary()
        self.model.train()
        writer = MetricsWriter(self.run_dir, {
            "config": cfg.to_dict(), "model_config": self.model.config.to_dict(),
            "param_counts": self.model.config.param_counts(), "world_size": self.info.world_size,
            "precision": self.precision.to_dict() if self.precision is not None else None,
            "resumed_from_step": self.resumed_from}, enabled=self.info.is_main)
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.train.steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (cfg.run.progress and self.info.is_main))
        start, start_tokens = time.perf_counter(), self.tokens
        window: list[float] = []
        pending: dict[str, list[float]] = {}
        last_val = None
        while self.step < cfg.train.steps:
            record = self.train_step()
            elapsed = time.perf_counter() - start
            record["tokens"] = self.tokens
            record["tokens_per_s"] = (self.tokens - start_tokens) / max(elapsed, 1e-9)
            if "lm_loss" in record:
                window.append(record["lm_loss"])
            for key in LOSS_KEYS:  # logged as means over the steps since the last line
                if key in record:
                    pending.setdefault(key, []).append(record[key])
            last = self.step == cfg.train.steps
            if self.step % cfg.run.log_every == 0 or last or record.get("skipped"):
                writer.write({**record, **{k: sum(v) / len(v) for k, v in pending.items()}})
                pending.clear()
            if (cfg.run.eval_every and self.step % cfg.run.eval_every == 0) or last:
                last_val = self.evaluate()
                writer.write({"type": "eval", "step": self.step, "val_loss": last_val})
            if (cfg.run.save_every and self.step % cfg.run.save_every == 0) or last:
                self.save()
            bar.update(1)
            bar.set_postfix(loss=f"{record.get('lm_loss', float('nan')):.3f}",
                            tok_s=f"{record['tokens_per_s']:.0f}",
                            **({"val": f"{last_val:.3f}"} if last_val is not None else {}))
        bar.close()
        wall = time.perf_counter() - start
        summary = {
            "steps": self.step, "tokens": self.tokens, "skipped_steps": self.skipped,
            "final_train_lm_loss": sum(window[-cfg.run.log_every:]) / max(len(window[-cfg.run.log_every:]), 1)
            if window else None,
            "final_val_loss": last_val, "wall_s": wall,
            "tokens_per_s": (self.tokens - start_tokens) / max(wall, 1e-9),
            "checkpoint": str(ckpt.latest_checkpoint(self.run_dir)) if self.info.is_main else None,
        }
        if self.info.is_main:
            plot = plot_run(self.run_dir)
            summary["plot"] = str(plot) if plot else None
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _finished_summary(self) -> dict[str, Any]:
        """The summary of a run whose checkpoint already reached train.steps: summary.json when it
        describes that step, else rebuilt from metrics.jsonl (the process died after the final
        save) and written. Marked ``already_finished``; nothing is trained."""
        file = self.run_dir / "summary.json"
        summary = None
        if file.is_file():
            with contextlib.suppress(ValueError):
                summary = json.loads(file.read_text())
        if not (isinstance(summary, dict) and summary.get("steps") == self.step
                and summary.get("final_train_lm_loss") is not None):
            summary = summary_from_metrics(self.run_dir, self.step, self.tokens, self.skipped)
            summary["checkpoint"] = str(self.resumed_path)
            if self.info.is_main:
                plot = plot_run(self.run_dir)
                summary["plot"] = str(plot) if plot else None
                file.write_text(json.dumps(summary, indent=2))
        return {**summary, "already_finished": True}


def build_model(config: TrainConfig) -> NemotronHForCausalLM:
    torch.manual_seed(config.train.seed)
    return NemotronHForCausalLM(model_config_from(config))


__all__ = ["Trainer", "build_model", "model_config_from", "pretrain_loss", "unwrap"]
