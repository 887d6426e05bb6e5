"""Throughput of data_tools/shard.py against the raw speed of sentencepiece: measures, in one
run and on the same corpus, (a) single-process single-thread sentencepiece encoding and
(b) shard.py end to end (CLI wall time, Ray start-up included) with --num-workers W.

    python benchmarks/bench_shard.py [--mb 64] [--workers 2] [--seq-len 2048] [--tokenizer M]

The corpus is the Python standard library's source as JSONL documents (one per module),
repeated with a variant header per copy when more text is asked for than the library holds,
so dedup keeps every document. Prints ratio = (b) / ((a) x W); the target is >= 0.80.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def stdlib_sources() -> list[tuple[str, bytes]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            data = path.read_bytes()
            data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if data.strip():
            out.append((str(path.relative_to(root)), data))
    return out


def build_corpus(directory: Path, target_bytes: int, file_bytes: int = 16 << 20) -> list[str]:
    """JSONL files of about file_bytes each; returns the documents' texts in corpus order."""
    sources = stdlib_sources()
    docs, total, copy = [], 0, 0
    while total < target_bytes:
        for name, data in sources:
            text = data.decode("utf-8")
            if copy:
                text = f"# copy {copy} of {name}\n{text}"
            docs.append(text)
            total += len(text.encode())
            if total >= target_bytes:
                break
        copy += 1
    directory.mkdir(parents=True, exist_ok=True)
    index, size, f = 0, 0, None
    for text in docs:
        if f is None or size >= file_bytes:
            if f:
                f.close()
            f = open(directory / f"corpus-{index:04d}.jsonl", "w", encoding="utf-8")
            index, size = index + 1, 0
        line = json.dumps({"text": text}) + "\n"
        f.write(line)
        size += len(line)
    f.close()
    return docs


def train_tokenizer(docs: list[str], prefix: Path, vocab_size: int) -> Path:
    import sentencepiece as spm

    def lines():
        # Every 4th document is plenty for a 4k vocabulary and keeps training to seconds.
        for text in docs[::4]:
            for line in text.splitlines():
                if line.strip():
                    yield line[:4000]

    # The settings of data_tools/train_tokenizer.py that matter for encoding speed and chunking.
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_prefix=str(prefix), vocab_size=vocab_size,
        model_type="bpe", pad_id=0, unk_id=1, bos_id=2, eos_id=3, byte_fallback=True,
        split_digits=True, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        split_by_whitespace=True, input_sentence_size=400_000, shuffle_input_sentence=True,
        num_threads=os.cpu_count() or 1, minloglevel=2)
    return prefix.with_suffix(".model")


def raw_encode(model: Path, docs: list[str]) -> tuple[int, float]:
    """(tokens, seconds) for one thread encoding every document, batched as the workers do."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model), num_threads=1)
    encoded = [d.encode() for d in docs]
    tokens, start = 0, time.perf_counter()
    batch, size = [], 0
    for data in encoded:
        batch.append(data)
        size += len(data)
        if size >= 4 << 20:
            tokens += sum(len(ids) for ids in sp.encode(batch, return_type="numpy", num_threads=1))
            batch, size = [], 0
    if batch:
        tokens += sum(len(ids) for ids in sp.encode(batch, return_type="numpy", num_threads=1))
    return tokens, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=64, help="corpus size in MB (>= 50)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--tokenizer", help="use this .model instead of training one")
    parser.add_argument("--workdir", default="/tmp/bench_shard")
    parser.add_argument("--keep", action="store_true", help="keep the corpus, model and shards")
    args = parser.parse_args()

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    docs = build_corpus(work / "corpus", int(args.mb * 1e6))
    corpus_bytes = sum(len(d.encode()) for d in docs)
    print(f"corpus: {len(docs):,} documents, {corpus_bytes / 1e6:.1f} MB of text "
          f"(JSONL under {work / 'corpus'})")
    model = Path(args.tokenizer) if args.tokenizer else train_tokenizer(docs, work / "tok", args.vocab_size)

    tokens, raw_s = raw_encode(model, docs)
    raw_rate = tokens / raw_s
    print(f"(a) raw sentencepiece, 1 process 1 thread: {tokens:,} tokens in {raw_s:.1f} s = "
          f"{raw_rate:,.0f} tokens/s")
    del docs

    def shard(corpus: Path, output: Path, *extra: str) -> tuple[float, str]:
        cmd = [sys.executable, str(REPO / "data_tools" / "shard.py"), "--input", str(corpus),
               "--output", str(output), "--tokenizer", str(model), "--seq-len", str(args.seq_len),
               "--num-workers", str(args.workers), "--no-progress", *extra]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode:
            sys.exit(f"shard.py failed:\n{proc.stdout}\n{proc.stderr}")
        return seconds, proc.stdout.strip()

    # Fixed cost: the same command on a 1-document corpus (Ray start-up, actor start-up and
    # shutdown), run twice; the first also warms the page cache for Ray's imports, as (a) had
    # sentencepiece's warm.
    tiny = work / "tiny"
    tiny.mkdir()
    (tiny / "one.jsonl").write_text(json.dumps({"text": "def f(x):\n    return x\n" * 1000}) + "\n")
    fixed_s = min(shard(tiny, work / f"tiny_shards{i}", "--val-fraction", "0")[0] for i in range(2))
    shard_s, summary = shard(work / "corpus", work / "shards")
    manifest = json.loads((work / "shards" / "manifest.json").read_text())
    e2e_rate = tokens / shard_s
    ratio = e2e_rate / (raw_rate * args.workers)
    print(f"(b) shard.py --num-workers {args.workers}, end to end: {tokens:,} tokens "
          f"(+{manifest['documents']['kept']:,} EOD) in {shard_s:.1f} s = {e2e_rate:,.0f} tokens/s")
    print(f"    {summary}")
    print(f"ratio (b) / ((a) x {args.workers}) = {ratio:.2f} (target >= 0.80)")
    steady = tokens / max(shard_s - fixed_s, 1e-9)
    print(f"fixed cost (same command on a 1-document corpus): {fixed_s:.1f} s; the rest, "
          f"{shard_s - fixed_s:.1f} s, is {steady:,.0f} tokens/s: ratio "
          f"{steady / (raw_rate * args.workers):.2f} without the fixed cost")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
