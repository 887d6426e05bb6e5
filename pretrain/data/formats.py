"""The data layer's formats, defined once for the writers (data_tools/) and the readers
(pretrain/data/): raw input files and the shard dataset (the tokenizer and its card are in
tokenizers.py).

Raw inputs: `find_inputs` expands files, directories and globs; `open_jsonl` / `decompress`
and `parquet_texts` read every format; `json_text` takes one JSONL record apart. Shards:
names, format version and the manifest's fields with the checks every reader makes
(docs/formats.md).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
from pathlib import Path

from pretrain.errors import DataError


# ---------------------------------------------------------------- raw inputs

# Longest suffix first: `x.jsonl.gz` must not match `.jsonl`.
INPUT_FORMATS = {".jsonl.gz": "jsonl.gz", ".jsonl.zst": "jsonl.zst", ".jsonl": "jsonl",
                 ".parquet": "parquet", ".txt": "txt"}
SUPPORTED_INPUTS = ", ".join(sorted(INPUT_FORMATS, key=len))
_SURROGATE = re.compile("[\ud800-\udfff]")


def file_format(path: str | Path) -> str | None:
    name = str(path).lower()
    for suffix, fmt in INPUT_FORMATS.items():
        if name.endswith(suffix):
            return fmt
    return None


def _walk(directory: str) -> tuple[list[str], int]:
    """Input files below a directory, and how many other (non-hidden) files were skipped."""
    found, skipped = [], 0
    for root, dirs, files in os.walk(directory, followlinks=True):
        # Hidden entries are skipped: .git, and a shard directory's .work cache.
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            if file_format(name) is None:
                skipped += 1
            else:
                found.append(os.path.join(root, name))
    return found, skipped


def _checked_file(path: str, origin: str) -> str:
    if file_format(path) is None:
        raise DataError(f"{path}: unsupported file type (from --input {origin}); supported: "
                        f"{SUPPORTED_INPUTS}")
    return path


def find_inputs(patterns: list[str]) -> tuple[list[str], int]:
    """Every input file once, as named, sorted by absolute path (so the order never depends on
    the order of the patterns), and how many files in directories were skipped for their type.
    Directories are searched recursively (hidden entries skipped), globs expanded."""
    files: dict[str, str] = {}  # realpath -> path as named
    skipped = 0
    for pattern in patterns:
        if os.path.isdir(pattern):
            matches, other = _walk(pattern)
            skipped += other
            if not matches:
                raise DataError(f"--input {pattern}: directory has no files of a supported type "
                                f"({SUPPORTED_INPUTS})")
        elif os.path.isfile(pattern):
            matches = [_checked_file(pattern, pattern)]
        elif glob.has_magic(pattern):
            matches = []
            for match in sorted(glob.glob(pattern, recursive=True)):
                if os.path.isdir(match):
                    found, other = _walk(match)
                    matches.extend(found)
                    skipped += other
                else:
                    matches.append(_checked_file(match, pattern))
            if not matches:
                raise DataError(f"--input {pattern}: the pattern matches no files of a supported "
                                f"type ({SUPPORTED_INPUTS})")
        else:
            raise DataError(f"--input {pattern}: no such file or directory")
        for match in matches:
            files.setdefault(os.path.realpath(match), match)
    return sorted(files.values(), key=os.path.abspath), skipped


def decompress(raw, fmt: str):
    """A binary stream of JSONL lines over an open file of format `fmt`."""
    if fmt == "jsonl.gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if fmt == "jsonl.zst":
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return io.BufferedReader(reader, 1 << 20)
    return raw


def open_jsonl(path: str, fmt: str, start: int = 0):
    """(raw file, line stream) of a .jsonl(.gz/.zst); a plain file is positioned at `start`
    (compressed streams cannot be split, so they are read from their first byte)."""
    if fmt in ("jsonl.gz", "jsonl.zst"):
        raw = open(path, "rb")
        return raw, decompress(raw, fmt)
    raw = open(path, "rb", buffering=1 << 20)
    raw.seek(start)
    return raw, raw


class BadRecord(Exception):
    """A JSONL record without usable text; `reason` is the manifest's reject counter."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def json_text(line: bytes, text_key: str) -> tuple[bytes, bool]:
    """(UTF-8 text of the record's `text_key`, whether invalid UTF-8 was replaced)."""
    repaired = False
    try:
        try:
            record = json.loads(line)
        except UnicodeDecodeError:
            record = json.loads(line.decode("utf-8", "replace"))
            repaired = True
    except (json.JSONDecodeError, RecursionError, UnicodeDecodeError) as err:
        raise BadRecord("invalid_json", f"not valid JSON ({getattr(err, 'msg', err)})") from None
    if not isinstance(record, dict):
        raise BadRecord("invalid_json", f"a JSON {type(record).__name__}, not an object")
    text = record.get(text_key)
    if not isinstance(text, str):
        keys = ", ".join(list(record)[:10]) or "none"
        what = "no field" if text_key not in record else f"a {type(text).__name__} field"
        raise BadRecord("missing_text_key", f"{what} {text_key!r} (keys: {keys})")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from \ud800-style escapes: one U+FFFD each
        data = _SURROGATE.sub("\ufffd", text).encode("utf-8")
        repaired = True
    return data, repaired


def parquet_row_groups(path: str, text_key: str) -> list[int]:
    """Rows per row group of a parquet file whose `text_key` column holds text (else one line)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{path}: not a readable parquet file ({err})") from None
    if text_key not in schema.names:
        raise DataError(f"{path}: no column {text_key!r} (columns: {', '.join(schema.names)}); "
                        f"pass --text-key with the column that holds the text")
    kind = schema.field(text_key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind) or str(kind) in ("string_view", "binary_view")):
        raise DataError(f"{path}: column {text_key!r} has type {kind}, not string; pass "
                        f"--text-key with the column that holds the text")
    return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]


def parquet_texts(path: str, text_key: str, row_group: int | None = None):
    """Batches (lists) of the column's raw bytes (None for a null), in row order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    groups = None if row_group is None else [row_group]
    for batch in parquet.iter_batches(batch_size=1024, row_groups=groups, columns=[text_key]):
        column = batch.column(0)
        if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
            column = column.cast(pa.large_binary())  # no UTF-8 trust: repaired like any file
        yield column.to_pylist()


# ---------------------------------------------------------------- shards and manifest

FORMAT = "pretrain-shards"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
RESHARD = "re-run data_tools/shard.py to regenerate it"
# The only shard names shard.py writes. A manifest is data from outside (a bucket, a copy):
# a name is checked against this before it becomes part of a path or a `pipe:` command.
SHARD_NAME_RE = re.compile(r"^(train|val)-(\d{6})\.tar$")
REQUIRED_FIELDS = ("seq_len", "token_dtype", "eod_id", "tokenizer", "splits")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def build_manifest(*, seq_len: int, token_dtype: str, eod_id: int, tokenizer: dict, splits: dict,
                   documents: dict, tokens_dropped_tail: dict, settings: dict, inputs: list) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "seq_len": seq_len,
            "token_dtype": token_dtype, "eod_id": eod_id, "tokenizer": tokenizer,
            "splits": splits, "documents": documents, "tokens_dropped_tail": tokens_dropped_tail,
            "settings": settings, "inputs": inputs}


def dumps_manifest(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2) + "\n").encode()


def parse_manifest(data: bytes, where: str) -> dict:
    """The manifest in `data` (read from `where`), after the checks every reader makes:
    JSON, format, a version this code reads, the required fields."""
    try:
        manifest = json.loads(data)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise DataError(f"{where}: not valid JSON ({err}); {RESHARD}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{where}: not a shard manifest (format {found!r}, expected "
                        f"{FORMAT!r}); {RESHARD}")
    version = manifest.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise DataError(f"{where}: format_version {version!r} is not supported by this reader "
                        f"(supports {', '.join(map(str, SUPPORTED_VERSIONS))}); {RESHARD} or "
                        f"upgrade pretrain")
    for field in REQUIRED_FIELDS:
        if field not in manifest:
            raise DataError(f"{where}: field {field} is missing; {RESHARD}")
    return manifest


def read_manifest(directory: str | Path) -> dict:
    """The checked manifest of a local dataset directory."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path} does not exist: {directory} is not a finished dataset; {RESHARD}")
    return parse_manifest(path.read_bytes(), str(path))


def check_shard_names(shards: list, split: str, where: str) -> None:
    """Every listed shard has a name shard.py writes for this split (a name reaches paths and
    shell commands)."""
    for i, meta in enumerate(shards):
        name = meta.get("name") if isinstance(meta, dict) else None
        if not isinstance(name, str) or not SHARD_NAME_RE.match(name) \
                or not name.startswith(split + "-"):
            raise DataError(f"{where}: splits.{split}.shards[{i}].name={name!r} is not a "
                            f"{split}-NNNNNN.tar shard name; the manifest is damaged or not from "
                            f"shard.py, {RESHARD}")
