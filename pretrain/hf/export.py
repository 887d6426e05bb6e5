"""Export a checkpoint as a Hugging Face Llama, Qwen2 or Qwen3 directory that transformers loads with no code
of ours (the command line is pretrain/export_hf.py).

DIR gets config.json, generation_config.json, safetensors weights (sharded above
--max-shard-size, with model.safetensors.index.json) and the tokenizer (tokenizer.json,
tokenizer_config.json, special_tokens_map.json, tokenizer.model). Everything is written to
a hidden sibling directory and renamed to DIR only when complete, so an interrupted export
never leaves a directory that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from pretrain.checkpoint.weights import CheckpointWeights, read_weights
from pretrain.errors import CheckpointError
from pretrain.files import file_sha256, fsync_dir, fsync_tree, temp_path
from pretrain.hf.convert import ffn_size, to_hf
from pretrain.hf.families import check_exportable, hf_config
from pretrain.hf.tokenizer import write_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Test hook: "PREFIX" makes the export die (SIGKILL) right after writing the first file whose
# name starts with PREFIX, so the interruption test stops a real export at a real point.
FAULT_ENV = "PRETRAIN_TEST_EXPORT_KILL_AFTER"


def _fault(name: str) -> None:
    prefix = os.environ.get(FAULT_ENV)
    if prefix and name.startswith(prefix):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def check_output(output: Path) -> None:
    """Before any work: the export is renamed into OUTPUT at the end, so OUTPUT must be new
    (or an empty directory), not a symlink (the rename would replace the link, not fill its
    target), in an existing writable directory."""
    if output.is_symlink():
        raise CheckpointError(f"--output {output}: is a symlink; name the directory itself "
                              f"(an export never writes through a link)")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise CheckpointError(f"--output {output}: exists and is not an empty directory; "
                              f"choose a new path (an export never overwrites)")
    parent = output.parent
    if not parent.is_dir():
        raise CheckpointError(f"--output {output}: {parent} is not a directory; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"--output {output}: {parent} is not writable; choose another path")


def find_tokenizer(weights: CheckpointWeights, given: str | None) -> Path | None:
    """The sentencepiece model the checkpoint's data was tokenized with, checked by sha256.
    None for the built-in byte-level corpus, which has no sentencepiece model."""
    want = weights.train_state["tokenizer"]["sha256"]
    if given is None and want == "byte-level":
        return None
    candidates = [given] if given else []
    cfg_data = weights.train_state["config"].get("data", {})
    if not given:
        candidates.append(cfg_data.get("tokenizer") or None)
        for item in cfg_data.get("train", []):
            manifest = Path(item["path"]) / "manifest.json"
            try:
                candidates.append(json.loads(manifest.read_text())["tokenizer"].get("path"))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue  # not a local, readable manifest: --tokenizer names the file then
    for candidate in filter(None, candidates):
        path = Path(candidate)
        if not path.is_file():
            if given:
                raise CheckpointError(f"--tokenizer {given}: no such file")
            continue
        digest = file_sha256(path)
        if digest != want:
            raise CheckpointError(f"tokenizer {path} has sha256 {digest[:12]}, but {weights.path} "
                                  f"was trained on data tokenized with {want[:12]}; pass the "
                                  f"right PREFIX.model with --tokenizer")
        return path
    raise CheckpointError(f"{weights.path}: the tokenizer its data was made with (sha256 "
                          f"{want[:12]}) is not found from the run's config or manifest; pass "
                          f"--tokenizer PREFIX.model")


def write_safetensors(tensors: dict[str, torch.Tensor], out_dir: Path, max_bytes: int) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index above max_bytes."""
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names, weight_map = [], {}
    for index, shard in enumerate(shards, start=1):
        name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        _fault(name)
        names.append(name)
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names + ["model.safetensors.index.json"]


def export(checkpoint: str, output: Path, tokenizer: str | None = None, dtype: str = "float32",
           max_shard_size: int = 5 * 2**30, verify: bool = True) -> CheckpointWeights:
    check_output(output)
    for leftover in output.parent.glob(f".{output.name}.tmp-*"):  # a killed export's remains
        shutil.rmtree(leftover, ignore_errors=True)
    weights = read_weights(checkpoint, verify=verify)
    model = weights.model_config
    check_exportable(model, str(weights.path))
    tokenizer_path = find_tokenizer(weights, tokenizer)
    staging = temp_path(output)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        special_ids = {}
        if tokenizer_path is not None:
            special_ids = write_tokenizer(tokenizer_path, staging, model["max_seq_length"])
        tensors = {name: t.to(DTYPES[dtype]) for name, t in
                   to_hf(weights.state, model, weights.vocab_size).items()}
        write_safetensors(tensors, staging, max_shard_size)
        config = hf_config(model, ffn_size(model), weights.vocab_size, special_ids, dtype)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {"bos_token_id": special_ids.get("bos"), "eos_token_id": special_ids.get("eos"),
                      "pad_token_id": special_ids.get("pad")}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        _fault("config.json")
        fsync_tree(staging)
        if output.exists():
            output.rmdir()  # empty, checked above
        os.rename(staging, output)
        fsync_dir(output.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return weights
