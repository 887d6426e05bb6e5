"""Every error a user can meet, and the one function that turns it into a line and an exit
status (docs/failures.md has the table; slurm/pretrain_1b.sh's `case` follows it).

Exit statuses, chosen so a batch script can tell "fix the input" from "try again":

    0   done
    2   bad input: config, data, checkpoint, tokenizer, plan, or training that cannot usefully
        continue (non-finite steps in a row). One line on stderr; requeueing would fail alike.
    3   preflight: the nodes of a job disagree or cannot reach each other (launch/preflight.py).
        Not requeued onto the same nodes.
    75  stopped on a signal after saving a checkpoint (sysexits.h EX_TEMPFAIL): requeue.
    76  a step hung, or a save ran past checkpoint.save_timeout_s; every rank's stacks are in
        the log (trainer/guards.py Watchdog): requeue.
    130 interrupted from the keyboard.

Anything else (a traceback, a signal) is a crash: the SLURM script requeues it up to
MAX_RESTARTS times. Only the types below are turned into one line; an unexpected exception
keeps its traceback, because it is a bug to be reported, not an input to be fixed.
"""

from __future__ import annotations

import argparse
import sys

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_PREFLIGHT = 3
EXIT_REQUEUE = 75
EXIT_HUNG = 76
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A problem the user can fix, stated as one line that names the file, field or value and
    the fix. `label` starts the printed line; `exit_status` is what the process returns."""

    label = "error"
    exit_status = EXIT_BAD_INPUT


class ConfigError(UserError, ValueError):
    """A configuration problem: the field, the value and the fix."""

    label = "config error"


class DataError(UserError, RuntimeError):
    """A dataset, tokenizer or input problem, naming the file and what to do about it."""

    label = "data error"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used: which one and why."""

    label = "checkpoint error"


class TrainingHalted(UserError, RuntimeError):
    """Training cannot usefully continue (e.g. non-finite steps in a row): why and what to do."""

    label = "training error"


class PeerStopped(UserError, RuntimeError):
    """Another rank stopped on an error and printed it itself: this rank exits 2 quietly."""

    label = ""


class PlanError(UserError, ValueError):
    """A planning problem (pretrain.plan): what is wrong and the fix."""

    label = "plan error"


class PlotError(UserError, ValueError):
    """Metrics that cannot be drawn (pretrain.plot)."""

    label = "plot error"


class PreflightError(UserError):
    """The nodes of a job cannot train together (launch/preflight.py)."""

    label = "preflight"
    exit_status = EXIT_PREFLIGHT


def one_line(err: UserError, label: str | None = None, rank: int | None = None) -> str:
    """`LABEL: message` on one line (a multi-line message is joined), `(rank R)` appended when
    only that rank saw the problem."""
    label = err.label if label is None else label
    text = " ".join(str(err).split("\n")).strip()
    where = f" (rank {rank})" if rank is not None else ""
    return f"{label}: {text}{where}" if label else f"{text}{where}"


def report(err: BaseException, *, label: str | None = None, rank: int = 0, world_size: int = 1,
           every_rank: bool = False, file=None) -> int:
    """Print ERR's one line and return its exit status; re-raise what is not a UserError.

    Errors every rank meets alike (a config or manifest read at start-up) are printed by rank
    0 only; `every_rank=True` is for a problem one rank found by itself (a corrupt shard it
    read while training), printed by that rank with its number. PeerStopped prints nothing:
    the rank that stopped first has said why. `label` overrides the type's label for a tool
    whose lines all start alike (the data tools' `error: ...`).
    """
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if not isinstance(err, UserError):
        raise err
    if not isinstance(err, PeerStopped) and (every_rank or rank == 0):
        line = one_line(err, label, rank if every_rank and world_size > 1 else None)
        print(line, file=file or sys.stderr, flush=True)
    return err.exit_status


class OneLineParser(argparse.ArgumentParser):
    """argparse for the tools: a bad command line is one line (not usage + message) and exit
    EXIT_BAD_INPUT, like every other input error."""

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
