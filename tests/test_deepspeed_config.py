"""`parallel.deepspeed`: the user's DeepSpeed keys from YAML, a JSON file or the command line,
deep-merged over ours, the keys our contract owns refused, and the rest checked by DeepSpeed's
own config parser before any process group exists (one line, exit 2)."""

from __future__ import annotations

import json

import pytest

from pretrain.config import load_config
from pretrain.parallel import deepspeed_user
from pretrain.parallel.deepspeed_user import deepspeed_config
from tests.test_config import SMOKE, _error, _train

OFFLOAD = "parallel.deepspeed={zero_optimization: {offload_optimizer: {device: cpu}}}"


def _merged(*overrides: str, path=SMOKE, dp: int = 2) -> dict:
    return deepspeed_user.check(load_config(path, list(overrides)), dp, bf16=False)


def test_user_keys_merge_over_ours_from_every_source(tmp_path):
    ours = deepspeed_config(1, 2, 1.0, False)
    assert ours == _merged()  # nothing given: our config unchanged
    (tmp_path / "ds.json").write_text(json.dumps(
        {"zero_optimization": {"reduce_bucket_size": 1000}, "wall_clock_breakdown": True}))
    (tmp_path / "run.yaml").write_text(SMOKE.read_text().replace(
        "model: tiny", "model: tiny\nparallel:\n  deepspeed:\n"
                       "    zero_optimization: {allgather_bucket_size: 2000}"))
    (tmp_path / "model").symlink_to(SMOKE.parent / "model")
    merged = _merged(f"parallel.deepspeed={tmp_path / 'ds.json'}",       # a JSON file
                     "parallel.deepspeed={communication_data_type: fp32}",  # a mapping
                     "parallel.deepspeed.zero_optimization.overlap_comm=true",  # one leaf
                     path=tmp_path / "run.yaml")                          # YAML section
    zero = merged["zero_optimization"]
    assert (zero["allgather_bucket_size"], zero["reduce_bucket_size"], zero["overlap_comm"]) \
        == (2000, 1000, True)
    assert merged["wall_clock_breakdown"] is True and merged["communication_data_type"] == "fp32"
    # ours where the user said nothing
    assert zero["contiguous_gradients"] is True and zero["stage"] == 1
    assert merged["gradient_accumulation_steps"] == 1 and merged["gradient_clipping"] == 1.0


def test_optimizer_offload_keeps_our_torch_adamw():
    zero = _merged(OFFLOAD)
    assert zero["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    # DeepSpeed would otherwise demand its JIT-compiled DeepSpeedCPUAdam
    assert zero["zero_force_ds_cpu_optimizer"] is False
    assert "zero_force_ds_cpu_optimizer" not in _merged()
    message = _error(_merged, OFFLOAD, "parallel.deepspeed.zero_force_ds_cpu_optimizer=true")
    assert "needs DeepSpeedCPUAdam" in message
    # stage 0 has nothing to offload; DeepSpeed would silently ignore the key
    assert "offload_optimizer needs parallel.zero_stage 1 or 2" in _error(
        _merged, OFFLOAD, "parallel.zero_stage=0")


@pytest.mark.parametrize("given, ours", [
    ("{train_micro_batch_size_per_gpu: 4}", "train.micro_batch_size"),
    ("{train_batch_size: 64}", "train.global_batch_size"),
    ("{gradient_accumulation_steps: 4}", "train.global_batch_size"),
    ("{bf16: {enabled: true}}", "parallel.precision"),
    ("{fp16: {enabled: true}}", "parallel.precision=bf16"),
    ("{gradient_clipping: 0.5}", "optim.grad_clip"),
    ("{optimizer: {type: Adam, params: {lr: 0.1}}}", "optim.lr"),
    ("{scheduler: {type: WarmupLR}}", "optim.schedule"),
    ("{zero_optimization: {stage: 3}}", "parallel.zero_stage"),
])
def test_keys_our_contract_owns_are_refused(given, ours):
    message = _error(_merged, f"parallel.deepspeed={given}")
    assert message.startswith("parallel.deepspeed.") and " is refused: " in message
    assert ours in message


@pytest.mark.parametrize("given, needle", [
    # a top-level key DeepSpeed never reads (it would silently ignore it)
    ("{zero_optimisation: {stage: 1}}",
     "parallel.deepspeed.zero_optimisation is not a key DeepSpeed reads"),
    # DeepSpeed's pydantic models: unknown nested keys and bad values, with the full path
    ("{zero_optimization: {offload_optimizer: {device: cpu, pinned: true}}}",
     "parallel.deepspeed.zero_optimization.offload_optimizer.pinned=True: Extra inputs"),
    ("{zero_optimization: {overlap_comm: maybe}}",
     "parallel.deepspeed.zero_optimization.overlap_comm='maybe': Input should be a valid boolean"),
    ("{zero_optimization: {offload_optimizer: {device: gpu}}}",
     "parallel.deepspeed.zero_optimization.offload_optimizer.device='gpu'"),
    # a section this DeepSpeed version removed (its own DeepSpeedConfigError)
    ("{elasticity: {enabled: true}}",
     "parallel.deepspeed: DeepSpeed rejects it: Elastic training has been removed"),
    ("[1, 2]", "parallel.deepspeed=[1, 2] must be a mapping"),
    ("no/such/ds.json", "is neither a mapping nor an existing JSON file"),
])
def test_deepspeed_validation_is_one_line_naming_the_key(given, needle):
    assert needle in _error(_merged, f"parallel.deepspeed={given}")


def test_json_file_with_a_duplicate_key_or_bad_json(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"overlap_comm": true, "overlap_comm": false}}')
    assert "key 'overlap_comm' appears twice" in _error(load_config, SMOKE,
                                                        [f"parallel.deepspeed={path}"])
    path.write_text('{"zero_optimization": ')
    assert "not a readable JSON file" in _error(load_config, SMOKE, [f"parallel.deepspeed={path}"])


@pytest.mark.parametrize("override, needle", [
    ("parallel.deepspeed={zero_optimizaton: {overlap_comm: true}}", "zero_optimizaton is not a key"),
    ("parallel.deepspeed={gradient_accumulation_steps: 4}",
     "gradient_accumulation_steps is refused"),
])
@pytest.mark.slow
def test_cli_deepspeed_error_exits_2_with_one_line(tmp_path, override, needle):
    proc = _train("--config", "configs/smoke.yaml", f"run.dir={tmp_path}", override)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("[20")]  # DS log
    assert len(lines) == 1 and lines[0].startswith("config error: parallel.deepspeed."), proc.stderr
    assert needle in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "config.yaml").exists()  # refused before anything was written
