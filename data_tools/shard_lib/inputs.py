"""Input files for shard.py: the sorted file list (found by the data layer, formats.py), read
units (groups of whole files, byte ranges of large files, parquet row groups) and a unit read
into pieces of cleaned documents. The reading half runs in Ray tasks and returns errors as data.

Document order is the sorted absolute file paths, then order within a file; units and pieces
are consecutive slices of that order, so concatenating them in index order restores it.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections import Counter
from typing import Iterator

import numpy as np

from data_tools.shard_lib.clean import (NormalizedHasher, chunk_bounds, is_binary, is_empty,
                                        repair_utf8)
from pretrain.data.formats import (BadRecord, file_format, find_inputs, json_text, open_jsonl,
                                   parquet_row_groups, parquet_texts)

REJECT_REASONS = ("empty", "binary", "duplicate", "missing_text_key", "invalid_json")
# A blank line (whitespace containing two newlines) separates paragraphs in --txt-mode paragraph.
PARAGRAPH_SEP = re.compile(rb"\n[ \t\r\x0b\x0c\n]*\n")
_BLANK_LINE = re.compile(rb"\n[ \t\r\x0b\x0c]*\n")
_SCAN_BLOCK = 1 << 20


def resolve_inputs(patterns: list[str]) -> list[str]:
    """Absolute paths of every input file, sorted, each once."""
    return [os.path.abspath(path) for path in find_inputs(patterns)[0]]


# ---------------------------------------------------------------- planning

def _boundary(f, offset: int, size: int, paragraphs: bool) -> int:
    """First record start at or after `offset`: after a newline (JSONL) or a blank line."""
    f.seek(max(offset - 1, 0))
    position = f.tell()
    pattern = _BLANK_LINE if paragraphs else re.compile(rb"\n")
    while position < size:
        block = f.read(_SCAN_BLOCK)
        match = pattern.search(block)
        if match:
            return position + match.end()
        if position + len(block) >= size:
            break
        # Overlap so a separator cut by the block edge is still found (longer blank lines
        # are found further on: any blank line is a valid boundary).
        position += len(block) - 4096
        f.seek(position)
    return size


def _byte_ranges(path: str, size: int, unit_bytes: int, paragraphs: bool) -> list[tuple[int, int]]:
    if size <= unit_bytes:
        return [(0, size)]
    cuts = [0]
    with open(path, "rb") as f:
        while cuts[-1] < size:
            cuts.append(_boundary(f, max(cuts[-1] + unit_bytes, cuts[-1] + 1), size, paragraphs))
    return list(zip(cuts[:-1], cuts[1:]))


def _parquet_segments(path: str, base: dict, text_key: str) -> list[dict]:
    import pyarrow.parquet as pq

    segments, first_row = [], 0
    rows = parquet_row_groups(path, text_key)  # checks the file and its text column
    meta = pq.ParquetFile(path).metadata
    for group, num_rows in enumerate(rows):
        segments.append({**base, "row_group": group, "first_row": first_row,
                         "weight": max(int(meta.row_group(group).total_byte_size), 1)})
        first_row += num_rows
    return segments


def plan_units(files: list[str], txt_mode: str, text_key: str, unit_bytes: int) -> list[dict]:
    """Read units: lists of segments of about `unit_bytes` (one Ray read task each).

    Small files are grouped, large plain-text and JSONL files are cut at record boundaries,
    compressed files are read whole (streams cannot be split), parquet by row group."""
    segments = []
    for path in files:
        stat = os.stat(path)
        fmt = file_format(path)
        if fmt == "txt" and txt_mode == "paragraph":
            fmt = "paragraph"
        base = {"path": path, "fmt": fmt, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        if fmt == "parquet":
            segments.extend(_parquet_segments(path, base, text_key))
        elif fmt in ("jsonl", "paragraph"):
            for start, end in _byte_ranges(path, stat.st_size, unit_bytes, fmt == "paragraph"):
                segments.append({**base, "start": start, "end": end, "weight": max(end - start, 1)})
        else:
            segments.append({**base, "start": 0, "end": stat.st_size,
                             "weight": max(stat.st_size, 1)})
    units, current, weight = [], [], 0
    for segment in segments:
        if current and weight + segment["weight"] > unit_bytes:
            units.append(current)
            current, weight = [], 0
        current.append(segment)
        weight += segment["weight"]
    if current:
        units.append(current)
    return [{"index": i, "segments": unit} for i, unit in enumerate(units)]


# ---------------------------------------------------------------- reading (runs in Ray tasks)

class _Position:
    """How much of the current segment has been consumed, in the segment's weight units
    (drives the progress bar only)."""

    def __init__(self):
        self.done = 0


def _read_jsonl(segment: dict, text_key: str, position: _Position) -> Iterator:
    raw, stream = open_jsonl(segment["path"], segment["fmt"], segment["start"])
    compressed = stream is not raw
    offset, end = segment["start"], segment["end"]
    with raw, stream:
        for number, line in enumerate(stream, start=1):
            if compressed:
                position.done = raw.tell()
            else:
                offset += len(line)
                position.done = offset - segment["start"]
            if number == 1 and segment["start"] == 0 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]  # a UTF-8 byte-order mark is not JSON
            if line.strip():
                try:
                    item = json_text(line, text_key)
                except BadRecord as bad:
                    item = bad.reason, {"path": segment["path"], "line": number,
                                        "start": segment["start"], "detail": bad.detail}
                line = None  # a 100 MB line is not kept alive while its document is processed
                yield item
            if not compressed and offset >= end:
                break


def _read_txt(segment: dict, position: _Position) -> Iterator:
    with open(segment["path"], "rb") as f:
        data = f.read()
    position.done = segment["weight"]
    yield repair_utf8(data)


def _read_paragraphs(segment: dict, position: _Position) -> Iterator:
    with open(segment["path"], "rb") as f:
        f.seek(segment["start"])
        data = f.read(segment["end"] - segment["start"])
    position.done = segment["weight"]
    # Whitespace-only fragments only occur at the ends of a range (the separator swallows
    # every other blank run); they are not documents, so a range cut never changes the count.
    for paragraph in PARAGRAPH_SEP.split(data):
        paragraph = paragraph.strip()
        if paragraph:
            yield repair_utf8(paragraph)


def _read_parquet(segment: dict, text_key: str, position: _Position) -> Iterator:
    import pyarrow.parquet as pq

    total = max(pq.ParquetFile(segment["path"]).metadata.row_group(segment["row_group"]).num_rows, 1)
    row = segment["first_row"]
    for values in parquet_texts(segment["path"], text_key, segment["row_group"]):
        for value in values:
            row += 1
            if value is None:
                yield "missing_text_key", {"path": segment["path"], "row": row,
                                           "detail": f"null in column {text_key!r}"}
            else:
                yield repair_utf8(value)
        position.done = segment["weight"] * (row - segment["first_row"]) // total


def read_segment(segment: dict, text_key: str, position: _Position) -> Iterator:
    """Yield (utf8_bytes, repaired) per document, or (reason, location) per bad record."""
    fmt = segment["fmt"]
    if fmt == "txt":
        return _read_txt(segment, position)
    if fmt == "paragraph":
        return _read_paragraphs(segment, position)
    if fmt == "parquet":
        return _read_parquet(segment, text_key, position)
    return _read_jsonl(segment, text_key, position)


# Per-entry flags of a piece. An entry is a whole document (FIRST | LAST) or, for a document
# longer than a piece, one part of it: parts are consecutive runs of the document's encoding
# chunks (clean.chunk_bounds), so they tokenize exactly as the whole would, and a huge
# document is tokenized by several actors with bounded memory everywhere.
FIRST, LAST, GIVEN_DIGEST = 1, 2, 4
_NO_DIGEST = bytes(16)


class _PieceBuilder:
    """Collects documents into pieces of about `piece_bytes` of text (the unit of tokenization,
    caching and ordering downstream)."""

    def __init__(self, unit: int, piece_bytes: int, chunk_bytes: int):
        self.unit, self.piece_bytes, self.chunk_bytes, self.index = unit, piece_bytes, chunk_bytes, 0
        self.progress = 0  # weight units consumed, reported with each piece
        self._reset()

    def _reset(self):
        self.entries, self.repaired, self.flags, self.digests = [], [], [], []
        self.nbytes, self.read = 0, 0
        self.rejected, self.bad = Counter(), None

    def _entry(self, data: bytes, repaired: bool, flags: int, digest: bytes) -> None:
        self.entries.append(data)
        self.repaired.append(repaired)
        self.flags.append(flags)
        self.digests.append(digest)
        self.nbytes += len(data)

    def add(self, item) -> Iterator:
        """Take one reader item; yields the pieces it completes."""
        self.read += 1
        data, extra = item
        if isinstance(data, str):  # a bad record: (reason, location)
            self.rejected[data] += 1
            if self.bad is None:
                self.bad = {"reason": data, **extra}
            return
        if is_empty(data):
            self.rejected["empty"] += 1
            return
        if is_binary(data):
            self.rejected["binary"] += 1
            return
        if len(data) <= max(self.piece_bytes, self.chunk_bytes):
            self._entry(data, extra, FIRST | LAST, _NO_DIGEST)
            if self.nbytes >= self.piece_bytes:
                yield self.emit(last=False)
            return
        chunks = chunk_bounds(data, self.chunk_bytes)
        hasher = NormalizedHasher()  # the parts' actors cannot hash the whole document
        for a, b in chunks:
            hasher.update(data[a:b])
        digest = hasher.digest()
        start = 0
        for i, (_, end) in enumerate(chunks):
            final = i == len(chunks) - 1
            if final or end - start + (chunks[i + 1][1] - chunks[i + 1][0]) > self.piece_bytes:
                # A part of at most piece_bytes (at least one chunk), in a piece of its own
                # unless it fits beside what the piece holds.
                if self.nbytes and self.nbytes + end - start > self.piece_bytes:
                    yield self.emit(last=False)
                self._entry(data[start:end], extra,
                            (FIRST if start == 0 else 0) | (LAST if final else 0) | GIVEN_DIGEST, digest)
                start = end
        if self.nbytes >= self.piece_bytes:
            yield self.emit(last=False)

    def emit(self, last: bool, fatal: str = ""):
        import pyarrow as pa

        lens = np.fromiter((len(d) for d in self.entries), dtype=np.int64, count=len(self.entries))
        data = b"".join(self.entries)
        offsets = np.array([0, len(data)], dtype=np.int64)
        # Zero-copy: the text is not copied again on its way into Arrow.
        text = pa.LargeBinaryArray.from_buffers(pa.large_binary(), 1,
                                                [None, pa.py_buffer(offsets), pa.py_buffer(data)])
        table = pa.table({
            "unit": pa.array([self.unit], pa.int64()),
            "piece": pa.array([self.index], pa.int64()),
            "last": pa.array([last]),
            "data": text,
            "lens": pa.array([lens.tobytes()], pa.binary()),
            "repaired": pa.array([np.array(self.repaired, np.uint8).tobytes()], pa.binary()),
            "flags": pa.array([np.array(self.flags, np.uint8).tobytes()], pa.binary()),
            "given": pa.array([b"".join(self.digests)], pa.binary()),
            "read": pa.array([self.read], pa.int64()),
            "rejected": pa.array([json.dumps(dict(sorted(self.rejected.items())))]),
            "bad": pa.array([json.dumps(self.bad) if self.bad else ""]),
            "fatal": pa.array([fatal]),
            "progress": pa.array([self.progress], pa.int64()),
        })
        self.index += 1
        self.progress = 0
        self._reset()
        return table


def read_unit(unit: dict, text_key: str, piece_bytes: int, chunk_bytes: int) -> Iterator:
    """Pieces (one-row Arrow tables) of one read unit, in document order; the last has
    last=True. A file that cannot be read ends the unit with a piece whose `fatal` names it."""
    import pyarrow as pa

    builder = _PieceBuilder(unit["index"], piece_bytes, chunk_bytes)
    for segment in unit["segments"]:
        position = _Position()
        reported = 0
        try:
            for item in read_segment(segment, text_key, position):
                builder.progress += position.done - reported
                reported = position.done
                yield from builder.add(item)
        except (OSError, EOFError, zlib.error, ValueError, pa.ArrowException) as err:
            # zstandard.ZstdError is a ValueError; truncated gzip raises EOFError.
            yield builder.emit(last=True, fatal=f"{segment['path']}: cannot read "
                                                f"({type(err).__name__}: {err})")
            return
        builder.progress += segment["weight"] - reported
    yield builder.emit(last=True)


def read_batch(batch, text_key: str, piece_bytes: int, chunk_bytes: int) -> Iterator:
    """Ray map_batches UDF: a batch of unit descriptions (JSON) -> their pieces."""
    for spec in batch.column("unit").to_pylist():
        yield from read_unit(json.loads(spec), text_key, piece_bytes, chunk_bytes)
