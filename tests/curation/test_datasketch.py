"""Agreement with datasketch (a test-only dependency, used as an oracle, not as code): the
bands/rows our threshold gives are the ones datasketch's MinHashLSH picks with the same
false-positive/false-negative weights, and our signatures estimate the same Jaccard
similarities as datasketch's MinHash over the same shingles."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from data_tools.curate_lib.minhash import choose_bands, permutations, shingles, signature

datasketch = pytest.importorskip("datasketch")


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9])
@pytest.mark.parametrize("num_perm", [64, 128, 256])
def test_bands_and_rows_match_datasketch(threshold, num_perm):
    lsh = datasketch.MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
    assert choose_bands(threshold, num_perm) == (lsh.b, lsh.r)


def test_jaccard_estimates_agree_with_datasketch():
    rng = random.Random(5)
    seeds = permutations(256, seed=9)
    differences = []
    for _ in range(30):
        base = [f"w{rng.randrange(3000)}" for _ in range(200)]
        other = list(base)
        for i in rng.sample(range(len(other)), rng.randrange(0, 40)):
            other[i] = f"x{rng.randrange(10 ** 6)}"
        texts = [" ".join(base), " ".join(other)]
        ours = (signature(shingles(texts[0], 5), seeds) == signature(shingles(texts[1], 5), seeds)).mean()
        theirs = []
        for text in texts:
            words = re.findall(r"\w+", text.lower())
            sketch = datasketch.MinHash(num_perm=256, seed=1)
            sketch.update_batch([" ".join(words[i:i + 5]).encode() for i in range(len(words) - 4)])
            theirs.append(sketch)
        differences.append(ours - theirs[0].jaccard(theirs[1]))
    differences = np.abs(differences)
    # Two independent 256-position estimates: the difference's standard error is <= 0.044.
    assert differences.mean() < 0.035 and differences.max() < 0.12, differences
