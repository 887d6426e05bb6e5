"""`checkpoint.load_from=hf:DIR` compared only the vocabulary size: shards made with another
tokenizer (and model.vocab_size set as the refusal suggested) trained the model on the wrong
ids, exit 0. Now DIR's tokenizer must be the data's: the same file (sha256), or the same ids
on a probe text and the same end-of-text id; a DIR without tokenizer files is refused."""

from __future__ import annotations

import json

import pytest

from pretrain.config import load_config
from pretrain.data.build import open_data
from pretrain.errors import CheckpointError
from pretrain.files import file_sha256
from pretrain.hf.importer import check_tokenizer
from tests.conftest import SMOKE
from tests.data.shard_writer import write_dataset
from tests.hf.byte_tokenizer import save_byte_tokenizer


def _embedded():
    cfg = load_config(SMOKE, ["data.train=embedded"])
    return cfg, open_data(cfg)


def test_the_data_tokenizer_passes_by_its_ids(tmp_path):
    cfg, data = _embedded()  # byte-level ids: no file to hash, so compared on the probe
    save_byte_tokenizer(tmp_path)
    check_tokenizer(tmp_path, cfg, data, "hf:x")


@pytest.mark.parametrize("make, needle", [
    (lambda d: None, "no tokenizer.json or tokenizer.model in"),
    (lambda d: save_byte_tokenizer(d, swap=(ord("a"), ord("b"))),
     "was not made with {d}'s tokenizer: the ids of a probe text differ from token"),
    (lambda d: save_byte_tokenizer(d) and (d / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "a"})), "the end-of-text id differs (97 in tokenizer.json, 256"),
])
def test_another_tokenizer_is_one_line(tmp_path, make, needle):
    cfg, data = _embedded()
    make(tmp_path)
    with pytest.raises(CheckpointError, match=None) as err:
        check_tokenizer(tmp_path, cfg, data, "hf:x")
    assert str(err.value).startswith("hf:x: ") and needle.format(d=tmp_path) in str(err.value)


def test_shards_of_the_same_tokenizer_file_pass_by_hash(tmp_path):
    """Shards whose manifest names DIR's tokenizer.json by its sha256; the file the shards were
    made from is not readable here, so only the hash can say, and it suffices."""
    hf = tmp_path / "hf"
    tokenizer = save_byte_tokenizer(hf)
    shards = write_dataset(tmp_path / "ds", 32, [4], tokenizer_sha=file_sha256(tokenizer),
                           vocab_size=257, eod_id=256)
    cfg = load_config(SMOKE, [f"data.train={shards}"])
    check_tokenizer(hf, cfg, open_data(cfg), "hf:x")
    other = write_dataset(tmp_path / "other", 32, [4], tokenizer_sha="f" * 64, vocab_size=257)
    cfg = load_config(SMOKE, [f"data.train={other}"])
    with pytest.raises(CheckpointError, match="is not readable here to compare ids; set "
                                              "data.tokenizer=PATH"):
        check_tokenizer(hf, cfg, open_data(cfg), "hf:x")


@pytest.mark.slow
def test_a_run_on_another_tokenizers_data_stops_with_exit_2(tmp_path):
    from tests.hf.test_import_hf import BASE, make_llama
    from tests.launch_helpers import run_training

    make_llama(tmp_path / "hf", tie=True, seed=5)
    save_byte_tokenizer(tmp_path / "hf", swap=(ord("e"), ord("t")))  # over the matching one
    out = run_training(tmp_path / "run", BASE + [f"checkpoint.load_from=hf:{tmp_path / 'hf'}"],
                       expect_rc=2)
    assert out.stderr.startswith("checkpoint error: hf:") and out.stderr.count("\n") == 1, \
        out.stderr[-2000:]
    assert "the ids of a probe text differ" in out.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").read_text()  # not one step trained
