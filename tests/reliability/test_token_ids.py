"""Token ids at or past the vocabulary (a manifest whose `tokenizer.vocab_size` is wrong, or
shards made with another tokenizer): once an IndexError in the embedding (a device assert on
GPU), exit 1, which SLURM requeued up to MAX_RESTARTS times; now one data error, exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pretrain.data.sources import ShardSource
from pretrain.errors import DataError
from tests.data.shard_writer import sample_tokens, write_dataset

SEQ = 32


def _samples(n: int, top: int, where: int, bad: int) -> np.ndarray:
    """n samples of ids below `top`, except one id `bad` in sample `where`."""
    rows = np.stack([sample_tokens(k, SEQ) % top for k in range(n)])
    rows[where, 5] = bad
    return rows


def test_an_id_past_the_vocabulary_is_named_when_its_shard_is_read(tmp_path):
    data = write_dataset(tmp_path / "ds", SEQ, [4, 4], samples=_samples(8, 300, where=6, bad=300),
                         vocab_size=300)
    source = ShardSource(str(data))
    source.load_shard(0)  # ids 0..299 only: fine
    with pytest.raises(DataError, match=r"train-000001\.tar: sample 6 holds token id 300, not "
                                        r"below the manifest's tokenizer\.vocab_size 300"):
        source.load_shard(1)


@pytest.mark.slow
def test_training_on_ids_past_the_vocabulary_is_one_line_and_exit_2(tmp_path):
    from tests.launch_helpers import run_training

    data = write_dataset(tmp_path / "ds", SEQ, [16, 16], samples=_samples(32, 300, where=20, bad=1000),
                         vocab_size=300)
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == 300
    out = run_training(tmp_path / "run", [f"data.train={data}", "train.steps=4",
                                          "train.sample_tokens=0", "data.num_workers=0"],
                       expect_rc=2, timeout=180)
    assert out.stderr.startswith("data error: ") and out.stderr.count("\n") == 1, out.stderr[-2000:]
    # 1000: past the embedding's rows too (300 is padded up for TP), so the old code crashed
    assert "holds token id 1000, not below the manifest's tokenizer.vocab_size 300" in out.stderr
