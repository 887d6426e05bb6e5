"""data_tools/inspect_shards.py on a dataset written by the real shard.py CLI: a good dataset
verifies (exit 0) and decodes; a flipped byte, a truncated or missing shard, wrong manifest
counts, a format-inconsistent shard and a missing manifest each exit 1 naming the culprit."""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tests.data_tools.test_shard import make_doc, run_cli, tokenizer, write_jsonl  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
INSPECT = REPO / "data_tools" / "inspect_shards.py"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tokenizer):  # noqa: F811 - the fixture imported above
    root = tmp_path_factory.mktemp("inspect")
    rng = random.Random(5)
    write_jsonl(root / "docs.jsonl", [{"text": make_doc(rng, rng.randint(5, 80))} for _ in range(150)])
    out = root / "shards"
    proc = run_cli(["--input", root / "docs.jsonl", "--output", out, "--tokenizer", tokenizer,
                    "--seq-len", 32, "--shard-samples", 30, "--val-fraction", 0.1, "--num-workers", 1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["splits"]["train"]["shards"]) >= 3
    return out


@pytest.fixture
def copy(dataset, tmp_path) -> Path:
    target = tmp_path / "shards"
    shutil.copytree(dataset, target)
    return target


def inspect(directory: Path, capsys, *args) -> tuple[int, str]:
    from data_tools import inspect_shards

    code = inspect_shards.main([str(directory), *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_good_dataset_verifies_and_decodes_real_cli(dataset):
    proc = subprocess.run([sys.executable, str(INSPECT), str(dataset), "--samples", "3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = json.loads((dataset / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    assert f"train: {train['samples']:,} samples, {train['tokens']:,} tokens in {len(train['shards'])} shards" in proc.stdout
    assert "documents per sample mean" in proc.stdout
    assert proc.stdout.count("--- train sample ") == 3
    assert any(word in proc.stdout for word in ("alpha", "gamma", "return"))
    assert proc.stdout.rstrip().endswith(f"OK: {len(train['shards']) + len(manifest['splits']['val']['shards'])} shards verified")
    stream = train["tokens"] + manifest["tokens_dropped_tail"]["train"]
    assert f"{train['text_bytes'] / stream:.2f} bytes per token" in proc.stdout
    assert proc.stderr == ""  # no progress bar when stderr is not a terminal


def test_progress_bar_on_a_terminal_only(dataset):
    from tests.launch_helpers import run_on_terminal

    code, stdout, terminal = run_on_terminal([sys.executable, str(INSPECT), str(dataset)])
    assert code == 0 and "shards verified" in stdout
    shards = sum(len(s["shards"]) for s in json.loads((dataset / "manifest.json").read_text())["splits"].values())
    assert f"verify: 100%" in terminal and f"{shards}/{shards}" in terminal


def test_flipped_byte_is_named(copy, capsys):
    shard = copy / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    code, out = inspect(copy, capsys, "--samples", 0)
    assert code == 1
    assert "FAIL train-000001.tar: sha256 " in out and "(corrupt)" in out
    assert "FAIL train-000000.tar" not in out and "FAIL train-000002.tar" not in out


def test_truncated_shard_is_named(copy, capsys):
    shard = copy / "train-000002.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 3])
    code, out = inspect(copy, capsys, "--samples", 0)
    assert code == 1
    assert f"FAIL train-000002.tar: {len(data) // 3} bytes, manifest says {len(data)} (truncated" in out
    assert "FAIL train-000002.tar: " in out and "readable samples, manifest says 30" in out


def test_missing_shard_and_wrong_counts_are_named(copy, capsys):
    (copy / "val-000000.tar").unlink()
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["samples"] = 31
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code, out = inspect(copy, capsys, "--samples", 0)
    assert code == 1
    assert "FAIL val-000000.tar: missing" in out
    assert "FAIL train-000000.tar: 30 readable samples, manifest says 31" in out
    assert "FAIL train-000001.tar: first_key 30 should be 31" in out


def test_consistent_checksum_but_wrong_doc_starts_is_named(copy, capsys):
    """A shard rewritten with a valid sha256 in the manifest but content off the format."""
    name = "train-000000.tar"
    with tarfile.open(copy / name) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member, payload in members:
            if member.name == "0000000005.doc_starts":
                payload = np.array([7], dtype="<u4").tobytes()
                member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    data = buffer.getvalue()
    (copy / name).write_bytes(data)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code, out = inspect(copy, capsys, "--samples", 0)
    assert code == 1
    assert "FAIL train-000000.tar: 0000000005.doc_starts [7] differs from the positions after EOD" in out


def test_missing_or_unknown_manifest(copy, capsys):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 2
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code, out = inspect(copy, capsys)
    assert code == 1 and "FAIL manifest: " in out and "format_version 2" in out
    (copy / "manifest.json").unlink()
    code, out = inspect(copy, capsys)
    assert code == 1 and "manifest.json does not exist" in out and "data_tools/shard.py" in out


def test_bad_arguments_exit_2(tmp_path, capsys):
    code, out = inspect(tmp_path / "nope", capsys)
    assert code == 2 and out.startswith("error: ") and "is not a directory" in out
    code, out = inspect(tmp_path, capsys, "--tokenizer", tmp_path / "missing.model")
    assert code == 2 and "missing.model: no such file" in out


def test_other_tokenizer_is_not_used_to_decode(dataset, tmp_path, capsys):
    other = tmp_path / "other.model"
    other.write_bytes(b"some other model")
    code, out = inspect(dataset, capsys, "--tokenizer", other)
    assert code == 0 and "is not the tokenizer of this dataset" in out and "--- train sample" not in out
