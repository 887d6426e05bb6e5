"""The on-disk protocol of pretrain/checkpoint/store.py on real directories: what counts
as complete, publish by rename, the latest pointer, retention and crash leftovers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain.checkpoint import store
from pretrain.checkpoint.store import CheckpointDir, CheckpointError
from tests.checkpoint.crafted import RunsCode


def _staged(ckpt: CheckpointDir, step: int, files: dict[str, bytes], nonce: str = "ab12") -> Path:
    staging = ckpt.staging(step, nonce)
    staging.mkdir(parents=True)
    for rel, data in files.items():
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_bytes(data)
    return staging


def _complete(ckpt: CheckpointDir, step: int, files=None) -> Path:
    files = files or {"a.distcp": b"x" * 100, "train_state.json": b"{}"}
    staging = _staged(ckpt, step, files)
    hashes = {rel: store.sha256_file(staging / rel) for rel in files}
    store.write_record(staging, step, hashes, {"world_size": 1})
    return ckpt.publish(staging, step)


def _verify(path: Path) -> None:
    record = store.read_record(path)
    store.check_sizes(path, record)
    store.check_digests(path, record, sorted(record["files"]))


def test_publish_renames_and_points_latest(tmp_path):
    ckpt = CheckpointDir(tmp_path / "checkpoints")
    final = _complete(ckpt, 7)
    assert final == tmp_path / "checkpoints" / "step_00000007"
    assert ckpt.latest_pointer() == "step_00000007"
    assert not list(ckpt.root.glob("*.tmp-*"))
    _verify(final)
    record = json.loads((final / store.RECORD).read_text())
    assert record["step"] == 7 and set(record["files"]) == {"a.distcp", "train_state.json"}


def test_staging_without_record_is_not_a_candidate(tmp_path):
    ckpt = CheckpointDir(tmp_path)
    _complete(ckpt, 2)
    _staged(ckpt, 4, {"a.distcp": b"half"})  # a save killed before its record
    assert [c.step for c in ckpt.candidates()] == [2]
    assert ckpt.remove_leftovers() == ["step_00000004.tmp-ab12"]
    assert not (tmp_path / "step_00000004.tmp-ab12").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "a.distcp").write_bytes(b"x" * 50), "50 bytes"),
    (lambda p: (p / "a.distcp").write_bytes(b"y" * 100), "sha256 differs"),
    (lambda p: (p / "a.distcp").unlink(), "missing"),
    (lambda p: (p / "stray.bin").write_bytes(b"?"), "not listed"),
    (lambda p: (p / store.RECORD).unlink(), "never finished"),
    (lambda p: (p / store.RECORD).write_text("{"), "unreadable"),
])
def test_damage_is_named(tmp_path, damage, message):
    ckpt = CheckpointDir(tmp_path)
    final = _complete(ckpt, 3)
    damage(final)
    with pytest.raises(CheckpointError, match=message):
        _verify(final)


def test_record_refuses_unhashed_files(tmp_path):
    ckpt = CheckpointDir(tmp_path)
    staging = _staged(ckpt, 1, {"a": b"1", "b": b"2"})
    with pytest.raises(CheckpointError, match="not hashed"):
        store.write_record(staging, 1, {"a": store.sha256_file(staging / "a")}, {})


def test_publish_replaces_a_checkpoint_of_the_same_step(tmp_path):
    ckpt = CheckpointDir(tmp_path)
    _complete(ckpt, 5, {"a": b"old"})
    final = _complete(ckpt, 5, {"a": b"new!"})
    assert (final / "a").read_bytes() == b"new!"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".trash")]
    _verify(final)


@pytest.mark.parametrize("keep_last, keep_every, left", [
    (2, 0, [10, 9]),
    (1, 4, [10, 8, 4]),
    (3, 5, [10, 9, 8, 5]),
])
def test_retention(tmp_path, keep_last, keep_every, left):
    ckpt = CheckpointDir(tmp_path)
    for step in range(1, 11):
        _complete(ckpt, step, {"a": bytes([step])})
    ckpt.apply_retention(keep_last, keep_every)
    assert [c.step for c in ckpt.candidates()] == left
    assert ckpt.latest_pointer() == "step_00000010"


def test_resolve_load_path_forms(tmp_path):
    run = tmp_path / "run"
    ckpt = CheckpointDir(run / "checkpoints")
    final = _complete(ckpt, 3)
    where, exact = store.resolve_load_path(final)
    assert where.root == run / "checkpoints" and exact == final
    where, exact = store.resolve_load_path(run)
    assert where.root == run / "checkpoints" and exact is None
    where, exact = store.resolve_load_path(run / "checkpoints")
    assert where.root == run / "checkpoints" and exact is None
    with pytest.raises(CheckpointError, match="no such file"):
        store.resolve_load_path(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither"):
        store.resolve_load_path(tmp_path / "empty")


def test_index_pickle_allowlist(tmp_path):
    import pickle

    import torch
    from torch.distributed.checkpoint.metadata import Metadata, TensorProperties

    good = tmp_path / "good"
    good.mkdir()
    (good / ".metadata").write_bytes(pickle.dumps(
        Metadata(state_dict_metadata={}, planner_data={"x": (torch.Size([2]), torch.bfloat16,
                                                            TensorProperties(dtype=torch.float32))})))
    store.check_index_pickle(good)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / ".metadata").write_bytes(pickle.dumps({"payload": RunsCode(f"touch {tmp_path}/x")}))
    with pytest.raises(CheckpointError, match=r"refers to posix.system|refers to os.system"):
        store.check_index_pickle(bad)
    assert not (tmp_path / "x").exists()


def test_index_with_a_bytes_entry_or_another_dcp_class_is_refused(tmp_path):
    """Exact classes only: a BytesStorageMetadata entry (DCP would torch.load its bytes with
    weights_only=False) and DCP classes a tensor index never holds are both refused."""
    import pickle

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata
    from torch.distributed.checkpoint.planner import LoadPlan

    (tmp_path / ".metadata").write_bytes(pickle.dumps(
        Metadata(state_dict_metadata={"model.w": BytesStorageMetadata()})))
    with pytest.raises(CheckpointError, match=r"BytesStorageMetadata"):
        store.check_index_pickle(tmp_path)
    (tmp_path / ".metadata").write_bytes(pickle.dumps(
        Metadata(state_dict_metadata={}, planner_data=LoadPlan(items=[]))))
    with pytest.raises(CheckpointError, match=r"refers to torch\.distributed\.checkpoint\.planner\.LoadPlan"):
        store.check_index_pickle(tmp_path)
    (tmp_path / ".metadata").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(CheckpointError, match=r"not a torch\.distributed\.checkpoint index \(list\)"):
        store.check_index_pickle(tmp_path)


def test_retention_counts_only_intact_checkpoints_and_protects(tmp_path):
    """A corrupt newest checkpoint is neither counted nor deleted; the protected steps (just
    saved, resumed from) stay whatever keep_last says."""
    ckpt = CheckpointDir(tmp_path)
    for step in range(1, 7):
        _complete(ckpt, step, {"a": bytes([step])})
    (tmp_path / "step_00000006" / "a").write_bytes(b"?")  # same size, other bytes

    def intact(cand):
        try:
            _verify(cand.path)
            return True
        except CheckpointError:
            return False

    deleted = ckpt.apply_retention(1, 0, protect={2, 5}, verified=intact)
    assert sorted(deleted) == [1, 3, 4]
    assert [c.step for c in ckpt.candidates()] == [6, 5, 2]
