"""The data layer's formats, defined once for the writers (data_tools/) and the readers
(pretrain/data/): raw input files, the tokenizer with its card, and the shard dataset.

Raw inputs: `find_inputs` expands files, directories and globs; `open_jsonl` / `decompress`
and `parquet_texts` read every format; `json_text` takes one JSONL record apart. Tokenizer:
`open_tokenizer` (sentencepiece or Hugging Face tokenizer.json, hash-checked), `load_tokenizer`
(plus the card PREFIX.json train_tokenizer.py writes). Shards: names, format version and the
manifest's fields with the checks every reader makes (docs/formats.md).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
from pathlib import Path

from pretrain.files import file_sha256


class DataError(RuntimeError):
    """A dataset, tokenizer or input problem, naming the file and what to do about it."""


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


# ---------------------------------------------------------------- tokenizer

CARD_FORMAT = "pretrain-tokenizer"
CARD_VERSION = 1
# Fixed for every tokenizer this project trains; shard.py appends eos after each document.
SPECIAL_IDS = {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
RETRAIN = "re-run data_tools/train_tokenizer.py"


class TokenizerError(DataError):
    """A tokenizer problem, stated as one line: the file, what is wrong and the fix."""


def is_hf_tokenizer(path: str | Path) -> bool:
    """A Hugging Face `tokenizer.json` (tokenizers library) rather than a sentencepiece model."""
    return str(path).endswith(".json")


def card_path(model_path: str | Path) -> Path:
    """PREFIX.model -> PREFIX.json (the card lies next to the model)."""
    return Path(model_path).with_suffix(".json")


def read_card(model_path: str | Path) -> dict | None:
    """The card of a model, or None when the model has none (e.g. a model trained elsewhere)."""
    path = card_path(model_path)
    if is_hf_tokenizer(model_path) or not path.is_file():
        return None
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokenizerError(f"{path}: not a valid JSON tokenizer card ({err}); {RETRAIN}") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise TokenizerError(f"{path}: format is {card.get('format') if isinstance(card, dict) else None!r}, "
                             f"expected {CARD_FORMAT!r}; {RETRAIN}")
    if card.get("format_version") != CARD_VERSION:
        raise TokenizerError(f"{path}: format_version {card.get('format_version')!r} is not one this "
                             f"code reads ({CARD_VERSION}); {RETRAIN}")
    return card


def open_tokenizer(path: str | Path, sha256: str | None = None, data: bytes | None = None):
    """A sentencepiece processor (single-threaded) or an `HFTokenizer` for a tokenizer.json,
    read once from `data` or the file; with `sha256`, the bytes must hash to it."""
    import hashlib

    import sentencepiece as spm  # here, so that importing this module stays cheap

    path = Path(path)
    if data is None:
        if not path.is_file():
            raise TokenizerError(f"tokenizer {path}: no such file; pass the PREFIX.model written "
                                 f"by data_tools/train_tokenizer.py (or a Hugging Face tokenizer.json)")
        data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise TokenizerError(f"tokenizer {path} (sha256 {hashlib.sha256(data).hexdigest()[:12]}) "
                             f"is not the one expected ({sha256[:12]})")
    if is_hf_tokenizer(path):
        return HFTokenizer(path, data)
    try:
        return spm.SentencePieceProcessor(model_proto=data, num_threads=1)
    except (RuntimeError, OSError, TypeError) as err:
        raise TokenizerError(f"{path}: not a sentencepiece model ({err}); pass the PREFIX.model "
                             f"written by data_tools/train_tokenizer.py") from None


def load_tokenizer(model_path: str | Path):
    """Load a tokenizer and its card; returns (processor, card or None, sha256).

    With a card, the model's sha256 and special ids must match it: a card left over from an
    earlier model (or a model copied over another) would otherwise go unnoticed until the
    token ids of a dataset stopped meaning what its manifest says.
    """
    model_path = Path(model_path)
    if not model_path.is_file():
        raise TokenizerError(f"tokenizer model {model_path} does not exist; pass the PREFIX.model "
                             f"written by data_tools/train_tokenizer.py")
    sha256 = file_sha256(model_path)
    card = read_card(model_path)
    processor = open_tokenizer(model_path)
    if card is not None:
        if card.get("sha256") != sha256:
            raise TokenizerError(f"{card_path(model_path)}: sha256 {card.get('sha256')} does not match "
                                 f"{model_path} ({sha256}); the card belongs to another model, {RETRAIN}")
        actual = {"pad": processor.pad_id(), "unk": processor.unk_id(),
                  "bos": processor.bos_id(), "eos": processor.eos_id()}
        if card.get("special_ids") != actual:
            raise TokenizerError(f"{model_path}: special ids {actual} differ from the card's "
                                 f"{card.get('special_ids')}; {RETRAIN}")
        if card.get("vocab_size") != processor.get_piece_size():
            raise TokenizerError(f"{model_path}: {processor.get_piece_size()} pieces but the card "
                                 f"says vocab_size={card.get('vocab_size')}; {RETRAIN}")
    return processor, card, sha256


class HFTokenizer:
    """A tokenizer.json behind the part of sentencepiece's API that the data tools use: batch
    encode of UTF-8 chunks, decode, vocabulary size, eos id. Encoding is single-threaded (like
    the sentencepiece actors) and deterministic."""

    def __init__(self, path: str | Path, data: bytes | None = None):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("RAYON_NUM_THREADS", "1")
        from tokenizers import Tokenizer

        path = Path(path)
        data = path.read_bytes() if data is None else data
        try:
            self.tokenizer = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as err:  # tokenizers raises a bare Exception on a bad file
            raise TokenizerError(f"{path}: not a Hugging Face tokenizer.json ({err}); pass a "
                                 f"tokenizer.json saved by transformers/tokenizers") from None
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self.eos = self._eos_id(path, vocab)

    @staticmethod
    def _eos_id(path: Path, vocab: dict) -> int:
        from pretrain.hf_tokenizer import EOS_CANDIDATES  # one list for shard and export

        config = path.with_name("tokenizer_config.json")
        names = list(EOS_CANDIDATES)
        if config.is_file():
            token = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
            token = token.get("content") if isinstance(token, dict) else token
            names = [token] if token else names
        for name in names:
            if name in vocab:
                return vocab[name]
        return -1

    def get_piece_size(self) -> int:
        return self.vocab_size

    def eos_id(self) -> int:
        return self.eos

    def encode(self, texts, return_type=None, num_threads=None):
        import numpy as np

        texts = [t.decode("utf-8") if isinstance(t, bytes) else t for t in texts]
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [np.array(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


class TextTokenizer:
    """One text at a time, for samples and inspection, over either kind of tokenizer."""

    def __init__(self, processor):
        self.processor = processor
        self.vocab_size = processor.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.processor.encode([text])[0]]

    def decode(self, ids) -> str:
        return self.processor.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])


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
