"""parallel.recompute=selective (megatron-core's selective granularity with
recompute_modules): the same losses and gradients as no recompute, bit for bit, and the
activations kept for backward between none and full, measured."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import ConfigError, megatron_flags, validate
from pretrain.model.estimate import memory_per_rank

SHAPE = ["model.hidden_size=128", "model.num_layers=2", "train.seq_length=64"]
MODES = {"none": [], "core_attn": ["parallel.recompute=selective"],
         "mlp": ["parallel.recompute=selective", "parallel.recompute_modules=mlp"],
         "both": ["parallel.recompute=selective", "parallel.recompute_modules=core_attn,mlp"],
         "full": ["parallel.recompute=full"]}


@pytest.fixture(scope="module")
def measured(smoke_config, single_rank_parallel):
    """{mode: (bytes of distinct storage saved for backward in one forward, loss, grads)}."""
    from pretrain.model.gpt import build_model_chunks

    def build_model(cfg):
        layout = validate(cfg, world_size=1, vocab_size=257)
        return build_model_chunks(cfg, layout.padded_vocab_size, torch.float32,
                                  torch.device("cpu"))

    tokens = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(64).unsqueeze(0).repeat(2, 1)
    out = {}
    for mode, overrides in MODES.items():
        (model,) = build_model(smoke_config(*SHAPE, *overrides))
        saved = {}

        def pack(tensor):
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(tokens, positions, None, labels=tokens).float().mean()
        loss.backward()
        out[mode] = (sum(saved.values()), loss.item(),
                     [p.grad.clone() for p in model.parameters()])
    return out


@pytest.fixture(scope="module")
def smoke_config():
    from pretrain.config import load_config
    from tests.conftest import SMOKE

    return lambda *overrides: load_config(SMOKE, list(overrides))


def test_selective_recompute_changes_no_value(measured):
    _, loss, grads = measured["none"]
    for mode in ("core_attn", "mlp", "both", "full"):
        assert measured[mode][1] == loss, mode
        assert all(torch.equal(a, b) for a, b in zip(measured[mode][2], grads)), mode


def test_selective_keeps_less_than_none_and_more_than_full(measured):
    kept = {mode: value[0] for mode, value in measured.items()}
    assert kept["full"] < kept["both"] <= kept["mlp"] < kept["core_attn"] <= kept["none"], kept


def test_the_dry_run_estimate_orders_them_alike(smoke_config):
    def activations(overrides):
        cfg = smoke_config(*SHAPE, *overrides)
        validate(cfg, world_size=1, vocab_size=257)
        return memory_per_rank(cfg, 257, 1, bf16=False).activation_bytes

    est = {mode: activations(overrides) for mode, overrides in MODES.items()}
    assert est["full"] < est["mlp"] < est["none"] and est["core_attn"] == est["none"], est


@pytest.mark.parametrize("overrides, needle", [
    (["parallel.recompute=selective", "parallel.recompute_modules=core_attn,moe"],
     "'moe' unknown; choose from core_attn, mlp, layernorm"),
    (["parallel.recompute=selective", "parallel.recompute_modules=[]"], "empty"),
    (["parallel.recompute=selective", "parallel.recompute_modules=layernorm"],
     "needs model.backend=te"),
])
def test_bad_modules_are_one_line(smoke_config, overrides, needle):
    with pytest.raises(ConfigError) as err:
        validate(smoke_config(*overrides), world_size=1, vocab_size=257)
    assert needle in str(err.value)


def test_megatron_spelling():
    rest, overrides = megatron_flags.translate(
        ["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "mlp",
         "train.steps=3"])
    assert rest == ["train.steps=3"]
    assert [o for _, o in overrides] == ["parallel.recompute=selective",
                                        "parallel.recompute_modules=core_attn,mlp"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", [
    ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"],
    ["parallel.pipeline_parallel=2"],
])
def test_selective_is_bit_identical_under_tp_sp_and_pp(layout, tmp_path):
    """Every step's loss and gradient norm (so every update) equal to no recompute's."""
    from tests.launch_helpers import read_metrics, run_training

    runs = {}
    for mode in ("none", "both"):
        run = tmp_path / mode
        run_training(run, ["train.steps=4", "optim.warmup_steps=1", "train.sample_tokens=0",
                           *layout, *MODES[mode]], nproc=2)
        runs[mode] = [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(run)]
    assert len(runs["none"]) == 4 and runs["both"] == runs["none"]
