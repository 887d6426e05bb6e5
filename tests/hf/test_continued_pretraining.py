"""docs/continued-pretraining.md end to end on CPU, with a tiny random Qwen3 (transformers'
from_config) and a Qwen2-style tokenizer trained here: shard two corpora with the model's
tokenizer.json, train a few steps from configs/continue_qwen3.yaml (the doc's config, its
paths pointed at this test's files, its sizes shrunk by overrides), export, and load the
export with transformers: same tokenizer ids as the original directory and the shards."""

from __future__ import annotations

import json
import re
import sysconfig
from pathlib import Path

import pytest

from tests.hf.families import tokenizer_files
from tests.launch_helpers import REPO, launch, read_metrics, run_training

DOC = REPO / "docs" / "continued-pretraining.md"
CONFIG = REPO / "configs" / "continue_qwen3.yaml"
# what the test changes in the doc's config: sizes for a 2-core CPU, not keys or structure
TINY = ["train.steps=4", "optim.warmup_steps=2", "train.seq_length=32", "model.max_seq_length=64",
        "train.micro_batch_size=2", "train.global_batch_size=4", "train.eval_interval=0",
        "checkpoint.interval=2", "checkpoint.keep_every=0"]


def test_doc_shows_the_config_file_and_the_overrides_tested():
    doc = DOC.read_text()
    assert CONFIG.read_text() in re.findall(r"```yaml\n(.*?)```", doc, re.S)
    cpu_command = " ".join(doc.split("# on one CPU")[1].split("```")[0].replace("\\\n", " ").split())
    assert all(f" {override}" in cpu_command for override in TINY), cpu_command


def make_qwen3_base(path: Path):
    """A random Qwen3 (q/k norms, head_dim 32 != 64/4, tied embeddings) with the Qwen
    tokenizer, saved as a downloaded base model directory holds it."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=640, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=32, max_position_embeddings=128, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer_files.save("qwen2", path)  # Qwen3 ships Qwen2's tokenizer


@pytest.mark.slow
def test_worked_example_runs_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pretrain.data.sources import ShardSource

    base = tmp_path / "hf" / "qwen3-base"
    make_qwen3_base(base)
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[g-m]*.py"))
    corpora = {"new": stdlib[:10], "general": stdlib[10:20]}
    for name, files in corpora.items():  # the doc's shard.py commands, at seq_len 32
        (tmp_path / "corpus" / name).mkdir(parents=True)
        for file in files:
            (tmp_path / "corpus" / name / file.name).with_suffix(".txt").write_text(file.read_text())
        launch(["data_tools/shard.py", "--input", str(tmp_path / "corpus" / name), "--output",
                str(tmp_path / "data" / "qwen3" / name), "--tokenizer", str(base / "tokenizer.json"),
                "--seq-len", "32", "--val-fraction", "0.005", "--num-workers", "1"],
               1, 300, "shard.py")

    config = tmp_path / "continue_qwen3.yaml"  # the doc's config, its relative paths made ours
    text = CONFIG.read_text()
    for relative in ("hf/qwen3-base", "data/qwen3/new", "data/qwen3/general"):
        assert relative in text
        text = text.replace(relative, str(tmp_path / relative))
    config.write_text(text)
    run = tmp_path / "runs" / "qwen3-continued"
    out = run_training(run, TINY, config=str(config))
    assert "fresh optimizer, step 0" in out.stdout
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[0]["lr"] < metrics[1]["lr"]  # the warmup

    exported = tmp_path / "hf" / "qwen3-continued"
    launch(["-m", "pretrain.export_hf", str(run), "--output", str(exported)], 1, 120, "export_hf")
    hf_config = json.loads((exported / "config.json").read_text())
    assert hf_config["model_type"] == "qwen3" and hf_config["head_dim"] == 32
    AutoModelForCausalLM.from_pretrained(exported)
    theirs, ours = (AutoTokenizer.from_pretrained(str(d)) for d in (base, exported))
    eot = ours.convert_tokens_to_ids("<|endoftext|>")
    assert ours.eos_token_id == hf_config["eos_token_id"] == eot and ours.bos_token_id is None
    source = ShardSource(str(tmp_path / "data" / "qwen3" / "new"), "train")
    tokens = source.load_shard(0).tokens.reshape(-1).tolist()
    # the train split starts with one of the documents, as the export's tokenizer encodes it
    documents = [file.read_text() for file in corpora["new"]]  # a .txt file is one document
    assert any(tokens[:len(ours.encode(doc)) + 1] == ours.encode(doc) + [eot] for doc in documents)
    for sample in [documents[0][:300], "Café naïve 日本語 12345   spaces\tand\ttabs\n\n"]:
        assert ours.encode(sample) == theirs.encode(sample)
