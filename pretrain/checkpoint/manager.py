"""Save and load everything a run needs, on every rank, with the publish protocol of
store.py. The public surface is `load()`, `save(step)` and `wait()`.

What a checkpoint holds is a registry of parts (parts.py), given by the caller:
- tensor parts (tensor_parts.py: the model chunks, the ZeRO optimizer's Adam state in model
  space, per-rank RNG), megatron-core sharded tensors (`dist_checkpointing`, torch_dist
  format) keyed by global name with TP/PP offsets, so they load under any TP/PP/DP/ZeRO;
- JSON parts (the LR scheduler, the loader position, the counters), stored under their
  names in train_state.json with the resolved config, the tokenizer hash, the layout and
  the model's shape.

Nothing is unpickled on load: the tensor files are read by torch.distributed.checkpoint,
megatron's common.pt (an empty dict here) by torch.load's default weights_only=True, and the
rest is JSON. Weights from elsewhere (a Hugging Face model) are read by the caller and handed
in as `initial_weights`.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from pretrain.checkpoint import megatron_compat, store
from pretrain.checkpoint.faults import fault
from pretrain.checkpoint.finder import Finder
from pretrain.checkpoint.parts import Loading, Stateful, TensorPart
from pretrain.checkpoint.signature import check_compatible, layout_key, model_signature
from pretrain.checkpoint.staging import HostStaging
from pretrain.checkpoint.store import CheckpointDir
from pretrain.errors import CheckpointError
from pretrain.log import log
from pretrain.reaper import start_reaper
from pretrain.run_dir import RunDir, TRAIN_STATE

WEIGHTS = "model"  # the tensor part holding the weights: read alone by weights-only loads


@dataclass
class Loaded:
    path: Path
    step: int
    weights_only: bool
    resharded: bool


class Checkpointer:
    """One per run. `save(step)` on every rank at the same step; `load()` once, after the
    engine and loaders exist and before the first step; `wait()` before exiting."""

    def __init__(self, cfg, layout, data, device: torch.device, parts: dict[str, Stateful],
                 tensors: dict[str, TensorPart],
                 initial_weights: Callable[[], tuple[Path, dict]] | None = None):
        """`parts`: the JSON parts by name (parts.training_parts); `tensors`: the tensor parts
        by name (tensor_parts.tensor_parts), the weights part "model" first.
        `initial_weights`: called only when the run has no checkpoint of its own, returns
        (where from, a full-shape state keyed by model/init.py's names): the weights to
        start from with a fresh optimizer at step 0 (checkpoint.load_from=hf:DIR)."""
        self.cfg, self.layout, self.data, self.parts = cfg, layout, data, parts
        self.tensors, self.initial_weights = tensors, initial_weights
        self.weights = tensors[WEIGHTS]
        self.dir = CheckpointDir(RunDir(cfg.run.dir).checkpoints)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.finder = Finder(self.dir, cfg.checkpoint.verify)
        megatron_compat.start_results_queue()
        # megatron forks writer processes for synchronous saves too, and the async writer forks
        # writers of its own; after a SIGKILL of this process they blocked forever on their
        # results queue, holding memory and the job's stdout.
        start_reaper()
        mode = cfg.checkpoint.async_save
        self.async_queue, self.staging = None, None
        if mode == "on" or (mode == "auto" and torch.cuda.is_available()):
            self.async_queue = megatron_compat.async_writers()
            # The training path copies the state once into reused (pinned) host buffers.
            self.staging = HostStaging(pin=device.type == "cuda")

    # ================================================================== save
    def _sharded(self, host=None) -> dict:
        """Every tensor part's sharded state dict; the weights part's inside its full-weights
        context (ZeRO-3 gathers each parameter), the others after it."""
        with self.weights.full_weights(gather=True):
            sharded = {WEIGHTS: self.weights.sharded_state_dict(host=host)}
        for name, part in self.tensors.items():
            if name != WEIGHTS:
                sharded[name] = part.sharded_state_dict(host=host)
        return sharded

    def _train_state(self, step: int) -> dict:
        summaries = {k: v for part in self.tensors.values() for k, v in part.summary().items()}
        return {
            **{name: part.state_dict() for name, part in self.parts.items()},
            "step": step,
            **summaries,
            "tokenizer": {"sha256": self.data.train[0].tokenizer_sha256,
                          "vocab_size": self.data.vocab_size},
            "model": model_signature(self.cfg, self.layout.padded_vocab_size),
            "layout": layout_key(self.cfg, self.layout),
            "zero_stage": self.cfg.parallel.zero_stage,
            "config": self.cfg.to_dict(),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def save(self, step: int) -> Path:
        """Save `step` on every rank (a collective). With async_save the files are written by
        a background process and published at a later `wait()`; returns the final path."""
        started = time.perf_counter()
        fault("begin", step)
        nonce = [uuid.uuid4().hex[:8] if self.rank == 0 else None]
        dist.broadcast_object_list(nonce, src=0)
        staging = self.dir.staging(step, nonce[0])
        train_state = self._train_state(step)
        if self.rank == 0:
            staging.mkdir(parents=True)
        dist.barrier()

        strategy = megatron_compat.save_strategy()
        if self.async_queue is None:
            dist_checkpointing.save(self._sharded(), str(staging), sharded_strategy=strategy)
            self._finish(staging, step, train_state, started)
            return self.dir.final(step)
        self.wait()  # one save in flight at a time (so the host buffers are free again)
        waited = time.perf_counter()
        sharded = self.staging.stage(self._sharded(host=self.staging.copy))
        self.staging.synchronize()
        copied = time.perf_counter()
        request = dist_checkpointing.save(sharded, str(staging), sharded_strategy=strategy,
                                          async_sharded_save=True)
        request.add_finalize_fn(lambda: self._finish(staging, step, train_state, started))
        self.async_queue.schedule_async_request(request)
        done = time.perf_counter()
        # The stall, split so a slow save says where it went (the writer's own time is in
        # the "saved ... in" line when it is published).
        log(f"checkpoint: step {step} handed to a background writer after {done - started:.2f} s "
            f"(previous save {waited - started:.2f} s, copy of "
            f"{self.staging.nbytes / 2**30:.2f} GiB to host {copied - waited:.2f} s, "
            f"plan and fork {done - copied:.2f} s); training continues")
        return self.dir.final(step)

    def wait(self, block: bool = True) -> None:
        """Publish a background save: block until it is written (before exiting, before the
        next save), or with `block=False` only if it has finished on every rank. A
        collective: call on all ranks at the same step. Nothing to do without async_save."""
        if self.async_queue is not None:
            self.async_queue.maybe_finalize_async_calls(blocking=block)

    def _finish(self, staging: Path, step: int, train_state: dict, started: float) -> None:
        """After every rank's tensor files are written: train_state.json, every file hashed
        (spread over ranks), the record, publish, prune."""
        if self.rank == 0:
            (staging / TRAIN_STATE).write_text(json.dumps(train_state, indent=1) + "\n")
        fault("files_written", step)
        dist.barrier()
        names = [store.list_files(staging) if self.rank == 0 else None]
        dist.broadcast_object_list(names, src=0)
        mine = {rel: store.sha256_file(staging / rel) for rel in names[0][self.rank::self.world]}
        gathered = [None] * self.world
        dist.all_gather_object(gathered, mine)
        error = [None]
        if self.rank == 0:
            try:
                hashes = {k: v for part in gathered for k, v in part.items()}
                store.write_record(staging, step, hashes, {
                    "world_size": self.world, "layout": layout_key(self.cfg, self.layout)})
                fault("record_written", step)
                self.dir.publish(staging, step, after_rename=lambda: fault("renamed", step))
                fault("latest_written", step)
                self.finder.known_good.add(step)
                deleted = self.dir.apply_retention(
                    self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_every,
                    protect={step}, verified=self.finder.intact)
                if deleted:
                    log(f"checkpoint: retention removed step(s) {', '.join(map(str, deleted))}")
            except Exception as err:  # noqa: BLE001 - re-raised on every rank below
                error[0] = f"{type(err).__name__}: {err}"
        dist.broadcast_object_list(error, src=0)
        if error[0]:
            raise CheckpointError(f"saving step {step} failed on rank 0: {error[0]}")
        log(f"checkpoint: saved step {step} to {self.dir.final(step)} in "
            f"{time.perf_counter() - started:.1f} s")

    # ================================================================== load
    def load(self) -> Loaded | None:
        """Start from the run's own newest complete checkpoint (a restart), else from
        `checkpoint.load_from` (or `initial_weights`); None when there is nothing to load."""
        own = self.finder.own()
        if own is not None:
            return self._load(*own, weights_only=False)
        if self.initial_weights is not None:
            return self._load_initial_weights()
        load_from = self.cfg.checkpoint.load_from
        if load_from:
            return self._load(*self.finder.load_from(load_from), self.cfg.checkpoint.weights_only)
        return None

    def load_own(self) -> Loaded | None:
        """The run's own newest complete checkpoint, in the middle of a run too (a rewind
        past a loss spike); None when the run has saved none yet."""
        self.wait()
        own = self.finder.own()
        return None if own is None else self._load(*own, weights_only=False)

    def _load(self, path: Path, state: dict, weights_only: bool) -> Loaded:
        check_compatible(path, state, self.cfg, self.layout.padded_vocab_size, self.data)
        started = time.perf_counter()
        loading = Loading(state, state["layout"] == layout_key(self.cfg, self.layout),
                          weights_only)
        others = {} if weights_only else {n: p for n, p in self.tensors.items() if n != WEIGHTS}
        # ZeRO-3: the loaded weights go into this rank's slices when the context closes.
        with self.weights.full_weights(gather=False):
            templates = {WEIGHTS: self.weights.sharded_state_dict(loading)}
            templates.update({name: part.sharded_state_dict(loading)
                              for name, part in others.items()})
            loaded = dist_checkpointing.load({n: t for n, t in templates.items() if t}, str(path))
            self.weights.load_sharded_state_dict(loaded[WEIGHTS], loading)
        if weights_only:
            log(f"checkpoint: loaded weights of step {state['step']} from {path} (fresh optimizer, "
                f"step 0) in {time.perf_counter() - started:.1f} s")
            return Loaded(path, 0, True, not loading.same_layout)

        for name, part in self.parts.items():
            # Checkpoints written before the parts were named kept the counters at the top.
            saved = state.get(name, state if name == "counters" else None)
            if saved is None:
                raise CheckpointError(f"{path}: {TRAIN_STATE} has no {name!r} state")
            try:
                part.load_state_dict(saved)
            except (ValueError, KeyError) as err:
                raise CheckpointError(f"{path}: {name}: {err}") from None
        for name, part in others.items():  # RNG last: nothing may draw from it after
            part.load_sharded_state_dict(loaded.get(name, {}), loading)
        how = "same layout" if loading.same_layout else f"resharded from {state['layout']}"
        if state.get("zero_stage", self.cfg.parallel.zero_stage) != self.cfg.parallel.zero_stage:
            how += f"; ZeRO-{state['zero_stage']} state into ZeRO-{self.cfg.parallel.zero_stage}"
        log(f"checkpoint: resumed from {path} at step {state['step']} ({how}) in "
            f"{time.perf_counter() - started:.1f} s")
        return Loaded(path, state["step"], False, not loading.same_layout)

    def _load_initial_weights(self) -> Loaded:
        """Weights from elsewhere (checkpoint.load_from=hf:DIR), fresh optimizer, step 0."""
        started = time.perf_counter()
        source, state = self.initial_weights()
        load_from = self.cfg.checkpoint.load_from
        self.weights.load_full(state, load_from)
        log(f"checkpoint: loaded the weights of {load_from} (fresh optimizer, step 0) in "
            f"{time.perf_counter() - started:.1f} s")
        return Loaded(source, 0, True, True)
