"""pretrain.export_hf end to end: checkpoints saved under one process, TP2 x PP2 and DP2
ZeRO-2 give a directory that transformers loads with no code of ours, whose logits and
greedy continuation equal our model's, and whose tokenizer gives sentencepiece's ids.
Bad input ends in exit status 2 with one line; an interrupted export leaves nothing that
looks complete."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.hf.conftest import our_model
from tests.launch_helpers import launch

TRICKY = ["", " ", "   leading spaces", "trailing   ", "tabs\t\tand\nnewlines\n\n\n", "a  b   c    d",
          "1234567890 3.14159 -42 0x1F", "Café naïve Straße", "日本語のテキスト", "emoji 🙂🚀 ok",
          "\u00a0nbsp\u2003em space", "Ж Ω ğ ß", "def f(x):\n    return x  # comment",
          "\x00\x01 control bytes", "text with </s> and <s> typed in"]


@pytest.mark.parametrize("layout", ["one_process", "tp2_pp2", "dp2_zero2"])
@pytest.mark.slow
def test_logits_equal_ours(layout, trained_run, exported, single_rank_parallel):
    from transformers import AutoModelForCausalLM

    from pretrain.checkpoint.weights import read_weights

    weights = read_weights(trained_run(layout))
    chunks = our_model(weights)
    hf = AutoModelForCausalLM.from_pretrained(exported(layout), dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    vocab = weights.vocab_size
    tokens_bs = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(24).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        ours = chunks[0](input_ids=tokens_bs, position_ids=positions, attention_mask=None)[..., :vocab]
        theirs = hf(tokens_bs).logits
    assert theirs.shape == ours.shape == (2, 24, vocab)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4 * float(ours.abs().max()))


@pytest.mark.slow
def test_directory_layout_and_sharding(exported):
    out = exported("one_process")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] is False
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / name).is_file() for name in files)  # --max-shard-size
    assert "lm_head.weight" in index["weight_map"]
    assert not list(out.parent.glob(".*tmp-*"))


@pytest.mark.slow
def test_greedy_generation_equals_ours(trained_run, exported, spm_data, single_rank_parallel):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pretrain.checkpoint.weights import read_weights
    from pretrain.model.generate import sample

    weights = read_weights(trained_run("tp2_pp2"))
    out = exported("tp2_pp2")
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("def main(args):\n    return", add_special_tokens=False)["input_ids"]
    ours = sample(our_model(weights), prompt, 12, 64, weights.vocab_size, seed=0,
                  device=torch.device("cpu"), temperature=0)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    generated = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    theirs = generated[0, len(prompt):].tolist()
    # transformers stops at EOS; up to there the continuations must agree token for token.
    assert theirs == ours[:len(theirs)]
    assert len(theirs) == 12 or theirs[-1] == tokenizer.eos_token_id


@pytest.mark.slow
def test_tokenizer_gives_sentencepiece_ids(exported, spm_data):
    import sentencepiece
    from transformers import AutoTokenizer

    processor = sentencepiece.SentencePieceProcessor(model_file=str(spm_data["tokenizer"]))
    tokenizer = AutoTokenizer.from_pretrained(exported("one_process"))
    assert (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id,
            tokenizer.unk_token_id) == (3, 2, 0, 1)
    for text in TRICKY:
        ids = processor.encode(text)
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids, repr(text)
        # encode() as users call it adds nothing either: the shards have no BOS
        assert tokenizer.encode(text) == ids, repr(text)
        assert tokenizer.decode(ids) == processor.decode(ids), repr(text)
    assert any(processor.id_to_piece(i).startswith("<0x") for text in TRICKY
               for i in processor.encode(text)), "no string exercised byte fallback"


def _one_error_line(result, prefix="export error:"):
    lines = [line for line in result.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_bad_input_is_one_line(trained_run, tmp_path):
    run = trained_run("one_process")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    result = launch(["-m", "pretrain.export_hf", str(run), "--output", str(busy)], 1, 60,
                    "export", expect_rc=2)
    assert "is not an empty directory" in _one_error_line(result)
    assert (busy / "keep.txt").read_text() == "x"

    empty_run = tmp_path / "empty_run"
    (empty_run / "checkpoints" / "step_00000002.tmp-abc").mkdir(parents=True)
    result = launch(["-m", "pretrain.export_hf", str(empty_run), "--output", str(tmp_path / "o")],
                    1, 60, "export", expect_rc=2)
    assert "no complete checkpoint" in _one_error_line(result)

    other = tmp_path / "other.model"
    other.write_bytes(b"not the tokenizer")
    result = launch(["-m", "pretrain.export_hf", str(run), "--output", str(tmp_path / "o2"),
                     "--tokenizer", str(other)], 1, 60, "export", expect_rc=2)
    assert "pass the right PREFIX.model" in _one_error_line(result)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


@pytest.mark.parametrize("setting, value", [("position_embedding", "learned"),
                                            ("normalization", "layernorm"),
                                            ("activation", "gelu"), ("bias", True)])
def test_variants_without_a_llama_equivalent_are_refused(setting, value):
    from pretrain.checkpoint.store import CheckpointError
    from pretrain.hf.families import check_exportable

    model = {"position_embedding": "rope", "normalization": "rmsnorm", "activation": "swiglu",
             "bias": False}
    check_exportable(model, "ckpt")
    with pytest.raises(CheckpointError, match=f"model.{setting}={value!r} has no faithful"):
        check_exportable({**model, setting: value}, "ckpt")


@pytest.mark.slow
def test_interrupted_export_leaves_nothing_complete(trained_run, tmp_path):
    out = tmp_path / "hf"
    for point in ("model-00001-of-", "config.json"):
        result = launch(["-m", "pretrain.export_hf", str(trained_run("one_process")), "--output",
                         str(out), "--max-shard-size", "200000"], 1, 60, "export", expect_rc=None,
                        env_extra={"PRETRAIN_TEST_EXPORT_KILL_AFTER": point})
        assert result.returncode == -9, result.stderr[-2000:]
        assert not out.exists()
    launch(["-m", "pretrain.export_hf", str(trained_run("one_process")), "--output", str(out)],
           1, 60, "export")
    assert (out / "config.json").is_file() and not list(tmp_path.glob(".hf.tmp-*"))
    assert sorted(os.listdir(tmp_path)) == ["hf"]
