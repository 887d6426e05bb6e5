"""The driver of data_tools/curate.py.

1. Ray Data map over read units: read documents, run the per-document stages in recipe order
   (each document stops at the first that removes it), and compute what each dedup stage needs
   of the text as it stands at that stage (a normalized digest, a MinHash signature).
   Materialized in Ray's object store, never collected on the driver.
2. Each dedup stage, in order, over the documents still present at it: rows keyed by digest
   (exact) or by LSH band bucket (near) are grouped in a Ray shuffle; each group emits only
   (removed, kept) pairs or verified edges. The driver holds those and runs union-find over
   the edges; the kept document of a cluster is its lowest input position.
3. The driver streams the dataset back in input order and writes the kept documents.

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
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_tools.curate_lib import output as out
from data_tools.curate_lib import recipe as rcp
from data_tools.curate_lib.errors import CurateError
from data_tools.curate_lib.filters import FILTERS, eval_ngrams
from data_tools.curate_lib.minhash import (band_buckets, bucket_edges, choose_bands, clusters,
                                           permutations, shingles, signature)
from data_tools.curate_lib.reader import UnitError, unit_documents
from data_tools.shard_lib.clean import normalized_digest
from data_tools.shard_lib.errors import ShardError
from data_tools.shard_lib.inputs import plan_units, resolve_inputs
from data_tools.shard_lib.pipeline import NORMALIZATION, TXT_MODES, init_ray, local_cpus
from pretrain.errors import DataError

READ_STAGE = "read"  # stage 0: empty and binary documents (shard.py's cleaning rules)
EXAMPLES = 3  # per stage and reason in report.json
SNIPPET_CHARS = 300


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
    # input position -> (stage index, reason, kept document's position or -1); stage 0 is read
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


# ---------------------------------------------------------------- phase 1 (Ray tasks)

def _bad_record_message(bad: dict) -> str:
    if "row" in bad:
        where = f"{bad['path']}: row {bad['row']}"
    else:
        line = bad["line"]
        if bad.get("start"):  # a byte range of a large file: count the lines before it
            with open(bad["path"], "rb") as f:
                line += f.read(bad["start"]).count(b"\n")
        where = f"{bad['path']}:{line}"
    fix = ("pass --text-key with the field that holds the text" if bad["reason"] == "missing_text_key"
           else "fix or remove the record")
    return f"{where}: {bad['detail']}; {fix}"


def _unit_schema(dedup: list[int]):
    import pyarrow as pa

    return pa.schema([("key", pa.int64()), ("path", pa.string()), ("id", pa.string()),
                      ("text", pa.large_string()), ("nbytes", pa.int64()),
                      ("drop_stage", pa.int16()), ("reason", pa.string()),
                      ("cut", pa.string()), ("error", pa.string())]
                     + [(f"feature_{s}", pa.binary()) for s in dedup])


def process_units(batch, stages: list[dict], resources: dict, text_key: str):
    """Ray map_batches UDF: read units (JSON) -> one table of their documents each."""
    import pyarrow as pa

    built = {}
    for s, spec in enumerate(stages, start=1):
        if spec["name"] in FILTERS:
            built[s] = FILTERS[spec["name"]](spec["params"], resources.get(s))
        elif spec["name"] == "near_dedup":
            p = spec["params"]
            built[s] = (p["ngram"], *permutations(p["num_perm"], p["seed"]))
    dedup = [s for s, spec in enumerate(stages, start=1) if spec["name"] in rcp.DEDUP_STAGES]
    schema = _unit_schema(dedup)
    for unit_json in batch.column("unit").to_pylist():
        unit = json.loads(unit_json)
        rows = defaultdict(list)
        try:
            for i, (path, data, id_json, reject) in enumerate(unit_documents(unit, text_key)):
                text = data.decode("utf-8")
                drop, reason, cuts = (0, reject, {}) if reject else (-1, "", {})
                features = dict.fromkeys(dedup)
                for s, spec in enumerate(stages, start=1):
                    if drop >= 0:
                        break
                    if spec["name"] == "exact_dedup":
                        features[s] = normalized_digest([text.encode("utf-8")])
                    elif spec["name"] == "near_dedup":
                        ngram, a, b = built[s]
                        sig = signature(shingles(text, ngram), a, b)
                        features[s] = None if sig is None else sig.tobytes()
                    else:
                        text, why, cut = built[s].apply(text)
                        if why:
                            drop, reason = s, why
                        elif cut:
                            cuts[s] = dict(cut)
                rows["key"].append((unit["index"] << 32) | i)
                rows["path"].append(path)
                rows["id"].append(id_json)
                rows["text"].append(text)
                rows["nbytes"].append(len(data))
                rows["drop_stage"].append(drop)
                rows["reason"].append(reason)
                rows["cut"].append(json.dumps(cuts) if cuts else "")
                rows["error"].append("")
                for s in dedup:
                    rows[f"feature_{s}"].append(features[s])
        except UnitError as err:
            message = _bad_record_message(err.bad) if err.bad else str(err)
            rows = {name: [None] for name in schema.names}
            rows.update(key=[-1], error=[message], drop_stage=[-1], nbytes=[0])
        if not rows:
            continue
        yield pa.table({name: rows[name] for name in schema.names}, schema=schema)


# ---------------------------------------------------------------- phase 2 (Ray shuffles)

def _present(table, stage: int, removed: np.ndarray) -> np.ndarray:
    """Rows still present at `stage`: not removed by an earlier stage, with a feature."""
    drop = table.column("drop_stage").to_numpy()
    keys = table.column("key").to_numpy()
    return ((drop < 0) | (drop > stage)) & pc_valid(table, stage) & ~np.isin(keys, removed) \
        & (keys >= 0)


def exact_rows(table, stage: int, removed: np.ndarray):
    import pyarrow as pa

    mask = _present(table, stage, removed)
    keys = table.column("key").to_numpy()[mask]
    digests = table.column(f"feature_{stage}").filter(pa.array(mask)).to_pylist()
    buckets = np.frombuffer(b"".join(d[:8] for d in digests), dtype="<i8")
    return pa.table({"bucket": buckets, "key": keys, "digest": pa.array(digests, pa.binary())})


def exact_groups(group):
    """One bucket of digests: every document but the first of each digest is removed."""
    import pyarrow as pa

    first: dict[bytes, int] = {}
    keys = group.column("key").to_numpy()
    for key, digest in sorted(zip(keys.tolist(), group.column("digest").to_pylist())):
        first.setdefault(digest, key)
    pairs = [(k, first[d]) for k, d in zip(keys.tolist(), group.column("digest").to_pylist())
             if first[d] != k]
    return pa.table({"a": pa.array([p[1] for p in pairs], pa.int64()),
                     "b": pa.array([p[0] for p in pairs], pa.int64())})


def band_rows(table, stage: int, removed: np.ndarray, bands: int, rows: int, num_perm: int):
    import pyarrow as pa

    mask = _present(table, stage, removed)
    keys = table.column("key").to_numpy()[mask]
    sig_bytes = table.column(f"feature_{stage}").filter(pa.array(mask)).to_pylist()
    if not sig_bytes:
        return pa.table({"bucket": pa.array([], pa.int64()), "key": pa.array([], pa.int64()),
                         "signature": pa.array([], pa.binary())})
    signatures = np.frombuffer(b"".join(sig_bytes), dtype=np.uint32).reshape(-1, num_perm)
    buckets = band_buckets(signatures, bands, rows)  # (N, bands)
    return pa.table({"bucket": buckets.reshape(-1), "key": np.repeat(keys, bands),
                     "signature": pa.array([s for s in sig_bytes for _ in range(bands)],
                                           pa.binary())})


def near_groups(group, threshold: float, num_perm: int):
    import pyarrow as pa

    keys = group.column("key").to_numpy()
    edges = []
    if len(keys) > 1:
        signatures = np.frombuffer(b"".join(group.column("signature").to_pylist()),
                                   dtype=np.uint32).reshape(-1, num_perm)
        edges = bucket_edges(keys, signatures, threshold)
    return pa.table({"a": pa.array([e[0] for e in edges], pa.int64()),
                     "b": pa.array([e[1] for e in edges], pa.int64())})


def _collect_pairs(ds) -> tuple[np.ndarray, np.ndarray]:
    a, b = [], []
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        a.append(batch.column("a").to_numpy())
        b.append(batch.column("b").to_numpy())
    if not a:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(a), np.concatenate(b)


def component_rows(table, stage: int, members: np.ndarray, roots: np.ndarray, num_perm: int):
    """(bucket = the component's root, key, signature) of the documents in near-duplicate
    components."""
    import pyarrow as pa

    keys = table.column("key").to_numpy()
    at = np.searchsorted(members, keys).clip(max=max(len(members) - 1, 0))
    mask = (members[at] == keys) if len(members) else np.zeros(len(keys), bool)
    mask &= pc_valid(table, stage)
    signatures = table.column(f"feature_{stage}").filter(pa.array(mask))
    return pa.table({"bucket": roots[at[mask]], "key": keys[mask],
                     "signature": signatures.combine_chunks() if signatures.num_chunks else
                     pa.array([], pa.binary())})


def pc_valid(table, stage: int) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.is_valid(table.column(f"feature_{stage}")).to_numpy()


def _dedup_stage(ds, stage: rcp.Stage, s: int, removed: np.ndarray, workers: int) -> dict[int, int]:
    common = dict(batch_size=None, batch_format="pyarrow", num_cpus=1, concurrency=workers)
    if stage.name == "exact_dedup":
        rows = ds.map_batches(exact_rows, fn_kwargs={"stage": s, "removed": removed}, **common)
        pairs = rows.groupby("bucket", num_partitions=workers).map_groups(
            exact_groups, batch_format="pyarrow", num_cpus=1)
        return clusters(*_collect_pairs(pairs))
    p = stage.params
    verify = {"threshold": p["threshold"], "num_perm": p["num_perm"]}
    rows = ds.map_batches(band_rows, fn_kwargs={
        "stage": s, "removed": removed, "bands": p["bands"], "rows": p["rows"],
        "num_perm": p["num_perm"]}, **common)
    edges = rows.groupby("bucket", num_partitions=workers).map_groups(
        near_groups, fn_kwargs=verify, batch_format="pyarrow", num_cpus=1)
    linked = clusters(*_collect_pairs(edges))
    if not linked:
        return {}
    # Edges chain: A~B and B~C do not make C close to A. Within each connected component,
    # documents are taken in position order and removed only when they match a document
    # kept before them (bucket_edges over the component), so every removed document is
    # within the threshold of the one that replaces it.
    members = np.array(sorted(set(linked) | set(linked.values())), dtype=np.int64)
    roots = np.array([linked.get(int(k), int(k)) for k in members], dtype=np.int64)
    rows = ds.map_batches(component_rows, fn_kwargs={
        "stage": s, "members": members, "roots": roots, "num_perm": p["num_perm"]}, **common)
    pairs = rows.groupby("bucket", num_partitions=workers).map_groups(
        near_groups, fn_kwargs=verify, batch_format="pyarrow", num_cpus=1)
    a, b = _collect_pairs(pairs)
    return dict(zip(b.tolist(), a.tolist()))


# ---------------------------------------------------------------- the driver

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
    import ray

    if not opts.ray_address and opts.num_workers and opts.num_workers > local_cpus():
        opts.num_workers = local_cpus()
    owned = False
    if not ray.is_initialized():
        try:
            init_ray(opts.num_workers, opts.ray_address)
        except ShardError as err:
            raise CurateError(str(err)) from None
        owned = True
    cpus = int(ray.cluster_resources().get("CPU", 0))
    workers = opts.num_workers or max(cpus, 1)
    if workers > cpus:
        if owned:
            ray.shutdown()
        raise CurateError(f"--num-workers {workers} exceeds the {cpus} CPUs of the Ray cluster; "
                          f"lower --num-workers")
    return workers, owned


def _eval_texts(files: list[str], text_key: str, where: str):
    for unit in plan_units(files, "file", text_key, 64 << 20):
        try:
            for _path, data, _id, reject in unit_documents(unit, text_key):
                if not reject:
                    yield data.decode("utf-8")
        except UnitError as err:
            detail = _bad_record_message(err.bad) if err.bad else str(err)
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
        for cleanup in (_shutdown_ray if owned else None, held.release):
            if cleanup:
                try:
                    cleanup()
                except Exception:  # noqa: BLE001 - the error that got us here is the one to report
                    pass


def _shutdown_ray() -> None:
    import ray

    ray.shutdown()


def _ray_failure(err: Exception) -> CurateError:
    reason = (str(err).strip().splitlines() or [""])[0][:300]
    return CurateError(f"the Ray pipeline failed ({type(err).__name__}: {reason}); re-run the "
                       f"same command")


def _run(opts, stages, files, units, resources, workers, output, started, log) -> Result:
    import ray.data
    import ray.exceptions

    specs = [{"name": s.name, "params": s.params} for s in stages]
    names = [READ_STAGE] + [s.name for s in stages]
    try:
        ds = ray.data.from_items([{"unit": json.dumps(u)} for u in units],
                                 override_num_blocks=len(units))
        ds = ds.map_batches(process_units, fn_kwargs={"stages": specs, "resources": resources,
                                                      "text_key": opts.text_key},
                            batch_size=1, batch_format="pyarrow", num_cpus=1,
                            concurrency=workers).materialize()
        summary = ds.select_columns(["key", "nbytes", "drop_stage", "reason", "cut", "error"])
        keys, nbytes, drop, reasons, cuts = [], [], [], [], []
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
        nbytes = np.concatenate(nbytes) if nbytes else np.empty(0, np.int64)
        drop = np.concatenate(drop) if drop else np.empty(0, np.int16)

        # Dedup stages in order, each over what earlier stages left.
        removed_by: dict[int, tuple[int, int]] = {}  # key -> (stage, kept key)
        for stage in stages:
            s = stage.index + 1
            if stage.name in rcp.DEDUP_STAGES:
                gone = np.array(sorted(removed_by), dtype=np.int64)
                for key, kept in _dedup_stage(ds, stage, s, gone, workers).items():
                    removed_by[key] = (s, kept)
    except ray.exceptions.RayError as err:
        raise _ray_failure(err) from err

    position = {int(k): i for i, k in enumerate(keys.tolist())}  # key -> input position
    final_stage = drop.astype(np.int64).copy()
    final_stage[final_stage < 0] = len(names)  # kept
    dedup_reason = {}
    for key, (s, kept) in removed_by.items():
        i = position[key]
        if s < final_stage[i]:
            final_stage[i] = s
            dedup_reason[i] = ("duplicate" if names[s] == "exact_dedup" else "near_duplicate",
                               position[kept])
    counts = {s: Counter() for s in range(len(names))}
    byte_counts = {s: Counter() for s in range(len(names))}
    removed: dict[int, tuple[int, str, int]] = {}
    for i in np.flatnonzero(final_stage < len(names)).tolist():
        s = int(final_stage[i])
        reason, kept = dedup_reason.get(i, (reasons[i], -1))
        removed[i] = (s, reason, kept)
        counts[s][reason] += 1
        byte_counts[s][reason] += int(nbytes[i])
    trimmed = {s: Counter() for s in range(len(names))}
    for i, cut in enumerate(cuts):
        if cut:
            for s, rules in json.loads(cut).items():
                if int(s) < final_stage[i]:
                    trimmed[int(s)].update(rules)
    examples = defaultdict(list)  # (stage, reason) -> positions
    for i in sorted(removed):
        s, reason, _ = removed[i]
        if len(examples[(s, reason)]) < EXAMPLES:
            examples[(s, reason)].append(i)
    wanted = {i for group in examples.values() for i in group}
    wanted |= {removed[i][2] for i in wanted if removed[i][2] >= 0}

    # Phase 3: the kept documents in input order.
    writer = out.ShardWriter(output, opts.shard_bytes)
    snippets: dict[int, dict] = {}
    kept_docs = kept_bytes = 0
    try:
        i = 0
        for batch in ds.select_columns(["key", "path", "id", "text"]).iter_batches(
                batch_size=None, batch_format="pyarrow"):
            texts = batch.column("text").to_pylist()
            ids = batch.column("id").to_pylist()
            paths = batch.column("path").to_pylist()
            for text, id_json, path in zip(texts, ids, paths):
                if i in wanted:
                    snippets[i] = {"position": i, "path": path,
                                   **({"id": json.loads(id_json)} if id_json else {}),
                                   "text": text[:SNIPPET_CHARS]}
                if final_stage[i] == len(names):
                    writer.add(text, id_json or "", int(nbytes[i]))
                    kept_docs += 1
                    kept_bytes += int(nbytes[i])
                i += 1
        if kept_docs == 0:
            raise CurateError(f"no documents left after the recipe ({len(keys)} read); nothing "
                              f"is written. Check --input, --text-key and the recipe's thresholds")
        shards = writer.finish()
    except ray.exceptions.RayError as err:
        writer.abort()
        raise _ray_failure(err) from err
    except BaseException:
        writer.abort()
        raise

    stage_records = []
    for s, name in enumerate(names):
        record = {"name": name, "params": {} if s == 0 else rcp.describe([stages[s - 1]])[0][name],
                  "removed": {r: {"documents": counts[s][r], "bytes": byte_counts[s][r]}
                              for r in sorted(counts[s])}}
        if trimmed[s]:
            record["trimmed_bytes"] = dict(sorted(trimmed[s].items()))
        stage_records.append(record)
    inputs = [{"path": path, "bytes": os.path.getsize(path)} for path in files]
    manifest = {
        "format": out.FORMAT, "format_version": out.FORMAT_VERSION,
        "documents": {"read": len(keys), "kept": kept_docs, "removed": len(keys) - kept_docs},
        "text_bytes": {"read": int(nbytes.sum()), "kept": kept_bytes},
        "recipe": rcp.describe(stages), "stages": stage_records,
        "settings": {"text_key": opts.text_key, "txt_mode": opts.txt_mode,
                     "exact_dedup_normalization": NORMALIZATION,
                     "kept_copy": "lowest input position (sorted paths, then record order)"},
        "inputs": inputs, "shards": shards,
    }
    report_stages = []
    for record, s in zip(stage_records, range(len(names))):
        reasons_out = {}
        for reason, numbers in record["removed"].items():
            shown = []
            for i in examples[(s, reason)]:
                example = dict(snippets[i])
                if removed[i][2] >= 0:
                    example["kept"] = snippets[removed[i][2]]
                shown.append(example)
            reasons_out[reason] = {**numbers, "examples": shown}
        report_stages.append({**record, "removed": reasons_out})
    report = {"format": "pretrain-curation-report", "documents": manifest["documents"],
              "text_bytes": manifest["text_bytes"], "stages": report_stages}
    out.publish(output, shards, report, manifest)
    print(f"curate: {len(keys):,} documents read, {kept_docs:,} kept in {len(shards)} shards; "
          + ", ".join(f"{name} removed {sum(counts[s].values()):,}" for s, name in enumerate(names))
          + f" ({time.monotonic() - started:.1f} s) -> {output}", file=log, flush=True)
    return Result(manifest, report, removed)
