"""pretrain.evaluate: loss and perplexity of a checkpoint on a shard split, under TP2 and
DP2 equal to a loss computed here from the shards and our model on one process;
data made with another tokenizer is refused in one line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.hf.conftest import our_model
from tests.launch_helpers import launch

# Every test here trains, exports or evaluates through the CLIs (tests/hf/conftest.py).
pytestmark = pytest.mark.slow

BATCHES = 2
GLOBAL_BATCH = 8


def reference_loss(weights, shards) -> float:
    """Token-mean loss over the split's first BATCHES x GLOBAL_BATCH samples in manifest order,
    read straight from the shards (not through the loader)."""
    from pretrain.data.sources import ShardSource

    source = ShardSource(str(shards), "val")
    rows = []
    for index in range(len(source.shards)):
        rows.extend(source.load_shard(index).tokens)
        if len(rows) >= BATCHES * GLOBAL_BATCH:
            break
    seq = weights.run_config().train.seq_length
    tokens = torch.tensor(list(rows[:BATCHES * GLOBAL_BATCH]), dtype=torch.long)[:, :seq + 1]
    model = our_model(weights)[0]
    with torch.no_grad():
        logits = model(input_ids=tokens[:, :-1], position_ids=torch.arange(seq).expand(len(tokens), -1),
                       attention_mask=None)
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                   tokens[:, 1:].reshape(-1)))


@pytest.fixture(scope="module")
def reference(trained_run, spm_data, single_rank_parallel):
    from pretrain.checkpoint.weights import read_weights

    return reference_loss(read_weights(trained_run("dp2_zero2")), spm_data["shards"])


# One process is the reference below; the layouts are what the command adds.
@pytest.mark.parametrize("nproc, layout", [(2, ["parallel.tensor_parallel=2"]),
                                           (2, ["train.micro_batch_size=2"])])
def test_loss_and_perplexity_under_a_layout(nproc, layout, trained_run, spm_data, reference,
                                            tmp_path):
    out = tmp_path / "eval.json"
    launch(["-m", "pretrain.evaluate", str(trained_run("dp2_zero2")), "--data",
            str(spm_data["shards"]), "--max-batches", str(BATCHES), "--output", str(out),
            f"train.global_batch_size={GLOBAL_BATCH}", *layout], nproc, 120, "evaluate")
    result = json.loads(out.read_text())
    assert result["step"] == 2 and result["samples"] == BATCHES * GLOBAL_BATCH
    assert result["tokens"] == BATCHES * GLOBAL_BATCH * 32
    assert result["loss"] == pytest.approx(reference, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(reference), rel=1e-5)


def test_data_of_another_tokenizer_is_one_line(trained_run):
    result = launch(["-m", "pretrain.evaluate", str(trained_run("dp2_zero2")), "--data",
                     "embedded"], 1, 60, "evaluate", expect_rc=2)
    errors = [line for line in result.stderr.splitlines() if line.startswith("data error:")]
    assert len(errors) == 1 and "evaluate on data made with the checkpoint's tokenizer" in errors[0]
    assert "Traceback" not in result.stderr
