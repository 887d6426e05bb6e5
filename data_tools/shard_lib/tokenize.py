"""The tokenizing stage: a Ray actor that holds one tokenizer and turns a piece of cleaned
documents into token ids (a family's BOS before, EOD after each document) plus each
document's digest.

One actor per CPU, each pinned to one thread: sentencepiece's batch encoder would otherwise
start a thread per core in every actor and oversubscribe the machine.
"""

from __future__ import annotations

import os

import numpy as np

from data_tools.shard_lib.clean import NormalizedHasher, chunk_bounds
from data_tools.shard_lib.inputs import FIRST, GIVEN_DIGEST, LAST

# Text handed to one sentencepiece call: large enough to amortize the call, small enough that
# the int32 ids of one call (4 bytes per token) stay a few tens of MB for a huge document.
ENCODE_BATCH_BYTES = 4 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def tokenize_entries(processor, data, lens: np.ndarray, flags: np.ndarray, given: bytes,
                     chunk_bytes: int, dtype: np.dtype, eod_id: int, prefix=(), suffix=()
                     ) -> tuple[np.ndarray, np.ndarray, bytes]:
    """Encode a piece's entries: (tokens, tokens per entry, 16-byte digest per entry).

    `prefix` ids (a family's BOS) come before an entry that starts its document (flag
    FIRST); `suffix` ids, then EOD, follow one that ends it (flag LAST). An entry's digest is
    computed here unless the reader gave it (GIVEN_DIGEST: a part of a document split over
    pieces)."""
    view = memoryview(data)
    head = np.array(list(prefix), dtype=dtype)
    eod = np.array([*suffix, eod_id], dtype=dtype)
    out = bytearray()  # grows in place: one copy of the ids, not a list plus its concatenation
    ntok = np.zeros(len(lens), dtype=np.int64)
    digests = []
    batch, owners, batch_bytes = [], [], 0  # texts for one encode call, (entry, ends it) each

    def flush():
        nonlocal batch, owners, batch_bytes
        if batch:
            for (entry, head_before, eod_after), ids in zip(
                    owners, processor.encode(batch, return_type="numpy", num_threads=1)):
                if head_before:
                    out.extend(head.tobytes())
                    ntok[entry] += len(head)
                out.extend(ids.astype(dtype).tobytes())
                ntok[entry] += len(ids)
                if eod_after:
                    out.extend(eod.tobytes())
                    ntok[entry] += len(eod)
        batch, owners, batch_bytes = [], [], 0

    start = 0
    for entry, (length, flag) in enumerate(zip(lens.tolist(), flags.tolist())):
        buffer = np.frombuffer(view[start:start + length], dtype=np.uint8)
        hasher = None if flag & GIVEN_DIGEST else NormalizedHasher()
        # Chunks are copied out one at a time: one encode batch is alive at once.
        bounds = chunk_bounds(buffer, chunk_bytes)
        for i, (a, b) in enumerate(bounds):
            chunk = bytes(view[start + a:start + b])
            if hasher is not None:
                hasher.update(chunk)
            batch.append(chunk)
            owners.append((entry, bool(flag & FIRST) and i == 0,
                           bool(flag & LAST) and i == len(bounds) - 1))
            batch_bytes += len(chunk)
            if batch_bytes >= ENCODE_BATCH_BYTES:
                flush()
        digests.append(given[16 * entry:16 * entry + 16] if hasher is None else hasher.digest())
        start += length
    flush()
    return np.frombuffer(out, dtype=dtype), ntok, b"".join(digests)


class TokenizeWorker:
    """Ray Data actor UDF: Arrow pieces from inputs.read_batch -> tokenized pieces."""

    def __init__(self, model_path: str, model_sha256: str, chunk_bytes: int, eod_id: int,
                 prefix: list[int], suffix: list[int]):
        os.environ["OMP_NUM_THREADS"] = "1"
        from pretrain.data.tokenizers import TokenizerError, open_tokenizer

        # The path, not the model bytes: constructor arguments that large go through the
        # object store, which Ray warns about for restartable actors. Inputs and output must be
        # on shared storage on a cluster anyway; the checksum catches a different file there.
        try:
            self.processor = open_tokenizer(model_path, sha256=model_sha256)
        except TokenizerError as err:
            raise RuntimeError(f"{err} on this Ray node: the driver loaded another file; put it "
                               f"on storage all nodes share") from None
        self.dtype = token_dtype(self.processor.get_piece_size())
        self.chunk_bytes = chunk_bytes
        self.eod_id = eod_id
        self.prefix, self.suffix = prefix, suffix  # the driver's, like eod_id

    def __call__(self, batch):
        import pyarrow as pa

        tables = []
        for i in range(batch.num_rows):
            row = {name: batch.column(name)[i] for name in batch.column_names}
            tokens, ntok, digests, fatal = np.empty(0, self.dtype), np.empty(0, np.int64), b"", row["fatal"].as_py()
            lens = np.empty(0, np.int64)
            if not fatal:
                lens = np.frombuffer(row["lens"].as_py(), dtype=np.int64)
                flags = np.frombuffer(row["flags"].as_py(), dtype=np.uint8)
                try:
                    tokens, ntok, digests = tokenize_entries(
                        self.processor, row["data"].as_buffer(), lens, flags, row["given"].as_py(),
                        self.chunk_bytes, self.dtype, self.eod_id, self.prefix, self.suffix)
                except Exception as err:  # noqa: BLE001 - reported in order, naming the unit
                    fatal = f"tokenizing read unit {row['unit'].as_py()}: {type(err).__name__}: {err}"
            tables.append(pa.table({
                "unit": [row["unit"].as_py()], "piece": [row["piece"].as_py()],
                "last": [row["last"].as_py()],
                "tokens": pa.LargeBinaryArray.from_buffers(
                    pa.large_binary(), 1,
                    [None, pa.py_buffer(np.array([0, tokens.nbytes], np.int64)), pa.py_buffer(tokens)]),
                "ntok": pa.array([ntok.tobytes()], pa.binary()),
                "nbytes": pa.array([(lens if not fatal else np.empty(0, np.int64)).tobytes()],
                                   pa.binary()),
                "digests": pa.array([digests], pa.binary()),
                "repaired": [row["repaired"].as_py()], "flags": [row["flags"].as_py()],
                "read": [row["read"].as_py()],
                "rejected": [row["rejected"].as_py()], "bad": [row["bad"].as_py()],
                "fatal": [fatal], "progress": [row["progress"].as_py()],
            }))
        return pa.concat_tables(tables)
