"""Document cleaning on raw bytes: UTF-8 validation and repair, the 'binary' and 'empty' reject
rules, the normalized-text digest (dedup and train/val split) and chunking of long documents.

Everything works on UTF-8 bytes, not str: sentencepiece accepts bytes, and skipping the
bytes -> str -> bytes round trip keeps cleaning a small fraction of tokenization time.
"""

from __future__ import annotations

import codecs
import hashlib
from typing import Iterable

import numpy as np

# A document is rejected as 'binary' when more than this fraction of its characters are
# U+FFFD (invalid UTF-8 that was repaired, or already in the text) or NUL: random bytes decode
# to ~50% U+FFFD, UTF-16 text to ~50% NUL, while real text with a few bad bytes stays near 0.
BINARY_FRACTION = 0.30
_REPLACEMENT = "\ufffd".encode()
_CONTINUATION = bytes(range(0x80, 0xC0))  # UTF-8 continuation bytes: not the start of a character
_VALIDATE_BLOCK = 8 << 20  # validate huge documents in blocks so no full-size str is built
_SPACE = 0x20


def repair_utf8(raw: bytes) -> tuple[bytes, bool]:
    """(valid UTF-8 bytes, whether invalid sequences were replaced by U+FFFD)."""
    try:
        if len(raw) <= _VALIDATE_BLOCK:
            raw.decode("utf-8")
        else:
            decoder = codecs.getincrementaldecoder("utf-8")("strict")
            view = memoryview(raw)
            for start in range(0, len(raw), _VALIDATE_BLOCK):
                decoder.decode(view[start:start + _VALIDATE_BLOCK],
                               final=start + _VALIDATE_BLOCK >= len(raw))
        return raw, False
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace").encode("utf-8"), True


def is_empty(data: bytes) -> bool:
    return not data or data.isspace()


def is_binary(data: bytes) -> bool:
    bad = data.count(_REPLACEMENT) + data.count(b"\x00")
    if not bad:
        return False
    characters = len(data.translate(None, _CONTINUATION))
    return bad > BINARY_FRACTION * characters


def is_binary_file(path) -> bool:
    """is_binary over a whole file, read in blocks (invalid UTF-8 repaired as U+FFFD)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    bad = characters = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_VALIDATE_BLOCK)
            text = decoder.decode(block, final=not block).encode("utf-8")
            bad += text.count(_REPLACEMENT) + text.count(b"\x00")
            characters += len(text.translate(None, _CONTINUATION))
            if not block:
                return bool(bad) and bad > BINARY_FRACTION * characters


def chunk_bounds(doc, limit: int) -> list[tuple[int, int]]:
    """Split points that keep every chunk <= limit bytes, for encoding a long document in pieces
    (`doc`: bytes or a uint8 array, so an Arrow buffer needs no copy).

    A chunk ends where a run of spaces begins: with the project's tokenizer settings
    (split_by_whitespace, identity normalization, no dummy prefix) sentencepiece never merges
    across that point, so encoding the chunks and concatenating the ids gives the same ids as
    encoding the whole document. Only a stretch of limit/2 bytes without a space (a huge
    base64 line) is cut at a plain character boundary, where the ids can differ from a
    whole-document encoding: the documented approximation. The cuts are greedy from the start,
    so the chunks of any suffix starting at a cut are the remaining chunks of the whole.
    """
    buf = doc if isinstance(doc, np.ndarray) else np.frombuffer(doc, dtype=np.uint8)
    n = len(buf)
    if n <= limit:
        return [(0, n)]
    bounds, start = [], 0
    while n - start > limit:
        hi = start + limit
        cut = -1
        window = buf[start + limit // 2:hi][::-1]
        last = int(np.argmax(window == _SPACE)) if len(window) else 0
        if len(window) and window[last] == _SPACE:
            space = hi - 1 - last
            before = buf[start:space][::-1]  # back to the first space of that run
            run = int(np.argmax(before != _SPACE))
            if before[run] != _SPACE:
                cut = space - run
        if cut < 0:
            cut = hi
            while cut > start + 1 and 0x80 <= buf[cut] < 0xC0:  # not inside a character
                cut -= 1
        bounds.append((start, cut))
        start = cut
    bounds.append((start, n))
    return bounds


class NormalizedHasher:
    """16-byte blake2b of the normalized text: ASCII whitespace runs collapsed to one space,
    leading and trailing whitespace dropped. Fed consecutive slices of one document (see
    chunk_bounds), the digest equals that of the whole document fed at once."""

    def __init__(self):
        self._hash = hashlib.blake2b(digest_size=16)
        self._emitted = False  # a word has been hashed
        self._open_word = False  # the previous slice ended inside a word

    def update(self, chunk: bytes) -> None:
        if not chunk:
            return
        words = chunk.split()
        if words:
            # A word cut by a slice boundary continues without a separator.
            if self._emitted and not (self._open_word and not chunk[:1].isspace()):
                self._hash.update(b" ")
            self._hash.update(b" ".join(words))
            self._emitted = True
        self._open_word = not chunk[-1:].isspace()

    def digest(self) -> bytes:
        return self._hash.digest()


def normalized_digest(chunks: Iterable[bytes]) -> bytes:
    hasher = NormalizedHasher()
    for chunk in chunks:
        hasher.update(chunk)
    return hasher.digest()
