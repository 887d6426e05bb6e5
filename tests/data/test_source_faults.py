"""Untrusted and failing shard sources, injected for real: a manifest whose shard name is a
shell command, missing or malformed shards and fields found at start-up, and `pipe:` reads
that fail and are retried with backoff before they become one DataError line."""

from __future__ import annotations

import json
import time

import pytest

from pretrain.data import sources
from pretrain.data.sources import DataError, ShardSource
from tests.data.shard_writer import write_dataset

SEQ = 8


@pytest.fixture
def dataset(tmp_path):
    return write_dataset(tmp_path / "ds", SEQ, [5, 4, 6])


def _edit_manifest(root, edit):
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["train-000000.tar; touch {marker}",
                                  "$(touch {marker})", "../../train-000000.tar"])
def test_shard_name_from_the_manifest_never_reaches_a_shell(dataset, tmp_path, name):
    marker = tmp_path / "pwned"
    name = name.format(marker=marker)

    def rename(m):
        m["splits"]["train"]["shards"][0]["name"] = name

    _edit_manifest(dataset, rename)
    with pytest.raises(DataError, match=r"shards\[0\]\.name=.* is not a train-NNNNNN\.tar"):
        ShardSource(f"pipe:cat {dataset}/{{name}}").load_shard(0)
    assert not marker.exists()


def test_pipe_names_are_shell_quoted():
    url = sources._url_for("pipe:cat /d/{name}", "a b;c")
    assert url == "pipe:cat /d/'a b;c'"
    assert sources._url_for("/d", "train-000001.tar") == "/d/train-000001.tar"


def test_missing_shard_is_found_at_start_up(dataset):
    (dataset / "train-000001.tar").unlink()
    (dataset / "train-000002.tar").write_bytes(b"short")
    with pytest.raises(DataError, match=r"1 of 3 train shards listed in manifest\.json are "
                                        r"missing \(train-000001\.tar\)"):
        ShardSource(str(dataset))


def test_shard_of_the_wrong_size_is_found_at_start_up(dataset):
    (dataset / "train-000002.tar").write_bytes(b"short")
    with pytest.raises(DataError, match=r"train-000002\.tar \(5 bytes, manifest says \d+\)"):
        ShardSource(str(dataset))


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.update(seq_len="long"), "seq_len"),
    (lambda m: m["tokenizer"].pop("vocab_size"), "tokenizer"),
    (lambda m: m["splits"]["train"]["shards"][1].pop("samples"), "splits.train.shards"),
    (lambda m: m.update(token_dtype="float128x"), "token_dtype"),
])
def test_malformed_manifest_field_is_one_line(dataset, edit, field):
    _edit_manifest(dataset, edit)
    with pytest.raises(DataError, match=rf"field {field} is missing or malformed"):
        ShardSource(str(dataset))


def _flaky_pipe(tmp_path, dataset, failures: int) -> str:
    """A `pipe:` command that fails `failures` times per object, then cats it."""
    script = tmp_path / "flaky.sh"
    script.write_text(f"""n=$(cat "{tmp_path}/$1.count" 2>/dev/null || echo 0)
echo $((n + 1)) > "{tmp_path}/$1.count"
[ "$n" -ge {failures} ] || {{ echo "transient failure $n" >&2; exit 1; }}
exec cat "{dataset}/$1"
""")
    return f"pipe:sh {script} {{name}}"


def test_pipe_read_fails_twice_then_works(dataset, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(sources, "RETRY_BASE_S", 0.05)
    started = time.monotonic()
    source = ShardSource(_flaky_pipe(tmp_path, dataset, failures=2))
    assert source.load_shard(1).keys.tolist() == [5, 6, 7, 8]
    assert (tmp_path / "train-000001.tar.count").read_text().strip() == "3"
    err = capfd.readouterr().err
    assert "attempt 2 of 4 in 0.05 s" in err and "attempt 3 of 4 in 0.1 s" in err
    assert time.monotonic() - started >= 2 * (0.05 + 0.1)  # backoff waited, for both objects


def test_pipe_read_that_keeps_failing_is_one_data_error(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "RETRY_BASE_S", 0.01)
    source = ShardSource(_flaky_pipe(tmp_path, dataset, failures=0))
    source.path = _flaky_pipe(tmp_path, dataset, failures=99)
    with pytest.raises(DataError, match=r"train-000000\.tar: cannot read after 4 attempt\(s\)"):
        source.load_shard(0)
    assert (tmp_path / "train-000000.tar.count").read_text().strip() == "4"


def test_shard_corrupt_during_training_is_one_line_and_exit_2(tmp_path):
    """Same size (so the start-up check passes), other bytes: found when the loader reads it,
    in the middle of fit(); exit 2 (not requeued: a requeue would read the same bytes)."""
    from tests.launch_helpers import run_training

    data = write_dataset(tmp_path / "ds", 32, [16, 16])
    for shard in data.glob("train-*.tar"):
        raw = bytearray(shard.read_bytes())
        raw[700] ^= 0xFF
        shard.write_bytes(bytes(raw))
    out = run_training(tmp_path / "run", [f"data.train={data}", "train.steps=2",
                                          "train.sample_tokens=0"], expect_rc=2, timeout=180)
    assert out.stderr.startswith("data error: ") and out.stderr.count("\n") == 1, out.stderr[-2000:]
    assert "does not match the manifest" in out.stderr
