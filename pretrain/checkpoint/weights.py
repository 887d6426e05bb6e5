"""A checkpoint's model weights without the run that made it: one full-shape state on one
process (no DeepSpeed, no process group), whatever TP/PP/DP/ZeRO layout saved it.

The state is keyed by the layout-independent parameter names of model/init.py
(`embedding.word_embeddings.weight`, `layers.3.mlp.linear_fc1.weight`,
`decoder.final_layernorm.weight`, `output_layer.weight`), so `install()` can place it into
the model chunks of any layout, and export/import/evaluation share one vocabulary of names.
Tensors are in megatron's own full layouts: linear_qkv grouped per query group
([q heads of the group; k; v] per group), SwiGLU linear_fc1 as [gate; up].
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.checkpoint import store
from pretrain.errors import CheckpointError
from pretrain.run_dir import TRAIN_STATE

_STACKED_LAYERS = "decoder.layers."
_LAYER_INDEX = re.compile(r"^(\d+)\.(.+)$")


@dataclass
class CheckpointWeights:
    path: Path  # the step_N directory read
    train_state: dict  # its train_state.json (config, tokenizer, step, ...)
    state: dict[str, torch.Tensor]  # layout-independent name -> full tensor

    @property
    def model_config(self) -> dict:
        return self.train_state["config"]["model"]

    def run_config(self):
        """The saved run's Config, laid out for one process (TP1, PP1)."""
        from pretrain.config import Config, merge_into

        cfg = Config()
        merge_into(cfg, self.train_state["config"], str(self.path / TRAIN_STATE))
        cfg.parallel.tensor_parallel = cfg.parallel.pipeline_parallel = 1
        cfg.parallel.virtual_pipeline_chunks = 1
        return cfg

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary (the model's rows beyond it are padding)."""
        return int(self.train_state["tokenizer"]["vocab_size"])


def find_complete(path: str | Path, verify: bool = True) -> Path:
    """The checkpoint a path names (a step_N directory, a checkpoints directory or a run
    directory: its newest complete one), checked as the trainer checks it on load."""
    try:
        where, exact = store.resolve_load_path(path)
    except CheckpointError as err:  # its messages name the training setting; here it is a path
        raise CheckpointError(str(err).replace("checkpoint.load_from=", "", 1)) from None
    candidates = [exact] if exact is not None else [c.path for c in where.candidates()]
    problems = []
    for candidate in candidates:
        try:
            record = store.read_record(candidate)
            store.check_sizes(candidate, record)
            store.check_index_pickle(candidate)
            if verify:
                store.check_digests(candidate, record, sorted(record["files"]))
            return candidate
        except CheckpointError as err:
            if exact is not None:
                raise
            problems.append(str(err))
    detail = f" (newest problem: {problems[0]})" if problems else ""
    raise CheckpointError(f"{path}: no complete checkpoint there{detail}; train with "
                          f"checkpoint.interval=N or let the run reach its end")


def _read_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor under `prefix` at its full (global) shape, read with DCP on this process
    only. The index was vetted by store.check_index_pickle before DCP unpickles it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(path))
    metadata = reader.read_metadata()
    request = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
               for key, meta in metadata.state_dict_metadata.items()
               if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
    if not request:
        raise CheckpointError(f"{path}: no {prefix}* tensors; not a model checkpoint of this format")
    dcp.load(request, storage_reader=reader, no_dist=True)
    return request


def layout_free_names(tensors: dict[str, torch.Tensor], prefix: str = "model.") -> dict:
    """megatron's sharded keys -> init.py's names. Homogeneous blocks stack the layers along a
    leading axis under `decoder.layers.NAME`; per-layer keys (`decoder.layers.N.NAME`) are
    accepted too."""
    out = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(prefix)
        if name.endswith("._extra_state"):
            continue
        if not name.startswith(_STACKED_LAYERS):
            out[name] = tensor
            continue
        rest = name[len(_STACKED_LAYERS):]
        match = _LAYER_INDEX.match(rest)
        if match:
            out[f"layers.{match.group(1)}.{match.group(2)}"] = tensor
        else:
            for index in range(tensor.shape[0]):
                out[f"layers.{index}.{rest}"] = tensor[index].clone()
    return out


def read_weights(path: str | Path, verify: bool = True) -> CheckpointWeights:
    """The full-shape model weights of the checkpoint `path` names."""
    step_dir = find_complete(path, verify)
    try:
        train_state = json.loads((step_dir / TRAIN_STATE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{step_dir / TRAIN_STATE}: unreadable ({err})") from None
    state = layout_free_names(_read_tensors(step_dir, "model."))
    return CheckpointWeights(step_dir, train_state, state)


@torch.no_grad()
def install(chunks, state: dict[str, torch.Tensor], tp_rank: int, tp_size: int, gated: bool,
            source: str) -> None:
    """Copy a full-shape state into this rank's chunks (its layers, its TP slice), checking
    every shape. `source` names where the state came from, for the error messages."""
    from pretrain.model.init import full_shape_and_slice, global_names

    for chunk in chunks:
        names = global_names(chunk)
        for local_name, param in chunk.named_parameters():
            name = names[local_name]
            if name not in state:
                raise CheckpointError(f"{source} has no value for {name}")
            shape, take = full_shape_and_slice(param, tp_rank, tp_size, gated,
                                               "mlp.linear_fc1." in name)
            full = state[name]
            if tuple(full.shape) != shape:
                raise CheckpointError(f"{source}: {name} has shape {tuple(full.shape)}, this "
                                      f"model needs {shape}")
            param.copy_(take(full).to(param.dtype))
