"""data_tools/shard.py on a real local Ray (2 CPUs) writing real tars: round trip of every
input format, byte-identical output for any worker count and work granularity, dedup, the
train/val rule, kill-and-resume, the manifest, and every bad input ending in exit status 2.

Ray starts once for the module (in-process builds share it); the CLI runs as a subprocess for
the end-to-end and kill tests. The expected documents are derived here from the corpus
spec, independently of the library's readers.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SHARD = REPO / "data_tools" / "shard.py"
SEQ_LEN = 32
EOD = 3
VAL_FRACTION = 0.2

WORDS = ["alpha", "beta", "gamma", "delta", "return", "def", "self", "value", "naïve", "café",
         "Straße", "日本語", "🙂", "42", "3.14", "x", "(", ")", ":", "=", "#"]
SEPARATORS = [" ", " ", " ", "  ", "    ", "\n", "\n    ", "\t", "\n\n"]


def make_doc(rng: random.Random, words: int) -> str:
    parts = []
    for _ in range(words):
        parts.append(rng.choice(WORDS))
        parts.append(rng.choice(SEPARATORS))
    return "".join(parts).strip() + rng.choice(["", "\n"])


def normalized_digest(text: str) -> bytes:
    return hashlib.blake2b(" ".join(text.split()).encode(), digest_size=16).digest()


def is_val(text: str, fraction: float = VAL_FRACTION) -> bool:
    return int.from_bytes(normalized_digest(text)[:8], "big") / 2 ** 64 < fraction


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    import sentencepiece as spm

    rng = random.Random(7)
    lines = [line for _ in range(400) for line in make_doc(rng, 40).splitlines() if line.strip()]
    prefix = tmp_path_factory.mktemp("tok") / "tok"
    # The project tokenizer's encoding settings (data_tools/train_tokenizer.py): identity
    # normalization and no dummy prefix make decode(encode(text)) == text.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=400, model_type="bpe",
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, byte_fallback=True, num_threads=1,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_by_whitespace=True, minloglevel=2)
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def processor(tokenizer):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tokenizer))


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from data_tools.shard_lib.pipeline import init_ray

    init_ray(2)
    yield
    ray.shutdown()


def write_jsonl(path: Path, records: list, opener=open) -> None:
    with opener(path, "wt", encoding="utf-8") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A directory with every input format and every cleaning case; returns (dir, expected),
    expected = the documents (text, kind) in document order, kind one of kept / empty /
    binary / duplicate."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rng = random.Random(1234)
    root = tmp_path_factory.mktemp("corpus") / "in"
    (root / "a_docs").mkdir(parents=True)
    files: dict[Path, list[str]] = {}  # path -> documents as the file holds them

    txt = [make_doc(rng, rng.randint(5, 300)) for _ in range(6)]
    for i, text in enumerate(txt):
        (root / "a_docs" / f"{i:02d}.txt").write_text(text, encoding="utf-8")
        files[root / "a_docs" / f"{i:02d}.txt"] = [text]
    (root / "a_docs" / "empty.txt").write_text(" \n\t \n", encoding="utf-8")
    files[root / "a_docs" / "empty.txt"] = [" \n\t \n"]
    garbage = random.Random(5).randbytes(3000)  # about half decodes to U+FFFD
    (root / "a_docs" / "garbage.txt").write_bytes(garbage)
    files[root / "a_docs" / "garbage.txt"] = [garbage.decode("utf-8", "replace")]
    broken = "caf\xe9 latin-1 bytes in a UTF-8 file".encode("latin-1") + b" and more text"
    (root / "a_docs" / "latin1.txt").write_bytes(broken)
    files[root / "a_docs" / "latin1.txt"] = [broken.decode("utf-8", "replace")]
    (root / "a_docs" / "notes.md").write_text("not an input: unsupported types in a directory are skipped")
    (root / "a_docs" / ".hidden.txt").write_text("hidden files are skipped")

    jsonl = [make_doc(rng, rng.randint(1, 120)) for _ in range(60)]
    jsonl[10] = jsonl[3]  # exact duplicate
    jsonl[11] = "  " + jsonl[4].replace(" ", "   ") + "\n"  # duplicate after normalization
    jsonl[12] = ""  # empty
    jsonl[13] = "\n \t"  # whitespace only
    records = [{"text": t, "id": i} for i, t in enumerate(jsonl)]
    write_jsonl(root / "b.jsonl", records[:30] + [""] + records[30:])  # a blank line is no record
    files[root / "b.jsonl"] = jsonl
    # A lone surrogate escape is repaired to U+FFFD.
    (root / "b2.jsonl").write_text('{"text": "bad \\ud800 surrogate"}\n', encoding="utf-8")
    files[root / "b2.jsonl"] = ["bad \ufffd surrogate"]

    gz = [make_doc(rng, rng.randint(1, 200)) for _ in range(40)] + [txt[0]]  # dup of a .txt
    write_jsonl(root / "c.jsonl.gz", [{"text": t} for t in gz], opener=gzip.open)
    files[root / "c.jsonl.gz"] = gz
    zst = [make_doc(rng, rng.randint(1, 200)) for _ in range(40)]
    with open(root / "d.jsonl.zst", "wb") as raw, zstandard.ZstdCompressor().stream_writer(raw) as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in zst).encode())
    files[root / "d.jsonl.zst"] = zst
    pq_docs = [make_doc(rng, rng.randint(1, 200)) for _ in range(50)]
    pq.write_table(pa.table({"id": list(range(50)), "text": pq_docs}), root / "e.parquet",
                   row_group_size=20)
    files[root / "e.parquet"] = pq_docs

    expected, seen = [], set()
    for path in sorted(files, key=str):
        for text in files[path]:
            if not text.strip():
                kind = "empty"
            elif (text.count("\ufffd") + text.count("\0")) > 0.3 * len(text):
                kind = "binary"
            elif normalized_digest(text) in seen:
                kind = "duplicate"
            else:
                kind = "kept"
                seen.add(normalized_digest(text))
            expected.append((text, kind))
    return root, expected


def build(inputs, output: Path, tokenizer: Path, **overrides) -> dict:
    from data_tools.shard_lib.pipeline import Options, build as run

    settings = dict(seq_len=SEQ_LEN, val_fraction=VAL_FRACTION, shard_samples=40, progress=False,
                    log=io.StringIO())
    settings.update(overrides)
    return run(Options(inputs=[str(p) for p in inputs], output=str(output), tokenizer=str(tokenizer),
                       **settings))


def read_split(directory: Path, split: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """All samples of a split, read with tarfile: (tokens [n, seq_len+1], doc_starts)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    dtype = np.dtype(manifest["token_dtype"]).newbyteorder("<")
    rows, starts, key = [], [], 0
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(directory / shard["name"]) as tar:
            names = tar.getnames()
            assert names == sorted(names)
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        assert shard["first_key"] == key
        for k in range(key, key + shard["samples"]):
            rows.append(np.frombuffer(members.pop(f"{k:010d}.tokens"), dtype=dtype))
            starts.append(np.frombuffer(members.pop(f"{k:010d}.doc_starts"), dtype="<u4"))
        assert not members, f"unexpected members {list(members)[:3]}"
        key += shard["samples"]
    width = manifest["seq_len"] + 1
    return (np.stack(rows) if rows else np.empty((0, width), dtype)), starts


def decode_docs(processor, flat: np.ndarray) -> list[str]:
    """The complete documents (those whose EOD was written) of a token stream."""
    docs, start = [], 0
    for i in np.flatnonzero(flat == EOD).tolist():
        docs.append(processor.decode(flat[start:i].tolist()))
        start = i + 1
    return docs


def output_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file() and p.name != ".lock"}


def run_cli(args: list[str], env_extra: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(env_extra or {})
    cmd = [sys.executable, str(SHARD), *map(str, args)]
    # Own session: a killed run's Ray helpers are cleaned up with the whole process group.
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        finally:
            try:
                os.killpg(popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, tokenizer, ray_local):
    """The corpus sharded in-process with 2 workers."""
    root, _ = corpus
    out = tmp_path_factory.mktemp("ref") / "shards"
    manifest = build([root], out, tokenizer, num_workers=2)
    return out, manifest


@pytest.mark.slow
def test_round_trip_every_format_in_document_order(corpus, reference, processor):
    _, expected = corpus
    out, manifest = reference
    kept = [text for text, kind in expected if kind == "kept"]
    for split, want in (("train", [t for t in kept if not is_val(t)]),
                        ("val", [t for t in kept if is_val(t)])):
        stream = []
        for text in want:
            ids = processor.encode(text)
            assert processor.decode(ids) == text  # the tokenizer itself is lossless
            stream.extend(ids + [EOD])
        tokens, starts = read_split(out, split)
        flat = tokens.reshape(-1)
        assert len(flat) == manifest["splits"][split]["tokens"]
        assert flat.tolist() == stream[:len(flat)]
        assert len(stream) - len(flat) == manifest["tokens_dropped_tail"][split] < SEQ_LEN + 1
        # Decoding the concatenated samples gives back the documents, in order.
        docs = decode_docs(processor, flat)
        assert docs == want[:len(docs)] and len(want) - len(docs) <= SEQ_LEN
        for row, doc_starts in zip(tokens, starts):
            assert doc_starts.tolist() == (np.flatnonzero(row[:SEQ_LEN] == EOD) + 1).tolist()
    assert manifest["splits"]["val"]["samples"] > 0 and manifest["splits"]["train"]["samples"] > 0


@pytest.mark.slow
def test_manifest_fields(corpus, reference, tokenizer):
    _, expected = corpus
    out, manifest = reference
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["format"] == "pretrain-shards" and manifest["format_version"] == 1
    assert list(manifest) == ["format", "format_version", "seq_len", "token_dtype", "eod_id",
                              "tokenizer", "splits", "documents", "tokens_dropped_tail",
                              "settings", "inputs"]  # docs/formats.md, in its order
    assert (manifest["seq_len"], manifest["token_dtype"], manifest["eod_id"]) == (SEQ_LEN, "uint16", EOD)
    assert manifest["tokenizer"] == {"sha256": hashlib.sha256(tokenizer.read_bytes()).hexdigest(),
                                     "vocab_size": 400, "path": str(tokenizer)}
    kinds = [kind for _, kind in expected]
    documents = manifest["documents"]
    assert documents == {"read": len(expected), "kept": kinds.count("kept"), "utf8_repaired": 2,
                         "rejected": {"empty": kinds.count("empty"), "binary": kinds.count("binary"),
                                      "duplicate": kinds.count("duplicate"), "missing_text_key": 0,
                                      "invalid_json": 0}}
    assert kinds.count("empty") == 3 and kinds.count("binary") == 1 and kinds.count("duplicate") == 3
    names = {p.name for p in out.glob("*.tar")}
    for split in ("train", "val"):
        info = manifest["splits"][split]
        assert info["samples"] == sum(s["samples"] for s in info["shards"])
        assert info["tokens"] == info["samples"] * (SEQ_LEN + 1)
        key = 0
        for index, shard in enumerate(info["shards"]):
            data = (out / shard["name"]).read_bytes()
            assert list(shard) == ["name", "first_key", "samples", "tokens", "bytes", "sha256"]
            assert shard["name"] == f"{split}-{index:06d}.tar" and shard["name"] in names
            assert shard["first_key"] == key and shard["bytes"] == len(data)
            assert shard["sha256"] == hashlib.sha256(data).hexdigest()
            assert shard["tokens"] == shard["samples"] * (SEQ_LEN + 1)
            assert shard["samples"] == 40 or index == len(info["shards"]) - 1
            key += shard["samples"]
    assert len(manifest["splits"]["train"]["shards"]) >= 2
    assert manifest["settings"]["val_fraction"] == VAL_FRACTION and manifest["settings"]["dedup"] is True
    assert manifest["settings"]["text_key"] == "text" and manifest["settings"]["shard_samples"] == 40
    assert [i["path"] for i in manifest["inputs"]] == sorted(i["path"] for i in manifest["inputs"])
    assert all(os.path.getsize(i["path"]) == i["bytes"] for i in manifest["inputs"])
    assert len(manifest["inputs"]) == 14  # 9 .txt (hidden and .md skipped), 2 jsonl, gz, zst, parquet
    # Nothing else is left behind: no temp files, no work cache.
    assert sorted(p.name for p in out.iterdir()) == sorted(names | {"manifest.json", ".lock"})


@pytest.mark.slow
def test_tar_format_is_fixed_and_readable_by_webdataset(reference):
    import webdataset as wds

    from data_tools.shard_lib.pack import member_header

    out, manifest = reference
    shard = out / manifest["splits"]["train"]["shards"][1]["name"]
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    for member in members:
        assert (member.mtime, member.uid, member.gid, member.uname, member.gname, member.mode) == \
               (0, 0, 0, "", "", 0o644)
    assert len(shard.read_bytes()) % tarfile.RECORDSIZE == 0
    # The fast header writer is byte-identical to tarfile's.
    for key, ext, size in ((0, "tokens", 66), (1234567890, "doc_starts", 0), (42, "doc_starts", 12)):
        info = tarfile.TarInfo(f"{key:010d}.{ext}")
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
        assert member_header(key, ext, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    first = manifest["splits"]["train"]["shards"][1]["first_key"]
    assert [s["__key__"] for s in samples] == [f"{k:010d}" for k in range(first, first + 40)]
    assert all(len(s["tokens"]) == 2 * (SEQ_LEN + 1) for s in samples)


@pytest.mark.slow
def test_output_is_byte_identical_for_any_worker_count_and_granularity(tmp_path, corpus, reference, tokenizer):
    root, _ = corpus
    out, _ = reference
    # One worker, and read units / pieces of a few KB (many units, byte ranges of b.jsonl).
    build([root], tmp_path / "one", tokenizer, num_workers=1, unit_bytes=4096, piece_bytes=1024)
    assert output_files(tmp_path / "one") == output_files(out)


@pytest.mark.slow
def test_val_split_is_by_content_not_position(tmp_path, tokenizer, ray_local, processor):
    rng = random.Random(99)
    unique = {}
    for _ in range(200):
        text = make_doc(rng, rng.randint(3, 40))
        unique.setdefault(normalized_digest(text), text)
    docs = list(unique.values())
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in docs])
    write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in reversed(docs)])
    val_docs = {}
    for name in ("a", "b"):
        build([tmp_path / f"{name}.jsonl"], tmp_path / name, tokenizer, num_workers=1, val_fraction=0.3)
        tokens, _ = read_split(tmp_path / name, "val")
        val_docs[name] = decode_docs(processor, tokens.reshape(-1))
    want = [t for t in docs if is_val(t, 0.3)]
    assert 30 < len(want) < 90
    # The same documents go to val whatever their position; only their order follows the input.
    assert val_docs["a"] == want[:len(val_docs["a"])] and len(want) - len(val_docs["a"]) <= 3
    assert set(val_docs["b"]) <= set(want) and len(want) - len(val_docs["b"]) <= 3


@pytest.mark.slow
def test_no_dedup_keeps_duplicates(tmp_path, corpus, tokenizer, ray_local):
    root, expected = corpus
    manifest = build([root], tmp_path / "out", tokenizer, num_workers=2, dedup=False)
    kinds = [kind for _, kind in expected]
    assert manifest["documents"]["rejected"]["duplicate"] == 0
    assert manifest["documents"]["kept"] == kinds.count("kept") + kinds.count("duplicate")
    assert manifest["settings"]["dedup"] is False


@pytest.mark.slow
def test_paragraph_mode_with_byte_range_cuts(tmp_path, tokenizer, ray_local, processor):
    rng = random.Random(3)
    paragraphs = [make_doc(rng, rng.randint(1, 30)).replace("\n\n", "\n") for _ in range(80)]
    separators = ["\n\n", "\n  \n", "\r\n\r\n", "\n\n\n\n", "\n \t \n\n"]
    text = "\n\n" + "".join(p + rng.choice(separators) for p in paragraphs)
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    want = [p.strip() for p in re.split(r"\n[ \t\r\n]*\n", text) if p.strip()]
    assert len(want) == 80
    manifest = build([tmp_path / "book.txt"], tmp_path / "out", tokenizer, num_workers=2,
                     txt_mode="paragraph", val_fraction=0.0, unit_bytes=300, dedup=False)
    tokens, _ = read_split(tmp_path / "out", "train")
    docs = decode_docs(processor, tokens.reshape(-1))
    assert docs == want[:len(docs)] and len(want) - len(docs) <= 3
    assert manifest["documents"]["read"] == 80 and manifest["settings"]["txt_mode"] == "paragraph"


@pytest.mark.slow
def test_long_documents_are_encoded_in_chunks_and_split_over_pieces(tmp_path, tokenizer, ray_local, processor):
    rng = random.Random(11)
    spaced = make_doc(rng, 30000)  # ~200 KB, spaces throughout
    # 23 KB without a space, of learnt pieces: ids depend on where a hard cut falls.
    unspaced = "alphabetagammadelta" * 1200 + " tail " + make_doc(rng, 100)
    duplicate = spaced.replace(" x ", "  x  ")  # equal after normalization
    assert duplicate != spaced
    write_jsonl(tmp_path / "long.jsonl", [{"text": spaced}, {"text": unspaced}, {"text": duplicate}])
    common = dict(num_workers=2, val_fraction=0.0, chunk_bytes=4096, seq_len=64)
    # Pieces of 16 KB: the long documents are split into parts tokenized by both actors.
    manifest = build([tmp_path / "long.jsonl"], tmp_path / "parts", tokenizer, piece_bytes=16384, **common)
    build([tmp_path / "long.jsonl"], tmp_path / "whole", tokenizer, **common)
    assert output_files(tmp_path / "parts") == output_files(tmp_path / "whole")
    assert manifest["documents"]["kept"] == 2 and manifest["documents"]["rejected"]["duplicate"] == 1
    tokens, _ = read_split(tmp_path / "parts", "train")
    flat = tokens.reshape(-1).tolist()
    first = flat.index(EOD)
    # Cut where runs of spaces start: the same ids as encoding the whole document.
    assert flat[:first] == processor.encode(spaced)
    # A space-free stretch longer than a chunk is cut at a character boundary: an
    # approximation of the ids, but still the same text.
    assert processor.decode(flat[first + 1:]).startswith(unspaced[:10000])


# ---------------------------------------------------------------- atomicity and resume


@pytest.mark.slow
def test_killed_run_leaves_no_partial_final_file_and_resumes_byte_identical(tmp_path, corpus, tokenizer, reference):
    from data_tools.shard_lib.pack import KILL_AFTER_ENV

    root, _ = corpus
    out = tmp_path / "out"
    args = ["--input", root, "--output", out, "--tokenizer", tokenizer, "--seq-len", SEQ_LEN,
            "--val-fraction", VAL_FRACTION, "--shard-samples", 40, "--num-workers", 2,
            "--unit-bytes", 8192, "--piece-bytes", 2048]
    killed = run_cli(args, {KILL_AFTER_ENV: "2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    reference_files = output_files(reference[0])
    assert not (out / "manifest.json").exists()
    finished = sorted(p.name for p in out.glob("*.tar"))
    assert len(finished) == 2
    for name in finished:  # whatever has a final name is complete
        assert (out / name).read_bytes() == reference_files[name]
    temps = [p for p in out.iterdir() if re.match(r"^\..*\.tmp-\d+$", p.name)]
    assert temps and any(p.stat().st_size > 0 for p in temps)
    assert any((out / ".work").glob("*-last.npz"))

    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    cached = int(re.search(r"\((\d+) cached\)", resumed.stdout).group(1))
    assert cached > 0
    assert output_files(out) == reference_files
    assert not (out / ".work").exists()

    # Another dataset into the same OUTPUT: refused, then with --overwrite it replaces the old
    # one and removes its now-stale shards.
    other = args[:-4] + ["--shard-samples", 100000, "--no-progress"]
    refused = run_cli(other)
    assert refused.returncode == 2 and "holds another dataset (settings.shard_samples=40 there, " \
        "100000 now); pass --overwrite" in refused.stderr, refused.stderr[-3000:]
    assert output_files(out) == reference_files
    again = run_cli(other + ["--overwrite"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "val-000000.tar"]
    assert not (out / ".next").exists()


# ---------------------------------------------------------------- bad input


def cli_in_process(args: list, capsys) -> tuple[int, str]:
    from data_tools import shard

    code = shard.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize("case", ["unknown_extension", "missing_tokenizer", "missing_input",
                                  "parquet_without_column", "empty_directory", "bad_option"])
def test_bad_input_before_tokenizing_exits_2(tmp_path, tokenizer, case, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "ok.jsonl"
    write_jsonl(good, [{"text": "hello world"}])
    inputs, tok, extra, needle = [good], tokenizer, [], None
    if case == "unknown_extension":
        (tmp_path / "data.csv").write_text("a,b\n")
        inputs, needle = [tmp_path / "data.csv"], r"data\.csv: unsupported file type .*\.txt.*\.parquet"
    elif case == "missing_tokenizer":
        tok, needle = tmp_path / "nope.model", r"--tokenizer .*nope\.model: no such file"
    elif case == "missing_input":
        inputs, needle = [tmp_path / "absent.jsonl"], r"absent\.jsonl: no such file or directory"
    elif case == "parquet_without_column":
        pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
        inputs, needle = [tmp_path / "p.parquet"], r"p\.parquet: no column 'text' \(columns: body\); pass --text-key"
    elif case == "empty_directory":
        (tmp_path / "empty").mkdir()
        inputs, needle = [tmp_path / "empty"], r"empty: directory has no files of a supported type"
    else:
        extra, needle = ["--val-fraction", "1.5"], r"--val-fraction 1.5 must be in \[0, 1\)"
    code, err = cli_in_process(["--input", *inputs, "--output", tmp_path / "out", "--tokenizer", tok,
                                "--seq-len", 8, *extra], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and re.search(needle, err), err


def test_bad_input_real_cli_one_error_line(tmp_path, tokenizer):
    (tmp_path / "x.docx").write_bytes(b"PK\x03\x04")
    proc = run_cli(["--input", tmp_path / "x.docx", "--output", tmp_path / "out", "--tokenizer",
                    tokenizer, "--seq-len", 8])
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "x.docx: unsupported file type" in proc.stderr and ".jsonl.zst" in proc.stderr


@pytest.mark.parametrize("case", ["missing_key", "missing_key_in_later_range", "invalid_json",
                                  "no_documents", "too_few_tokens"])
@pytest.mark.slow
def test_bad_input_while_tokenizing_exits_2(tmp_path, tokenizer, ray_local, case, capsys):
    path = tmp_path / "data.jsonl"
    extra = ["--unit-bytes", 64]
    if case.startswith("missing_key"):
        bad_line = 3 if case == "missing_key" else 40
        records = [{"text": f"document {i} " * 3} for i in range(50)]
        records[bad_line - 1] = {"body": "no text here"}
        write_jsonl(path, records)
        needle = rf"data\.jsonl:{bad_line}: no field 'text' \(keys: body\); pass --text-key"
    elif case == "invalid_json":
        write_jsonl(path, [{"text": "fine"}, '{"text": "broken', {"text": "fine too"}])
        needle = r"data\.jsonl:2: not valid JSON .*--skip-bad-records"
    elif case == "no_documents":
        write_jsonl(path, [{"text": ""}, {"text": "  \n "}])
        (tmp_path / "junk.txt").write_bytes(bytes(range(128, 256)) * 20)
        extra += ["--input", tmp_path / "junk.txt"]
        needle = r"no documents left after cleaning \(3 read; rejected: 2 empty, 1 binary\)"
    else:
        write_jsonl(path, [{"text": "tiny"}])
        needle = r"the train split has \d+ tokens, less than one sample of seq_len\+1 = 1001"
    args = ["--input", path, "--output", tmp_path / "out", "--tokenizer", tokenizer, "--seq-len",
            1000 if case == "too_few_tokens" else 8, "--val-fraction", 0, "--no-progress", *extra]
    code, err = cli_in_process(args, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and re.search(needle, err), err
    assert not (tmp_path / "out" / "manifest.json").exists()
    if case.startswith("missing_key"):
        code, _ = cli_in_process(args + ["--skip-bad-records"], capsys)
        manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
        assert code == 0 and manifest["documents"]["rejected"]["missing_text_key"] == 1
        assert manifest["documents"]["kept"] == 49


# ---------------------------------------------------------------- library units (no Ray)


def test_chunk_bounds_and_digest_of_chunks():
    from data_tools.shard_lib.clean import chunk_bounds, normalized_digest

    rng = random.Random(0)
    for _ in range(200):
        doc = make_doc(rng, rng.randint(0, 400)).encode() + b"z" * rng.randint(0, 3000)
        limit = rng.randint(16, 600)
        bounds = chunk_bounds(doc, limit)
        assert bounds[0][0] == 0 and bounds[-1][1] == len(doc)
        assert all(a < b <= a + limit for a, b in bounds) or doc == b""
        assert all(b1 == a2 for (_, b1), (a2, _) in zip(bounds, bounds[1:]))
        chunks = [doc[a:b] for a, b in bounds]
        for chunk in chunks:
            chunk.decode("utf-8")  # never inside a character
        assert normalized_digest(chunks) == normalized_digest([doc])
        assert normalized_digest([doc]) == normalized_digest_ref(doc)


def normalized_digest_ref(doc: bytes) -> bytes:
    return hashlib.blake2b(b" ".join(doc.split()), digest_size=16).digest()


def test_token_dtype_by_vocab_size():
    from data_tools.shard_lib.tokenize import token_dtype

    assert token_dtype(400) == np.dtype("<u2") and token_dtype(65536) == np.dtype("<u2")
    assert token_dtype(65537) == np.dtype("<u4")



# ---------------------------------------------------------------- outputs pinned across refactors

# sha256 of what main (cfa7a2a, before the readers, tokenizer loading and shard format moved
# into pretrain/data/formats.py) wrote for the corpus below, with sentencepiece 0.2.x: the
# trained tokenizer model, and the manifest's splits (every shard's sha256, sample, token and
# text-byte counts) with its document counts. Neither may change in a refactor.
GOLDEN_MODEL_SHA256 = "fb95a931df657e2c1502f018d32dfc651a6a1652a98a41f3ddd350927464392c"
GOLDEN_SPLITS_SHA256 = "5f080d6bccad43f4f8dc080df5466a30e741b954750b30d21c280b3d2daadde1"


@pytest.mark.slow
def test_tokenizer_and_shards_keep_the_bytes_of_main(tmp_path, ray_local):
    from data_tools import train_tokenizer

    rng = random.Random(99)
    docs = [make_doc(rng, rng.randint(5, 150)) for _ in range(120)]
    root = tmp_path / "in"
    root.mkdir()
    (root / "a.txt").write_text("\n".join(docs[:20]), encoding="utf-8")
    write_jsonl(root / "b.jsonl", [{"text": d} for d in docs[20:]])
    assert train_tokenizer.main(["--input", str(root), "--vocab-size", "300",
                                 "--output", str(tmp_path / "tok")]) == 0
    manifest = build([root], tmp_path / "out", tmp_path / "tok.model", num_workers=2,
                     shard_samples=16, val_fraction=0.1)
    model = hashlib.sha256((tmp_path / "tok.model").read_bytes()).hexdigest()
    splits = hashlib.sha256(json.dumps([manifest["splits"], manifest["documents"],
                                        manifest["tokens_dropped_tail"]], sort_keys=True).encode())
    assert (model, splits.hexdigest()) == (GOLDEN_MODEL_SHA256, GOLDEN_SPLITS_SHA256)
