"""Megatron-LM's flag spellings as command-line aliases of our keys
(pretrain/config/megatron_flags.py), the deepspeed launcher's --local_rank, and the refusals:
a flag that does not map, a bad value through a flag, and a flag that disagrees with its own
key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pretrain.config import load_config
from pretrain.config.megatron_flags import ALIASES, NO_OPS, NOT_MAPPED
from pretrain.train import main, parse_args
from tests.test_config import SMOKE, _error

REPO = Path(__file__).resolve().parents[1]

MEGATRON_ARGS = (
    "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 "
    "--virtual-pipeline-model-parallel-size 2 --sequence-parallel --use-distributed-optimizer "
    "--recompute-granularity full --recompute-modules core_attn mlp --distributed-timeout-minutes 7 "
    "--num-layers 8 --hidden-size 96 --ffn-hidden-size 256 --num-attention-heads 6 "
    "--group-query-attention --num-query-groups 2 --kv-channels 32 --qk-layernorm "
    "--add-qkv-bias --max-position-embeddings 256 "
    "--position-embedding-type learned_absolute --rotary-base 50000 --normalization LayerNorm "
    "--norm-epsilon 1e-6 --swiglu --untie-embeddings-and-output-weights --disable-bias-linear "
    "--init-method-std 0.01 --seq-length 64 --micro-batch-size 1 --global-batch-size 16 "
    "--train-iters 50 --seed 7 --log-interval 5 --eval-interval 10 --eval-iters 3 "
    "--lr 6e-4 --min-lr 6e-5 --lr-warmup-iters 5 --lr-decay-style WSD --lr-wsd-decay-iters 10 "
    "--lr-wsd-decay-style minus_sqrt --weight-decay 0.05 --adam-beta1 0.8 --adam-beta2=0.99 "
    "--adam-eps 1e-7 --clip-grad 0.5 --save-interval 25 --save runs/meg --load runs/other "
    "--finetune --wandb-project proj --wandb-exp-name exp --use-mcore-models"
).split()

EXPECTED = {
    "parallel.tensor_parallel": 2, "parallel.pipeline_parallel": 2,
    "parallel.virtual_pipeline_chunks": 2, "parallel.sequence_parallel": True,
    "parallel.zero_stage": 1, "parallel.recompute": "full", "parallel.timeout_minutes": 7,
    "parallel.recompute_modules": ["core_attn", "mlp"],
    "model.num_layers": 8, "model.hidden_size": 96, "model.ffn_hidden_size": 256,
    "model.num_attention_heads": 6, "model.num_query_groups": 2, "model.max_seq_length": 256,
    "model.head_dim": 32, "model.qk_norm": True, "model.qkv_bias": True,
    "model.position_embedding": "learned", "model.rotary_base": 50000,
    "model.normalization": "layernorm", "model.norm_eps": 1e-6, "model.activation": "swiglu",
    "model.tie_embeddings": False, "model.bias": False, "model.init_std": 0.01,
    "train.seq_length": 64, "train.micro_batch_size": 1, "train.global_batch_size": 16,
    "train.steps": 50, "train.seed": 7, "train.log_interval": 5, "train.eval_interval": 10,
    "train.eval_batches": 3, "optim.lr": 6e-4, "optim.min_lr": 6e-5, "optim.warmup_steps": 5,
    "optim.schedule": "wsd", "optim.decay_steps": 10, "optim.decay_shape": "1-sqrt",
    "optim.weight_decay": 0.05, "optim.beta1": 0.8, "optim.beta2": 0.99, "optim.eps": 1e-7,
    "optim.grad_clip": 0.5, "checkpoint.interval": 25, "run.dir": "runs/meg",
    "checkpoint.load_from": "runs/other", "checkpoint.weights_only": True,
    "logging.wandb.project": "proj", "logging.wandb.name": "exp",
}


def _value(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _load(*argv: str):
    args = parse_args(["--config", str(SMOKE), *argv])
    return load_config(args.config, args.overrides)


def test_megatron_flags_set_our_keys():
    cfg = _load(*MEGATRON_ARGS)
    got = {key: _value(cfg, key) for key in EXPECTED}
    assert got == EXPECTED
    # every alias is exercised here (the DeepSpeed spellings have their own test)
    used = {a.partition("=")[0] for a in MEGATRON_ARGS if a.startswith("--")}
    assert set(ALIASES) - used == {"--bf16", "--zero-stage", "--deepspeed_config",
                                   "--deepspeed-config"}


def test_bf16_and_deepspeed_spellings(tmp_path):
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"overlap_comm": true}}')
    cfg = _load("--bf16", "--deepspeed", "--deepspeed_config", str(tmp_path / "ds.json"),
                "--zero-stage", "2")
    assert cfg.parallel.precision == "bf16" and cfg.parallel.zero_stage == 2
    assert cfg.parallel.deepspeed == {"zero_optimization": {"overlap_comm": True}}
    assert _load(f"--deepspeed-config={tmp_path / 'ds.json'}").parallel.deepspeed \
        == cfg.parallel.deepspeed


def test_megatron_resume_idiom_save_equals_load_is_our_run_dir():
    cfg = _load("--save", "runs/meg", "--load", "runs/meg")
    assert cfg.run.dir == "runs/meg" and cfg.checkpoint.load_from == ""


def test_flag_and_own_key_may_agree():
    cfg = _load("--lr", "3e-4", "optim.lr=0.0003", "--num-layers=2", "model.num_layers=2")
    assert cfg.optim.lr == 3e-4 and cfg.model.num_layers == 2
    # overrides given after the flags win as usual for other keys
    assert _load("--num-layers", "2", "model.hidden_size=32").model.hidden_size == 32


@pytest.mark.parametrize("argv, needle", [
    # a flag together with its own key, different values
    (["--num-layers", "4", "model.num_layers=2"],
     "model.num_layers is given twice with different values: --num-layers (= model.num_layers=4) "
     "and model.num_layers=2; give one"),
    (["--use-distributed-optimizer", "--zero-stage", "2"],
     "parallel.zero_stage is given twice with different values"),
    # bad values through a flag name the flag
    (["--num-layers", "four"], "--num-layers (model.num_layers)='four' must be an integer"),
    (["--lr", "fast"], "--lr (optim.lr)='fast' must be a number"),
    (["--lr-decay-style", "inverse-square-root"],
     "--lr-decay-style inverse-square-root: not one of cosine, linear, constant, WSD"),
    (["--normalization", "rmsnorm"], "--normalization rmsnorm: not one of RMSNorm, LayerNorm"),
    (["--hidden-size"], "--hidden-size needs a value"),
    (["--bf16=true"], "--bf16 is a switch and takes no value"),
    # known Megatron flags whose meaning differs from ours
    (["--data-path", "my-corpus_text_document"], "--data-path (Megatron-LM) has no equivalent"),
    (["--fp16"], "fp16 with loss scaling is not supported; use --bf16"),
])
def test_bad_megatron_flags_are_one_line(argv, needle):
    assert needle in _error(parse_args, ["--config", str(SMOKE), *argv])


@pytest.mark.parametrize("argv, needle", [
    (["--num-layers", "4", "model.num_layers=2"], "model.num_layers is given twice"),
    (["--num-attention-heads", "0"], "model.num_attention_heads=0 must be at least 1"),
    (["--clip-grad", "x"], "--clip-grad (optim.grad_clip)='x' must be a number"),
])
def test_cli_exits_2_with_one_line(capsys, tmp_path, argv, needle):
    assert main(["--config", str(SMOKE), f"run.dir={tmp_path / 'run'}", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("config error: ") and needle in err, err
    assert not (tmp_path / "run").exists()


def test_deepspeed_launcher_local_rank_is_accepted():
    for spelling in (["--local_rank=1"], ["--local-rank", "1"]):
        args = parse_args([*spelling, "--config", str(SMOKE), "train.steps=2"])
        assert args.local_rank == 1 and args.overrides == ["train.steps=2"]


def test_docs_table_lists_every_flag():
    text = (REPO / "docs" / "megatron-flags.md").read_text()
    documented = set(re.findall(r"`(--[a-z0-9_-]+)", text))
    missing = (set(ALIASES) | set(NO_OPS) | set(NOT_MAPPED)) - documented
    assert not missing, f"docs/megatron-flags.md lacks {sorted(missing)}"
