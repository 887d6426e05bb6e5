"""Phase 2 of curate.py: one dedup stage over the whole corpus on Ray, never per worker.

Rows keyed by digest (exact) or LSH band bucket (near) meet in a Ray shuffle (groupby); each
group emits only pairs (kept, removed) or verified edges, which the driver collects and joins
by union-find (minhash.clusters: the root is the lowest key). Near-duplicate components are
then re-checked in a second shuffle keyed by component, so that no document is removed for
resembling a document that was itself removed (chains). The driver holds edges, never
signatures; every decision depends only on the documents and their keys.
"""

from __future__ import annotations

import numpy as np

from data_tools.curate_lib import recipe as rcp
from data_tools.curate_lib.minhash import band_buckets, bucket_edges, clusters


def _present(table, stage: int, removed: np.ndarray) -> np.ndarray:
    """Rows still present at `stage`: not removed by an earlier stage, with a feature."""
    drop = table.column("drop_stage").to_numpy()
    keys = table.column("key").to_numpy()
    return ((drop < 0) | (drop > stage)) & pc_valid(table, stage) & ~np.isin(keys, removed) \
        & (keys >= 0)


def exact_rows(table, stage: int, removed: np.ndarray):
    """(bucket = the digest's first 8 bytes, key, digest) of every present document."""
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
    """(bucket, key, signature) per band of every present document. Each row carries the whole
    signature (bands x num_perm x 4 bytes per document in the shuffle) so that a bucket can
    verify its candidates without a join."""
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
    """One bucket (or component): verified edges (earlier key, later key), bucket_edges."""
    import pyarrow as pa

    keys = group.column("key").to_numpy()
    edges = []
    if len(keys) > 1:
        signatures = np.frombuffer(b"".join(group.column("signature").to_pylist()),
                                   dtype=np.uint32).reshape(-1, num_perm)
        edges = bucket_edges(keys, signatures, threshold)
    return pa.table({"a": pa.array([e[0] for e in edges], pa.int64()),
                     "b": pa.array([e[1] for e in edges], pa.int64())})


def collect_pairs(ds) -> tuple[np.ndarray, np.ndarray]:
    """The groups' (a, b) pairs on the driver: edges only, never signatures."""
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


def run_stage(ds, stage: rcp.Stage, s: int, removed: np.ndarray, workers: int) -> dict[int, int]:
    """{removed key: kept key} of dedup stage `stage` (index s) over the documents present at
    it (not in `removed`, the keys earlier dedup stages removed)."""
    common = dict(batch_size=None, batch_format="pyarrow", num_cpus=1, concurrency=workers)
    if stage.name == "exact_dedup":
        rows = ds.map_batches(exact_rows, fn_kwargs={"stage": s, "removed": removed}, **common)
        pairs = rows.groupby("bucket", num_partitions=workers).map_groups(
            exact_groups, batch_format="pyarrow", num_cpus=1)
        return clusters(*collect_pairs(pairs))
    p = stage.params
    verify = {"threshold": p["threshold"], "num_perm": p["num_perm"]}
    rows = ds.map_batches(band_rows, fn_kwargs={
        "stage": s, "removed": removed, "bands": p["bands"], "rows": p["rows"],
        "num_perm": p["num_perm"]}, **common)
    edges = rows.groupby("bucket", num_partitions=workers).map_groups(
        near_groups, fn_kwargs=verify, batch_format="pyarrow", num_cpus=1)
    linked = clusters(*collect_pairs(edges))
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
    a, b = collect_pairs(pairs)
    return dict(zip(b.tolist(), a.tolist()))


