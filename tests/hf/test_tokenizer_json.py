"""A Hugging Face tokenizer.json (tokenizers library) in place of a sentencepiece model:
shard.py tokenizes with it exactly as the library does and records its sha256, training
decodes samples with it and refuses another file, and a bad file is one line."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from tests.launch_helpers import launch, run_training

# Every test here trains, exports or evaluates through the CLIs (tests/hf/conftest.py).
pytestmark = pytest.mark.slow

TEXT = ("def greet(name):\n    return f'Hello, {name}!'  # ok\n\n"
        "Café naïve Straße 日本語 🙂 3.14159   spaces\ttab\n") * 40


def make_tokenizer_json(path):
    """A byte-level BPE (GPT-2 style) trained here, with </s> as its end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([TEXT], trainer)
    tokenizer.save(str(path))
    return tokenizer


def test_shards_made_with_a_tokenizer_json(tmp_path):
    tokenizer = make_tokenizer_json(tmp_path / "tokenizer.json")
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    out = tmp_path / "shards"
    launch(["data_tools/shard.py", "--input", str(tmp_path / "corpus.jsonl"), "--output", str(out),
            "--tokenizer", str(tmp_path / "tokenizer.json"), "--seq-len", "32",
            "--val-fraction", "0", "--num-workers", "2"], 1, 300, "shard.py")
    manifest = json.loads((out / "manifest.json").read_text())
    digest = hashlib.sha256((tmp_path / "tokenizer.json").read_bytes()).hexdigest()
    eos = tokenizer.token_to_id("</s>")
    assert manifest["tokenizer"]["sha256"] == digest and manifest["eod_id"] == eos
    assert manifest["tokenizer"]["vocab_size"] == tokenizer.get_vocab_size()

    from pretrain.data.sources import ShardSource

    source = ShardSource(str(out), "train")
    rows = np.concatenate([source.load_shard(i).tokens for i in range(len(source.shards))])
    stream = tokenizer.encode(TEXT, add_special_tokens=False).ids + [eos]
    width = 33
    assert len(rows) == len(stream) // width
    assert manifest["tokens_dropped_tail"]["train"] == len(stream) - len(rows) * width
    assert rows.reshape(-1).tolist() == stream[:len(rows) * width]

    # Training reads the shards, finds the tokenizer through the manifest, checks its hash
    # and decodes a sample with it; another tokenizer.json is refused in one line.
    result = run_training(tmp_path / "run", ["train.steps=1", "optim.warmup_steps=0",
                                             f"data.train={out}", "train.sample_tokens=4",
                                             "checkpoint.save_on_stop=false"])
    assert "---- sample ----" in result.stdout
    other = tmp_path / "other" / "tokenizer.json"
    other.parent.mkdir()
    other.write_text((tmp_path / "tokenizer.json").read_text().replace("</s>", "<eos>"))
    result = run_training(tmp_path / "run2", ["train.steps=1", "optim.warmup_steps=0",
                                              f"data.train={out}", f"data.tokenizer={other}"],
                          expect_rc=2)
    errors = [line for line in result.stderr.splitlines() if line.startswith("data error:")]
    assert len(errors) == 1 and "is not the one" in errors[0], result.stderr[-2000:]


def test_bad_tokenizer_json_is_one_line(tmp_path):
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    result = launch(["data_tools/shard.py", "--input", str(tmp_path / "corpus.jsonl"), "--output",
                     str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tokenizer.json"),
                     "--seq-len", "32"], 1, 120, "shard.py", expect_rc=2)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "not a Hugging Face tokenizer.json" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
