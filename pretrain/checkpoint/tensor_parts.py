"""The tensor parts of a checkpoint (parts.TensorPart): model weights, the ZeRO optimizer's
Adam state in model space, and per-rank RNG streams, as megatron-core sharded tensors.

Keys in the files (docs/checkpoints.md "Layout on disk"; never change them, old checkpoints
must load): `model.<param>`; `optimizer.state.<exp_avg|exp_avg_sq|fp32_param>.model.<param>`;
`rng.torch`, `rng.cuda`, `rng.tracker.<name>` of shape (PP, TP, DP, n).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from megatron.core import parallel_state as ps, tensor_parallel
from megatron.core.dist_checkpointing import ShardedTensor

from pretrain.checkpoint import weights
from pretrain.checkpoint.parts import Loading, TensorPart
from pretrain.checkpoint.zero3_state import for_engine
from pretrain.errors import CheckpointError


class ModelPart(TensorPart):
    """The chunks' weights (`model.<param>`, TP/PP offsets in the sharded-tensor metadata).

    ZeRO-3 keeps only a slice of each parameter; `full_weights()` makes the parameters whole
    for the time of a save's or load's sharded state dict (see zero3_state.py)."""

    def __init__(self, chunks, opt, tensor_parallel_size: int, swiglu: bool):
        self.chunks, self.opt = chunks, opt
        self.tensor_parallel_size, self.swiglu = tensor_parallel_size, swiglu
        self._host: dict = {}
        # Each parameter's entry by id(param), from the last sharded_state_dict(): the
        # optimizer's state is keyed and sharded like its parameter.
        self.by_param: dict = {}

    @contextlib.contextmanager
    def full_weights(self, gather: bool):
        """Every parameter whole inside (ZeRO-3: gathered when `gather`, else to be filled by
        a load and installed as this rank's slices on exit; stages 0-2: nothing to do)."""
        with self.opt.full_weights(gather=gather) as host:
            self._host = host
            try:
                yield
            finally:
                self._host = {}

    def sharded_state_dict(self, loading: Loading | None = None, host=None) -> dict:
        """Call inside `full_weights()`; its host tensors (ZeRO-3: the full weights by
        id(param)) replace the parameters in the entries, so they outlive the context."""
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
                    if id(data) in self._host:
                        entry = dataclasses.replace(entry, data=self._host[id(data)])
                    by_param[id(data)] = entry
                chunk_sd[key] = entry
            out[f"chunk{i}"] = chunk_sd
        self.by_param = by_param
        return out

    def load_sharded_state_dict(self, state: dict, loading: Loading) -> None:
        with torch.no_grad():
            for i, chunk in enumerate(self.chunks):
                tensors = state[f"chunk{i}"]
                for name, param in chunk.named_parameters():
                    key = f"model.{name}"
                    if key not in tensors:
                        raise CheckpointError(f"the checkpoint has no value for {key}")
                    if tensors[key].data_ptr() != param.data_ptr():  # not loaded in place
                        param.copy_(tensors[key])
        if loading.weights_only:
            self.opt.reset_master_from_weights()

    def load_full(self, state: dict, source: str) -> None:
        """Weights from elsewhere (a Hugging Face model): one full-shape state keyed by
        model/init.py's layout-free names; each rank keeps its layers and TP slice, and the
        optimizer's master weights start from them."""
        with self.full_weights(gather=False):
            weights.install(self.chunks, state, ps.get_tensor_model_parallel_rank(),
                            self.tensor_parallel_size, self.swiglu, source)
        self.opt.reset_master_from_weights()


class OptimizerPart(TensorPart):
    """Adam moments (and fp32 master weights with bf16) of every parameter, gathered into the
    parameter's shape (optimizer_state.py), so they load under any DP size and ZeRO stage.
    Loading also sets the DeepSpeed engine's step and sample counters."""

    def __init__(self, opt, model: ModelPart, engine, global_batch_size: int):
        self.opt, self.model, self.engine = opt, model, engine
        self.global_batch_size = global_batch_size
        self._states = None  # a load's target tensors, between template and install

    def sharded_state_dict(self, loading: Loading | None = None, host=None) -> dict:
        """After the model part's (its entries give each state's key and sharding)."""
        if loading is None:
            states = self.opt.gather(host=host)
        else:
            states = self._states = self.opt.empty(with_master=loading.state["master_weights"])
        out: dict = {}
        for index, param in enumerate(self.opt.params()):
            base = self.model.by_param.get(id(param))
            if base is None:
                raise RuntimeError(f"optimizer parameter {index} of shape {tuple(param.shape)} "
                                   f"has no entry in the model's sharded state dict")
            for name, tensor in states[param].items():
                kwargs = {"key": f"optimizer.state.{name}.{base.key}", "data": tensor}
                if hasattr(base, "dtype"):
                    kwargs["dtype"] = tensor.dtype
                out.setdefault(name, {})[f"p{index}"] = dataclasses.replace(base, **kwargs)
        return out

    def load_sharded_state_dict(self, state: dict, loading: Loading) -> None:
        params, states = self.opt.params(), self._states
        for name, tensors in state.items():
            for key, tensor in tensors.items():
                target = states[params[int(key[1:])]][name]
                if tensor.data_ptr() != target.data_ptr():  # loaded elsewhere (factories)
                    target.copy_(tensor)
        self.opt.scatter(states, loading.state["optimizer_step"])
        self._states = None
        self.engine.global_steps = loading.step
        self.engine.global_samples = loading.step * self.global_batch_size

    def summary(self) -> dict:
        return {"optimizer_step": self.opt.step_count(), "master_weights": self.opt.has_master,
                "param_dtype": str(self.opt.params()[0].dtype).removeprefix("torch.")}


class RngPart(TensorPart):
    """This rank's torch, CUDA and megatron tracker RNG states, as tensors indexed by its
    (PP, TP, DP) rank. Restored under the same layout (bit-exact resume); under another one
    there are no streams to continue, and they are re-seeded from (seed, step)."""

    def __init__(self, layout, seed: int):
        self.layout, self.seed = layout, seed

    def sharded_state_dict(self, loading: Loading | None = None, host=None) -> dict:
        if loading is not None and not loading.same_layout:
            return {}
        coords = ((ps.get_pipeline_model_parallel_rank(), self.layout.pipeline_parallel),
                  (ps.get_tensor_model_parallel_rank(), self.layout.tensor_parallel),
                  (ps.get_data_parallel_rank(), self.layout.data_parallel))
        out = {}
        for name, state in self._states().items():
            data = state.reshape(1, 1, 1, -1)
            out[name] = ShardedTensor.from_rank_offsets(
                f"rng.{name}", data, *((axis, rank, size) for axis, (rank, size) in enumerate(coords)),
                replica_id=0)
        return out

    def load_sharded_state_dict(self, state: dict, loading: Loading) -> None:
        if not loading.same_layout:
            # Deterministic for the new layout: fresh streams derived from (seed, step).
            seed = self.seed + 1_000_003 * loading.step
            torch.manual_seed(seed)
            tensor_parallel.model_parallel_cuda_manual_seed(seed)
            return
        states = {k: v.reshape(-1) for k, v in state.items()}
        torch.set_rng_state(states["torch"].to(torch.uint8))
        if torch.cuda.is_available() and "cuda" in states:
            torch.cuda.set_rng_state(states["cuda"].to(torch.uint8))
        tracker = tensor_parallel.get_cuda_rng_tracker()
        tracker.set_states({name.removeprefix("tracker."): s.to(torch.uint8)
                            for name, s in states.items() if name.startswith("tracker.")})

    @staticmethod
    def _states() -> dict[str, torch.Tensor]:
        states = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.get_rng_state()
        for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items():
            states[f"tracker.{name}"] = state.cpu()
        return states


def tensor_parts(cfg, layout, engine, chunks) -> dict[str, TensorPart]:
    """The tensor parts every training run registers, by the names their keys start with;
    the model first (the optimizer's entries follow its parameters')."""
    opt = for_engine(engine)
    model = ModelPart(chunks, opt, layout.tensor_parallel, cfg.model.activation == "swiglu")
    return {"model": model,
            "optimizer": OptimizerPart(opt, model, engine, cfg.train.global_batch_size),
            "rng": RngPart(layout, cfg.train.seed)}
