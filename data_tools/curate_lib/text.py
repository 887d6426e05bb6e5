"""Words and word n-gram hashes, shared by near-dedup, decontamination and the repetition rules.

Hashes are stable across processes and machines (blake2b of each distinct word, then a
vectorized polynomial combine and a splitmix64 finish per n-gram): Python's own hash() is
salted per process, and the output must not depend on which worker saw a document.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

# Lower-cased runs of letters and digits: punctuation and case do not make two texts differ.
_WORD = re.compile(r"\w+")
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


def shingle_words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def word_hashes(words: list[str]) -> np.ndarray:
    """uint64 hash of every word, hashing each distinct word once."""
    if not words:
        return np.empty(0, dtype=np.uint64)
    unique, inverse = np.unique(np.array(words, dtype=object).astype(str), return_inverse=True)
    table = np.frombuffer(b"".join(hashlib.blake2b(w.encode("utf-8", "surrogatepass"),
                                                   digest_size=8).digest() for w in unique.tolist()),
                          dtype="<u8")
    return table[inverse.reshape(-1)]


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise (uint64 arithmetic wraps, as intended)."""
    x = x.copy()
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """uint64 hash of every run of n consecutive words (len(hashes) - n + 1 of them; none when
    the text is shorter than n words)."""
    count = len(hashes) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        combined = hashes[:count].copy()
        for j in range(1, n):  # n is small: a loop over positions, vectorized over n-grams
            combined = combined * _MULTIPLIER + hashes[j:j + count]
        return mix64(combined)
