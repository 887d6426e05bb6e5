"""Opening `cfg.data`: blends are checked against each other before anything is built."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pretrain.config import load_config
from pretrain.data.build import build_loaders, open_data
from pretrain.data.sources import DataError
from tests.data.shard_writer import write_dataset
from tests.launch_helpers import REPO

SMOKE = REPO / "configs" / "smoke.yaml"


def _cfg(*overrides):
    return load_config(SMOKE, list(overrides))


def test_blend_of_different_tokenizers_is_refused(tmp_path):
    a = write_dataset(tmp_path / "a", 32, [10], tokenizer_sha="aaaa1111")
    b = write_dataset(tmp_path / "b", 32, [10], tokenizer_sha="bbbb2222")
    cfg = _cfg(f"data.train=[{{path: {a}, weight: 1}}, {{path: {b}, weight: 1}}]")
    with pytest.raises(DataError, match=r"b\[train\] was tokenized with a different tokenizer"):
        open_data(cfg)


def test_samples_shorter_than_the_training_sequence_are_refused(tmp_path):
    a = write_dataset(tmp_path / "a", 16, [10])
    with pytest.raises(DataError, match=r"seq_len=16, shorter than train.seq_length=32"):
        open_data(_cfg(f"data.train={a}"))


def test_validation_defaults_to_the_val_split_of_the_training_sources(tmp_path):
    with_val = write_dataset(tmp_path / "a", 32, [12], extra_splits={"val": [4]})
    without_val = write_dataset(tmp_path / "b", 32, [12])
    data = open_data(_cfg(f"data.train=[{with_val}, {without_val}]"))
    assert [s.name for s in data.valid] == [f"{with_val}[val]"]
    train, valid = build_loaders(_cfg("train.eval_interval=5"), data, 2, 0, 1)
    assert [v.name for v in valid] == [with_val.name] and not valid[0].loader.orders[0].shuffle
    assert valid[0].bytes_per_token is None  # this manifest predates text_bytes


@pytest.mark.slow
def test_missing_dataset_stops_the_cli_before_any_process_group(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", "--config", str(SMOKE),
                           f"data.train={tmp_path}/missing"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("data error:")]
    assert len(errors) == 1 and "missing/manifest.json: no such file" in errors[0]


@pytest.mark.slow
def test_missing_tokenizer_stops_the_dry_run(tmp_path):
    """A named tokenizer that is not there fails at start-up (the SLURM preflight runs this
    dry run), not when the end-of-run sample is drawn."""
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", "--config", str(SMOKE),
                           "--dry-run", f"data.tokenizer={tmp_path}/tok.model"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"data error: data.tokenizer={tmp_path}/tok.model: no such file" in proc.stderr


def test_validation_sources_have_bytes_per_token_and_distinct_names(tmp_path):
    from pretrain.data.build import source_names

    a = write_dataset(tmp_path / "x" / "web", 32, [12], extra_splits={"val": [4]},
                      text_bytes={"train": 12 * 33 * 4, "val": 4 * 33 * 2})
    b = write_dataset(tmp_path / "y" / "web", 32, [12], extra_splits={"val": [4]},
                      text_bytes={"train": 1, "val": 0})
    c = write_dataset(tmp_path / "code", 32, [12], extra_splits={"val": [4]})
    data = open_data(_cfg(f"data.train=[{a}, {b}, {c}]"))
    # UTF-8 bytes over the split's token stream; 0 bytes or no field: no bits-per-byte
    assert [s.bytes_per_token for s in data.valid] == [2.0, None, None]
    names = source_names(data.valid)
    assert len(set(names)) == 3 and names[0].endswith("x_web") and names[1].endswith("y_web")
    assert source_names(data.valid[1:]) == ["web", "code"]
