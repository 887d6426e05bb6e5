"""Untrusted and failing shard sources, injected for real: a manifest whose shard name is a
shell command, missing or malformed shards and fields found at start-up (local and over a
real HTTP server), and `pipe:` reads and HEAD requests that fail and are retried with
backoff before they become one DataError line."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pretrain.data import remote, sources
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
    monkeypatch.setattr(remote, "RETRY_BASE_S", 0.05)
    started = time.monotonic()
    source = ShardSource(_flaky_pipe(tmp_path, dataset, failures=2))
    assert source.load_shard(1).keys.tolist() == [5, 6, 7, 8]
    assert (tmp_path / "train-000001.tar.count").read_text().strip() == "3"
    err = capfd.readouterr().err
    assert "attempt 2 of 4 in 0.05 s" in err and "attempt 3 of 4 in 0.1 s" in err
    assert time.monotonic() - started >= 2 * (0.05 + 0.1)  # backoff waited, for both objects


def test_pipe_read_that_keeps_failing_is_one_data_error(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(remote, "RETRY_BASE_S", 0.01)
    source = ShardSource(_flaky_pipe(tmp_path, dataset, failures=0))
    source.path = _flaky_pipe(tmp_path, dataset, failures=99)
    with pytest.raises(DataError, match=r"train-000000\.tar: cannot read after 4 attempt\(s\)"):
        source.load_shard(0)
    assert (tmp_path / "train-000000.tar.count").read_text().strip() == "4"


@pytest.mark.slow
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


class _ShardServer(SimpleHTTPRequestHandler):
    """http.server's file handler; HEAD of a path in `flaky` answers 503 that many times."""

    flaky: dict = {}

    def do_HEAD(self):  # noqa: N802 - http.server's naming
        name = self.path.rsplit("/", 1)[-1]
        if self.flaky.get(name, 0) > 0:
            self.flaky[name] -= 1
            self.send_error(503, "busy")
            return
        super().do_HEAD()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _serve(directory):
    """`directory` served over real HTTP from a thread: (base URL, flaky-HEAD counts)."""
    handler = type("Handler", (_ShardServer,), {"flaky": {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", handler.flaky
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def served(dataset):
    with _serve(dataset) as served:
        yield served


def test_http_shards_are_checked_at_start_up(dataset, served):
    url, _ = served
    assert ShardSource(url).load_shard(2).keys.tolist() == list(range(9, 15))  # read via curl
    (dataset / "train-000002.tar").write_bytes(b"short")
    with pytest.raises(DataError, match=r"train-000002\.tar \(5 bytes, manifest says \d+\)"):
        ShardSource(url)
    (dataset / "train-000001.tar").unlink()
    with pytest.raises(DataError, match=r"1 of 3 train shards listed in manifest\.json are "
                                        r"missing \(train-000001\.tar\)"):
        ShardSource(url)


def test_http_head_is_retried_like_reads(served, monkeypatch, capfd):
    monkeypatch.setattr(remote, "RETRY_BASE_S", 0.01)
    url, flaky = served
    flaky["train-000001.tar"] = 2
    assert ShardSource(url).num_samples == 15
    err = capfd.readouterr().err
    assert f"checking {url}train-000001.tar failed (HTTP 503 busy); attempt 3 of 4" in err
    flaky["train-000000.tar"] = 99
    with pytest.raises(DataError, match=r"train-000000\.tar: no answer to a HEAD request after 4"):
        ShardSource(url)


@pytest.mark.slow
def test_missing_http_shard_stops_training_before_the_first_step(tmp_path):
    """The training CLI on a dataset served over HTTP with one shard gone: exit 2 and one line
    naming the shard, before any step (the loader would reach it only later)."""
    from tests.launch_helpers import run_training

    data = write_dataset(tmp_path / "ds", 32, [16, 16, 16])
    (data / "train-000002.tar").unlink()
    with _serve(data) as (url, _):
        out = run_training(tmp_path / "run", [f"data.train={url}", "train.steps=2",
                                              "train.sample_tokens=0"], expect_rc=2, timeout=180)
    assert out.stderr.startswith("data error: ") and out.stderr.count("\n") == 1, out.stderr[-2000:]
    assert "missing (train-000002.tar)" in out.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.multiprocess
def test_data_error_on_one_rank_stops_every_rank_with_exit_2(tmp_path):
    """Shards of one sample each, so the corrupt one is read by exactly one of the two
    ranks: that rank prints the data error, the other exits 2 quietly (it used to crash in
    the next collective, exit 1, which SLURM requeues)."""
    from tests.launch_helpers import start_ranks, wait_all

    data = write_dataset(tmp_path / "ds", 32, [1] * 16)
    shard = data / "train-000005.tar"
    raw = bytearray(shard.read_bytes())
    raw[700] ^= 0xFF
    shard.write_bytes(bytes(raw))
    procs = start_ranks(tmp_path / "run", [f"data.train={data}", "train.steps=2",
                                           "train.sample_tokens=0"], 2, tmp_path / "logs")
    assert wait_all(procs, timeout=240) == [2, 2]
    logs = [(tmp_path / "logs" / f"rank{r}.log").read_text() for r in range(2)]
    failed = [log for log in logs if "data error: " in log]
    assert len(failed) == 1, logs
    assert "train-000005.tar: sha256" in failed[0]
    assert not any("Traceback" in log for log in logs), logs
