"""The driver of data_tools/curate.py.

1. Ray Data map over read units (documents.py): read documents, run the per-document stages
   in recipe order, compute what each dedup stage needs. Materialized in Ray's object store;
   only small per-document columns (key, size, verdict) come to the driver.
2. Each dedup stage, in order, over the documents still present at it (dedup.py): Ray
   shuffles emit removal pairs and verified edges; union-find on the driver over edges only;
   the kept document of a cluster is its lowest input position. summary.py decides each
   document's fate.
3. The driver streams the dataset back in input order and writes the kept documents
   (output.py: staged shards, report.json, manifest.json last).

Every decision is a function of the documents and their input positions, never of which
worker or group saw them first, so the output is byte-identical for any --num-workers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_tools.curate_lib import dedup, summary
from data_tools.curate_lib import output as out
from data_tools.curate_lib import recipe as rcp
from data_tools.curate_lib.documents import bad_record_message, process_units
from data_tools.curate_lib.errors import CurateError
from data_tools.curate_lib.filters import eval_ngrams
from data_tools.curate_lib.minhash import choose_bands
from data_tools.curate_lib.reader import UnitError, unit_documents
from data_tools.shard_lib.errors import ShardError
from data_tools.shard_lib.inputs import plan_units, resolve_inputs
from data_tools.shard_lib.pipeline import (NORMALIZATION, TXT_MODES, shutdown_ray,
                                           start_ray)
from pretrain.errors import DataError

@dataclass
class Options:
    inputs: list[str]
    output: str
    recipe: str
    text_key: str = "text"
    txt_mode: str = "file"
    num_workers: int | None = None
    ray_address: str | None = None
    overwrite: bool = False
    shard_bytes: int = 256 << 20  # uncompressed JSON per output shard
    unit_bytes: int = 64 << 20  # input per read task; the output does not depend on it
    log: object = field(default=None, repr=False)


@dataclass
class Result:
    manifest: dict
    report: dict
    # input position -> (stage, reason, position of the document kept in its place or -1);
    # stage 0 is 'read', recipe stage i is i + 1
    removed: dict[int, tuple[int, str, int]]


def _validate(opts: Options) -> None:
    if opts.num_workers is not None and opts.num_workers < 1:
        raise CurateError(f"--num-workers {opts.num_workers} must be at least 1")
    if opts.txt_mode not in TXT_MODES:
        raise CurateError(f"--txt-mode {opts.txt_mode!r} is not one of {', '.join(TXT_MODES)}")
    if not opts.text_key:
        raise CurateError("--text-key must not be empty")
    if opts.shard_bytes < 1 or opts.unit_bytes < 1:
        raise CurateError("--shard-bytes and --unit-bytes must be at least 1")


def _configure_ray_data() -> None:
    import ray.data
    from ray.data.context import ShuffleStrategy

    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message=".*minimum number of concurrent actors.*")
    warnings.filterwarnings("ignore", message=".*maximum number of concurrent tasks.*")
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Task-based sort shuffle: Ray 2.60's default hash shuffle starts aggregator actors,
    # ~7 s per groupby on a busy 2-core machine against 0.3 s for this (measured).
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED


def _start_ray(opts: Options) -> tuple[int, bool]:
    try:
        return start_ray(opts, tool=None)
    except ShardError as err:
        raise CurateError(str(err)) from None


def _eval_texts(files: list[str], text_key: str, where: str):
    for unit in plan_units(files, "file", text_key, 64 << 20):
        try:
            for _path, data, _id, reject in unit_documents(unit, text_key):
                if not reject:
                    yield data.decode("utf-8")
        except UnitError as err:
            detail = bad_record_message(err.bad) if err.bad else str(err)
            raise CurateError(f"{where}: {detail}") from None


def _resources(stages: list[rcp.Stage]) -> dict[int, np.ndarray]:
    """What a stage's workers need that is built once on the driver: the evaluation n-grams."""
    found = {}
    for stage in stages:
        if stage.name == "decontaminate":
            p = stage.params
            try:
                files = resolve_inputs(p["files"])
            except DataError as err:
                raise CurateError(f"{stage.label}.files: {err}") from None
            found[stage.index + 1] = eval_ngrams(_eval_texts(files, p["text_key"],
                                                             f"{stage.label}.files"), p["ngram"])
    return found


def _fill_bands(stages: list[rcp.Stage]) -> None:
    for stage in stages:
        if stage.name == "near_dedup" and stage.params["bands"] is None:
            stage.params["bands"], stage.params["rows"] = choose_bands(
                stage.params["threshold"], stage.params["num_perm"])


def build(opts: Options) -> Result:
    """Run the whole recipe; returns what was written to OUTPUT/manifest.json and report.json."""
    log = opts.log or sys.stdout
    started = time.monotonic()
    _validate(opts)
    stages = rcp.load_recipe(opts.recipe)
    _fill_bands(stages)
    try:
        files = resolve_inputs(opts.inputs)
    except DataError as err:
        raise CurateError(str(err)) from None
    output = Path(opts.output)
    out.check_output(output, opts.overwrite)
    resources = _resources(stages)
    held = out.lock(output)
    owned = False
    try:
        units = plan_units(files, opts.txt_mode, opts.text_key, opts.unit_bytes)
        workers, owned = _start_ray(opts)
        _configure_ray_data()
        print(f"curate: {len(files)} files in {len(units)} read units, {len(stages)} stages, "
              f"{workers} workers", file=log, flush=True)
        result = _run(opts, stages, files, units, resources, workers, output, started, log)
        return result
    except OSError as err:
        raise CurateError(f"cannot write {err.filename or output}: {err.strerror or err}; free "
                          f"space or fix the permissions of --output {output}") from None
    finally:
        for cleanup in (shutdown_ray if owned else None, held.release):
            if cleanup:
                try:
                    cleanup()
                except Exception:  # noqa: BLE001 - the error that got us here is the one to report
                    pass


def _read_phase(ds):
    """Phase 1's small columns, in input order, on the driver (texts and signatures stay in
    the object store): keys, text bytes, removing per-document stage, reason, cut lines."""
    keys, nbytes, drop, reasons, cuts = [], [], [], [], []
    summary = ds.select_columns(["key", "nbytes", "drop_stage", "reason", "cut", "error"])
    for batch in summary.iter_batches(batch_size=None, batch_format="pyarrow"):
        errors = [e for e in batch.column("error").to_pylist() if e]
        if errors:
            raise CurateError(errors[0])
        keys.append(batch.column("key").to_numpy())
        nbytes.append(batch.column("nbytes").to_numpy())
        drop.append(batch.column("drop_stage").to_numpy())
        reasons.extend(batch.column("reason").to_pylist())
        cuts.extend(batch.column("cut").to_pylist())
    keys = np.concatenate(keys) if keys else np.empty(0, np.int64)
    if len(keys) and not (np.diff(keys) > 0).all():
        raise RuntimeError("Ray returned documents out of input order")
    return (keys, np.concatenate(nbytes) if nbytes else np.empty(0, np.int64),
            np.concatenate(drop) if drop else np.empty(0, np.int16), reasons, cuts)


def _write_phase(ds, decisions: summary.Decisions, output: Path, shard_bytes: int):
    """Phase 3: the kept documents, streamed back in input order, into staged shards; and the
    report's snippets. Returns (shards, snippets)."""
    writer = out.ShardWriter(output, shard_bytes)
    wanted = decisions.wanted()
    snippets: dict[int, dict] = {}
    try:
        i = 0
        for batch in ds.select_columns(["path", "id", "text"]).iter_batches(
                batch_size=None, batch_format="pyarrow"):
            for path, id_json, text in zip(batch.column("path").to_pylist(),
                                           batch.column("id").to_pylist(),
                                           batch.column("text").to_pylist()):
                if i in wanted:
                    snippets[i] = summary.snippet(i, path, id_json, text)
                if decisions.kept[i]:
                    writer.add(text, id_json, int(decisions.nbytes[i]))
                i += 1
        return writer.finish(), snippets
    except BaseException:
        writer.abort()
        raise


def _run(opts, stages, files, units, resources, workers, output, started, log) -> Result:
    import ray.data
    import ray.exceptions

    specs = [{"name": s.name, "params": s.params} for s in stages]
    try:
        ds = ray.data.from_items([{"unit": json.dumps(u)} for u in units],
                                 override_num_blocks=len(units))
        ds = ds.map_batches(process_units, fn_kwargs={"stages": specs, "resources": resources,
                                                      "text_key": opts.text_key},
                            batch_size=1, batch_format="pyarrow", num_cpus=1,
                            concurrency=workers).materialize()
        keys, nbytes, drop, reasons, cuts = _read_phase(ds)
        removed_by: dict[int, tuple[int, int]] = {}  # key -> (stage, kept key)
        for stage in stages:  # each dedup stage over what the earlier stages left
            if stage.name in rcp.DEDUP_STAGES:
                s = stage.index + 1
                gone = np.array(sorted(removed_by), dtype=np.int64)
                for key, kept in dedup.run_stage(ds, stage, s, gone, workers).items():
                    removed_by[key] = (s, kept)
        decisions = summary.decide(stages, keys, nbytes, drop, reasons, cuts, removed_by)
        if not decisions.kept.any():
            raise CurateError(f"no documents left after the recipe ({len(keys)} read); nothing "
                              f"is written. Check --input, --text-key and the recipe's thresholds")
        shards, snippets = _write_phase(ds, decisions, output, opts.shard_bytes)
    except ray.exceptions.RayError as err:
        reason = (str(err).strip().splitlines() or [""])[0][:300]
        raise CurateError(f"the Ray pipeline failed ({type(err).__name__}: {reason}); re-run "
                          f"the same command") from err
    settings = {"text_key": opts.text_key, "txt_mode": opts.txt_mode,
                "exact_dedup_normalization": NORMALIZATION,
                "kept_copy": "lowest input position (sorted paths, then record order)"}
    inputs = [{"path": path, "bytes": os.path.getsize(path)} for path in files]
    manifest, report = summary.manifest_and_report(decisions, stages, settings, inputs, shards,
                                                   snippets)
    out.publish(output, shards, report, manifest)
    removed = ", ".join(f"{name} removed {sum(decisions.counts[s].values()):,}"
                        for s, name in enumerate(decisions.names))
    print(f"curate: {len(keys):,} documents read, {manifest['documents']['kept']:,} kept in "
          f"{len(shards)} shards; {removed} ({time.monotonic() - started:.1f} s) -> {output}",
          file=log, flush=True)
    return Result(manifest, report, decisions.removed)
