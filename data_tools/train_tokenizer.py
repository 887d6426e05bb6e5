"""Train the project's sentencepiece tokenizer (byte fallback, fixed special ids) on every input
format shard.py reads, deterministically, and write PREFIX.model with its card PREFIX.json.

    python data_tools/train_tokenizer.py --input corpus/ 'more/*.jsonl.zst' data.parquet \\
        --vocab-size 32000 --output tokenizers/tok32k [--model-type bpe|unigram]

Inputs are found and read by the data layer (pretrain/data/formats.py), as shard.py finds and
reads them: .txt (a file is a document), .jsonl, .jsonl.gz, .jsonl.zst (field --text-key) and
.parquet (column --text-key); directories are searched recursively, globs expanded.

Choices, and why (the card's "settings" records every option passed to sentencepiece):

* Normalization is `identity`, with no dummy prefix and no whitespace folding, so that
  decode(encode(text)) == text for any text. sentencepiece's default `nmt_nfkc` turns tabs and
  newlines into spaces and NFKC-folds characters (U+FB01 "fi" -> "fi"), which breaks source
  code and makes the data a model sees differ from the data on disk. Runs of spaces may become
  pieces of their own (indentation is common and worth a token).
* No dummy prefix: the trainer sees lines, but shard.py encodes whole documents, where a line
  does not start after a space; with a prefix, line-initial words would be learnt as "_word"
  and then rarely match. Without it both sides see the same thing.
* Sampling is ours, not sentencepiece's (whose input_sentence_size sampling is randomized):
  sentences are read in sorted-path, file order and, above --max-sentences, a uniform subset is
  drawn by reservoir sampling with numpy's PCG64(--seed), fed in corpus order.
* num_threads=1: unigram training gives different pieces for different thread counts (BPE
  does not, but one setting for both keeps the guarantee simple). Same inputs and flags give a
  byte-identical .model.
* sentencepiece silently drops sentences longer than max_sentence_length (4192 bytes): long
  lines are cut at UTF-8 character boundaries, preferably before whitespace, and counted.
* The model is written from memory (model_writer), not by sentencepiece to model_prefix:
  the model file records model_prefix, so the bytes would depend on the output path.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import sys
import zlib
from pathlib import Path

import numpy as np

if __name__ == "__main__" and not __package__:  # run as a file in a checkout:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, as `-m` has it

from data_tools.shard_lib.clean import is_binary, is_binary_file, repair_utf8  # noqa: E402
from pretrain.data.formats import (BadRecord, DataError, decompress, file_format,  # noqa: E402
                                   find_inputs, json_text, parquet_row_groups, parquet_texts)
from pretrain.data.tokenizers import (CARD_FORMAT, CARD_VERSION, SPECIAL_IDS,  # noqa: E402
                                      card_path, open_tokenizer)
from pretrain.errors import OneLineParser, UserError, report  # noqa: E402
from pretrain.files import file_sha256, write_atomic  # noqa: E402

MAX_SENTENCE_BYTES = 4192  # sentencepiece's max_sentence_length default, passed explicitly
BYTE_PIECES = 256
MIN_VOCAB = len(SPECIAL_IDS) + BYTE_PIECES + 1  # specials, byte fallback, at least one character


class InputError(DataError):
    """Bad input or flags, stated as one line: the file or flag, the value and the fix."""


# ---------------------------------------------------------------- inputs

def expand_inputs(specs: list[str]) -> tuple[list[Path], int]:
    """The input files (as shard.py finds them) and how many files in directories were skipped
    for their type."""
    paths, skipped = find_inputs(specs)
    return [Path(p) for p in paths], skipped


class _HashingReader(io.RawIOBase):
    """Passes a file's raw bytes through a sha256, so inputs are hashed in the one read."""

    def __init__(self, raw, progress=None):
        self.raw = raw
        self.digest = hashlib.sha256()
        self.size = 0
        self.progress = progress  # a tqdm bar counting input bytes, or None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        if n:
            self.digest.update(memoryview(buffer)[:n])
            self.size += n
            if self.progress is not None:
                self.progress.update(n)
        return n


class CorpusStats:
    def __init__(self):
        self.documents = 0
        self.empty_lines = 0  # skipped: an empty sentence teaches the trainer nothing
        self.sentences = 0
        self.long_lines_split = 0
        self.long_line_chunks = 0
        self.utf8_repaired = 0  # documents whose invalid UTF-8 became U+FFFD
        self.binary_skipped = 0  # documents shard.py would reject as 'binary' (same rule)

    def as_dict(self) -> dict:
        return dict(vars(self))


def _decode(raw: bytes) -> tuple[str, bool]:
    """UTF-8 text, and whether invalid bytes had to be replaced (U+FFFD) to get it."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def _documents(path: Path, kind: str, stream, text_key: str, stats: CorpusStats):
    """Yield the text of each document: a .txt file is one document; a JSONL line or a parquet
    row is one (records are taken apart by the data layer, as shard.py takes them apart)."""
    if kind == "txt":
        # shard.py drops binary documents; a tokenizer trained on them would waste its
        # vocabulary on pieces the shards never contain.
        if is_binary_file(path):
            stats.binary_skipped += 1
            return
        # Streamed line by line (a .txt may be large); the file is still one document.
        stats.documents += 1
        repaired = False
        for raw in stream:
            text, bad = _decode(raw[:-1] if raw.endswith(b"\n") else raw)
            repaired |= bad
            yield text
        stats.utf8_repaired += repaired
        return
    for number, (data, repaired) in _records(path, kind, stream, text_key):
        if is_binary(data):
            stats.binary_skipped += 1
            continue
        stats.documents += 1
        stats.utf8_repaired += repaired
        yield data.decode("utf-8")


def _records(path: Path, kind: str, stream, text_key: str):
    """(line or row number, (UTF-8 text, repaired)) of each JSONL line or parquet row."""
    if kind == "parquet":
        row = 0
        for values in parquet_texts(str(path), text_key):
            for value in values:
                row += 1
                if value is None:
                    raise InputError(f"{path} row {row}: null in column {text_key!r}; drop the "
                                     f"row or pass --text-key naming a text column")
                yield row, repair_utf8(value)
        return
    for number, raw in enumerate(stream, start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte-order mark is not JSON
        if not raw.strip():
            continue
        try:
            yield number, json_text(raw, text_key)
        except BadRecord as bad:
            fix = ("pass --text-key with the field that holds the text"
                   if bad.reason == "missing_text_key"
                   else "each line of a .jsonl file must be one JSON object")
            raise InputError(f"{path} line {number}: {bad.detail}; {fix}") from None


def split_long_line(line: str, limit: int = MAX_SENTENCE_BYTES) -> list[str]:
    """Cut a line into pieces of at most `limit` UTF-8 bytes, at character boundaries and, where
    the last half of a piece has one, just before whitespace (so words stay whole and the
    whitespace starts the next piece, as it would inside a line)."""
    if len(line) * 4 <= limit:  # cheap: no character takes more than 4 bytes
        return [line]
    data = line.encode("utf-8")
    if len(data) <= limit:
        return [line]
    chunks, start = [], 0
    while len(data) - start > limit:
        end = start + limit
        while data[end] & 0xC0 == 0x80:  # a continuation byte: back up to a character start
            end -= 1
        cut = max(data.rfind(b" ", start + limit // 2, end), data.rfind(b"\t", start + limit // 2, end))
        if cut > start:
            end = cut
        chunks.append(data[start:end].decode("utf-8"))
        start = end
    chunks.append(data[start:].decode("utf-8"))
    return chunks


class ReservoirSampler:
    """A uniform sample of at most `capacity` items from a stream (Algorithm R), drawn with
    numpy's PCG64(seed): the same stream and seed always give the same sample, in stream
    order, in memory bounded by the capacity rather than by the corpus."""

    _BATCH = 1 << 16

    def __init__(self, capacity: int, seed: int):
        self.capacity = capacity
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.items: list[str] = []
        self.positions: list[int] = []
        self.seen = 0
        self._draws: list[int] = []

    def add(self, item: str) -> None:
        i = self.seen
        self.seen += 1
        if i < self.capacity:
            self.items.append(item)
            self.positions.append(i)
            return
        if not self._draws:
            # Draws for items i .. i+B-1, each uniform in [0, its index]; batched for speed.
            highs = np.arange(i + 1, i + 1 + self._BATCH, dtype=np.int64)
            self._draws = self.rng.integers(0, highs).tolist()[::-1]
        j = self._draws.pop()
        if j < self.capacity:
            self.items[j] = item
            self.positions[j] = i

    def sample(self) -> list[str]:
        if self.seen <= self.capacity:
            return self.items
        order = sorted(range(len(self.items)), key=self.positions.__getitem__)
        return [self.items[k] for k in order]


def collect_sentences(paths: list[Path], text_key: str, sampler: ReservoirSampler,
                      stats: CorpusStats) -> list[dict]:
    """Read every input in order, feeding its non-empty lines (long ones split) to the sampler;
    returns the card's inputs list."""
    from tqdm import tqdm

    inputs = []
    # A bar on a terminal only (disable=None): logs and pipes stay free of carriage returns.
    total = sum(p.stat().st_size for p in paths if p.is_file())
    with tqdm(total=total, unit="B", unit_scale=True, desc="read", file=sys.stderr,
              disable=None, dynamic_ncols=True, mininterval=0.5) as bar:
        for path in paths:
            inputs.append(_collect_file(path, text_key, sampler, stats, bar))
    return inputs


def _collect_file(path: Path, text_key: str, sampler: ReservoirSampler, stats: CorpusStats,
                  bar) -> dict:
    """One input file's lines into the sampler; returns its entry of the card's inputs."""
    kind = file_format(path)
    try:
        with open(path, "rb") as raw:
            hashing = _HashingReader(raw, bar)
            buffered = io.BufferedReader(hashing, 1 << 20)
            if kind == "parquet":  # read by row group, not as a stream: checked first
                parquet_row_groups(str(path), text_key)
            stream = None if kind == "parquet" else decompress(buffered, kind)
            try:
                for text in _documents(path, kind, stream, text_key, stats):
                    for line in text.split("\n"):
                        if not line:
                            stats.empty_lines += 1
                            continue
                        pieces = split_long_line(line)
                        if len(pieces) > 1:
                            stats.long_lines_split += 1
                            stats.long_line_chunks += len(pieces)
                        for piece in pieces:
                            stats.sentences += 1
                            sampler.add(piece)
            except (gzip.BadGzipFile, EOFError, zlib.error) as err:
                raise InputError(f"{path}: not a valid gzip file ({err}); re-compress it or "
                                 f"pass the uncompressed .jsonl") from None
            except ValueError as err:  # zstandard.ZstdError, pyarrow's ArrowInvalid
                raise InputError(f"{path}: not a valid {kind} file ({err}); re-write it or pass "
                                 f"the uncompressed .jsonl") from None
            while buffered.read(1 << 20):  # hash any bytes the reader did not need
                pass
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror or err})") from None
    return {"path": str(path), "bytes": hashing.size, "sha256": hashing.digest.hexdigest()}


# ---------------------------------------------------------------- training

def sentencepiece_options(args) -> dict:
    """Every option passed to sentencepiece (recorded in the card as they are here)."""
    return {
        "model_type": args.model_type,
        "vocab_size": args.vocab_size,
        "character_coverage": args.character_coverage,
        "byte_fallback": True,
        "split_digits": True,
        "pad_id": SPECIAL_IDS["pad"], "unk_id": SPECIAL_IDS["unk"],
        "bos_id": SPECIAL_IDS["bos"], "eos_id": SPECIAL_IDS["eos"],
        "pad_piece": "<pad>", "unk_piece": "<unk>", "bos_piece": "<s>", "eos_piece": "</s>",
        "normalization_rule_name": "identity",
        "add_dummy_prefix": False,
        "remove_extra_whitespaces": False,
        "allow_whitespace_only_pieces": True,
        "split_by_whitespace": True,
        "max_sentence_length": MAX_SENTENCE_BYTES,
        "input_sentence_size": 0,  # take every sentence given: the sampling is ours
        "shuffle_input_sentence": False,
        "num_threads": 1,
        "hard_vocab_limit": True,  # exactly --vocab-size pieces, or an error
        "minloglevel": 2,  # errors only: sentencepiece's progress log would drown the summary
    }


def _rephrase(err: Exception, args) -> InputError | None:
    """sentencepiece's vocabulary-size errors, as the flag to change and a value that works."""
    message = str(err)
    high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
    if high:
        return InputError(f"--vocab-size {args.vocab_size} is more than this text supports with "
                          f"--model-type {args.model_type}; use --vocab-size {high.group(2)} or "
                          f"less, or train on more text")
    low = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", message)
    if low:
        return InputError(f"--vocab-size {args.vocab_size} is too small for the special ids, "
                          f"{BYTE_PIECES} byte pieces and the characters --character-coverage "
                          f"{args.character_coverage} keeps; use --vocab-size {low.group(2)} or more, "
                          f"or lower --character-coverage")
    return None


def train_model(sentences: list[str], options: dict, seed: int, args) -> bytes:
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)  # sentencepiece's own RNG, in case any path uses it
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=writer,
                                       **options)
    except RuntimeError as err:
        rephrased = _rephrase(err, args)
        if rephrased is not None:
            raise rephrased from None
        raise
    return writer.getvalue()


# ---------------------------------------------------------------- command line


def parse_args(argv=None):
    parser = OneLineParser(description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, nargs="+", action="extend",
                        help="files, directories or quoted globs (.txt, .jsonl, .jsonl.gz, .jsonl.zst, "
                             ".parquet)")
    parser.add_argument("--vocab-size", required=True, type=int, help="pieces, specials included")
    parser.add_argument("--output", required=True, help="PREFIX: writes PREFIX.model and PREFIX.json")
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--max-sentences", type=int, default=2_000_000,
                        help="above this many lines, train on a seeded uniform sample of them")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sentence sample")
    parser.add_argument("--text-key", default="text",
                        help="the text field of JSONL records / column of parquet files")
    parser.add_argument("--character-coverage", type=float, default=0.9995,
                        help="share of characters that get pieces, in [0.98, 1]; the rarest "
                             "fall back to bytes")
    return parser.parse_args(argv)


def check_args(args) -> Path:
    """Flag checks that need no data; returns the output prefix."""
    if args.vocab_size < MIN_VOCAB:
        raise InputError(f"--vocab-size {args.vocab_size} is too small: {len(SPECIAL_IDS)} special "
                         f"ids and {BYTE_PIECES} byte-fallback pieces come first; use at least "
                         f"{MIN_VOCAB} (more like 32000 for a real corpus)")
    if args.max_sentences < 1:
        raise InputError(f"--max-sentences {args.max_sentences} must be at least 1")
    if args.seed < 0:
        raise InputError(f"--seed {args.seed} must not be negative")
    if not 0.98 <= args.character_coverage <= 1.0:  # sentencepiece's own bounds
        raise InputError(f"--character-coverage {args.character_coverage} must be in [0.98, 1], "
                         f"e.g. 0.9995 (or 1.0 for a small alphabet)")
    if not args.text_key:
        raise InputError("--text-key must not be empty; pass the .jsonl field that holds the text")
    prefix = args.output[:-len(".model")] if args.output.endswith(".model") else args.output
    if not Path(prefix).name or Path(prefix).is_dir():
        raise InputError(f"--output {args.output} is a directory; pass a prefix such as "
                         f"{Path(args.output) / 'tok'}")
    return Path(prefix)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        prefix = check_args(args)
        paths, skipped = expand_inputs(args.input)
        stats = CorpusStats()
        sampler = ReservoirSampler(args.max_sentences, args.seed)
        inputs = collect_sentences(paths, args.text_key, sampler, stats)
        if stats.sentences == 0:
            binary = f", {stats.binary_skipped} binary skipped" if stats.binary_skipped else ""
            raise InputError(f"the {len(paths)} input file(s) hold no text ({stats.documents} "
                             f"documents, all empty{binary}); check --input"
                             + ("" if any(file_format(p) == "txt" for p in paths) else " and --text-key"))
        sentences = sampler.sample()
        options = sentencepiece_options(args)
        if sys.stderr.isatty():  # sentencepiece reports no progress; say what the wait is
            print(f"training a {args.model_type} tokenizer on {len(sentences):,} sentences ...",
                  file=sys.stderr, flush=True)
        model = train_model(sentences, options, args.seed, args)
    except UserError as err:  # InputError, and the data layer's input errors
        return report(err, label="error")
    except RuntimeError as err:  # a sentencepiece failure not caused by a flag we know of
        print(f"error: sentencepiece training failed: {' '.join(str(err).split())}", file=sys.stderr)
        return 1

    import sentencepiece as spm

    model_path = prefix.with_name(prefix.name + ".model")
    card_file = card_path(model_path)
    try:
        model_path.parent.mkdir(parents=True, exist_ok=True)
        # A card left from an earlier model must not describe the new one, even for a moment.
        card_file.unlink(missing_ok=True)
        write_atomic(model_path, model)
    except OSError as err:
        return report(UserError(f"cannot write {model_path} ({err.strerror or err}); check "
                                f"--output"))
    sha256 = file_sha256(model_path)
    vocab_size = open_tokenizer(model_path, data=model).get_piece_size()
    card = {
        "format": CARD_FORMAT, "format_version": CARD_VERSION,
        "model_file": model_path.name, "sha256": sha256,
        "vocab_size": vocab_size, "model_type": args.model_type,
        "special_ids": dict(SPECIAL_IDS),
        "settings": {**options, "seed": args.seed, "max_sentences": args.max_sentences,
                     "sample_size": len(sentences), "text_key": args.text_key,
                     "sentencepiece_version": spm.__version__},
        "corpus": {**stats.as_dict(), "files": len(paths), "sentences_used": len(sentences)},
        "inputs": inputs,
    }
    write_atomic(card_file, (json.dumps(card, indent=2) + "\n").encode("utf-8"))

    sampled = f", a seed-{args.seed} sample" if len(sentences) < stats.sentences else ""
    print(f"trained a {args.model_type} tokenizer of {vocab_size} pieces on {len(sentences):,} of "
          f"{stats.sentences:,} sentences{sampled} ({stats.documents:,} documents in "
          f"{len(paths)} files)")
    if stats.binary_skipped:
        print(f"  {stats.binary_skipped:,} binary document(s) skipped (as shard.py does)")
    if stats.long_lines_split:
        print(f"  {stats.long_lines_split:,} line(s) over {MAX_SENTENCE_BYTES} bytes split into "
              f"{stats.long_line_chunks:,} sentences")
    if skipped:
        print(f"  skipped {skipped} files in input directories (not an input format)")
    print(f"  model: {model_path}  sha256 {sha256[:16]}")
    print(f"  card:  {card_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
