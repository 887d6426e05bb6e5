"""shard.py as a careless or hostile user meets it, with the real faults injected: a re-run
into an OUTPUT holding another dataset, a replacing run that fails half-way, a SIGKILLed
run's Ray processes, --num-workers beyond the cores, and who may talk to the local Ray
(its servers listen on every interface; a client without the run's token is refused)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys

import pytest

from tests.data_tools.test_shard import (REPO, SHARD, build, cli_in_process,  # noqa: F401
                                         output_files, ray_local, tokenizer, write_jsonl)
from tests.launch_helpers import leftover_processes


def _docs(n: int, salt: str) -> list[dict]:
    return [{"text": f"{salt} document {i} " + "alpha beta gamma delta " * (i % 7 + 3)}
            for i in range(n)]


@pytest.mark.slow
def test_failed_replacing_run_keeps_the_old_dataset(tmp_path, tokenizer, ray_local, capsys):
    good = tmp_path / "good.jsonl"
    write_jsonl(good, _docs(60, "old"))
    out = tmp_path / "out"
    log = io.StringIO()
    build([good], out, tokenizer, num_workers=64, log=log)
    assert f"--num-workers 64 is more than the {len(os.sched_getaffinity(0))} CPUs here" in log.getvalue()
    before = output_files(out)

    bad = tmp_path / "bad.jsonl"  # other inputs, with a record that stops the run
    write_jsonl(bad, _docs(40, "new") + ["{not json"])
    args = ["--input", bad, "--output", out, "--tokenizer", tokenizer, "--seq-len", 32,
            "--val-fraction", 0.2, "--shard-samples", 40,
            "--no-progress"]
    code, err = cli_in_process(args, capsys)
    assert code == 2 and "holds another dataset (other inputs" in err, err
    code, err = cli_in_process(args + ["--overwrite"], capsys)
    assert code == 2 and "bad.jsonl:41" in err, err
    assert output_files(out) == before  # manifest and shards of the old dataset untouched


def test_output_that_is_a_file_or_unwritable_is_one_line(tmp_path, tokenizer, capsys):
    good = tmp_path / "good.jsonl"
    write_jsonl(good, _docs(3, "x"))
    (tmp_path / "file").write_text("")
    code, err = cli_in_process(["--input", good, "--output", tmp_path / "file" / "sub",
                                "--tokenizer", tokenizer, "--seq-len", 8], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "file/sub: cannot create or lock it (Not a directory)" in err


@pytest.mark.slow
def test_killed_run_leaves_no_ray_process(tmp_path, tokenizer):
    from data_tools.shard_lib.pack import KILL_AFTER_ENV

    corpus = tmp_path / "c.jsonl"
    write_jsonl(corpus, _docs(400, "k"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env[KILL_AFTER_ENV] = "1"
    cmd = [sys.executable, str(SHARD), "--input", str(corpus), "--output", str(tmp_path / "out"),
           "--tokenizer", str(tokenizer), "--seq-len", "16", "--shard-samples", "20",
           "--num-workers", "2", "--unit-bytes", "4096", "--piece-bytes", "2048", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
        assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
        assert leftover_processes(proc.pid) == []
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_local_ray_wants_its_token(ray_local):
    """The local cluster's GCS accepts no client without this process's random token."""
    import ray

    # The token lives in this process's environment (readable by its user only), not in
    # Ray's default ~/.ray/auth_token file.
    assert os.environ["RAY_AUTH_MODE"] == "token" and len(os.environ["RAY_AUTH_TOKEN"]) == 64
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = "0" * 64  # a wrong token
    probe = subprocess.run(
        [sys.executable, "-c", "import ray; from ray._raylet import GcsClient; "
         f"GcsClient(address={ray.get_runtime_context().gcs_address!r})"
         ".internal_kv_keys(b'', None, timeout=3)"],
        env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode != 0 and "Authentication" in probe.stderr, probe.stderr[-2000:]


@pytest.mark.slow
def test_disk_full_while_writing_is_one_line_and_keeps_the_old_dataset(tmp_path, tokenizer,
                                                                       ray_local, capsys):
    """The shard writes fail (a file-size limit stands in for a full disk: the same OSError
    path, EFBIG instead of ENOSPC). Every piece is cached, so the re-run starts no Ray."""
    good = tmp_path / "good.jsonl"
    write_jsonl(good, _docs(80, "full"))
    out = tmp_path / "out"
    args = ["--input", good, "--output", out, "--tokenizer", tokenizer, "--seq-len", 32,
            "--shard-samples", 40, "--no-progress", "--keep-work"]
    assert cli_in_process(args, capsys)[0] == 0
    before = output_files(out)
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
              "from data_tools import shard; sys.exit(shard.main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args + ["--overwrite"])],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if not k.startswith("RAY_")})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: cannot write ") and proc.stderr.count("\n") == 1
    assert "File too large" in proc.stderr and "(0 cached)" not in proc.stdout
    assert output_files(out) == before
