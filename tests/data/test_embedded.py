"""The embedded corpus: deterministic, byte-exact, one EOD per document."""

from __future__ import annotations

import numpy as np

from pretrain.data.embedded import EOD_ID, embedded_tokens, stdlib_files

MAX_BYTES = 300_000


def test_embedded_tokens_deterministic():
    embedded_tokens.cache_clear()
    tokens_1, sha_1 = embedded_tokens(MAX_BYTES)
    embedded_tokens.cache_clear()
    tokens_2, sha_2 = embedded_tokens(MAX_BYTES)
    assert tokens_1 is not tokens_2
    assert sha_1 == sha_2 and len(sha_1) == 64
    assert np.array_equal(tokens_1, tokens_2)


def test_embedded_tokens_content():
    tokens, _ = embedded_tokens(MAX_BYTES)
    files = stdlib_files(MAX_BYTES)
    assert tokens.dtype == np.uint16
    assert int(tokens.max()) == EOD_ID == 256
    # one EOD after each document, and the documents are the files' bytes
    assert int((tokens == EOD_ID).sum()) == len(files)
    first = files[0].read_bytes()
    assert np.array_equal(tokens[:len(first)], np.frombuffer(first, dtype=np.uint8))
    assert tokens[len(first)] == EOD_ID
    assert len(tokens) == sum(f.stat().st_size for f in files) + len(files)
    assert sum(f.stat().st_size for f in files) >= MAX_BYTES


def test_embedded_tokens_size_changes_the_sha():
    _, small = embedded_tokens(MAX_BYTES)
    _, large = embedded_tokens(2 * MAX_BYTES)
    assert small != large
