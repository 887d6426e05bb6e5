"""A run whose checkpoints/step_N is a symlink to a checkpoint elsewhere (a shared pretrained
one, a copied run): retention used to report "removed step N" while only renaming the link to
`.trash-step_N-PID`, where it stayed for good (rmtree refuses links; the target survived by
that luck alone). The rule now: a delete never follows a link, it unlinks it, and no `.trash-*`
is left behind."""

from __future__ import annotations

import os

from pretrain.checkpoint.store import CheckpointDir
from pretrain.run_dir import step_name
from tests.checkpoint.test_store import _complete, _verify


def test_retention_unlinks_a_symlinked_checkpoint_and_keeps_its_target(tmp_path):
    shared = CheckpointDir(tmp_path / "shared" / "checkpoints")
    target = _complete(shared, 1)
    ckpt = CheckpointDir(tmp_path / "run" / "checkpoints")
    ckpt.root.mkdir(parents=True)
    os.symlink(target, ckpt.root / step_name(1))  # resumed from a checkpoint elsewhere
    for step in (2, 3):
        _complete(ckpt, step)
    assert [c.step for c in ckpt.candidates()] == [3, 2, 1]

    assert ckpt.apply_retention(keep_last=1, keep_every=0) == [2, 1]
    assert sorted(os.listdir(ckpt.root)) == ["latest", step_name(3)]  # no .trash-* left
    _verify(target)  # the shared checkpoint is whole


def test_leftover_trash_link_is_unlinked_not_followed(tmp_path):
    """A `.trash-*` link left by the old code (or by a crash between rename and delete)."""
    shared = CheckpointDir(tmp_path / "shared")
    target = _complete(shared, 7)
    ckpt = CheckpointDir(tmp_path / "run")
    _complete(ckpt, 8)
    os.symlink(target, ckpt.root / f".trash-{step_name(7)}-123")
    assert ckpt.remove_leftovers() == [f".trash-{step_name(7)}-123"]
    assert sorted(os.listdir(ckpt.root)) == ["latest", step_name(8)]
    _verify(target)
