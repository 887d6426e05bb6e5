"""Sample sources: sets of shards of packed samples that the loader draws from.

`ShardSource` reads a directory (or URL prefix) written by data_tools/shard.py: the
manifest, then tar shards through webdataset's tar iteration, each verified against the
manifest's size and sha256. `EmbeddedSource` presents the built-in corpus the same way
(in-memory "shards"), so the loader's ordering, blending and resume logic exist once.
"""

from __future__ import annotations

import hashlib
import io
import os
import shlex
from dataclasses import dataclass

import numpy as np

# The shard format and its checks live in the data layer (formats.py); DataError is raised
# from here on as well.
from pretrain.data.formats import MANIFEST, DataError, check_shard_names, parse_manifest
from pretrain.data.formats import RESHARD as RESHARD_HINT
from pretrain.data import remote
from pretrain.data.remote import MISSING, READ_ATTEMPTS, wait_before_retry


@dataclass
class ShardData:
    tokens: np.ndarray  # [n, seq_len + 1] uint16/uint32
    doc_starts: list[np.ndarray]  # per sample: positions where a new document starts
    keys: np.ndarray  # [n] int64 sample keys (index within the split)


def _is_local(path: str) -> bool:
    return not path.startswith("pipe:") and "://" not in path


def _url_for(prefix: str, name: str) -> str:
    if "{name}" in prefix:
        # Quoted for the shell that runs a `pipe:` command (names are checked as well).
        return prefix.replace("{name}", shlex.quote(name) if prefix.startswith("pipe:") else name)
    return prefix.rstrip("/") + "/" + name


def _read_once(url: str) -> bytes:
    import webdataset as wds

    with wds.gopen(url, "rb") as stream:
        return stream.read()


def _read_url(url: str) -> bytes:
    """The whole object; remote reads are retried with exponential backoff, each failure
    logged, and the last one becomes one DataError line."""
    attempts = 1 if _is_local(url) else READ_ATTEMPTS
    for attempt in range(1, attempts + 1):
        try:
            return _read_once(url)
        except FileNotFoundError:
            if attempts == 1:
                raise DataError(f"{url}: no such file") from None
            reason = "no such file"
        except Exception as err:  # noqa: BLE001 - gopen raises plain IOErrors for pipe: commands
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        wait_before_retry(url, "reading", attempt, attempts, reason)
    raise DataError(f"{url}: cannot read after {attempts} attempt(s) ({reason[:300]})")


def _local_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return MISSING


class ShardSource:
    """One shard set (a split of a dataset directory written by shard.py).

    `path` is a directory, a URL prefix, or a template containing `{name}`
    (e.g. `pipe:aws s3 cp s3://bucket/ds/{name} -`).
    """

    def __init__(self, path: str, split: str = "train", verify: bool = True):
        self.path = path
        self.split = split
        self.verify = verify
        manifest_url = _url_for(path, MANIFEST)
        manifest = parse_manifest(_read_url(manifest_url), manifest_url)
        splits = manifest.get("splits", {})
        if not isinstance(splits, dict) or split not in splits \
                or not isinstance(splits[split], dict) or not splits[split].get("shards"):
            has = ", ".join(sorted(splits)) if isinstance(splits, dict) else ""
            raise DataError(f"{manifest_url}: no {split!r} split with shards (has: {has or 'none'})")
        self.manifest_url = manifest_url
        field = "seq_len"
        try:  # a field of the wrong type or missing: one line naming it, not a traceback
            self.seq_len = int(manifest["seq_len"])
            field = "token_dtype"
            self.dtype = np.dtype(manifest["token_dtype"]).newbyteorder("<")
            field = "eod_id"
            self.eod_id = int(manifest["eod_id"])
            field = "tokenizer"
            self.tokenizer_sha256 = str(manifest["tokenizer"]["sha256"])
            self.tokenizer_path = manifest["tokenizer"].get("path")
            self.vocab_size = int(manifest["tokenizer"]["vocab_size"])
            field = f"splits.{split}.shards"
            self.shards = list(splits[split]["shards"])
            self._check_shards()
            self.shard_samples = np.array([int(s["samples"]) for s in self.shards], dtype=np.int64)
            for s in self.shards:
                int(s["bytes"]), int(s["first_key"]), str(s["sha256"])
            field = f"splits.{split}.text_bytes"
            # UTF-8 bytes per token of the split's stream, for bits-per-byte; None for
            # manifests written before shard.py recorded `text_bytes` (docs/formats.md).
            text_bytes = splits[split].get("text_bytes")
            stream = int(splits[split].get("tokens", 0)) + int(
                manifest.get("tokens_dropped_tail", {}).get(split, 0))
            self.bytes_per_token = (float(text_bytes) / stream
                                    if isinstance(text_bytes, int) and text_bytes > 0
                                    and stream > 0 else None)
        except DataError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise DataError(f"{manifest_url}: field {field} is missing or malformed "
                            f"({type(err).__name__}: {err}); {RESHARD_HINT}") from None
        self.num_samples = int(self.shard_samples.sum())
        # Content-defined identity: the order of a dataset survives moving or renaming it.
        self.digest = hashlib.sha256("".join(s["sha256"] for s in self.shards).encode()).hexdigest()

    @property
    def name(self) -> str:
        return f"{self.path}[{self.split}]"

    def _check_shards(self) -> None:
        """Names in the format shard.py writes (a name reaches paths and shell commands) and,
        for a local directory or an http(s) URL, every shard present with its recorded size:
        a missing shard fails at start-up, not when the loader reaches it hours later. A
        `pipe:` command cannot be checked without running it: its shards are found when read."""
        check_shard_names(self.shards, self.split, self.manifest_url)
        urls = [_url_for(self.path, meta["name"]) for meta in self.shards]
        if _is_local(self.path):
            sizes = [_local_size(url) for url in urls]
        elif remote.is_http(urls[0]):
            sizes = remote.shard_sizes(urls)  # None where the server gives no size
        else:
            return
        missing, wrong = [], []
        for meta, size in zip(self.shards, sizes):
            if size == MISSING:
                missing.append(meta["name"])
                continue
            if self.verify and size is not None and size != int(meta["bytes"]):
                wrong.append(f"{meta['name']} ({size} bytes, manifest says {meta['bytes']})")
        if missing:
            raise DataError(f"{self.path}: {len(missing)} of {len(self.shards)} {self.split} shards "
                            f"listed in manifest.json are missing ({', '.join(missing[:3])}"
                            f"{', ...' if len(missing) > 3 else ''}); restore them or {RESHARD_HINT}")
        if wrong:
            raise DataError(f"{self.path}: {len(wrong)} {self.split} shard(s) differ in size from "
                            f"manifest.json: {', '.join(wrong[:3])}; {RESHARD_HINT}")

    def load_shard(self, index: int) -> ShardData:
        from webdataset.tariterators import group_by_keys, tar_file_iterator

        meta = self.shards[index]
        url = _url_for(self.path, meta["name"])
        data = _read_url(url)
        if self.verify:
            if len(data) != int(meta["bytes"]):
                raise DataError(f"{url}: {len(data)} bytes, manifest says {meta['bytes']} "
                                f"(truncated or replaced); {RESHARD_HINT}")
            digest = hashlib.sha256(data).hexdigest()
            if digest != meta["sha256"]:
                raise DataError(f"{url}: sha256 {digest[:16]}... does not match the manifest's "
                                f"{meta['sha256'][:16]}...; the shard is corrupt, {RESHARD_HINT}")
        width = self.seq_len + 1
        n = int(meta["samples"])
        tokens = np.empty((n, width), dtype=self.dtype)
        doc_starts, keys = [], np.empty(n, dtype=np.int64)
        try:
            members = ({**member, "__url__": url} for member in tar_file_iterator(io.BytesIO(data)))
            samples = group_by_keys(members)
            for i, sample in enumerate(samples):
                if i >= n:
                    raise DataError(f"{url}: more samples than the manifest's {n}; {RESHARD_HINT}")
                row = np.frombuffer(sample["tokens"], dtype=self.dtype)
                if row.shape[0] != width:
                    raise DataError(f"{url}: sample {sample['__key__']} has {row.shape[0]} tokens, "
                                    f"expected seq_len+1 = {width}; {RESHARD_HINT}")
                tokens[i] = row
                doc_starts.append(np.frombuffer(sample.get("doc_starts", b""), dtype="<u4"))
                keys[i] = int(sample["__key__"])
        except DataError:
            raise
        except Exception as err:  # tarfile.ReadError, KeyError on a missing member, ...
            raise DataError(f"{url}: unreadable shard ({type(err).__name__}: {err}); "
                            f"{RESHARD_HINT}") from None
        if len(doc_starts) != n:
            raise DataError(f"{url}: {len(doc_starts)} samples, manifest says {n}; {RESHARD_HINT}")
        expected = np.arange(int(meta["first_key"]), int(meta["first_key"]) + n)
        if not np.array_equal(keys, expected):
            raise DataError(f"{url}: sample keys are not the contiguous range starting at "
                            f"{meta['first_key']}; {RESHARD_HINT}")
        # An id at or past the vocabulary would index past the embedding table: an IndexError
        # on CPU, a device assert on GPU, a crash that a requeue repeats. One max per shard,
        # in the loader's thread.
        if n and int(tokens.max()) >= self.vocab_size:
            row, col = np.argwhere(tokens >= self.vocab_size)[0]
            raise DataError(f"{url}: sample {keys[row]} holds token id {int(tokens[row, col])}, "
                            f"not below the manifest's tokenizer.vocab_size {self.vocab_size}; "
                            f"the manifest or the tokenizer it names is wrong; {RESHARD_HINT}")
        return ShardData(tokens, doc_starts, keys)


class EmbeddedSource:
    """The built-in corpus (byte-level tokens) cut into samples and in-memory shards."""

    SHARD_SAMPLES = 1024

    def __init__(self, seq_len: int, split: str = "train", val_fraction: float = 0.02):
        from pretrain.data.embedded import BYTE_VOCAB_SIZE, EOD_ID, embedded_tokens

        tokens, corpus_sha = embedded_tokens()
        width = seq_len + 1
        total = (len(tokens) - 1) // seq_len
        # Contiguous val tail (whole samples) so train and val never share a sample.
        num_val = max(1, int(total * val_fraction))
        first, count = (0, total - num_val) if split == "train" else (total - num_val, num_val)
        if count < 1:
            raise DataError(f"embedded corpus too small for seq_length={seq_len}")
        starts = (first + np.arange(count)) * seq_len
        self._rows = tokens[starts[:, None] + np.arange(width)[None, :]]
        self.name = f"embedded[{split}]"
        self.split = split
        self.seq_len = seq_len
        self.eod_id = EOD_ID
        self.vocab_size = BYTE_VOCAB_SIZE
        self.tokenizer_sha256 = "byte-level"
        # One token per byte, plus one EOD per document that stands for no text.
        self.bytes_per_token = float(np.count_nonzero(tokens != EOD_ID)) / len(tokens)
        self.tokenizer_path = None
        n_shards = -(-count // self.SHARD_SAMPLES)
        self.shard_samples = np.array(
            [min(self.SHARD_SAMPLES, count - i * self.SHARD_SAMPLES) for i in range(n_shards)],
            dtype=np.int64)
        self.num_samples = count
        self.digest = hashlib.sha256(f"{corpus_sha}/{seq_len}/{split}".encode()).hexdigest()

    def load_shard(self, index: int) -> ShardData:
        lo = index * self.SHARD_SAMPLES
        rows = self._rows[lo:lo + int(self.shard_samples[index])]
        width = self.seq_len + 1
        doc_starts = [np.flatnonzero(row[:width - 1] == self.eod_id).astype("<u4") + 1 for row in rows]
        return ShardData(rows, doc_starts, np.arange(lo, lo + len(rows), dtype=np.int64))


def open_source(path: str, split: str, seq_len: int, verify: bool = True):
    if path == "embedded":
        return EmbeddedSource(seq_len, split)
    return ShardSource(path, split, verify)
