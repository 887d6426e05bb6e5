"""Which checkpoint a run starts from, checked on every rank alike: the run's own newest
complete one, else `checkpoint.load_from`'s; incomplete or corrupt ones are reported and
skipped, and the steps known intact are remembered for retention."""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from pretrain.checkpoint import store
from pretrain.checkpoint.store import CheckpointDir
from pretrain.errors import CheckpointError
from pretrain.log import log, warn
from pretrain.run_dir import LATEST, TRAIN_STATE


class Finder:
    """Collective: every method that takes no candidate runs on all ranks at once."""

    def __init__(self, dir: CheckpointDir, verify: bool):
        self.dir, self.verify = dir, verify
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # Steps saved or loaded (so verified) by this process: retention counts them as intact
        # without hashing them again (the one resumed from is deleted only once keep_last
        # newer intact ones exist).
        self.known_good: set[int] = set()
        self.rejected: list[tuple[Path, str]] = []  # (checkpoint, why) skipped

    def own(self) -> tuple[Path, dict] | None:
        """This run's newest complete checkpoint (after removing unfinished saves), or None.
        Raises when there are checkpoints and none is usable: starting over would discard
        the run."""
        if self.rank == 0:
            for name in self.dir.remove_leftovers():
                warn(f"checkpoint: removed {self.dir.root / name} (an unfinished save or delete)")
        dist.barrier()
        chosen = self.newest_complete(self.dir, None)
        if chosen is None and self.dir.candidates():
            raise CheckpointError(
                f"every checkpoint in {self.dir.root} failed verification ("
                f"{'; '.join(f'{p.name}: {why}' for p, why in self.rejected)}); starting "
                f"over from step 0 would discard the run. Restore them, or move them away to "
                f"start from scratch")
        return chosen

    def load_from(self, load_from: str) -> tuple[Path, dict]:
        """The checkpoint `checkpoint.load_from` names (a step, checkpoints or run directory)."""
        source, exact = store.resolve_load_path(load_from)
        chosen = self.newest_complete(source, exact)
        if chosen is None:
            raise CheckpointError(f"checkpoint.load_from={load_from}: no complete checkpoint "
                                  f"there (see the warnings above)")
        return chosen

    def newest_complete(self, where: CheckpointDir, exact: Path | None):
        candidates = [exact] if exact is not None else [cand.path for cand in where.candidates()]
        pointer = where.latest_pointer()
        for path in candidates:
            problem = self.check(path)
            if problem is None:
                if exact is None and pointer and pointer != path.name:
                    log(f"checkpoint: {where.root}/{LATEST} says {pointer}; using {path.name}, "
                        f"the newest complete checkpoint")
                state = json.loads((path / TRAIN_STATE).read_text())
                if where is self.dir:
                    self.known_good.add(state["step"])
                return path, state
            warn(f"checkpoint: skipping {path}: {problem}")
            self.rejected.append((path, problem))
            if exact is not None:
                raise CheckpointError(f"checkpoint.load_from={exact}: {problem}")
        return None

    def check(self, path: Path) -> str | None:
        """None when complete and intact, else the reason (the same on every rank)."""
        result = [None, None]
        if self.rank == 0:
            try:
                record = store.read_record(path)
                store.check_sizes(path, record)
                store.check_index_pickle(path)
                result = [None, record]
            except CheckpointError as err:
                result = [str(err), None]
        dist.broadcast_object_list(result, src=0)
        if result[0] is not None:
            return result[0]
        if not self.verify:
            return None
        record = result[1]  # read once, on rank 0
        problem = None
        try:
            store.check_digests(path, record, sorted(record["files"])[self.rank::self.world])
        except CheckpointError as err:
            problem = str(err)
        problems = [None] * self.world
        dist.all_gather_object(problems, problem)
        return next((p for p in problems if p), None)

    def intact(self, cand: store.Candidate) -> bool:
        """Rank 0, for retention: a checkpoint not known good is checked now (record, sizes
        and, with checkpoint.verify, sha256), so only intact ones count as kept."""
        if cand.step in self.known_good:
            return True
        try:
            record = store.read_record(cand.path)
            store.check_sizes(cand.path, record)
            if self.verify:
                store.check_digests(cand.path, record, sorted(record["files"]))
        except CheckpointError as err:
            warn(f"checkpoint: retention keeps {cand.path} but does not count it: {err}")
            return False
        self.known_good.add(cand.step)
        return True
