"""MinHash signatures over word n-gram shingles, LSH band buckets, and the candidate check
inside one bucket (Broder 1997; Leskovec, Rajaraman, Ullman, "Mining of Massive Datasets",
ch. 3.4). All numpy, vectorized over shingles and permutations.

A signature holds num_perm minima of mix64(x XOR seed_i) over the document's 64-bit shingle
hashes x, one random seed per position (stored as the minima's low 32 bits). Two documents
agree at one position with probability equal to their shingle sets' Jaccard similarity (up to
a 2^-32 collision). A linear family (a*x + b) mod p with 32-bit a and x wraps p = 2^61 - 1
only a few times, which leaves the positions correlated: measured, its estimates erred 3x
more than independent ones (tests/curation/test_datasketch.py holds the accuracy).
"""

from __future__ import annotations

import numpy as np

from data_tools.curate_lib.text import mix64, ngram_hashes, shingle_words, word_hashes

_LOW32 = np.uint64(0xFFFFFFFF)
_CHUNK = 2048  # shingles per step: bounds the (shingles, num_perm) matrix to ~2 MB at 128
# Candidates are verified against their signatures (bucket_edges), so a false positive costs
# only a comparison while a false negative loses a duplicate: bands/rows favour recall 9:1.
_FALSE_NEGATIVE_WEIGHT = 0.9


def permutations(num_perm: int, seed: int) -> np.ndarray:
    """uint64[num_perm] seeds, one per signature position."""
    return np.random.default_rng(seed).integers(0, 2 ** 64 - 1, size=num_perm, dtype=np.uint64,
                                                endpoint=True)


def shingles(text: str, ngram: int) -> np.ndarray:
    """Distinct 64-bit hashes of the text's word n-grams (a text shorter than n words is one
    shingle; a text without words has none)."""
    hashes = word_hashes(shingle_words(text))
    if len(hashes) == 0:
        return np.empty(0, dtype=np.uint64)
    return np.unique(ngram_hashes(hashes, min(ngram, len(hashes))))


def signature(shingle_set: np.ndarray, seeds: np.ndarray) -> np.ndarray | None:
    """uint32[num_perm] MinHash signature (None for a text without shingles)."""
    if len(shingle_set) == 0:
        return None
    result = np.full(len(seeds), np.iinfo(np.uint64).max, dtype=np.uint64)
    for start in range(0, len(shingle_set), _CHUNK):
        x = shingle_set[start:start + _CHUNK, None]  # (chunk, 1)
        permuted = mix64(x ^ seeds[None, :])  # (chunk, num_perm)
        np.minimum(result, permuted.min(axis=0), out=result)
    return (result & _LOW32).astype(np.uint32)


def choose_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows), bands * rows <= num_perm, minimizing the weighted areas under the LSH
    S-curve P(candidate | J) = 1 - (1 - J^rows)^bands: above threshold missed (false
    negatives) and below it caught (false positives)."""
    jaccard = np.linspace(0.0, 1.0, 1001)
    below = jaccard < threshold
    best = None
    for rows in range(1, num_perm + 1):
        bands = np.arange(1, num_perm // rows + 1)[:, None]  # (B, 1)
        caught = 1.0 - (1.0 - jaccard[None, :] ** rows) ** bands  # (B, J)
        false_pos = np.where(below, caught, 0.0).mean(axis=1)  # areas on a uniform grid
        false_neg = np.where(below, 0.0, 1.0 - caught).mean(axis=1)
        error = (1 - _FALSE_NEGATIVE_WEIGHT) * false_pos + _FALSE_NEGATIVE_WEIGHT * false_neg
        i = int(np.argmin(error))
        if best is None or error[i] < best[0] - 1e-12:
            best = (float(error[i]), int(bands[i, 0]), rows)
    return best[1], best[2]


def band_buckets(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """int64[N, bands] bucket ids of uint32[N, num_perm] signatures: one hash per band of
    `rows` values, salted with the band's index so equal values in two bands never meet."""
    n = signatures.shape[0]
    values = signatures[:, :bands * rows].astype(np.uint64).reshape(n, bands, rows)
    with np.errstate(over="ignore"):
        combined = np.arange(1, bands + 1, dtype=np.uint64)[None, :].repeat(n, axis=0)
        for j in range(rows):
            combined = mix64(combined * np.uint64(0x100000001B3) + values[:, :, j])
    return combined.view(np.int64)


def bucket_edges(keys: np.ndarray, signatures: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Edges (earlier key, later key) between the documents of one bucket whose signatures
    agree on at least `threshold` of their positions (the estimated Jaccard similarity).

    Documents are taken in key order; each is compared with the bucket's representatives so
    far (documents that matched none before them) and linked to the first it matches, else it
    becomes one. Union-find over the edges then gives the clusters; the result does not
    depend on the order rows reached the bucket."""
    order = np.argsort(keys, kind="stable")
    keys, signatures = keys[order], signatures[order]
    reps: list[int] = []
    edges = []
    for i in range(len(keys)):
        if reps:
            agreement = (signatures[reps] == signatures[i]).mean(axis=1)
            match = np.flatnonzero(agreement >= threshold)
            if len(match):
                edges.append((int(keys[reps[match[0]]]), int(keys[i])))
                continue
        reps.append(i)
    return edges


def clusters(a: np.ndarray, b: np.ndarray) -> dict[int, int]:
    """{removed key: kept key} from edges: union-find whose root is always the smallest key,
    so the kept document of a cluster is its lowest input position."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for x, y in zip(a.tolist(), b.tolist()):
        rx, ry = find(x), find(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    return {x: find(x) for x in list(parent) if find(x) != x}
