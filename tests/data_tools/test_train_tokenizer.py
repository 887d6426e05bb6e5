"""data_tools/train_tokenizer.py run as the CLI it is (a subprocess from the repo root) on small
corpora cut from the standard library's source, plus unit tests of its splitting and sampling.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from data_tools.train_tokenizer import MAX_SENTENCE_BYTES, ReservoirSampler, split_long_line
from pretrain.data.tokenizers import TokenizerError, load_tokenizer
from pretrain.files import file_sha256, write_atomic

REPO = Path(__file__).resolve().parents[2]
SCRIPT = "data_tools/train_tokenizer.py"
VOCAB = 400
# Characters surely absent from the training text: they must come back through byte fallback.
UNSEEN = "ꙮ 𓂀 🎉"


def run_cli(*args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=REPO, text=True,
                          capture_output=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"train_tokenizer failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return proc


def _stdlib_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.stat().st_size < 60_000)


def _documents(start: int, total_bytes: int) -> list[str]:
    """Whole stdlib source files (one document each) from the start-th on, about total_bytes."""
    docs, size = [], 0
    for path in _stdlib_sources()[start:]:
        text = path.read_text(encoding="utf-8")
        if "\r" in text or "\t" in text or not text.endswith("\n"):
            continue  # keep the corpus plain, so that the round-trip test's tabs are unseen
        docs.append(text)
        size += len(text.encode())
        if size >= total_bytes:
            return docs
    raise AssertionError("not enough standard-library source for the test corpus")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Two .txt files, about 300 KB of Python source in all."""
    root = tmp_path_factory.mktemp("corpus")
    docs = _documents(0, 300_000)
    half = len(docs) // 2
    (root / "a.txt").write_text("".join(docs[:half]), encoding="utf-8")
    (root / "b.txt").write_text("".join(docs[half:]), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    """PREFIX.model of one BPE run over the corpus (shared by the read-only tests)."""
    prefix = tmp_path_factory.mktemp("tok") / "tok"
    run_cli("--input", corpus, "--vocab-size", VOCAB, "--output", prefix)
    return prefix.with_suffix(".model")


# ---------------------------------------------------------------- determinism

def test_same_inputs_give_a_byte_identical_model(corpus, tmp_path):
    first = run_cli("--input", corpus, "--vocab-size", VOCAB, "--output", tmp_path / "one" / "tok")
    second = run_cli("--input", corpus, "--vocab-size", VOCAB, "--output", tmp_path / "two" / "other")
    model_a = (tmp_path / "one" / "tok.model").read_bytes()
    model_b = (tmp_path / "two" / "other.model").read_bytes()
    assert model_a == model_b
    assert "tok.model" in first.stdout and "other.model" in second.stdout
    card_a = json.loads((tmp_path / "one" / "tok.json").read_text())
    card_b = json.loads((tmp_path / "two" / "other.json").read_text())
    assert card_a["sha256"] == card_b["sha256"] == file_sha256(tmp_path / "one" / "tok.model")


def test_progress_on_a_terminal_only_and_the_same_model(corpus, tmp_path):
    from tests.launch_helpers import run_on_terminal

    piped = run_cli("--input", corpus, "--vocab-size", VOCAB, "--output", tmp_path / "piped")
    assert piped.stderr == ""  # logs and pipes get no bar
    code, stdout, terminal = run_on_terminal(
        [sys.executable, SCRIPT, "--input", str(corpus), "--vocab-size", str(VOCAB),
         "--output", str(tmp_path / "tty")])
    assert code == 0 and "tty.model" in stdout
    assert "read: 100%" in terminal and "training a bpe tokenizer on" in terminal
    assert (tmp_path / "tty.model").read_bytes() == (tmp_path / "piped.model").read_bytes()


def test_input_order_and_spelling_do_not_matter(corpus, tmp_path):
    run_cli("--input", corpus, "--vocab-size", VOCAB, "--output", tmp_path / "dir")
    run_cli("--input", corpus / "b.txt", corpus / "a.txt", "--vocab-size", VOCAB,
            "--output", tmp_path / "files")
    run_cli("--input", str(corpus / "*.txt"), "--vocab-size", VOCAB, "--output", tmp_path / "glob")
    models = {name: (tmp_path / f"{name}.model").read_bytes() for name in ("dir", "files", "glob")}
    assert models["dir"] == models["files"] == models["glob"]
    card = json.loads((tmp_path / "files.json").read_text())
    assert [Path(i["path"]).name for i in card["inputs"]] == ["a.txt", "b.txt"]


def test_unigram_is_deterministic_too(corpus, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("".join(_documents(0, 80_000)), encoding="utf-8")
    for name in ("u1", "u2"):
        run_cli("--input", small, "--vocab-size", 350, "--model-type", "unigram",
                "--output", tmp_path / name)
    assert (tmp_path / "u1.model").read_bytes() == (tmp_path / "u2.model").read_bytes()
    card = json.loads((tmp_path / "u1.json").read_text())
    assert card["model_type"] == "unigram" and card["settings"]["num_threads"] == 1
    sp, _, _ = load_tokenizer(tmp_path / "u1.model")
    text = "def f(x):\n\treturn x  # " + UNSEEN + "\n"
    assert sp.decode(sp.encode(text)) == text


def test_sampling_is_a_seeded_subset(corpus, tmp_path):
    common = ("--input", corpus, "--vocab-size", VOCAB, "--max-sentences", 3000)
    run_cli(*common, "--seed", 7, "--output", tmp_path / "s7a")
    run_cli(*common, "--seed", 7, "--output", tmp_path / "s7b")
    run_cli(*common, "--seed", 8, "--output", tmp_path / "s8")
    assert (tmp_path / "s7a.model").read_bytes() == (tmp_path / "s7b.model").read_bytes()
    assert (tmp_path / "s7a.model").read_bytes() != (tmp_path / "s8.model").read_bytes()
    card = json.loads((tmp_path / "s7a.json").read_text())
    assert card["settings"]["seed"] == 7 and card["settings"]["max_sentences"] == 3000
    assert card["settings"]["sample_size"] == card["corpus"]["sentences_used"] == 3000
    assert card["corpus"]["sentences"] > 3000
    # sentencepiece must not sample again on its own
    assert card["settings"]["input_sentence_size"] == 0


def test_reservoir_sampler_is_uniform_ordered_and_seeded():
    def sample(seed, n=20_000, k=1000):
        sampler = ReservoirSampler(k, seed)
        for i in range(n):
            sampler.add(f"{i:06d}")
        return sampler.sample()

    first = sample(1)
    assert first == sample(1) and first != sample(2)
    assert len(first) == 1000 and len(set(first)) == 1000
    assert first == sorted(first)  # fed to the trainer in corpus order
    positions = [int(s) for s in first]
    assert 9_000 < sum(positions) / len(positions) < 11_000  # uniform: mean near n/2
    assert sum(p >= 10_000 for p in positions) > 400  # the late half is not starved
    few = ReservoirSampler(10, 0)
    for s in "abc":
        few.add(s)
    assert few.sample() == ["a", "b", "c"]


# ---------------------------------------------------------------- the model

def test_round_trip_of_source_with_indentation_and_unicode(trained):
    sp, card, _ = load_tokenizer(trained)
    assert card is not None
    unseen_source = "".join(p.read_text(encoding="utf-8") for p in _stdlib_sources()[-3:])
    text = (unseen_source + "\nclass Café:\n\tdef f(self):\t# tab\n\t\treturn '  two  spaces '\r\n"
            "        x = 'ﬁ ＡＢ 世界 " + UNSEEN + "'\n\n\n   \n")
    ids = sp.encode(text)
    assert sp.decode(ids) == text
    assert sp.unk_id() not in ids
    # characters the trainer never saw are spelled in UTF-8 bytes, not mapped to <unk>
    pieces = sp.encode("ꙮ", out_type=str)
    assert pieces == ["<0xEA>", "<0x99>", "<0xAE>"]
    # indentation gets pieces of its own (whitespace-only pieces allowed, spaces not folded)
    assert sp.piece_to_id("▁▁▁▁") != sp.unk_id()
    assert len(sp.encode("        return")) <= 3
    assert sp.encode("12345", out_type=str) == ["1", "2", "3", "4", "5"]  # split_digits
    assert not sp.encode("import os", out_type=str)[0].startswith("▁")  # no dummy prefix


def test_special_ids_are_fixed(trained):
    sp, card, _ = load_tokenizer(trained)
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert all(sp.is_byte(i) for i in range(4, 4 + 256))
    assert card["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}


def test_card_describes_the_model_and_inputs(trained, corpus):
    sp, card, sha256 = load_tokenizer(trained)
    assert card["format"] == "pretrain-tokenizer" and card["format_version"] == 1
    assert card["model_file"] == trained.name
    assert card["sha256"] == sha256 == file_sha256(trained)
    assert card["vocab_size"] == VOCAB == sp.get_piece_size()
    assert card["model_type"] == "bpe"
    settings = card["settings"]
    for key, value in {"byte_fallback": True, "split_digits": True, "normalization_rule_name": "identity",
                       "remove_extra_whitespaces": False, "allow_whitespace_only_pieces": True,
                       "num_threads": 1, "shuffle_input_sentence": False, "vocab_size": VOCAB,
                       "pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3, "seed": 0,
                       "max_sentences": 2_000_000}.items():
        assert settings[key] == value, key
    assert settings["sample_size"] == card["corpus"]["sentences"] > 1000
    assert card["corpus"]["documents"] == 2 and card["corpus"]["long_lines_split"] == 0
    assert [(Path(i["path"]).name, i["bytes"], i["sha256"]) for i in card["inputs"]] == [
        (name, (corpus / name).stat().st_size, file_sha256(corpus / name)) for name in ("a.txt", "b.txt")]
    # written atomically: no temporary files are left beside the outputs
    assert sorted(p.name for p in trained.parent.iterdir()) == ["tok.json", "tok.model"]


def test_load_tokenizer_rejects_a_card_of_another_model(trained, tmp_path):
    model = tmp_path / "t.model"
    shutil.copy(trained, model)
    sp, card, sha256 = load_tokenizer(model)
    assert card is None and sha256 == file_sha256(trained)  # no card: still loads
    card = json.loads(trained.with_suffix(".json").read_text())
    card["sha256"] = "0" * 64
    model.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(TokenizerError, match="train_tokenizer.py"):
        load_tokenizer(model)


def test_retraining_into_a_prefix_replaces_model_and_card_together(corpus, tmp_path):
    prefix = tmp_path / "tok"
    run_cli("--input", corpus, "--vocab-size", VOCAB, "--output", prefix)
    run_cli("--input", corpus, "--vocab-size", VOCAB + 20, "--output", str(prefix) + ".model")
    sp, card, sha256 = load_tokenizer(prefix.with_suffix(".model"))  # checks sha256 and ids
    assert card["vocab_size"] == sp.get_piece_size() == VOCAB + 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok.json", "tok.model"]


def test_write_atomic_leaves_the_old_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "tok.model"
    write_atomic(target, b"old")
    assert target.read_bytes() == b"old" and target.stat().st_mode & 0o777 == 0o644

    def crash(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr("os.replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["tok.model"]  # no temporary left behind


# ---------------------------------------------------------------- long lines

def test_long_line_is_split_not_dropped(tmp_path):
    corpus = tmp_path / "in"
    corpus.mkdir()
    (corpus / "code.txt").write_text("".join(_documents(0, 60_000)), encoding="utf-8")
    # One 20,000-character line whose word appears nowhere else; sentencepiece would drop
    # the whole line (> 4192 bytes) and never learn the word.
    (corpus / "long.txt").write_text("qxzvk " * 3334 + "\n", encoding="utf-8")
    # Invalid UTF-8 and a lone surrogate are repaired (U+FFFD) and counted, not fatal.
    (corpus / "latin1.txt").write_bytes(b"caf\xe9 au lait\n")
    (corpus / "escaped.jsonl").write_text('{"text": "half a pair \\ud800 here"}\n')
    run_cli("--input", corpus, "--vocab-size", VOCAB, "--output", tmp_path / "tok")
    card = json.loads((tmp_path / "tok.json").read_text())
    assert card["corpus"]["utf8_repaired"] == 2
    assert card["corpus"]["long_lines_split"] == 1
    assert card["corpus"]["long_line_chunks"] == -(-20_004 // MAX_SENTENCE_BYTES)
    sp, _, _ = load_tokenizer(tmp_path / "tok.model")
    assert sp.piece_to_id("▁qxzvk") != sp.unk_id()


def test_split_long_line_respects_bytes_characters_and_whitespace():
    line = ("wörd 世界 🎉🎉 " * 2000).strip()
    chunks = split_long_line(line)
    assert "".join(chunks) == line and len(chunks) > 1
    assert all(len(c.encode("utf-8")) <= MAX_SENTENCE_BYTES for c in chunks)
    assert all(c.startswith(" ") for c in chunks[1:])  # cut before whitespace, words whole
    no_space = "é🎉" * 3000  # no whitespace: cut at character boundaries only
    chunks = split_long_line(no_space)
    assert "".join(chunks) == no_space
    assert all(0 < len(c.encode("utf-8")) <= MAX_SENTENCE_BYTES for c in chunks)
    assert split_long_line("short line") == ["short line"]
    exact = "a" * MAX_SENTENCE_BYTES
    assert split_long_line(exact) == [exact]


# ---------------------------------------------------------------- jsonl inputs

def _model_from_text(tmp_path, docs: list[str]) -> bytes:
    """The model trained on the two halves of `docs` as two .txt files: the reference every
    other input format of the same documents must reproduce byte for byte."""
    text_dir = tmp_path / "txt"
    text_dir.mkdir()
    half = len(docs) // 2
    (text_dir / "a.txt").write_text("".join(docs[:half]), encoding="utf-8")
    (text_dir / "b.txt").write_text("".join(docs[half:]), encoding="utf-8")
    run_cli("--input", text_dir, "--vocab-size", VOCAB, "--output", tmp_path / "from_txt")
    return (tmp_path / "from_txt.model").read_bytes()


def test_jsonl_and_gz_inputs_train_the_same_model_as_text(tmp_path):
    docs = _documents(0, 120_000)
    half = len(docs) // 2
    json_dir = tmp_path / "json"
    json_dir.mkdir()
    with open(json_dir / "a.jsonl", "w", encoding="utf-8") as f:
        for doc in docs[:half]:
            f.write(json.dumps({"id": 1, "content": doc}) + "\n\n")  # blank lines are skipped
    with gzip.open(json_dir / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        for doc in docs[half:]:
            f.write(json.dumps({"content": doc, "meta": {}}) + "\n")
    run_cli("--input", json_dir, "--vocab-size", VOCAB, "--text-key", "content",
            "--output", tmp_path / "from_json")
    assert _model_from_text(tmp_path, docs) == (tmp_path / "from_json.model").read_bytes()
    card = json.loads((tmp_path / "from_json.json").read_text())
    assert card["corpus"]["documents"] == len(docs)
    assert card["settings"]["text_key"] == "content"
    assert [Path(i["path"]).name for i in card["inputs"]] == ["a.jsonl", "b.jsonl.gz"]
    assert card["inputs"][1]["sha256"] == file_sha256(json_dir / "b.jsonl.gz")


def test_parquet_and_zst_inputs_train_the_same_model_as_text(tmp_path):
    """Every format shard.py reads trains the tokenizer too (the data layer reads them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = _documents(0, 120_000)
    half = len(docs) // 2
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    # several row groups, and a second column that is not the text
    pq.write_table(pa.table({"body": docs[:half], "n": list(range(half))}),
                   other_dir / "a.parquet", row_group_size=3)
    lines = "".join(json.dumps({"body": doc}) + "\n" for doc in docs[half:]).encode()
    (other_dir / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    run_cli("--input", other_dir, "--vocab-size", VOCAB, "--text-key", "body",
            "--output", tmp_path / "from_other")
    assert _model_from_text(tmp_path, docs) == (tmp_path / "from_other.model").read_bytes()
    card = json.loads((tmp_path / "from_other.json").read_text())
    assert card["corpus"]["documents"] == len(docs)
    assert [Path(i["path"]).name for i in card["inputs"]] == ["a.parquet", "b.jsonl.zst"]
    assert [i["sha256"] for i in card["inputs"]] == [file_sha256(other_dir / "a.parquet"),
                                                    file_sha256(other_dir / "b.jsonl.zst")]
    bad = run_cli("--input", other_dir / "a.parquet", "--vocab-size", VOCAB, "--output",
                  tmp_path / "x", check=False)  # the default --text-key: no such column
    assert bad.returncode == 2 and "a.parquet: no column 'text' (columns: body, n)" in bad.stderr


# ---------------------------------------------------------------- bad input

def _bad_cases(tmp: Path) -> dict:
    """name -> (arguments, words the one-line error must contain)."""
    code = tmp / "code.txt"
    code.write_text("".join(_documents(0, 20_000)), encoding="utf-8")
    (tmp / "data.csv").write_text("a,b\n")
    (tmp / "records.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"body": "c"}\n')
    (tmp / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    (tmp / "number.jsonl").write_text('{"text": 5}\n')
    (tmp / "empty.txt").write_text("\n\n\n")
    (tmp / "plain.jsonl.gz").write_text('{"text": "not compressed"}\n')
    (tmp / "nothing").mkdir()
    # 400 distinct characters: with coverage 1.0 each needs a piece, more than 300 allow
    (tmp / "many_chars.txt").write_text(
        "\n".join(" ".join(chr(0x4E00 + i) * 3 for i in range(j, j + 20)) for j in range(0, 400, 20)),
        encoding="utf-8")
    out = ["--output", tmp / "out" / "tok"]
    return {
        "missing file": (["--input", tmp / "nope.txt", "--vocab-size", VOCAB, *out], ["nope.txt"]),
        "unsupported extension": (["--input", tmp / "data.csv", "--vocab-size", VOCAB, *out],
                                  ["data.csv", ".txt, .jsonl", ".parquet"]),
        "missing text key": (["--input", tmp / "records.jsonl", "--vocab-size", VOCAB, *out],
                             ["records.jsonl line 3", "'text'", "--text-key"]),
        "invalid json": (["--input", tmp / "broken.jsonl", "--vocab-size", VOCAB, *out],
                         ["broken.jsonl line 2", "JSON"]),
        "text not a string": (["--input", tmp / "number.jsonl", "--vocab-size", VOCAB, *out],
                              ["number.jsonl line 1", "--text-key"]),
        "not gzip": (["--input", tmp / "plain.jsonl.gz", "--vocab-size", VOCAB, *out],
                     ["plain.jsonl.gz", "gzip"]),
        "empty input": (["--input", tmp / "empty.txt", "--vocab-size", VOCAB, *out], ["no text"]),
        "empty directory": (["--input", tmp / "nothing", "--vocab-size", VOCAB, *out], ["nothing"]),
        "glob without match": (["--input", str(tmp / "*.parquet"), "--vocab-size", VOCAB, *out],
                               ["*.parquet", "matches no files"]),
        "vocab too large": (["--input", code, "--vocab-size", 50_000, *out],
                            ["--vocab-size 50000", "or less"]),
        "vocab below the fixed pieces": (["--input", code, "--vocab-size", 100, *out],
                                         ["--vocab-size 100", "261"]),
        "vocab below the characters": (["--input", tmp / "many_chars.txt", "--vocab-size", 300,
                                        "--character-coverage", 1.0, *out],
                                       ["--vocab-size 300", "or more"]),
        "character coverage": (["--input", code, "--vocab-size", VOCAB, "--character-coverage",
                                0.5, *out], ["--character-coverage 0.5"]),
        "missing flag": (["--input", code, *out], ["--vocab-size"]),
    }


BAD_IDS = ["missing file", "unsupported extension", "missing text key", "invalid json",
           "text not a string", "not gzip", "empty input", "empty directory", "glob without match",
           "vocab too large", "vocab below the fixed pieces", "vocab below the characters",
           "character coverage", "missing flag"]


@pytest.mark.parametrize("case", BAD_IDS)
def test_bad_input_exits_2_with_one_line(case, tmp_path):
    args, words = _bad_cases(tmp_path)[case]
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not (tmp_path / "out").exists()  # nothing written on failure


def test_binary_inputs_are_skipped_like_shard_py_skips_them(corpus, tmp_path):
    """A binary .txt and a binary .jsonl record (shard.py's 'binary' rule): the model and its
    corpus counts are those of the text alone."""
    import random

    noise = random.Random(3).randbytes(200_000)
    (tmp_path / "blob.txt").write_bytes(noise)
    (tmp_path / "mixed.jsonl").write_text(json.dumps({"text": "\x00" * 500}) + "\n")
    clean, dirty = tmp_path / "clean", tmp_path / "dirty"
    run_cli("--input", corpus, "--vocab-size", VOCAB, "--output", clean)
    out = run_cli("--input", corpus, tmp_path / "blob.txt", tmp_path / "mixed.jsonl",
                  "--vocab-size", VOCAB, "--output", dirty)
    assert "2 binary document(s) skipped" in out.stdout
    assert (tmp_path / "dirty.model").read_bytes() == (tmp_path / "clean.model").read_bytes()
    card = json.loads((tmp_path / "dirty.json").read_text())
    assert card["corpus"]["binary_skipped"] == 2
