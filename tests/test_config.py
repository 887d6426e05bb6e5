"""Config loading, dotted overrides, validation messages, the derived Layout and the CLI's
handling of configuration errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import ConfigError, Layout, load_config, pad_vocab, validate

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
VOCAB = 257


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, f"config errors must be one line, got {message!r}"
    return message


# ---------------------------------------------------------------- loading

def test_smoke_config_loads_and_expands_tiny_preset():
    cfg = load_config(SMOKE)
    # from configs/model/tiny.yaml
    assert cfg.model.name == "tiny"
    assert cfg.model.num_layers == 4
    assert cfg.model.hidden_size == 64
    assert cfg.model.num_attention_heads == 4
    assert cfg.model.ffn_hidden_size == 128
    assert cfg.model.max_seq_length == 64
    # from configs/smoke.yaml itself
    assert cfg.run.dir == "runs/smoke"
    assert cfg.train.steps == 20
    assert cfg.train.micro_batch_size == 2
    assert cfg.train.global_batch_size == 8
    assert cfg.train.seq_length == 32
    assert cfg.optim.lr == pytest.approx(3.0e-3)
    assert cfg.optim.warmup_steps == 2
    # untouched defaults
    assert cfg.parallel.tensor_parallel == 1
    assert cfg.model.position_embedding == "rope"
    # the smoke config is valid as shipped
    assert validate(cfg, world_size=1, vocab_size=VOCAB) is not None


def test_overrides_apply_with_yaml_typing():
    cfg = load_config(SMOKE, ["parallel.tensor_parallel=2", "optim.lr=1", "model.tie_embeddings=false",
                              "model.activation=gelu", "run.dir=runs/x", "optim.min_lr=0.5e-4"])
    assert cfg.parallel.tensor_parallel == 2 and type(cfg.parallel.tensor_parallel) is int
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float  # int widened to the float field
    assert cfg.model.tie_embeddings is False
    assert cfg.model.activation == "gelu"
    assert cfg.run.dir == "runs/x"
    assert cfg.optim.min_lr == pytest.approx(5e-5)
    # overrides win over the preset and over the run file
    cfg = load_config(SMOKE, ["model.num_layers=8", "train.steps=7"])
    assert cfg.model.num_layers == 8 and cfg.train.steps == 7


def test_model_preset_override_loads_the_named_preset():
    cfg = load_config(SMOKE, ["model.preset=tiny", "model.hidden_size=96"])
    assert cfg.model.name == "tiny" and cfg.model.hidden_size == 96
    message = _error(load_config, SMOKE, ["model.preset=no_such_model"])
    assert "no_such_model" in message and "tiny" in message  # lists what is available


def test_float_override_in_exponent_notation():
    cfg = load_config(SMOKE, ["optim.lr=3e-4"])
    assert cfg.optim.lr == pytest.approx(3e-4)


# ---------------------------------------------------------------- loading errors

def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    message = _error(load_config, missing)
    assert str(missing) in message
    assert "does not exist" in message
    assert "configs/smoke.yaml" in message  # the fix: an example of an existing file


def test_unknown_section_in_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("modle:\n  num_layers: 2\n")
    message = _error(load_config, path)
    assert "'modle'" in message
    assert "known sections" in message and "model" in message and "parallel" in message


def test_unknown_section_in_override():
    message = _error(load_config, SMOKE, ["paralel.tensor_parallel=2"])
    assert "'paralel'" in message and "parallel" in message.split("known sections")[1]


def test_override_without_section():
    message = _error(load_config, SMOKE, ["steps=3"])
    assert "'steps=3'" in message and "section.key=value" in message


def test_unknown_key():
    message = _error(load_config, SMOKE, ["model.hiden_size=3"])
    assert "'model.hiden_size'" in message
    # the fix: the section's real keys
    assert "hidden_size" in message.split("known keys")[1]


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  stepz: 3\n")
    message = _error(load_config, path)
    assert "train.stepz" in message and "steps" in message


def test_wrong_type():
    message = _error(load_config, SMOKE, ["train.steps=abc"])
    assert "train.steps='abc'" in message and "integer" in message
    message = _error(load_config, SMOKE, ["train.steps=2.5"])
    assert "train.steps=2.5" in message and "integer" in message


def test_wrong_type_in_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: fast\n")
    message = _error(load_config, path)
    assert "optim.lr='fast'" in message and "number" in message


def test_bool_field_rejects_a_number():
    message = _error(load_config, SMOKE, ["model.tie_embeddings=1"])
    assert "model.tie_embeddings=1" in message and "true or false" in message


def test_int_field_rejects_a_bool():
    message = _error(load_config, SMOKE, ["train.steps=true"])
    assert "train.steps=True" in message and "integer" in message


def test_literal_field_rejects_a_bad_choice():
    message = _error(load_config, SMOKE, ["model.activation=relu"])
    assert "model.activation='relu'" in message
    assert "swiglu" in message and "gelu" in message  # the valid choices


# ---------------------------------------------------------------- validate()

def test_validate_tensor_parallel_must_divide_heads(smoke_config):
    message = _error(validate, smoke_config("parallel.tensor_parallel=3"), world_size=3,
                     vocab_size=VOCAB)
    assert "parallel.tensor_parallel=3" in message
    assert "model.num_attention_heads" in message
    assert message.endswith("use one of 1, 2, 4")


def test_validate_layers_divisible_by_pipeline_stages(smoke_config):
    cfg = smoke_config("model.num_layers=3", "parallel.pipeline_parallel=2")
    message = _error(validate, cfg, world_size=2, vocab_size=VOCAB)
    assert "model.num_layers=3" in message and "2 x 1 = 2" in message
    cfg = smoke_config("parallel.pipeline_parallel=2", "parallel.virtual_pipeline_chunks=4")
    message = _error(validate, cfg, world_size=2, vocab_size=VOCAB)
    assert "model.num_layers=4" in message and "2 x 4 = 8" in message
    # 4 layers = 2 stages x 2 chunks is fine
    cfg = smoke_config("parallel.pipeline_parallel=2", "parallel.virtual_pipeline_chunks=2")
    assert validate(cfg, world_size=2, vocab_size=VOCAB).pipeline_parallel == 2


def test_validate_world_size_divisible_by_model_parallel(smoke_config):
    cfg = smoke_config("parallel.tensor_parallel=2", "parallel.pipeline_parallel=2")
    message = _error(validate, cfg, world_size=6, vocab_size=VOCAB)
    assert "world size 6" in message and "2 x 2 = 4" in message
    assert validate(cfg, world_size=8, vocab_size=VOCAB).data_parallel == 2


def test_validate_global_batch_multiple_of_micro_times_dp(smoke_config):
    cfg = smoke_config("train.global_batch_size=12")  # micro 2 x dp 4 = 8 per step
    message = _error(validate, cfg, world_size=4, vocab_size=VOCAB)
    assert "train.global_batch_size=12" in message
    assert "2 x 4 = 8" in message
    assert "use 8 or 16" in message
    # both suggestions are accepted
    for good in (8, 16):
        ok = smoke_config(f"train.global_batch_size={good}")
        assert validate(ok, world_size=4, vocab_size=VOCAB).num_micro_batches == good // 8


@pytest.mark.parametrize("stage", [2, 3])
def test_validate_zero_2_3_refused_with_pipeline(smoke_config, stage):
    cfg = smoke_config(f"parallel.zero_stage={stage}", "parallel.pipeline_parallel=2")
    message = _error(validate, cfg, world_size=2, vocab_size=VOCAB)
    assert f"parallel.zero_stage={stage}" in message and "pipeline_parallel=2" in message
    assert "zero_stage=1" in message  # the fix
    # the same stage without pipelining, and ZeRO-1 with it, are fine
    validate(smoke_config(f"parallel.zero_stage={stage}"), world_size=2, vocab_size=VOCAB)
    validate(smoke_config("parallel.zero_stage=1", "parallel.pipeline_parallel=2"), world_size=2,
             vocab_size=VOCAB)


def test_validate_sequence_parallel_needs_tensor_parallel(smoke_config):
    message = _error(validate, smoke_config("parallel.sequence_parallel=true"), world_size=1,
                     vocab_size=VOCAB)
    assert "parallel.sequence_parallel=true" in message and "tensor_parallel" in message
    cfg = smoke_config("parallel.sequence_parallel=true", "parallel.tensor_parallel=2")
    assert validate(cfg, world_size=2, vocab_size=VOCAB).tensor_parallel == 2


def test_validate_seq_length_within_max(smoke_config):
    message = _error(validate, smoke_config("train.seq_length=65"), world_size=1, vocab_size=VOCAB)
    assert "train.seq_length=65" in message and "model.max_seq_length=64" in message
    validate(smoke_config("train.seq_length=64"), world_size=1, vocab_size=VOCAB)


def test_validate_virtual_chunks_need_pipeline(smoke_config):
    message = _error(validate, smoke_config("parallel.virtual_pipeline_chunks=2"), world_size=1,
                     vocab_size=VOCAB)
    assert "parallel.virtual_pipeline_chunks=2" in message and "pipeline_parallel" in message


def test_validate_exit_at_step_within_steps(smoke_config):
    message = _error(validate, smoke_config("train.exit_at_step=21"), world_size=1,
                     vocab_size=VOCAB)
    assert "train.exit_at_step=21" in message and "train.steps=20" in message
    validate(smoke_config("train.exit_at_step=20"), world_size=1, vocab_size=VOCAB)


def test_validate_bf16_needs_cuda(smoke_config):
    cfg = smoke_config("parallel.precision=bf16")
    message = _error(validate, cfg, world_size=1, vocab_size=VOCAB, cuda=False)
    assert "parallel.precision=bf16" in message and "precision=auto" in message
    assert validate(cfg, world_size=1, vocab_size=VOCAB, cuda=True) is not None


@pytest.mark.parametrize("overrides, needle", [
    (["checkpoint.keep_last=0"], "checkpoint.keep_last=0 must be at least 1"),
    (["checkpoint.save_timeout_s=0"], "checkpoint.save_timeout_s=0.0 must be a positive"),
    (["checkpoint.save_timeout_s=-5"], "checkpoint.save_timeout_s=-5.0 must be a positive"),
    (["checkpoint.interval=-1"], "checkpoint.interval=-1 must not be negative"),
    (["checkpoint.weights_only=true"], "needs checkpoint.load_from"),
])
def test_validate_checkpoint_settings(smoke_config, overrides, needle):
    assert needle in _error(validate, smoke_config(*overrides), world_size=1, vocab_size=VOCAB)


def test_validate_zero3_checkpoints_allowed(smoke_config):
    cfg = smoke_config("parallel.zero_stage=3", "checkpoint.interval=5")
    assert validate(cfg, world_size=2, vocab_size=VOCAB).data_parallel == 2


def test_async_save_accepts_yaml_booleans(smoke_config):
    assert smoke_config("checkpoint.async_save=on").checkpoint.async_save == "on"
    assert smoke_config("checkpoint.async_save=false").checkpoint.async_save == "off"
    assert smoke_config("checkpoint.async_save=auto").checkpoint.async_save == "auto"
    with pytest.raises(ConfigError, match="checkpoint.async_save='sometimes'"):
        smoke_config("checkpoint.async_save=sometimes")


def test_validate_without_world_size_returns_none(smoke_config):
    assert validate(smoke_config()) is None
    # ... but still runs the world-independent checks
    _error(validate, smoke_config("parallel.tensor_parallel=3"))


# ---------------------------------------------------------------- Layout and vocabulary

@pytest.mark.parametrize("world, tp, pp, dp, micro_batches", [
    (1, 1, 1, 1, 4),  # global 8 / (micro 2 x dp 1)
    (4, 1, 1, 4, 1),
    (8, 2, 2, 2, 2),
    (8, 2, 1, 4, 1),
    (2, 1, 2, 1, 4),
])
def test_layout(smoke_config, world, tp, pp, dp, micro_batches):
    cfg = smoke_config(f"parallel.tensor_parallel={tp}", f"parallel.pipeline_parallel={pp}")
    layout = validate(cfg, world_size=world, vocab_size=VOCAB)
    assert layout == Layout(world_size=world, tensor_parallel=tp, pipeline_parallel=pp,
                            data_parallel=dp, micro_batch_size=2,
                            num_micro_batches=micro_batches, padded_vocab_size=384)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_pad_vocab_is_layout_independent(smoke_config, tp):
    cfg = smoke_config(f"parallel.tensor_parallel={tp}")
    assert pad_vocab(257, cfg) == 384
    assert pad_vocab(384, cfg) == 384
    assert pad_vocab(385, cfg) == 512


def test_pad_vocab_odd_tensor_parallel(smoke_config):
    cfg = smoke_config("parallel.tensor_parallel=3")
    padded = pad_vocab(257, cfg)
    assert padded >= 257 and padded % 384 == 0 and padded % 3 == 0 and padded % 128 == 0
    assert padded == 384


# ---------------------------------------------------------------- command line

def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("SLURM_")}
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.train", *args], cwd=REPO,
                          env=_clean_env(), capture_output=True, text=True, timeout=120)


# Unmarked: the one start of the real training CLI (~5 s) that the check lane keeps.
def test_cli_config_error_exits_2_with_one_line():
    proc = _train("--config", "configs/smoke.yaml", "parallel.tensor_parallel=3")
    assert proc.returncode == 2, proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    assert len(error_lines) == 1, proc.stderr
    assert "parallel.tensor_parallel=3" in error_lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_unknown_key_exits_2():
    proc = _train("--config", "configs/smoke.yaml", "model.hiden_size=3")
    assert proc.returncode == 2, proc.stderr
    assert "config error:" in proc.stderr and "model.hiden_size" in proc.stderr


@pytest.mark.slow
def test_cli_dry_run_prints_plan(tmp_path):
    proc = _train("--config", "configs/smoke.yaml", "--dry-run", "--world-size", "8",
                  f"run.dir={tmp_path}",
                  "parallel.tensor_parallel=2", "parallel.pipeline_parallel=2")
    assert proc.returncode == 0, proc.stderr
    assert "parameters:" in proc.stdout
    assert "memory per rank" in proc.stdout
    assert "TP 2 x PP 2 x DP 2" in proc.stdout
