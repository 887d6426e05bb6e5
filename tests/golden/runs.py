"""The fixed runs whose per-step losses are pinned in `losses.json` (tests/test_golden.py).

The tokens come from `tokens.u16`, cut once from the embedded corpus (this Python's standard
library, which changes with the Python version) and checked in, so the runs see the same
bytes on every machine. Each run writes them as a two-shard directory in the shard format,
trains 20 steps of configs/smoke.yaml's tiny model on it and returns the logged losses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TOKENS = HERE / "tokens.u16"
LOSSES = HERE / "losses.json"
SEQ_LEN = 32  # configs/smoke.yaml's train.seq_length
SAMPLES = 256  # 20 steps x global batch 8 = 160 samples, with room to spare
STEPS = 20
REGENERATE = "python -m tests.golden.regenerate --reason '...'"

# Layout name -> (ranks, overrides). One process, and TP2 x PP2 (megatron's schedule across
# stages, TP-sharded matmuls and cross entropy).
LAYOUTS = {
    "one_process": (1, []),
    "tp2_pp2": (4, ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"]),
}


def read_samples() -> np.ndarray:
    """[SAMPLES, SEQ_LEN + 1] uint16 tokens (byte ids 0-255, 256 ends a document)."""
    tokens = np.fromfile(TOKENS, dtype="<u2")
    return tokens.reshape(SAMPLES, SEQ_LEN + 1)


def write_shards(root: Path) -> Path:
    from pretrain.data.embedded import BYTE_VOCAB_SIZE, EOD_ID
    from tests.data.shard_writer import write_dataset

    return write_dataset(root, SEQ_LEN, [SAMPLES // 2, SAMPLES // 2], samples=read_samples(),
                         vocab_size=BYTE_VOCAB_SIZE, eod_id=EOD_ID,
                         tokenizer_sha="golden-bytes")


def run_layout(workdir: Path, layout: str, extra: list[str] = (),
               env_extra: dict | None = None) -> list[float]:
    """Train LAYOUT on the golden shards under WORKDIR; the loss of every step."""
    from tests.launch_helpers import run_training

    data = workdir / "data"
    if not (data / "manifest.json").exists():
        write_shards(data)
    nproc, overrides = LAYOUTS[layout]
    run_dir = workdir / f"run-{layout}"
    run_training(run_dir, [f"data.train={data}", f"train.steps={STEPS}",
                           "train.log_interval=1", "checkpoint.interval=0",
                           "checkpoint.save_on_stop=false", *overrides, *extra],
                 nproc=nproc, timeout=600, env_extra=env_extra)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    if len(losses) != STEPS:
        raise AssertionError(f"{layout}: {len(losses)} losses logged, expected {STEPS}")
    return losses


def read_golden() -> dict:
    return json.loads(LOSSES.read_text())
