"""Input files: expand paths, directories and globs into a sorted file list, plan read units
(groups of whole files, byte ranges of large files, parquet row groups) and read a unit into
pieces of cleaned documents. The reading half runs in Ray tasks and returns errors as data.

Document order is the sorted absolute file paths, then order within a file; units and pieces
are consecutive slices of that order, so concatenating them in index order restores it.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
import zlib
from collections import Counter
from typing import Iterator

import numpy as np

from data_tools.shard_lib.clean import (NormalizedHasher, chunk_bounds, is_binary, is_empty,
                                        repair_utf8)
from data_tools.shard_lib.errors import ShardError

# Longest suffix first: `x.jsonl.gz` must not match `.jsonl`.
FORMATS = {".jsonl.gz": "jsonl.gz", ".jsonl.zst": "jsonl.zst", ".jsonl": "jsonl",
           ".parquet": "parquet", ".txt": "txt"}
SUPPORTED = ", ".join(sorted(FORMATS, key=len))
REJECT_REASONS = ("empty", "binary", "duplicate", "missing_text_key", "invalid_json")
# A blank line (whitespace containing two newlines) separates paragraphs in --txt-mode paragraph.
PARAGRAPH_SEP = re.compile(rb"\n[ \t\r\x0b\x0c\n]*\n")
_BLANK_LINE = re.compile(rb"\n[ \t\r\x0b\x0c]*\n")
_SCAN_BLOCK = 1 << 20
_SURROGATE = re.compile("[\ud800-\udfff]")


def file_format(path: str) -> str | None:
    name = path.lower()
    for suffix, fmt in FORMATS.items():
        if name.endswith(suffix):
            return fmt
    return None


def _walk(directory: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(directory, followlinks=True):
        # Hidden entries are skipped: .git, and a shard directory's .work cache.
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(root, f) for f in files
                     if not f.startswith(".") and file_format(f) is not None)
    return found


def _checked_file(path: str, origin: str) -> str:
    if file_format(path) is None:
        raise ShardError(f"{path}: unsupported file type (from --input {origin}); supported: "
                         f"{SUPPORTED}")
    return path


def resolve_inputs(patterns: list[str]) -> list[str]:
    """Absolute paths of every input file, sorted, each once."""
    files: dict[str, str] = {}  # realpath -> absolute path as named
    for pattern in patterns:
        if os.path.isdir(pattern):
            matches = _walk(pattern)
            if not matches:
                raise ShardError(f"--input {pattern}: directory has no files of a supported type "
                                 f"({SUPPORTED})")
        elif os.path.isfile(pattern):
            matches = [_checked_file(pattern, pattern)]
        elif glob.has_magic(pattern):
            matches = []
            for match in sorted(glob.glob(pattern, recursive=True)):
                matches.extend(_walk(match) if os.path.isdir(match) else [_checked_file(match, pattern)])
            if not matches:
                raise ShardError(f"--input {pattern}: the pattern matches no files of a supported "
                                 f"type ({SUPPORTED})")
        else:
            raise ShardError(f"--input {pattern}: no such file or directory")
        for match in matches:
            files.setdefault(os.path.realpath(match), os.path.abspath(match))
    return sorted(set(files.values()))


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
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as err:
        raise ShardError(f"{path}: not a readable parquet file ({err})") from None
    if text_key not in schema.names:
        raise ShardError(f"{path}: no column {text_key!r} (columns: {', '.join(schema.names)}); "
                         f"pass --text-key with the column that holds the text")
    kind = schema.field(text_key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind) or str(kind) in ("string_view", "binary_view")):
        raise ShardError(f"{path}: column {text_key!r} has type {kind}, not string; pass "
                         f"--text-key with the column that holds the text")
    segments, first_row = [], 0
    for group in range(meta.num_row_groups):
        info = meta.row_group(group)
        segments.append({**base, "row_group": group, "first_row": first_row,
                         "weight": max(int(info.total_byte_size), 1)})
        first_row += info.num_rows
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

class _BadRecord(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _Position:
    """How much of the current segment has been consumed, in the segment's weight units
    (drives the progress bar only)."""

    def __init__(self):
        self.done = 0


def _json_text(line: bytes, text_key: str) -> tuple[bytes, bool]:
    repaired = False
    try:
        try:
            record = json.loads(line)
        except UnicodeDecodeError:
            record = json.loads(line.decode("utf-8", "replace"))
            repaired = True
    except (json.JSONDecodeError, RecursionError, UnicodeDecodeError) as err:
        raise _BadRecord("invalid_json", f"not valid JSON ({getattr(err, 'msg', err)})") from None
    if not isinstance(record, dict):
        raise _BadRecord("invalid_json", f"a JSON {type(record).__name__}, not an object")
    text = record.get(text_key)
    if not isinstance(text, str):
        keys = ", ".join(list(record)[:10]) or "none"
        what = "no field" if text_key not in record else f"a {type(text).__name__} field"
        raise _BadRecord("missing_text_key", f"{what} {text_key!r} (keys: {keys})")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from \ud800-style escapes: one U+FFFD each
        data = _SURROGATE.sub("\ufffd", text).encode("utf-8")
        repaired = True
    return data, repaired


def _open_stream(segment: dict):
    fmt = segment["fmt"]
    if fmt == "jsonl.gz":
        raw = open(segment["path"], "rb")
        return raw, gzip.GzipFile(fileobj=raw, mode="rb")
    if fmt == "jsonl.zst":
        import zstandard

        raw = open(segment["path"], "rb")
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return raw, io.BufferedReader(reader, 1 << 20)
    raw = open(segment["path"], "rb", buffering=1 << 20)
    raw.seek(segment["start"])
    return raw, raw


def _read_jsonl(segment: dict, text_key: str, position: _Position) -> Iterator:
    raw, stream = _open_stream(segment)
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
                    item = _json_text(line, text_key)
                except _BadRecord as bad:
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
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(segment["path"])
    total = max(parquet.metadata.row_group(segment["row_group"]).num_rows, 1)
    row = segment["first_row"]
    for batch in parquet.iter_batches(batch_size=1024, row_groups=[segment["row_group"]],
                                      columns=[text_key]):
        column = batch.column(0)
        if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
            column = column.cast(pa.large_binary())  # no UTF-8 trust: repaired like any file
        for value in column.to_pylist():
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
