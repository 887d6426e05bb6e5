"""Documents of one read unit (shard.py's units: groups of small files, byte ranges of large
JSONL files, parquet row groups), with their record `id` where the input has one (a JSONL
field or a parquet column named `id`).

Runs inside Ray tasks; a bad record or an unreadable file comes back as data (an error
line for the driver), never as a worker traceback.
"""

from __future__ import annotations

import json
import zlib
from typing import Iterator

from data_tools.shard_lib.clean import is_binary, is_empty
from data_tools.shard_lib.inputs import _Position, read_segment
from pretrain.data.formats import BadRecord, json_text, open_jsonl


class UnitError(Exception):
    """A record or file the run cannot continue past; `bad` is shard.py's record location."""

    def __init__(self, message: str, bad: dict | None = None):
        super().__init__(message)
        self.bad = bad


def _record_id(line: bytes):
    """The record's `id` as JSON text ('' when it has none)."""
    if b'"id"' not in line:
        return ""
    record = json.loads(line)
    return json.dumps(record["id"], ensure_ascii=False) if "id" in record else ""


def _jsonl(segment: dict, text_key: str) -> Iterator:
    raw, stream = open_jsonl(segment["path"], segment["fmt"], segment["start"])
    compressed = stream is not raw
    offset, end = segment["start"], segment["end"]
    with raw, stream:
        for number, line in enumerate(stream, start=1):
            offset += len(line)
            if number == 1 and segment["start"] == 0 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if line.strip():
                try:
                    data, _repaired = json_text(line, text_key)
                except BadRecord as bad:
                    yield bad.reason, {"path": segment["path"], "line": number,
                                       "start": segment["start"], "detail": bad.detail,
                                       "reason": bad.reason}
                else:
                    yield data, _record_id(line)
            if not compressed and offset >= end:
                break


def _parquet_ids(segment: dict, text_key: str) -> Iterator[str]:
    """The row group's `id` column as JSON texts ('' for a null, or every row when the file
    has no such column), in row order."""
    import itertools

    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(segment["path"])
    if "id" not in parquet.schema_arrow.names or text_key == "id":
        return itertools.repeat("")
    ids = parquet.read_row_group(segment["row_group"], columns=["id"]).column(0).to_pylist()
    return ("" if v is None else json.dumps(v, ensure_ascii=False, default=str) for v in ids)


def unit_documents(unit: dict, text_key: str) -> Iterator[tuple[int, bytes, str, str]]:
    """(file path, UTF-8 text, id JSON or '', reject reason or '') per record, in order.
    Raises UnitError for a bad record or an unreadable file."""
    import pyarrow as pa

    for segment in unit["segments"]:
        try:
            if segment["fmt"] in ("jsonl", "jsonl.gz", "jsonl.zst"):
                items = _jsonl(segment, text_key)
            elif segment["fmt"] == "parquet":
                texts = read_segment(segment, text_key, _Position())
                items = ((data, id_json) for (data, _), id_json in
                         zip(texts, _parquet_ids(segment, text_key)))
            else:
                items = ((data, "") for data, _repaired in
                         read_segment(segment, text_key, _Position()))
            for data, extra in items:
                if isinstance(data, str):  # a bad record: (reason, location)
                    raise UnitError(extra["detail"], {**extra, "reason": data})
                reason = "empty" if is_empty(data) else "binary" if is_binary(data) else ""
                yield segment["path"], data, extra, reason
        except (OSError, EOFError, zlib.error, ValueError, pa.ArrowException) as err:
            raise UnitError(f"{segment['path']}: cannot read ({type(err).__name__}: "
                            f"{err})") from None
