"""The user's path, end to end with real components: a directory of jsonl and text files ->
train_tokenizer.py -> shard.py (local Ray) -> inspect_shards.py -> training under TP2 with
validation, then a sample decoded with the trained tokenizer."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.launch_helpers import REPO, read_metrics, run_training

pytestmark = pytest.mark.multiprocess


def _run(*args, timeout=300):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_raw_corpus_to_shards_to_training(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _run("data_tools/export_embedded_corpus.py", "--output", str(corpus / "stdlib.jsonl"),
         "--max-bytes", "600000")
    docs = [json.loads(line)["text"] for line in (corpus / "stdlib.jsonl").read_text().splitlines()]
    for i, text in enumerate(docs[:5]):  # some of it as plain text files too
        (corpus / f"extra_{i}.txt").write_text(text[::-1])
    tok = tmp_path / "tok"
    _run("data_tools/train_tokenizer.py", "--input", str(corpus), "--vocab-size", "1024",
         "--output", str(tok))
    data = tmp_path / "data"
    _run("data_tools/shard.py", "--input", str(corpus), "--output", str(data), "--tokenizer",
         f"{tok}.model", "--seq-len", "32", "--val-fraction", "0.05", "--num-workers", "2")
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] > 100 and manifest["splits"]["val"]["samples"] > 0
    assert manifest["documents"]["kept"] == len(docs) + 5
    # Every kept document's UTF-8 text is counted in exactly one split (for bits-per-byte).
    text_bytes = {split: manifest["splits"][split]["text_bytes"] for split in ("train", "val")}
    assert min(text_bytes.values()) > 0
    assert sum(text_bytes.values()) == sum(len(d.encode()) for d in docs + [d[::-1] for d in docs[:5]])
    _run("data_tools/inspect_shards.py", str(data), "--samples", "1")

    run = tmp_path / "run"
    proc = run_training(run, [f"data.train={data}", "parallel.tensor_parallel=2",
                              "train.steps=6", "train.eval_interval=3", "train.eval_batches=1",
                              "train.sample_tokens=8"], nproc=2)
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, 7))
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert [m["step"] for m in metrics if "val_loss" in m] == [3, 6]
    val = manifest["splits"]["val"]
    bytes_per_token = val["text_bytes"] / (val["tokens"] + manifest["tokens_dropped_tail"]["val"])
    for m in metrics[2::3]:
        assert m["val_bpb"] == pytest.approx(m["val_loss"] / math.log(2) / bytes_per_token)
        assert m["val_ppl"] == pytest.approx(math.exp(m["val_loss"]))
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert "---- sample ----\ndef " in proc.stdout
