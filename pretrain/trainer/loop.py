"""The training loop: one global batch per step through the pipeline schedule, then the
ZeRO step; evaluation, the stop agreement and checkpoint saves in a fixed order on every
rank, and a record per step handed to the hooks (hooks.py) that watch."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from pretrain.config import Config, Layout
from pretrain.errors import DataError, PeerStopped, TrainingHalted
from pretrain.model.estimate import flops_per_token, peak_tflops
from pretrain.trainer.guards import LossSpikes, NonFiniteGuard, Stragglers, Watchdog
from pretrain.trainer.hooks import Hooks, perplexity
from pretrain.trainer.fault_hooks import FaultHooks
from pretrain.log import log, warn
from pretrain.parallel.schedule import (
    allreduce_tied_embedding_grads,
    flex_masks,
    forward_backward,
    global_mean_loss,
)



@dataclass
class TrainState:
    """Counters that survive a restart."""

    step: int = 0  # steps completed (their batches consumed)
    tokens: int = 0  # training tokens consumed (global)
    skipped: int = 0  # steps whose update was skipped (non-finite loss or gradients)
    spike_skips: int = 0  # steps whose update was skipped as a loss spike
    # Rewinds past loss spikes: {"steps": [first, last], "positions": [from, to]}, the steps
    # (numbered as they were then) whose batches were skipped, and the loader positions.
    rewinds: list = field(default_factory=list)
    # The loss spike detector's window (guards.LossSpikes keeps it here): a resumed run
    # flags, skips and rewinds at the same steps as an uninterrupted one.
    loss_window: list = field(default_factory=list)

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "skipped": self.skipped,
                "spike_skips": self.spike_skips, "rewinds": list(self.rewinds),
                "loss_window": list(self.loss_window)}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        # absent in older checkpoints
        self.skipped = int(state.get("skipped", 0))
        self.spike_skips = int(state.get("spike_skips", 0))
        self.rewinds = list(state.get("rewinds", []))
        self.loss_window[:] = [float(x) for x in state.get("loss_window", [])]  # in place


class Throughput:
    """Model FLOPs utilisation from the analytic FLOPs per token (estimate.flops_per_token)
    and the accelerator's peak (logging.peak_tflops, else from the GPU's name)."""

    def __init__(self, cfg: Config, layout: Layout, device: torch.device):
        self.flops_per_token = flops_per_token(cfg, layout.padded_vocab_size)
        self.world_size = layout.world_size
        self.cuda = device.type == "cuda"
        self.peak = cfg.logging.peak_tflops or None
        if self.peak is None and self.cuda:
            name = torch.cuda.get_device_name(device)
            self.peak = peak_tflops(name)
            if self.peak is None:
                log(f"mfu: peak FLOP/s of {name!r} unknown; set logging.peak_tflops to report MFU")

    def metrics(self, tokens: int, seconds: float) -> dict:
        tflops = tokens * self.flops_per_token / seconds / self.world_size / 1e12
        out = {"tflops_per_gpu": tflops}
        if self.peak:
            out["mfu"] = tflops / self.peak
        if self.cuda:
            out["memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            out["memory_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
            torch.cuda.reset_peak_memory_stats()
        return out


@dataclass
class Trainer:
    cfg: Config
    layout: Layout
    zero: object  # parallel.zero.ZeroEngine
    chunks: list
    model_proxies: list
    loader: object
    device: torch.device
    hooks: Hooks = field(default_factory=lambda: Hooks([]))
    valid_sets: list = field(default_factory=list)  # [data.build.ValidSet]; empty: no eval
    eval_proxies: list = None
    checkpointer: object = None  # checkpoint.manager.Checkpointer; None: never save
    stops: object = None  # checkpoint.signals.StopRequests; None: signals keep their defaults
    state: TrainState = field(default_factory=TrainState)
    history: list = field(default_factory=list)

    def __post_init__(self):
        t = self.cfg.train
        self.throughput = Throughput(self.cfg, self.layout, self.device)
        self.guard = NonFiniteGuard(t.max_bad_steps)
        self.spikes = LossSpikes(t.loss_spike_zscore, t.loss_spike_window, self.state.loss_window)
        self.faults = FaultHooks.from_env()  # the test hooks of docs/failures.md
        self.stragglers = Stragglers(t.straggler_factor, t.straggler_steps,
                                     self.layout.world_size)
        self._busy_s = 0.0  # this rank's compute (CPU busy) seconds since the last check

    def train_step(self) -> dict:
        batch_index = self.loader.position // self.cfg.train.global_batch_size  # the test hook's
        waited = time.perf_counter()
        micro_batches = self._next_micro_batches(self.loader)
        waited = time.perf_counter() - waited
        self.faults.corrupt(micro_batches, self.state.step + 1, batch_index,
                            self.layout.padded_vocab_size)
        lr = self.zero.engine.get_lr()[0]
        # Compute time as CPU busy time: a rank blocked in a gloo collective sleeps, so the
        # wait for a slower rank is not counted (on GPUs it is the host's busy time only).
        busy = time.process_time()
        self.faults.spin()
        loss_sum, num_tokens = forward_backward(
            self.model_proxies, micro_batches, self.cfg.train.seq_length,
            self.layout.micro_batch_size, z_loss=self.cfg.optim.z_loss,
            flex=flex_masks(self.cfg.data, self.device))
        allreduce_tied_embedding_grads(self.chunks)
        # The loss before the step, so that a spike's update can still be dropped; every rank
        # reaches the same verdict from the same all-reduced loss and the same window.
        loss = global_mean_loss(loss_sum, num_tokens, self.device)
        spike = self.spikes.check(loss)
        dropped = spike is not None and self.cfg.train.loss_spike_action != "warn"
        applied = self.zero.step(skip=dropped)
        self._busy_s += time.process_time() - busy
        return {"loss": loss, "lr": lr, "grad_norm": self.zero.grad_norm(), "data_wait_s": waited,
                "applied": applied, "spike": spike, "spike_dropped": dropped}

    def _next_micro_batches(self, loader) -> list:
        """This rank's micro-batches of the next step. Whether every rank got its data is
        agreed (one all-reduced flag) before the step's first collective: a data error on one
        rank then stops every rank with exit 2, where the others used to fail (gloo) or hang
        (NCCL) in a collective the failed rank never joined."""
        error = None
        try:
            micro_batches = [self._to_device(mb) for mb in loader.next_step()]
        except DataError as err:
            error = err
        if torch.distributed.get_world_size() > 1:
            failed = torch.tensor(float(error is not None), device=self.device)
            torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
            if failed.item() and error is None:
                raise PeerStopped("another rank stopped on a data error")
        if error is not None:
            raise error
        return micro_batches

    def _to_device(self, micro):
        if self.device.type == "cpu":
            return micro
        return type(micro)(*(None if t is None else t.to(self.device, non_blocking=True)
                             for t in vars(micro).values()))

    @torch.no_grad()
    def _mean_loss(self, loader) -> float:
        """Mean loss over the same `eval_batches` global batches of `loader` every time."""
        loader.load_state_dict({**loader.state_dict(), "position": 0,
                                "consumed": [0] * len(loader.sources)})
        total, tokens = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        for _ in range(self.cfg.train.eval_batches):
            micro_batches = self._next_micro_batches(loader)
            # Through the chunks directly: no gradients, so no DeepSpeed backward hooks.
            loss_sum, num_tokens = forward_backward(
                self.eval_proxies, micro_batches, self.cfg.train.seq_length,
                self.layout.micro_batch_size, forward_only=True,
                flex=flex_masks(self.cfg.data, self.device))
            total += loss_sum
            tokens += num_tokens
        return global_mean_loss(total, tokens, self.device)

    def evaluate(self) -> dict:
        """val_loss, val_ppl and val_bpb (bits per UTF-8 byte), and the same per source
        (`val_loss/NAME`, ...) when there are several. The combined loss weighs the sources
        as the blend does; combined bits-per-byte is total bits over total bytes."""
        for chunk in self.chunks:
            chunk.eval()
        losses = [self._mean_loss(vs.loader) for vs in self.valid_sets]
        for chunk in self.chunks:
            chunk.train()
        weights = [vs.weight / sum(v.weight for v in self.valid_sets) for vs in self.valid_sets]
        loss = sum(w * l for w, l in zip(weights, losses))
        out = {"val_loss": loss, "val_ppl": perplexity(loss)}
        if all(vs.bytes_per_token for vs in self.valid_sets):
            byte_count = sum(w * vs.bytes_per_token for w, vs in zip(weights, self.valid_sets))
            out["val_bpb"] = loss / math.log(2) / byte_count
        if len(self.valid_sets) > 1:
            for vs, l in zip(self.valid_sets, losses):
                out[f"val_loss/{vs.name}"] = l
                out[f"val_ppl/{vs.name}"] = perplexity(l)
                if vs.bytes_per_token:
                    out[f"val_bpb/{vs.name}"] = l / math.log(2) / vs.bytes_per_token
        return out

    def resume(self) -> None:
        """Load the newest complete checkpoint (or checkpoint.load_from), if any."""
        if self.checkpointer is None:
            return
        loaded = self.checkpointer.load()
        if loaded is not None:
            self.hooks.on_checkpoint_loaded(self, loaded.step)

    def fit(self) -> str:
        """Train until train.exit_at_step (or train.steps), or until a stop signal. Returns
        why it stopped: "done" or "signal" (a checkpoint of the last step was saved)."""
        reason = "error"
        try:
            reason = self._loop()
        finally:
            self.hooks.on_train_end(self, reason)
        return reason

    def _loop(self) -> str:
        t = self.cfg.train
        last = t.exit_at_step or t.steps
        tokens_per_step = t.global_batch_size * t.seq_length
        for chunk in self.chunks:
            chunk.train()
        if self.state.step >= last:
            log(f"nothing to train: step {self.state.step} already reached "
                f"{'train.exit_at_step' if t.exit_at_step else 'train.steps'}={last}")
            return "done"
        self.hooks.on_train_start(self)
        watchdog = Watchdog(t.watchdog_factor, t.watchdog_min_s, torch.distributed.get_rank())
        try:
            return self._steps(last, tokens_per_step, watchdog)
        finally:
            watchdog.close()

    def _steps(self, last: int, tokens_per_step: int, watchdog: Watchdog) -> str:
        t = self.cfg.train
        stalled = None  # seconds the previous step's save kept the loop (reported next step)
        while self.state.step < last:
            self.hooks.on_step_begin(self, self.state.step + 1)
            started = time.perf_counter()
            out = self.train_step()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
            watchdog.beat(self.state.step + 1, elapsed)
            self.state.step += 1
            self.state.tokens += tokens_per_step
            spike = out["spike"]
            if out["spike_dropped"] and t.loss_spike_action == "rewind" and self._rewind(
                    out["loss"], spike):
                watchdog.beat(self.state.step)
                continue
            record = {"step": self.state.step, "loss": out["loss"], "lr": out["lr"],
                      "grad_norm": out["grad_norm"], "tokens": self.state.tokens,
                      "tokens_per_s": tokens_per_step / elapsed, "step_time_s": elapsed,
                      "data_wait_s": out["data_wait_s"],
                      **self.throughput.metrics(tokens_per_step, elapsed)}
            # A dropped spike is no non-finite step: the guard and the spike window skip it.
            bad = not out["spike_dropped"] and self.guard.observe(
                out["loss"], out["grad_norm"], out["applied"])
            if bad:
                self.state.skipped += 1
                warn(f"step {self.state.step}: loss {out['loss']}, grad_norm {out['grad_norm']}: "
                     f"update skipped ({self.guard.in_a_row} in a row, the run stops at "
                     f"{t.max_bad_steps})")
            record["skipped_updates"] = self.state.skipped
            if stalled is not None:
                record["save_stall_s"], stalled = stalled, None
            if spike is not None:
                record["loss_spike_z"] = spike
                what = "kept"
                if out["spike_dropped"]:
                    self.state.spike_skips += 1
                    what = "update skipped (train.loss_spike_action)"
                warn(f"step {self.state.step}: loss spike, {out['loss']:.4f} is {spike:.1f} "
                     f"standard deviations above the last {len(self.spikes.losses)} steps; "
                     f"{what}")
            if not out["spike_dropped"]:
                self.spikes.add(out["loss"])
            if t.loss_spike_action != "warn":
                record["spike_skipped_updates"] = self.state.spike_skips
                record["rewinds"] = len(self.state.rewinds)
            evaluating = bool(self.valid_sets) and (
                self.state.step % t.eval_interval == 0 or self.state.step == last)
            if evaluating:
                with watchdog.paused():
                    validation = self.evaluate()
                self.hooks.on_eval_end(self, validation)
                record.update(validation)
            if (self.stragglers.factor and self.layout.world_size > 1
                    and (self.state.step % t.log_interval == 0 or self.state.step == last)):
                self.stragglers.check(self._busy_s, self.state.step, record, self.device)
                self._busy_s = 0.0
            self.history.append(record)
            if (self.state.step % t.log_interval == 0 or self.state.step == last or evaluating
                    or bad or spike is not None):
                self.hooks.on_step_end(self, record)
            self.guard.check(self.state.step, out["loss"], out["grad_norm"])
            stopping = self.stops is not None and self.stops.agreed(self.device)
            with self._save_deadline(watchdog, f"the save of step {self.state.step}"):
                if self._should_save(last, stopping):
                    saving = time.perf_counter()
                    self.checkpointer.save(self.state.step)
                    stalled = time.perf_counter() - saving
                    self.hooks.on_checkpoint_saved(self, self.state.step)
                elif self.checkpointer is not None:
                    self.checkpointer.wait(block=False)  # publish a finished background save
            if stopping:
                if self.checkpointer is not None:
                    with self._save_deadline(watchdog, "the wait for the last save"):
                        self.checkpointer.wait()
                log(f"stopped by a signal after step {self.state.step}; requeue the job to resume")
                return "signal"
            watchdog.beat(self.state.step)
        if self.checkpointer is not None:
            with self._save_deadline(watchdog, "the wait for the last save"):
                self.checkpointer.wait()
        return "done"

    def _rewind(self, loss: float, z: float) -> bool:
        """After a loss spike (train.loss_spike_action=rewind): reload the newest checkpoint
        (weights, Adam state, LR schedule, counters) and move the loader past the batches of
        the steps after it, the spike's included; the range is kept in the counters. False
        when there is no checkpoint yet (the spike's update was skipped; nothing else)."""
        t = self.cfg.train
        spike_step, done = self.state.step, list(self.state.rewinds)
        seen = len(self.spikes.losses)  # before the load puts the checkpoint's window back
        if len(done) >= t.max_rewinds:
            raise TrainingHalted(
                f"step {spike_step}: loss spike ({loss:.4f}, {z:.1f} standard deviations above "
                f"the recent mean) after {len(done)} rewind(s) (train.max_rewinds="
                f"{t.max_rewinds}). Stopping without requeue: lower optim.lr, check the data of "
                f"these steps, or raise train.loss_spike_zscore or train.max_rewinds")
        loaded = self.checkpointer.load_own()
        if loaded is None:
            warn(f"step {spike_step}: loss spike, {loss:.4f} is {z:.1f} standard deviations above "
                 f"the last {seen} steps; no checkpoint to rewind to yet, so "
                 f"only its update was skipped")
            return False
        back = loaded.step
        before = self.loader.state_dict()["position"]
        self.loader.skip_steps(spike_step - back)
        self.state.rewinds = done + [{"steps": [back + 1, spike_step],
                                      "positions": [before, self.loader.state_dict()["position"]]}]
        self.history = [r for r in self.history if r["step"] <= back]
        self.hooks.on_checkpoint_loaded(self, back)
        warn(f"step {spike_step}: loss spike, {loss:.4f} is {z:.1f} standard deviations above "
             f"the last {seen} steps; rewound to the checkpoint of step {back} "
             f"and skipped the batches of steps {back + 1}-{spike_step} (rewind "
             f"{len(self.state.rewinds)} of at most {t.max_rewinds})")
        return True

    def _save_deadline(self, watchdog: Watchdog, what: str):
        """Saves are not steps (no step budget), but may not hang: SIGTERM during a save is
        honoured within this deadline at the latest."""
        return watchdog.deadline(self.cfg.checkpoint.save_timeout_s, what,
                                 "checkpoint.save_timeout_s")

    def _should_save(self, last: int, stopping: bool) -> bool:
        if self.checkpointer is None:
            return False
        c = self.cfg.checkpoint
        if c.interval and self.state.step % c.interval == 0:
            return True
        return c.save_on_stop and (stopping or self.state.step == last)

    def close(self) -> None:
        self.hooks.close()
        self.loader.close()
        for vs in self.valid_sets:
            vs.loader.close()
