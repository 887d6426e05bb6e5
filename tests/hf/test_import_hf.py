"""checkpoint.load_from=hf:DIR: a random LlamaForCausalLM made here by transformers (no
network) starts a run under TP2, PP2 and ZeRO-3 whose first-step loss equals the HF model's
loss on the same global batch; a model that does not fit the config is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from tests.hf.byte_tokenizer import save_byte_tokenizer
from tests.hf.families.models import first_batch_loss as hf_first_batch_loss
from tests.launch_helpers import read_metrics, run_training

BASE = ["train.steps=2", "train.exit_at_step=1", "optim.warmup_steps=1", "model.num_query_groups=2",
        "train.global_batch_size=4", "train.micro_batch_size=2", "checkpoint.save_on_stop=false"]


def make_llama(path, tie: bool, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # The smoke model's shape (configs/model/tiny.yaml) with 2 KV groups; 384 rows = the
    # byte-level corpus's 257 ids padded to a multiple of 128, as the run pads them.
    config = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                         initializer_range=0.1,  # larger than usual: layer mistakes move the loss
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so a missed or swapped norm shows in the loss
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    save_byte_tokenizer(path)  # the embedded corpus's tokenizer: the runs train on that corpus
    return model


@pytest.mark.parametrize("layout, tie", [(["parallel.tensor_parallel=2"], True),
                                         (["parallel.pipeline_parallel=2",
                                           "model.tie_embeddings=false"], False),
                                         # installed into ZeRO-3's per-rank slices
                                         (["parallel.zero_stage=3"], True)])
@pytest.mark.slow
def test_first_step_loss_equals_hf(layout, tie, tmp_path):
    model = make_llama(tmp_path / "hf", tie=tie, seed=5)
    overrides = BASE + layout
    out = run_training(tmp_path / "run", overrides + [f"checkpoint.load_from=hf:{tmp_path / 'hf'}"],
                       nproc=2)
    assert "fresh optimizer, step 0" in out.stdout
    ours = read_metrics(tmp_path / "run")[0]
    assert ours["step"] == 1
    want = hf_first_batch_loss(model, overrides)
    assert ours["loss"] == pytest.approx(want, rel=1e-4)


@pytest.mark.slow
def test_model_that_does_not_fit_is_one_line(tmp_path):
    make_llama(tmp_path / "hf", tie=True, seed=1)
    out = run_training(tmp_path / "run", BASE + [
        "model.hidden_size=128", f"checkpoint.load_from=hf:{tmp_path / 'hf'}"], expect_rc=2)
    errors = [line for line in out.stderr.splitlines() if line.startswith("checkpoint error:")]
    assert len(errors) == 1 and "config.json hidden_size=64 but model.hidden_size=128 here; set " \
        "model.hidden_size=64" in errors[0], out.stderr[-3000:]
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("override, edit, message", [
    ("model.rotary_base=500000", {}, "config.json rope_theta=10000 but model.rotary_base=500000 here; set model.rotary_base=10000"),
    ("model.num_query_groups=4", {}, "num_key_value_heads=2 but model.num_query_groups=4"),
    ("model.tie_embeddings=false", {}, "tie_word_embeddings=True but model.tie_embeddings=False"),
    ("model.vocab_size=0", {"vocab_size": 512}, "vocab_size=512 exceeds this run's 384 rows"),
    ("model.vocab_size=0", {"hidden_act": "gelu"}, "hidden_act='gelu'; only 'silu' imports"),
    ("model.vocab_size=0", {"model_type": "gpt2"}, "model_type='gpt2'; only 'llama', 'qwen2', 'qwen3'"),
    ("model.activation=gelu", {}, "model.activation='gelu' has no faithful"),
])
def test_each_misfit_names_its_field(override, edit, message, tmp_path):
    """The same checks in process, one per field (the CLI path is shown once above)."""
    from pretrain.checkpoint.store import CheckpointError
    from pretrain.config import load_config, validate
    from pretrain.hf.importer import load_state
    from tests.conftest import SMOKE

    make_llama(tmp_path / "hf", tie=True, seed=1)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **edit}))
    cfg = load_config(SMOKE, ["model.num_query_groups=2", override])
    layout = validate(cfg, world_size=1, vocab_size=257)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace("+", r"\+")):
        load_state(f"hf:{tmp_path / 'hf'}", cfg, layout.padded_vocab_size, 257)


def test_data_tokenizer_larger_than_the_model_vocabulary(tmp_path):
    """Data sharded with a tokenizer (e.g. a tokenizer.json) of more ids than the model has
    rows would index past its embedding: refused, naming both sizes."""
    from pretrain.checkpoint.store import CheckpointError
    from pretrain.config import load_config
    from pretrain.hf.importer import load_state
    from tests.conftest import SMOKE

    make_llama(tmp_path / "hf", tie=True, seed=1)
    cfg = load_config(SMOKE, ["model.num_query_groups=2"])
    with pytest.raises(CheckpointError, match=r"vocab_size=384 is smaller than the data's "
                                              r"tokenizer \(400\)"):
        load_state(f"hf:{tmp_path / 'hf'}", cfg, 512, 400)
    assert load_state(f"hf:{tmp_path / 'hf'}", cfg, 512, 384)[
        "embedding.word_embeddings.weight"].shape == (512, 64)
