"""The training loop: one global batch per step through the pipeline schedule, then the
ZeRO step; a console line and a metrics record per logged step."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from pretrain.config import Config, Layout
from pretrain.log import MetricsWriter, log
from pretrain.parallel.schedule import (
    allreduce_tied_embedding_grads,
    forward_backward,
    global_mean_loss,
)


@dataclass
class TrainState:
    """Counters that survive a restart."""

    step: int = 0  # optimizer steps completed
    tokens: int = 0  # training tokens consumed (global)

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])


@dataclass
class Trainer:
    cfg: Config
    layout: Layout
    zero: object  # parallel.zero.ZeroEngine
    chunks: list
    model_proxies: list
    loader: object
    metrics: MetricsWriter
    device: torch.device
    state: TrainState = field(default_factory=TrainState)
    history: list = field(default_factory=list)

    def train_step(self) -> dict:
        micro_batches = [self._to_device(mb) for mb in self.loader.next_step()]
        lr = self.zero.engine.get_lr()[0]
        loss_sum, num_tokens = forward_backward(
            self.model_proxies, micro_batches, self.cfg.train.seq_length,
            self.layout.micro_batch_size)
        allreduce_tied_embedding_grads(self.chunks)
        self.zero.engine.step()
        loss = global_mean_loss(loss_sum, num_tokens, self.device)
        return {"loss": loss, "lr": lr, "grad_norm": self.zero.grad_norm()}

    def _to_device(self, micro):
        if self.device.type == "cpu":
            return micro
        return type(micro)(*(t.to(self.device, non_blocking=True) for t in vars(micro).values()))

    def fit(self) -> None:
        t = self.cfg.train
        last = t.exit_at_step or t.steps
        tokens_per_step = t.global_batch_size * t.seq_length
        for chunk in self.chunks:
            chunk.train()
        while self.state.step < last:
            started = time.perf_counter()
            out = self.train_step()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
            self.state.step += 1
            self.state.tokens += tokens_per_step
            record = {"step": self.state.step, "loss": out["loss"], "lr": out["lr"],
                      "grad_norm": out["grad_norm"], "tokens": self.state.tokens,
                      "tokens_per_s": tokens_per_step / elapsed, "step_time_s": elapsed}
            self.history.append(record)
            if self.state.step % t.log_interval == 0 or self.state.step == last:
                self.metrics.write(record)
                log(f"step {self.state.step:>6}/{t.steps} | loss {out['loss']:.4f} | "
                    f"lr {out['lr']:.3e} | grad_norm {out['grad_norm']:.3f} | "
                    f"tokens/s {record['tokens_per_s']:,.0f}")
            if not math.isfinite(out["loss"]):
                raise FloatingPointError(f"loss became {out['loss']} at step {self.state.step}")
