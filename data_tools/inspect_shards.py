"""Verify a shard directory written by data_tools/shard.py against its manifest, print its
statistics and decode a few samples.

    python data_tools/inspect_shards.py DIR [--samples N] [--tokenizer PATH.model]

Every shard is read whole: its byte size and sha256 must match the manifest, and its tar
members must be the format of docs/formats.md (names KEY.doc_starts / KEY.tokens with
contiguous keys from the shard's first_key, fixed metadata, seq_len + 1 tokens below the
vocabulary size, doc_starts equal to the positions after each EOD). Exit status: 0 when
everything verifies, 1 naming each shard (or the manifest) that does not, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import sys
import tarfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

if __name__ == "__main__" and not __package__:  # run as a file in a checkout:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, as `-m` has it

from pretrain.data import formats, tokenizers  # noqa: E402
from pretrain.errors import OneLineParser, UserError, report  # noqa: E402

MEMBER_RE = re.compile(r"^(\d{10})\.(doc_starts|tokens)$")
MAX_PROBLEMS = 5  # per shard: the first few say what is wrong, the rest is noise


class ShardCheck:
    """Reads one shard and records what does not match the manifest and the format."""

    def __init__(self, directory: Path, meta: dict, manifest: dict, first_key: int, keep: set[int]):
        self.name = meta.get("name", "?")
        self.problems: list[str] = []
        self.samples = 0
        self.docs_per_sample: list[int] = []
        self.eods = 0
        self.kept: dict[int, np.ndarray] = {}  # key -> tokens, for the samples to decode
        self.size = 0
        self._check(directory, meta, manifest, first_key, keep)

    def fail(self, message: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(message)

    def _check(self, directory, meta, manifest, first_key, keep) -> None:
        path = directory / self.name
        if not path.is_file():
            self.fail("missing")
            return
        data = path.read_bytes()
        self.size = len(data)
        if len(data) != meta.get("bytes"):
            self.fail(f"{len(data)} bytes, manifest says {meta.get('bytes')} (truncated or replaced)")
        digest = hashlib.sha256(data).hexdigest()
        if digest != meta.get("sha256"):
            self.fail(f"sha256 {digest[:16]}... does not match the manifest's "
                      f"{str(meta.get('sha256'))[:16]}... (corrupt)")
        if meta.get("first_key") != first_key:
            self.fail(f"first_key {meta.get('first_key')} should be {first_key} (the samples of the "
                      f"shards before it)")
        self._parse(data, manifest, first_key, keep)
        if self.samples != meta.get("samples"):
            self.fail(f"{self.samples} readable samples, manifest says {meta.get('samples')}")
        width = manifest["seq_len"] + 1
        if meta.get("tokens") != meta.get("samples", -1) * width:
            self.fail(f"manifest tokens {meta.get('tokens')} != samples x (seq_len + 1)")

    def _parse(self, data: bytes, manifest: dict, first_key: int, keep: set[int]) -> None:
        seq_len, eod = manifest["seq_len"], manifest["eod_id"]
        dtype = np.dtype(manifest["token_dtype"]).newbyteorder("<")
        vocab = manifest["tokenizer"].get("vocab_size")
        expected = [(first_key, "doc_starts")]  # the next member, by name order
        pending_starts = None
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                for member in tar:
                    match = MEMBER_RE.match(member.name)
                    if not match or not member.isfile():
                        self.fail(f"unexpected member {member.name!r}")
                        return
                    key, ext = int(match.group(1)), match.group(2)
                    if (key, ext) != expected[0]:
                        self.fail(f"member {member.name} where {expected[0][0]:010d}.{expected[0][1]} "
                                  f"was expected (keys must be contiguous from {first_key})")
                        return
                    if (member.mtime, member.uid, member.gid, member.uname, member.gname,
                            member.mode) != (0, 0, 0, "", "", 0o644):
                        self.fail(f"{member.name}: tar metadata is not the fixed one")
                    payload = tar.extractfile(member).read()
                    if len(payload) != member.size:
                        self.fail(f"{member.name}: truncated ({len(payload)} of {member.size} bytes)")
                        return
                    if ext == "doc_starts":
                        if len(payload) % 4:
                            self.fail(f"{member.name}: {len(payload)} bytes, not uint32 values")
                            return
                        pending_starts = np.frombuffer(payload, dtype="<u4")
                        expected = [(key, "tokens")]
                        continue
                    tokens = np.frombuffer(payload, dtype=dtype) if len(payload) % dtype.itemsize == 0 else None
                    if tokens is None or len(tokens) != seq_len + 1:
                        self.fail(f"{member.name}: {len(payload)} bytes, expected seq_len + 1 = "
                                  f"{seq_len + 1} {dtype.name} tokens")
                        return
                    if vocab and int(tokens.max()) >= vocab:
                        self.fail(f"{member.name}: token id {int(tokens.max())} >= vocab_size {vocab}")
                    eods = np.flatnonzero(tokens[:seq_len] == eod) + 1
                    if not np.array_equal(pending_starts, eods):
                        self.fail(f"{key:010d}.doc_starts {pending_starts.tolist()[:8]} differs from "
                                  f"the positions after EOD {eods.tolist()[:8]}")
                    self.samples += 1
                    self.docs_per_sample.append(len(pending_starts) + 1)
                    self.eods += int(np.count_nonzero(tokens == eod))
                    if key in keep:
                        self.kept[key] = tokens
                    expected = [(key + 1, "doc_starts")]
            if expected[0][1] != "doc_starts":
                self.fail(f"sample {expected[0][0]:010d} has doc_starts but no tokens")
        except (tarfile.TarError, EOFError, OSError) as err:
            self.fail(f"unreadable tar after {self.samples} samples ({type(err).__name__}: {err})")


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def inspect(directory: Path, samples: int, tokenizer: str | None, out=None) -> int:
    out = out or sys.stdout
    try:
        manifest = formats.read_manifest(directory)
    except formats.DataError as err:
        print(f"FAIL manifest: {err}", file=out)
        return 1
    tok = manifest["tokenizer"]
    print(f"{directory}: {manifest['format']} v{manifest['format_version']}, seq_len "
          f"{manifest['seq_len']}, {manifest['token_dtype']}, eod {manifest['eod_id']}, tokenizer "
          f"vocab {tok.get('vocab_size')} sha256 {str(tok.get('sha256'))[:16]}...", file=out)
    failures, shards_total = 0, 0
    kept: dict[str, dict[int, np.ndarray]] = {}
    listed = set()
    # Reading and hashing every shard takes a while for a real corpus; a bar on a terminal
    # only (disable=None), so reports written to files or pipes stay plain.
    bar = tqdm(total=sum(len(info.get("shards", [])) for info in manifest["splits"].values()),
               unit="shard", desc="verify", file=sys.stderr, disable=None, dynamic_ncols=True)
    for split, info in manifest["splits"].items():
        total = int(info.get("samples", 0))
        # Samples to decode: evenly spaced over the train split.
        keep = set(np.linspace(0, total - 1, samples).astype(int).tolist()) if split == "train" and total and samples else set()
        key, checks = 0, []
        for meta in info.get("shards", []):
            check = ShardCheck(directory, meta, manifest, key, keep)
            listed.add(check.name)
            key += int(meta.get("samples", 0))
            checks.append(check)
            shards_total += 1
            bar.update(1)
            for problem in check.problems:
                print(f"FAIL {check.name}: {problem}", file=out)
            failures += bool(check.problems)
        read = sum(c.samples for c in checks)
        if key != total or info.get("tokens") != total * (manifest["seq_len"] + 1):
            print(f"FAIL manifest: split {split} says {total} samples / {info.get('tokens')} tokens, "
                  f"its shards {key} samples", file=out)
            failures += 1
        docs = np.array([d for c in checks for d in c.docs_per_sample] or [0])
        sizes = np.array([c.size for c in checks] or [0])
        print(f"{split}: {read:,} samples, {read * (manifest['seq_len'] + 1):,} tokens in "
              f"{len(checks)} shards ({_mb(sizes.sum())}; per shard min {_mb(sizes.min())}, mean "
              f"{_mb(sizes.mean())}, max {_mb(sizes.max())}); documents per sample mean "
              f"{docs.mean():.2f}, min {docs.min()}, max {docs.max()}; "
              f"{sum(c.eods for c in checks):,} EOD", file=out)
        kept[split] = {k: v for c in checks for k, v in c.kept.items()}
        stream = read * (manifest["seq_len"] + 1) + manifest.get("tokens_dropped_tail", {}).get(split, 0)
        if isinstance(info.get("text_bytes"), int) and stream:
            print(f"{split}: {_mb(info['text_bytes'])} of text, "
                  f"{info['text_bytes'] / stream:.2f} bytes per token", file=out)
    bar.close()
    extra = sorted(n for n in os.listdir(directory) if formats.SHARD_NAME_RE.match(n) and n not in listed)
    if extra:
        print(f"note: {len(extra)} shard files not in the manifest (ignored): {', '.join(extra[:5])}", file=out)
    documents = manifest.get("documents")
    if documents:
        print(f"documents: {documents.get('read', 0):,} read, {documents.get('kept', 0):,} kept, "
              f"{documents.get('utf8_repaired', 0):,} UTF-8 repaired, rejected "
              f"{documents.get('rejected', {})}; tokens dropped at split ends "
              f"{manifest.get('tokens_dropped_tail', {})}", file=out)
    if samples:
        _decode(manifest, kept.get("train", {}), tokenizer, out)
    if failures:
        print(f"FAILED: {failures} problem(s) in {directory}", file=out)
        return 1
    print(f"OK: {shards_total} shards verified", file=out)
    return 0


def _decode(manifest: dict, samples: dict[int, np.ndarray], tokenizer: str | None, out) -> None:
    path = tokenizer or manifest["tokenizer"].get("path")
    if not path or not os.path.isfile(path):
        print(f"note: tokenizer {path} not found; pass --tokenizer to decode samples", file=out)
        return
    try:
        processor = tokenizers.TextTokenizer(
            tokenizers.open_tokenizer(path, sha256=manifest["tokenizer"].get("sha256")))
    except tokenizers.TokenizerError as err:
        print(f"note: {err}: {path} is not the tokenizer of this dataset; not decoding with it",
              file=out)
        return
    eod = manifest["eod_id"]
    for key in sorted(samples):
        tokens = samples[key].astype(np.int64)
        cuts = np.flatnonzero(tokens == eod)
        pieces, start = [], 0
        for cut in cuts.tolist():
            pieces.append(processor.decode(tokens[start:cut].tolist()) + "<EOD>")
            start = cut + 1
        pieces.append(processor.decode(tokens[start:].tolist()))
        text = "".join(pieces)
        print(f"--- train sample {key} ({len(cuts)} EOD) ---", file=out)
        print(text if len(text) <= 2000 else text[:2000] + " [...]", file=out)


def main(argv=None) -> int:
    summary, _, details = __doc__.partition("\n\n")
    parser = OneLineParser(description=" ".join(summary.split()), epilog=details,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", metavar="DIR", help="shard directory (holds manifest.json)")
    parser.add_argument("--samples", type=int, default=2, metavar="N",
                        help="decode N train samples, evenly spaced (default: 2; 0: none)")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="sentencepiece model to decode with (default: the manifest's path)")
    args = parser.parse_args(argv)
    directory = Path(args.directory)
    try:
        if not directory.is_dir():
            raise UserError(f"{directory} is not a directory; pass the --output of "
                            f"data_tools/shard.py")
        if args.samples < 0:
            raise UserError(f"--samples {args.samples} must be >= 0")
        if args.tokenizer and not os.path.isfile(args.tokenizer):
            raise UserError(f"--tokenizer {args.tokenizer}: no such file")
    except UserError as err:
        return report(err)
    return inspect(directory, args.samples, args.tokenizer)


if __name__ == "__main__":
    sys.exit(main())
