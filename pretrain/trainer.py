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
    valid_loader: object = None
    eval_proxies: list = None
    state: TrainState = field(default_factory=TrainState)
    history: list = field(default_factory=list)
    checkpointer: object = None  # checkpoint.manager.Checkpointer; None: never save
    stops: object = None  # checkpoint.signals.StopRequests; None: signals keep their defaults

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
        return type(micro)(*(None if t is None else t.to(self.device, non_blocking=True)
                             for t in vars(micro).values()))

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the same `eval_batches` global batches every time."""
        loader = self.valid_loader
        loader.load_state_dict({**loader.state_dict(), "position": 0,
                                "consumed": [0] * len(loader.sources)})
        for chunk in self.chunks:
            chunk.eval()
        total, tokens = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        for _ in range(self.cfg.train.eval_batches):
            micro_batches = [self._to_device(mb) for mb in loader.next_step()]
            # Through the chunks directly: no gradients, so no DeepSpeed backward hooks.
            loss_sum, num_tokens = forward_backward(
                self.eval_proxies, micro_batches, self.cfg.train.seq_length,
                self.layout.micro_batch_size, forward_only=True)
            total += loss_sum
            tokens += num_tokens
        for chunk in self.chunks:
            chunk.train()
        return global_mean_loss(total, tokens, self.device)

    def fit(self) -> str:
        """Train until train.exit_at_step (or train.steps), or until a stop signal. Returns
        why it stopped: "done" or "signal" (a checkpoint of the last step was saved)."""
        t = self.cfg.train
        last = t.exit_at_step or t.steps
        tokens_per_step = t.global_batch_size * t.seq_length
        for chunk in self.chunks:
            chunk.train()
        if self.state.step >= last:
            log(f"nothing to train: step {self.state.step} already reached "
                f"{'train.exit_at_step' if t.exit_at_step else 'train.steps'}={last}")
            return "done"
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
            evaluating = self.valid_loader is not None and (
                self.state.step % t.eval_interval == 0 or self.state.step == last)
            if evaluating:
                record["val_loss"] = self.evaluate()
            self.history.append(record)
            if self.state.step % t.log_interval == 0 or self.state.step == last or evaluating:
                self.metrics.write(record)
                val = f" | val_loss {record['val_loss']:.4f}" if evaluating else ""
                log(f"step {self.state.step:>6}/{t.steps} | loss {out['loss']:.4f} | "
                    f"lr {out['lr']:.3e} | grad_norm {out['grad_norm']:.3f} | "
                    f"tokens/s {record['tokens_per_s']:,.0f}{val}")
            if not math.isfinite(out["loss"]):
                raise FloatingPointError(f"loss became {out['loss']} at step {self.state.step}")
            stopping = self.stops is not None and self.stops.agreed(self.device)
            if self._should_save(last, stopping):
                self.checkpointer.save(self.state.step)
            elif self.checkpointer is not None:
                self.checkpointer.poll()
            if stopping:
                if self.checkpointer is not None:
                    self.checkpointer.wait()
                log(f"stopped by a signal after step {self.state.step}; requeue the job to resume")
                return "signal"
        if self.checkpointer is not None:
            self.checkpointer.wait()
        return "done"

    def _should_save(self, last: int, stopping: bool) -> bool:
        if self.checkpointer is None:
            return False
        c = self.cfg.checkpoint
        if c.interval and self.state.step % c.interval == 0:
            return True
        return c.save_on_stop and (stopping or self.state.step == last)
