"""Watching a real run: TensorBoard event files read back with TensorBoard's own reader, an
offline W&B run continued across a resume (its .wandb files decoded), per-source validation
with bits-per-byte, and curves rendered to a PNG by `python -m pretrain.plot`.

One run serves most tests: 3 steps with a checkpoint at step 2, then a resume that trains
steps 3-6 again, so the step logged after the checkpoint must be replaced, not duplicated.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data.shard_writer import write_dataset
from tests.launch_helpers import REPO, clean_env, read_metrics, run_training

pytestmark = pytest.mark.multiprocess

TRACKED = ["train.steps=6", "train.eval_interval=3", "train.eval_batches=1",
           "logging.tensorboard=true", "logging.peak_tflops=1", "logging.wandb.project=tests",
           "logging.wandb.mode=offline", "checkpoint.interval=2", "checkpoint.save_on_stop=false"]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("tracked") / "run"
    env = {"WANDB_SILENT": "true"}
    first = run_training(run, TRACKED + ["train.exit_at_step=3"], env_extra=env)
    first_metrics = read_metrics(run)
    resumed = run_training(run, TRACKED, env_extra=env)
    assert "resumed from" in resumed.stdout and "step_00000002" in resumed.stdout
    return run, first, first_metrics, resumed


def test_tensorboard_events_equal_the_metrics_file(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _, first_metrics, _ = tracked_run
    assert [m["step"] for m in first_metrics] == [1, 2, 3]
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected_tags = {("val/" + k[4:]) if k.startswith("val_") else "train/" + k
                     for m in metrics for k in m if k != "step"}
    assert {"train/loss", "train/mfu", "train/data_wait_s", "val/loss", "val/ppl",
            "val/bpb"} <= expected_tags
    assert tags == expected_tags
    for tag in tags:
        key = tag[len("val/"):] if tag.startswith("val/") else tag[len("train/"):]
        key = "val_" + key if tag.startswith("val/") else key
        want = {m["step"]: m[key] for m in metrics if key in m}
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        # One value per step: the resumed run's purge dropped the first run's step 3.
        assert [step for step, _ in got] == sorted(want), tag
        for step, value in got:
            assert value == pytest.approx(want[step], rel=1e-6), (tag, step)  # float32 events
    # Step 3 was trained twice; its loss is the same bits both times (exact resume), so the
    # purge is proven by the count above, not by a different value.
    assert first_metrics[2]["loss"] == metrics[2]["loss"]


def _wandb_records(path: Path) -> list:
    """Decode a .wandb file: a 7-byte header (':W&B', magic, version), then LevelDB-style
    log blocks of 32 KiB holding wandb's protobuf Records, possibly split over blocks."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    records, pos, partial = [], 7, b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # block trailer
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(partial + chunk)
            records.append(record)
            partial = b""
        elif kind in (2, 3):  # first / middle piece
            partial += chunk
    return records


def test_wandb_offline_run_continues_across_the_resume(tracked_run):
    run, _, _, _ = tracked_run
    run_id = (run / "wandb_run_id").read_text().strip()
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(d.name.endswith("-" + run_id) for d in offline)
    metrics = {m["step"]: m for m in read_metrics(run)}
    for directory, steps in zip(offline, ([1, 2, 3], [3, 4, 5, 6])):
        records = _wandb_records(directory / f"run-{run_id}.wandb")
        runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert runs and {(r.run_id, r.project) for r in runs} == {(run_id, "tests")}
        history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in r.history.item}
                   for r in records if r.WhichOneof("record_type") == "history"]
        assert [h["step"] for h in history] == steps
        for h in history:
            assert h["train/loss"] == metrics[h["step"]]["loss"]
            assert h["train/lr"] == metrics[h["step"]]["lr"]
        assert history[-1]["val/bpb"] == metrics[steps[-1]]["val_bpb"]


def test_wandb_online_without_credentials_is_one_line(tmp_path):
    env = clean_env({"HOME": str(tmp_path), "WANDB_API_KEY": "", "NETRC": str(tmp_path / "none")})
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", "--config", "configs/smoke.yaml",
                           f"run.dir={tmp_path / 'run'}", "logging.wandb.project=p"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "config error: logging.wandb.mode=online but no Weights & Biases credentials were found "
        "(WANDB_API_KEY or ~/.netrc); run `wandb login`, or set logging.wandb.mode=offline and "
        "`wandb sync RUN/wandb` later"]
    assert not (tmp_path / "run").exists()


def test_validation_reports_perplexity_and_bits_per_byte_per_source(tmp_path):
    """A blend of two corpora: each is scored on its own validation split; one manifest
    predates `text_bytes`, so its bits-per-byte (and the combined one) is omitted."""
    seq = 32
    web = write_dataset(tmp_path / "web", seq, [64], extra_splits={"val": [8]}, salt=1,
                        text_bytes={"train": 64 * 33 * 3, "val": 8 * 33 * 3})
    old = write_dataset(tmp_path / "old", seq, [64], extra_splits={"val": [8]}, salt=2)
    run = tmp_path / "run"
    proc = run_training(run, [f"data.train=[{{path: {web}, weight: 3}}, {{path: {old}, weight: 1}}]",
                              "model.vocab_size=60000", "train.steps=2", "train.eval_interval=2",
                              "train.eval_batches=1", "checkpoint.save_on_stop=false"])
    assert ("validation: old has no text_bytes in its manifest (made by an older shard.py): "
            "bits-per-byte is omitted; re-shard to report it") in proc.stdout
    last = read_metrics(run)[-1]
    assert last["val_loss"] == pytest.approx(0.75 * last["val_loss/web"] + 0.25 * last["val_loss/old"])
    assert last["val_ppl/web"] == pytest.approx(math.exp(last["val_loss/web"]))
    # 3 bytes per token of the stream (tokens + no dropped tail) by construction above.
    assert last["val_bpb/web"] == pytest.approx(last["val_loss/web"] / math.log(2) / 3.0)
    assert "val_bpb" not in last and "val_bpb/old" not in last
    assert "validation | loss" in proc.stdout and "web: loss" in proc.stdout


# ---------------------------------------------------------------- plots

def _plot(*args):
    return subprocess.run([sys.executable, "-m", "pretrain.plot", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_plot_overlays_runs_into_a_png(tracked_run, tmp_path):
    import matplotlib.image

    run, _, _, _ = tracked_run
    other = tmp_path / "other"
    other.mkdir()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    # a run killed while writing: its torn last line is skipped with a notice
    (other / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:25])
    out = tmp_path / "curves.png"
    proc = _plot(run, other, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "last line is incomplete" in proc.stderr
    assert proc.stdout.strip() == (
        f"plot: 2 run(s), loss, learning rate, gradient norm, throughput (tokens/s), MFU, "
        f"validation bits per byte -> {out}")
    height, width, _ = matplotlib.image.imread(out).shape
    assert width > 1000 and height > 500


def test_plot_of_a_directory_without_metrics_is_one_line(tmp_path):
    proc = _plot(tmp_path, "-o", tmp_path / "c.png")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"plot error: {tmp_path}: no metrics.jsonl here; pass a run directory (run.dir) of a "
        f"training run that logged at least one step"]
    assert not (tmp_path / "c.png").exists()
