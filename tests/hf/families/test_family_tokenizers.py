"""The families' own tokenizer.json (byte-level BPE, their split regex and special tokens) as
shard.py's --tokenizer: each document's ids are what transformers' AutoTokenizer, loaded
from the same directory, gives for it (BOS where the family adds one), then the family's
end-of-text id."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.hf.families import tokenizer_files

TEXTS = [
    "Hello, world! It's a test: don't, we'll, they've.",
    "Café naïve Straße, cafe\u0301 (decomposed), 日本語の文章, Zürich 🙂 \u00a0nbsp",
    "tabs\tand   runs   of spaces\n\n\n  indented\n   \n\ttrailing   ",
    "digits 1234567890 3.14159 12,345.67 and 0x1F",
    "def area(r):\n    return 3.14159 * r ** 2  # 12,345.67\n\n\nclass A:\n\tpass\n",
    "typed specials <|endoftext|> <|end_of_text|> <|im_start|> stay what the library makes them",
    "",
]


@pytest.fixture(scope="module")
def family_tokenizers(tmp_path_factory):
    """{family: DIR with tokenizer.json + tokenizer_config.json}, made once."""
    root = tmp_path_factory.mktemp("family_tokenizers")
    for family in tokenizer_files.FAMILIES:
        tokenizer_files.save(family, root / family)
    return {family: root / family for family in tokenizer_files.FAMILIES}


def expected(directory, texts):
    """AutoTokenizer's encode(text) + the end-of-text id, per text."""
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(directory))
    return [auto.encode(text) + [auto.eos_token_id] for text in texts]


def our_documents(directory, texts, chunk_bytes=1 << 20):
    """The ids shard.py's tokenizing stage writes for each text (one piece, whole documents)."""
    from data_tools.shard_lib.inputs import FIRST, LAST
    from data_tools.shard_lib.pipeline import load_tokenizer
    from data_tools.shard_lib.tokenize import token_dtype, tokenize_entries
    from pretrain.data.tokenizers import open_tokenizer

    tok = load_tokenizer(str(directory / "tokenizer.json"))
    processor = open_tokenizer(tok.path, sha256=tok.sha256)
    data = b"".join(text.encode() for text in texts)
    lens = np.array([len(text.encode()) for text in texts], np.int64)
    flags = np.full(len(texts), FIRST | LAST, np.uint8)
    tokens, ntok, _ = tokenize_entries(processor, data, lens, flags, b"", chunk_bytes,
                                       token_dtype(tok.vocab_size), tok.eos_id, tok.prefix,
                                       tok.suffix)
    ends = np.cumsum(ntok)
    return [tokens[end - n:end].tolist() for end, n in zip(ends, ntok)], tok


@pytest.mark.parametrize("family", list(tokenizer_files.FAMILIES))
def test_documents_are_autotokenizer_ids_then_end_of_text(family, family_tokenizers):
    directory = family_tokenizers[family]
    ours, tok = our_documents(directory, TEXTS)
    assert ours == expected(directory, TEXTS)
    spec = tokenizer_files.FAMILIES[family]
    vocab = json.loads((directory / "tokenizer.json").read_text())["added_tokens"]
    ids = {token["content"]: token["id"] for token in vocab}
    assert tok.eos_id == ids[spec["eos"]]
    # Llama 3 adds its BOS from the post-processor, Qwen adds none
    assert tok.prefix == ([ids[spec["bos"]]] if spec["bos"] else []) and tok.suffix == []


def test_framing_follows_the_post_processor_as_transformers_does(family_tokenizers, tmp_path):
    """transformers frames a text by tokenizer.json's post-processor alone (it drops
    add_bos_token/add_eos_token from tokenizer_config.json when a tokenizer.json is there),
    and so does shard.py; an EOS the template appends, equal to the EOT, is not doubled."""
    source = family_tokenizers["llama3"]
    end_too = "<|begin_of_text|> $A <|end_of_text|>"
    for case in ("add_bos_token false", "template adds the EOT"):
        directory = tmp_path / case.replace(" ", "_")
        shutil.copytree(source, directory)
        if case == "add_bos_token false":
            config = json.loads((directory / "tokenizer_config.json").read_text())
            (directory / "tokenizer_config.json").write_text(
                json.dumps({**config, "add_bos_token": False, "add_eos_token": False}))
        else:
            spec = json.loads((directory / "tokenizer.json").read_text())
            template = spec["post_processor"]["processors"][1]
            template["single"] = [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                                  {"Sequence": {"id": "A", "type_id": 0}},
                                  {"SpecialToken": {"id": "<|end_of_text|>", "type_id": 0}}]
            template["special_tokens"]["<|end_of_text|>"] = {
                "id": "<|end_of_text|>", "ids": [tokenizer_files.build("llama3").token_to_id(
                    "<|end_of_text|>")], "tokens": ["<|end_of_text|>"]}
            (directory / "tokenizer.json").write_text(json.dumps(spec))
        ours, tok = our_documents(directory, TEXTS[:3])
        want = expected(directory, TEXTS[:3])
        if case == "template adds the EOT":  # AutoTokenizer's ids already end with it
            assert all(doc[-2:] == [tok.eos_id, tok.eos_id] for doc in want), end_too
            want = [doc[:-1] for doc in want]
        assert tok.prefix == [want[0][0]] and ours == want, case


@pytest.mark.slow
def test_shard_cli_writes_autotokenizer_ids(family_tokenizers, tmp_path):
    """shard.py end to end (Ray), with Llama 3's tokenizer (BOS and EOT around each
    document; Qwen's goes through the CLI in tests/hf/test_continued_pretraining.py): the
    packed stream is every kept document's AutoTokenizer ids then its EOT, in order; the
    manifest names the EOT and the file's sha256."""
    import hashlib

    from pretrain.data.sources import ShardSource
    from tests.launch_helpers import launch

    directory = family_tokenizers["llama3"]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    out = tmp_path / "shards"
    launch(["data_tools/shard.py", "--input", str(corpus), "--output", str(out), "--tokenizer",
            str(directory / "tokenizer.json"), "--seq-len", "16", "--val-fraction", "0",
            "--num-workers", "1"], 1, 300, "shard.py")
    manifest = json.loads((out / "manifest.json").read_text())
    kept = [text for text in TEXTS if text.strip()]  # the empty document is dropped, counted
    assert manifest["documents"]["rejected"]["empty"] == 1
    stream = [i for doc in expected(directory, kept) for i in doc]
    assert manifest["eod_id"] == stream[-1]
    digest = hashlib.sha256((directory / "tokenizer.json").read_bytes()).hexdigest()
    assert manifest["tokenizer"]["sha256"] == digest
    source = ShardSource(str(out), "train")
    rows = np.concatenate([source.load_shard(i).tokens for i in range(len(source.shards))])
    assert rows.reshape(-1).tolist() == stream[:rows.size]
    assert manifest["tokens_dropped_tail"]["train"] == len(stream) - rows.size


@pytest.mark.parametrize("family", list(tokenizer_files.FAMILIES))
@pytest.mark.parametrize("beside", ["with_config", "without_config"])
def test_exported_tokenizer_gives_the_training_data_ids(family, beside, family_tokenizers, tmp_path):
    """The export's tokenizer files (pretrain/hf/export.py writes them with these): AutoTokenizer
    on the exported directory gives the ids shard.py wrote, names the EOT as its eos token
    (and config.json's eos_token_id, from the returned ids), and Llama 3's BOS as bos."""
    from transformers import AutoTokenizer

    from pretrain.hf.tokenizer import write_tokenizer

    source = tmp_path / "source"
    shutil.copytree(family_tokenizers[family], source)
    if beside == "without_config":
        (source / "tokenizer_config.json").unlink()
    out = tmp_path / "export"
    out.mkdir()
    special_ids = write_tokenizer(source / "tokenizer.json", out, 64)
    ours, tok = our_documents(source, TEXTS)
    auto = AutoTokenizer.from_pretrained(str(out))
    assert [auto.encode(text) + [auto.eos_token_id] for text in TEXTS] == ours
    assert special_ids["eos"] == auto.eos_token_id == tok.eos_id
    assert special_ids.get("bos") == auto.bos_token_id == (tok.prefix[0] if tok.prefix else None)
    assert json.loads((out / "special_tokens_map.json").read_text())["eos_token"] == auto.eos_token


def test_unreadable_tokenizer_config_is_one_line(family_tokenizers, tmp_path, capsys):
    from data_tools.shard import main

    directory = tmp_path / "tok"
    shutil.copytree(family_tokenizers["qwen2"], directory)
    (directory / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>",')
    (tmp_path / "corpus.jsonl").write_text('{"text": "hello"}\n')
    assert main(["--input", str(tmp_path / "corpus.jsonl"), "--output", str(tmp_path / "out"),
                 "--tokenizer", str(directory / "tokenizer.json"), "--seq-len", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizer_config.json: not valid JSON" in err, err
    assert "Traceback" not in err
