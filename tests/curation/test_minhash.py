"""MinHash, LSH banding and clustering (data_tools/curate_lib/minhash.py):
signatures estimate Jaccard similarity, bands/rows follow from the threshold, candidates are
verified, clusters keep their lowest position whatever order the edges come in."""

from __future__ import annotations

import random
import re

import numpy as np

from data_tools.curate_lib.minhash import (band_buckets, bucket_edges, choose_bands, clusters,
                                           permutations, shingles, signature)


def word_ngrams(text: str, n: int) -> set:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: str, b: str, n: int = 5) -> float:
    x, y = word_ngrams(a, n), word_ngrams(b, n)
    return len(x & y) / len(x | y)


def mutate(words: list[str], k: int, rng: random.Random) -> list[str]:
    out = list(words)
    for i in rng.sample(range(len(out)), k):
        out[i] = f"new{rng.randrange(10 ** 9)}"
    return out


def test_signature_agreement_estimates_jaccard():
    rng = random.Random(0)
    seeds = permutations(256, seed=3)
    errors = []
    for _ in range(60):
        base = [f"w{rng.randrange(5000)}" for _ in range(200)]
        other = mutate(base, rng.randrange(0, 40), rng)
        text_a, text_b = " ".join(base), " ".join(other)
        estimate = (signature(shingles(text_a, 5), seeds) == signature(shingles(text_b, 5), seeds)).mean()
        errors.append(estimate - jaccard(text_a, text_b))
    errors = np.array(errors)
    # 256 independent positions: standard error <= 0.031; a correlated family (a linear hash
    # that barely wraps its prime) measured a mean absolute error of 0.057 here.
    assert abs(errors.mean()) < 0.015 and np.abs(errors).mean() < 0.03, errors
    assert np.abs(errors).max() < 0.09, errors


def test_shingles_ignore_case_and_punctuation_and_handle_short_texts():
    assert np.array_equal(shingles("The cat, sat on the mat!", 5), shingles("the cat sat on THE mat", 5))
    assert len(shingles("two words", 5)) == 1  # shorter than n: the whole text is one shingle
    assert len(shingles("... !!!", 5)) == 0
    assert signature(shingles("", 5), permutations(8, 1)) is None


def test_bands_and_rows_follow_the_threshold():
    bands, rows = choose_bands(0.8, 128)
    assert bands * rows <= 128
    caught = lambda j: 1 - (1 - j ** rows) ** bands  # noqa: E731
    assert caught(0.85) > 0.95 and caught(0.5) < 0.05, (bands, rows)
    low_bands, low_rows = choose_bands(0.5, 128)
    assert (1 / low_bands) ** (1 / low_rows) < (1 / bands) ** (1 / rows)  # the curve moves left


def test_band_buckets_match_equal_bands_only_at_the_same_band():
    sig = np.arange(12, dtype=np.uint32).reshape(1, 12)
    same_first = sig.copy()
    same_first[0, 4:] += 100
    swapped = np.concatenate([sig[:, 4:8], sig[:, :4], sig[:, 8:]], axis=1)
    buckets = band_buckets(np.concatenate([sig, same_first, swapped]), bands=3, rows=4)
    assert buckets.shape == (3, 3) and buckets.dtype == np.int64
    assert buckets[0, 0] == buckets[1, 0] and buckets[0, 1] != buckets[1, 1]
    assert buckets[2, 1] != buckets[0, 0]  # band 0's values in band 1: another bucket


def test_bucket_edges_verify_candidates_and_ignore_row_order():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2 ** 32, size=100, dtype=np.uint64).astype(np.uint32)
    close = base.copy()
    close[:15] += 1  # agreement 0.85
    far = base.copy()
    far[:30] += 1  # agreement 0.70
    keys = np.array([7, 3, 9])
    sigs = np.stack([close, base, far])
    assert bucket_edges(keys, sigs, 0.8) == [(3, 7)]
    order = [2, 0, 1]
    assert bucket_edges(keys[order], sigs[order], 0.8) == [(3, 7)]
    assert sorted(bucket_edges(keys, sigs, 0.6)) == [(3, 7), (3, 9)]


def test_clusters_keep_the_lowest_key_whatever_the_edge_order():
    a = np.array([5, 2, 9, 4, 20])
    b = np.array([9, 5, 12, 6, 21])
    expected = {5: 2, 9: 2, 12: 2, 6: 4, 21: 20}
    assert clusters(a, b) == expected
    assert clusters(b[::-1], a[::-1]) == expected
    assert clusters(np.empty(0, np.int64), np.empty(0, np.int64)) == {}
