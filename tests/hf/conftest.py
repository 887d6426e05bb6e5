"""Shared, session-cached inputs of the Hugging Face tests: a real sentencepiece tokenizer
(data_tools/train_tokenizer.py), real shards made with it (data_tools/shard.py on Ray), and
tiny training runs that leave checkpoints under several layouts."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from tests.launch_helpers import launch, run_training

VOCAB = 500  # padded to 512 in the model: export drops the padding rows
# A model that exercises GQA (2 groups for 4 heads) and both embedding modes below.
BASE = ["train.steps=2", "optim.warmup_steps=1", "train.global_batch_size=8",
        "train.micro_batch_size=2", "model.num_query_groups=2", "checkpoint.interval=2"]
LAYOUTS = {
    "one_process": (1, ["model.tie_embeddings=false"]),
    "tp2_pp2": (4, ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"]),
    "dp2_zero2": (2, ["parallel.zero_stage=2"]),
}


@pytest.fixture(scope="session")
def spm_data(tmp_path_factory) -> dict:
    """{"tokenizer": PREFIX.model, "shards": DIR}: standard-library modules as documents."""
    root = tmp_path_factory.mktemp("spm")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = [path.read_text(encoding="utf-8") for path in sorted(stdlib.glob("[a-c]*.py"))[:24]]
    docs.append("Café naïve Straße 日本語 🙂 3.14159 12345 tabs\there   spaces\n")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    prefix = root / "tok" / "spm"
    launch(["data_tools/train_tokenizer.py", "--input", str(corpus), "--vocab-size", str(VOCAB),
            "--output", str(prefix)], 1, 120, "train_tokenizer")
    shards = root / "shards"
    launch(["data_tools/shard.py", "--input", str(corpus), "--output", str(shards),
            "--tokenizer", str(prefix.with_suffix(".model")), "--seq-len", "32",
            "--val-fraction", "0.2", "--num-workers", "1"], 1, 300, "shard.py")
    return {"tokenizer": prefix.with_suffix(".model"), "shards": shards}


@pytest.fixture(scope="session")
def trained_run(spm_data, tmp_path_factory):
    """Factory: the run directory of a 2-step run under one of LAYOUTS (trained once)."""
    cache: dict[str, Path] = {}

    def get(layout: str) -> Path:
        if layout not in cache:
            nproc, overrides = LAYOUTS[layout]
            run_dir = tmp_path_factory.mktemp(layout) / "run"
            run_training(run_dir, BASE + overrides + [f"data.train={spm_data['shards']}"],
                         nproc=nproc)
            cache[layout] = run_dir
        return cache[layout]

    return get


@pytest.fixture(scope="session")
def exported(trained_run, tmp_path_factory):
    """Factory: the HF directory exported (by the CLI) from a layout's run, in several
    safetensors files (--max-shard-size)."""
    cache = {}

    def get(layout: str):
        if layout not in cache:
            out = tmp_path_factory.mktemp("hf") / layout
            result = launch(["-m", "pretrain.export_hf", str(trained_run(layout)), "--output",
                             str(out), "--max-shard-size", "200000"], 1, 120, "export_hf")
            assert "load it with:" in result.stdout and str(out) in result.stdout
            cache[layout] = out
        return cache[layout]

    return get


def our_model(weights):
    """Our GPTModel (one process, TP1 PP1, fp32) holding a checkpoint's weights; needs the
    single_rank_parallel fixture."""
    import torch

    from pretrain.checkpoint.weights import install
    from pretrain.model.gpt import build_model_chunks

    cfg = weights.run_config()
    padded = weights.state["embedding.word_embeddings.weight"].shape[0]
    chunks = build_model_chunks(cfg, padded, torch.float32, torch.device("cpu"))
    install(chunks, weights.state, 0, 1, cfg.model.activation == "swiglu", str(weights.path))
    chunks[0].eval()
    return chunks
