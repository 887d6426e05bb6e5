"""Save and load everything a run needs, on every rank, with the publish protocol of
store.py.

What a checkpoint holds:
- model weights: megatron-core sharded tensors (`dist_checkpointing`, torch_dist format),
  keyed by global parameter name with TP/PP offsets, so they load under any TP/PP;
- Adam state (and fp32 master weights when training in bf16) in model space
  (optimizer_state.py): the same sharded tensors, prefixed `optimizer.state.NAME.`, so they
  load under any TP/PP/DP and ZeRO stage 0-3 (zero3_state.py gathers stage 3's
  partitioned weights too);
- per-rank RNG states as tensors indexed by (PP, TP, DP) rank: restored when the layout is
  unchanged (bit-exact resume), re-seeded from (seed, step, rank) otherwise;
- train_state.json: the registered JSON parts under their names (parts.py: the LR
  scheduler, the loader position, the step/token counters), the resolved config, the
  tokenizer hash, the layout and the model's shape.

Nothing is unpickled on load: the tensor files are read by torch.distributed.checkpoint,
megatron's common.pt (an empty dict here) by torch.load's default weights_only=True, and the
rest is JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state as ps, tensor_parallel
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelSaveStrategyWrapper)

from pretrain.hf import importer as hf_import
from pretrain.checkpoint import optimizer_state, store, weights
from pretrain.checkpoint.parts import Stateful
from pretrain.checkpoint.staging import HostStaging
from pretrain.checkpoint.store import CheckpointDir, CheckpointError
from pretrain.log import log, warn
from pretrain.reaper import start_reaper

# Test hook (documented in docs/checkpoints.md): "ACTION:POINT:STEP[:RANK]" makes the given
# rank (all ranks when omitted) SIGKILL itself ("kill") or send itself SIGTERM ("signal") at
# POINT of the save of STEP ("*": any step). The kill tests use it to stop a real save at
# exact places.
FAULT_ENV = "PRETRAIN_TEST_FAULT"
FAULT_POINTS = ("begin", "files_written", "record_written", "renamed", "latest_written")

MODEL_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "query_groups", "ffn_size",
                "activation", "normalization", "position_embedding", "tie_embeddings", "bias")


def _die_with_parent() -> None:
    """Runs in the Manager's server process: SIGKILL it when the training process dies.
    Otherwise a killed rank leaves the server running, holding the job's stdout/stderr open
    (a launcher waiting for EOF then waits forever). Stop signals are ignored: SLURM sends
    them to every process of a task, and the server must outlive the checkpoint they ask for."""
    import ctypes

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the server outlives a SIGKILLed parent
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(0)


def _start_results_queue() -> None:
    """megatron's torch_dist writer collects results from its forked writer processes through
    a multiprocessing Manager queue that it starts, on first use, in the *spawn* context: a
    fresh interpreter that re-imports the training script (about 3 s per rank, on the first
    save of every process). A Manager started by fork serves the same proxies (picklable to
    forked and spawned processes alike) in milliseconds."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "missing") is None:
        import multiprocessing
        from multiprocessing.managers import SyncManager

        manager = SyncManager(ctx=multiprocessing.get_context("fork"))
        manager.start(initializer=_die_with_parent)
        filesystem_async._results_queue = manager.Queue()


def _fault(point: str, step: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    parts = spec.split(":")
    action, where, at = parts[0], parts[1], parts[2]
    if where != point or at not in ("*", str(step)):
        return
    if len(parts) > 3 and int(parts[3]) != dist.get_rank():
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "signal":
        os.kill(os.getpid(), signal.SIGTERM)


def model_signature(cfg, padded_vocab_size: int) -> dict:
    m = cfg.model
    sig = {f"model.{name}": getattr(m, name) for name in MODEL_FIELDS}
    sig["padded_vocab_size"] = padded_vocab_size
    if m.position_embedding == "learned":
        sig["model.max_seq_length"] = m.max_seq_length
    return sig


def _layout_key(cfg, layout) -> dict:
    return {"tensor_parallel": layout.tensor_parallel, "pipeline_parallel": layout.pipeline_parallel,
            "data_parallel": layout.data_parallel,
            "virtual_pipeline_chunks": cfg.parallel.virtual_pipeline_chunks}


@dataclass
class Loaded:
    path: Path
    step: int
    weights_only: bool
    resharded: bool


class Checkpointer:
    """One per run. `save(step)` on every rank at the same step; `load_on_start()` once,
    after the engine and loaders exist and before the first step."""

    def __init__(self, cfg, layout, zero, chunks, data, device: torch.device,
                 parts: dict[str, Stateful]):
        """`parts`: the JSON parts to save and restore by name (parts.training_parts); the
        model chunks and the ZeRO engine's optimizer state are sharded tensors."""
        self.cfg, self.layout, self.zero, self.chunks = cfg, layout, zero, chunks
        self.data, self.device, self.parts = data, device, parts
        self.dir = CheckpointDir(Path(cfg.run.dir) / "checkpoints")
        self.opt = optimizer_state.for_engine(zero.engine)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # Steps saved or loaded (so verified) by this process: retention counts them as intact
        # without hashing them again (the one resumed from is deleted only once keep_last
        # newer intact ones exist).
        self.known_good: set[int] = set()
        self.rejected: list[tuple[Path, str]] = []  # (checkpoint, why) skipped by find()
        _start_results_queue()
        mode = cfg.checkpoint.async_save
        self.async_queue, self.staging = None, None
        if mode == "on" or (mode == "auto" and torch.cuda.is_available()):
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            # A forked writer per save: it sees the tensors as they were at the fork (copies
            # in host memory on GPU), so training may change them right away.
            self.async_queue = AsyncCallsQueue(persistent=False)
            # The training path copies the state once into reused (pinned) host buffers.
            self.staging = HostStaging(pin=device.type == "cuda")
            # The writer forks writers of its own; after a SIGKILL of this process they
            # blocked forever on their results queue, holding memory and the job's stdout.
            start_reaper()

    # ================================================================== state dicts
    def _sharded(self, host=None) -> dict:
        """Everything a save writes, as sharded tensors. `host`: the staging copy of async
        saves (optimizer_state.OptimizerState.gather)."""
        with self.opt.full_weights(gather=True) as full:
            model_sd, by_param = self._model_sharded(full)
        return {"model": model_sd,
                "optimizer": self._optimizer_sharded(by_param, self.opt.gather(host=host)),
                "rng": self._rng_sharded(self._rng_states())}

    def _model_sharded(self, host: dict) -> tuple[dict, dict]:
        """The chunks' sharded tensors, and each parameter's entry by id(param). Call inside
        `self.opt.full_weights()`; its `host` tensors (ZeRO-3: the full weights by id(param))
        replace the parameters in the entries, so they outlive the context."""
        out, by_param = {}, {}
        for i, chunk in enumerate(self.chunks):
            chunk_sd = {}
            for key, entry in chunk.sharded_state_dict(prefix="model.").items():
                # Linear layers' `_extra_state` is None here (TE keeps FP8 scaling metadata
                # there, unused without FP8); dropping it keeps the checkpoint free of pickles.
                if key.endswith("._extra_state"):
                    continue
                data = getattr(entry, "data", None)
                if isinstance(data, torch.Tensor):
                    if id(data) in host:
                        entry = dataclasses.replace(entry, data=host[id(data)])
                    by_param[id(data)] = entry
                chunk_sd[key] = entry
            out[f"chunk{i}"] = chunk_sd
        return out, by_param

    def _optimizer_sharded(self, by_param: dict, states: dict) -> dict:
        out: dict = {}
        for index, param in enumerate(self.opt.params()):
            base = by_param.get(id(param))
            if base is None:
                raise RuntimeError(f"optimizer parameter {index} of shape {tuple(param.shape)} "
                                   f"has no entry in the model's sharded state dict")
            for name, tensor in states[param].items():
                kwargs = {"key": f"optimizer.state.{name}.{base.key}", "data": tensor}
                if hasattr(base, "dtype"):
                    kwargs["dtype"] = tensor.dtype
                out.setdefault(name, {})[f"p{index}"] = dataclasses.replace(base, **kwargs)
        return out

    def _rank_coords(self) -> tuple[tuple[int, int], ...]:

        return ((ps.get_pipeline_model_parallel_rank(), self.layout.pipeline_parallel),
                (ps.get_tensor_model_parallel_rank(), self.layout.tensor_parallel),
                (ps.get_data_parallel_rank(), self.layout.data_parallel))

    def _rng_states(self) -> dict[str, torch.Tensor]:

        states = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.get_rng_state()
        for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items():
            states[f"tracker.{name}"] = state.cpu()
        return states

    def _rng_sharded(self, states: dict[str, torch.Tensor]) -> dict:

        coords = self._rank_coords()
        out = {}
        for name, state in states.items():
            data = state.reshape(1, 1, 1, -1)
            out[name] = ShardedTensor.from_rank_offsets(
                f"rng.{name}", data, *((axis, rank, size) for axis, (rank, size) in enumerate(coords)),
                replica_id=0)
        return out

    def _train_state(self, step: int) -> dict:
        return {
            **{name: part.state_dict() for name, part in self.parts.items()},
            "step": step,
            "optimizer_step": self.opt.step_count(),
            "tokenizer": {"sha256": self.data.train[0].tokenizer_sha256,
                          "vocab_size": self.data.vocab_size},
            "model": model_signature(self.cfg, self.layout.padded_vocab_size),
            "layout": _layout_key(self.cfg, self.layout),
            "zero_stage": self.cfg.parallel.zero_stage,
            "master_weights": self.opt.has_master,
            "param_dtype": str(self.opt.params()[0].dtype).removeprefix("torch."),
            "config": self.cfg.to_dict(),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    # ================================================================== save
    def save(self, step: int) -> Path:

        started = time.perf_counter()
        _fault("begin", step)
        nonce = [uuid.uuid4().hex[:8] if self.rank == 0 else None]
        dist.broadcast_object_list(nonce, src=0)
        staging = self.dir.staging(step, nonce[0])
        train_state = self._train_state(step)
        if self.rank == 0:
            staging.mkdir(parents=True)
        dist.barrier()

        # Replicated tensors (every DP rank holds the same weights) are written once, the
        # writing spread evenly over the DP group.
        strategy = FullyParallelSaveStrategyWrapper(
            get_default_save_sharded_strategy(), ps.get_data_parallel_group())
        if self.async_queue is None:
            sharded = self._sharded()
            dist_checkpointing.save(sharded, str(staging), sharded_strategy=strategy)
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

    def poll(self) -> None:
        """Publish a background save that finished on every rank (a collective; call on all
        ranks at the same step)."""
        if self.async_queue is not None:
            self.async_queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Block until a background save is published (before exiting, before the next)."""
        if self.async_queue is not None:
            self.async_queue.maybe_finalize_async_calls(blocking=True)

    def _finish(self, staging: Path, step: int, train_state: dict, started: float) -> None:
        """After every rank's tensor files are written: train_state.json, every file hashed
        (spread over ranks), the record, publish, prune."""
        if self.rank == 0:
            (staging / store.TRAIN_STATE).write_text(json.dumps(train_state, indent=1) + "\n")
        _fault("files_written", step)
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
                    "world_size": self.world, "layout": _layout_key(self.cfg, self.layout)})
                _fault("record_written", step)
                self.dir.publish(staging, step, after_rename=lambda: _fault("renamed", step))
                _fault("latest_written", step)
                self.known_good.add(step)
                deleted = self.dir.apply_retention(
                    self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_every,
                    protect={step}, verified=self._intact)
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
    def find(self) -> tuple[Path, dict, bool] | None:
        """The checkpoint to start from: (path, train_state, weights_only), or None.

        This run's own newest complete checkpoint wins (a restart after preemption); else
        `checkpoint.load_from`. Incomplete or corrupt candidates are reported and skipped."""
        c = self.cfg.checkpoint
        if self.rank == 0:
            for name in self.dir.remove_leftovers():
                warn(f"checkpoint: removed {self.dir.root / name} (an unfinished save or delete)")
        dist.barrier()
        chosen = self._newest_complete(self.dir, None)
        if chosen is not None:
            return (*chosen, False)
        if self.dir.candidates():  # there are checkpoints, and not one is usable
            raise CheckpointError(
                f"every checkpoint in {self.dir.root} failed verification ("
                f"{'; '.join(f'{p.name}: {why}' for p, why in self.rejected)}); starting "
                f"over from step 0 would discard the run. Restore them, or move them away to "
                f"start from scratch")
        if c.load_from and hf_import.is_hf(c.load_from):
            return hf_import.hf_dir(c.load_from), None, True
        if c.load_from:
            source, exact = store.resolve_load_path(c.load_from)
            chosen = self._newest_complete(source, exact)
            if chosen is None:
                raise CheckpointError(f"checkpoint.load_from={c.load_from}: no complete checkpoint "
                                      f"there (see the warnings above)")
            return (*chosen, c.weights_only)
        return None

    def _newest_complete(self, where: CheckpointDir, exact: Path | None):
        candidates = [exact] if exact is not None else [cand.path for cand in where.candidates()]
        pointer = where.latest_pointer()
        for path in candidates:
            problem = self._verify(path)
            if problem is None:
                if exact is None and pointer and pointer != path.name:
                    log(f"checkpoint: {where.root}/latest says {pointer}; using {path.name}, the "
                        f"newest complete checkpoint")
                state = json.loads((path / store.TRAIN_STATE).read_text())
                if where is self.dir:
                    self.known_good.add(state["step"])
                return path, state
            warn(f"checkpoint: skipping {path}: {problem}")
            self.rejected.append((path, problem))
            if exact is not None:
                raise CheckpointError(f"checkpoint.load_from={exact}: {problem}")
        return None

    def _verify(self, path: Path) -> str | None:
        """None when complete and intact, else the reason (the same on every rank)."""
        result = [None, None]
        if self.rank == 0:
            try:
                record = store.read_record(path)
                store.check_sizes(path, record)
                store.check_index_pickle(path)
                result = [None, record]
            except CheckpointError as err:
                result = [str(err), None]
        dist.broadcast_object_list(result, src=0)
        if result[0] is not None:
            return result[0]
        if not self.cfg.checkpoint.verify:
            return None
        record = result[1]  # read once, on rank 0
        problem = None
        try:
            store.check_digests(path, record, sorted(record["files"])[self.rank::self.world])
        except CheckpointError as err:
            problem = str(err)
        problems = [None] * self.world
        dist.all_gather_object(problems, problem)
        return next((p for p in problems if p), None)

    def _intact(self, cand: store.Candidate) -> bool:
        """Rank 0, for retention: a checkpoint not known good is checked now (record, sizes
        and, with checkpoint.verify, sha256), so only intact ones count as kept."""
        if cand.step in self.known_good:
            return True
        try:
            record = store.read_record(cand.path)
            store.check_sizes(cand.path, record)
            if self.cfg.checkpoint.verify:
                store.check_digests(cand.path, record, sorted(record["files"]))
        except CheckpointError as err:
            warn(f"checkpoint: retention keeps {cand.path} but does not count it: {err}")
            return False
        self.known_good.add(cand.step)
        return True

    def check_compatible(self, path: Path, state: dict) -> None:
        want = model_signature(self.cfg, self.layout.padded_vocab_size)
        have = state["model"]
        diffs = [f"{k}={have.get(k)!r} there, {v!r} here" for k, v in want.items() if have.get(k) != v]
        if diffs:
            raise CheckpointError(f"{path} holds a different model: {'; '.join(diffs)}. Resume with "
                                  f"the checkpoint's model settings, or use a new run.dir")
        tok = state["tokenizer"]
        if tok["sha256"] != self.data.train[0].tokenizer_sha256:
            raise CheckpointError(
                f"{path} was trained on data tokenized with tokenizer sha256 {tok['sha256'][:12]}, "
                f"but data.train uses {self.data.train[0].tokenizer_sha256[:12]}; token ids would "
                f"mean different text. Use data tokenized with the checkpoint's tokenizer")
        if tok["vocab_size"] != self.data.vocab_size:
            raise CheckpointError(f"{path}: tokenizer vocabulary {tok['vocab_size']} there, "
                                  f"{self.data.vocab_size} here")

    def load_on_start(self) -> Loaded | None:
        found = self.find()
        if found is None:
            return None
        path, state, weights_only = found
        if state is None:
            return self._load_hf()
        self.check_compatible(path, state)

        started = time.perf_counter()
        same_layout = state["layout"] == _layout_key(self.cfg, self.layout)
        # ZeRO-3: the loaded weights go into this rank's slices when the context closes.
        with self.opt.full_weights(gather=False) as host:
            model_sd, by_param = self._model_sharded(host)
            sharded = {"model": model_sd}
            states = None
            if not weights_only:
                states = self.opt.empty(with_master=state["master_weights"])
                sharded["optimizer"] = self._optimizer_sharded(by_param, states)
                if same_layout:
                    sharded["rng"] = self._rng_sharded(self._rng_states())
            loaded = dist_checkpointing.load(sharded, str(path))
            self._install_model(loaded["model"])
        if weights_only:
            self.opt.reset_master_from_weights()
            log(f"checkpoint: loaded weights of step {state['step']} from {path} (fresh optimizer, "
                f"step 0) in {time.perf_counter() - started:.1f} s")
            return Loaded(path, 0, True, not same_layout)

        params = self.opt.params()
        for name, tensors in loaded["optimizer"].items():
            for key, tensor in tensors.items():
                target = states[params[int(key[1:])]][name]
                if tensor.data_ptr() != target.data_ptr():  # loaded elsewhere (factories)
                    target.copy_(tensor)
        self.opt.scatter(states, state["optimizer_step"])
        for name, part in self.parts.items():
            # Checkpoints written before the parts were named kept the counters at the top.
            saved = state.get(name, state if name == "counters" else None)
            if saved is None:
                raise CheckpointError(f"{path}: {store.TRAIN_STATE} has no {name!r} state")
            try:
                part.load_state_dict(saved)
            except (ValueError, KeyError) as err:
                raise CheckpointError(f"{path}: {name}: {err}") from None
        engine = self.zero.engine
        engine.global_steps = state["step"]
        engine.global_samples = state["step"] * self.cfg.train.global_batch_size
        if same_layout:
            self._install_rng({k: v.reshape(-1) for k, v in loaded["rng"].items()})
        else:
            self._reseed(state["step"])
        how = "same layout" if same_layout else f"resharded from {state['layout']}"
        if state.get("zero_stage", self.cfg.parallel.zero_stage) != self.cfg.parallel.zero_stage:
            how += f"; ZeRO-{state['zero_stage']} state into ZeRO-{self.cfg.parallel.zero_stage}"
        log(f"checkpoint: resumed from {path} at step {state['step']} ({how}) in "
            f"{time.perf_counter() - started:.1f} s")
        return Loaded(path, state["step"], False, not same_layout)

    def _load_hf(self) -> Loaded:
        """checkpoint.load_from=hf:DIR: a Hugging Face Llama's weights, fresh optimizer, step 0."""
        load_from = self.cfg.checkpoint.load_from
        started = time.perf_counter()
        state = hf_import.load_state(load_from, self.cfg, self.layout.padded_vocab_size,
                                     self.data.vocab_size)
        with self.opt.full_weights(gather=False):
            weights.install(self.chunks, state, ps.get_tensor_model_parallel_rank(),
                            self.layout.tensor_parallel, self.cfg.model.activation == "swiglu",
                            load_from)
        self.opt.reset_master_from_weights()
        log(f"checkpoint: loaded the weights of {load_from} (fresh optimizer, step 0) in "
            f"{time.perf_counter() - started:.1f} s")
        return Loaded(hf_import.hf_dir(load_from), 0, True, True)

    def _install_model(self, loaded: dict) -> None:
        with torch.no_grad():
            for i, chunk in enumerate(self.chunks):
                tensors = loaded[f"chunk{i}"]
                for name, param in chunk.named_parameters():
                    key = f"model.{name}"
                    if key not in tensors:
                        raise CheckpointError(f"the checkpoint has no value for {key}")
                    if tensors[key].data_ptr() != param.data_ptr():  # not loaded in place
                        param.copy_(tensors[key])

    def _install_rng(self, states: dict[str, torch.Tensor]) -> None:

        torch.set_rng_state(states["torch"].to(torch.uint8))
        if torch.cuda.is_available() and "cuda" in states:
            torch.cuda.set_rng_state(states["cuda"].to(torch.uint8))
        tracker = tensor_parallel.get_cuda_rng_tracker()
        tracker.set_states({name.removeprefix("tracker."): state.to(torch.uint8)
                            for name, state in states.items() if name.startswith("tracker.")})

    def _reseed(self, step: int) -> None:
        """A new layout has no per-rank RNG streams to continue: derive fresh ones from
        (seed, step) so the run stays deterministic for its layout."""

        seed = self.cfg.train.seed + 1_000_003 * step
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
