"""The trainer's hook seam: dispatch and failure isolation, the console line, metrics.jsonl
truncation on resume, and the `logging` config section's checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain.config import ConfigError, load_config, validate
from pretrain.trainer.hooks import ConsoleLine, Hook, Hooks, MetricsWriter, format_duration, scalar_items

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


class Recorder(Hook):
    def __init__(self):
        self.calls = []

    def on_step_end(self, trainer, record):
        self.calls.append(("step", record["step"]))

    def close(self):
        self.calls.append(("close",))


class Broken(Hook):
    def on_step_end(self, trainer, record):
        raise OSError("disk full")


def test_a_failing_hook_is_dropped_with_one_warning_and_the_others_run(capsys):
    first, last = Recorder(), Recorder()
    hooks = Hooks([first, Broken(), last])
    hooks.on_step_end(None, {"step": 1})
    hooks.on_step_end(None, {"step": 2})
    hooks.close()
    assert first.calls == last.calls == [("step", 1), ("step", 2), ("close",)]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: Broken failed in on_step_end (OSError: disk full); it is switched "
                   "off, training continues"]


def test_console_line_has_mfu_validation_and_eta(capsys):
    console = ConsoleLine(steps=100, last=100)
    base = {"loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 12345.0}
    for step, seconds in ((1, 30.0), (2, 2.0), (3, 2.0)):  # the slow first step is ignored
        console.on_step_end(None, dict(base, step=step, step_time_s=seconds, mfu=0.4321))
    console.on_step_end(None, dict(base, step=100, step_time_s=2.0, val_loss=2.25))
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == ("step      3/100 | loss 2.5000 | lr 1.000e-03 | grad_norm 0.500 | "
                        "tokens/s 12,345 | mfu 43.2% | eta 3m14s")  # median 2 s x 97 steps
    assert "val_loss 2.2500" in lines[3] and "eta" not in lines[3]


def test_format_duration():
    assert format_duration(59) == "0m59s"
    assert format_duration(3 * 3600 + 5 * 60 + 7) == "3h05m"
    assert format_duration(2 * 86400 + 4 * 3600) == "2d04h"


def test_scalar_items_group_train_and_validation():
    record = {"step": 3, "loss": 1.0, "val_loss": 2.0, "val_bpb/web": 0.9, "note": "x"}
    assert dict(scalar_items(record)) == {"train/loss": 1.0, "val/loss": 2.0, "val/bpb/web": 0.9}


def test_metrics_file_drops_steps_after_the_checkpoint_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in range(1, 6))
                    + '{"step": 6, "lo')
    writer = MetricsWriter(tmp_path)
    writer.on_checkpoint_loaded(None, 3)
    writer.on_step_end(None, {"step": 4, "loss": 40})
    writer.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 1}, {"step": 2, "loss": 2}, {"step": 3, "loss": 3},
        {"step": 4, "loss": 40}]


# ---------------------------------------------------------------- the logging section

def _error(*overrides) -> str:
    with pytest.raises(ConfigError) as info:
        validate(load_config(SMOKE, list(overrides)))
    assert "\n" not in str(info.value)
    return str(info.value)


def test_logging_overrides_reach_nested_wandb_fields():
    cfg = load_config(SMOKE, ["logging.tensorboard=true", "logging.wandb.project=p",
                              "logging.wandb.mode=offline", "logging.peak_tflops=989"])
    validate(cfg)
    assert cfg.logging.tensorboard and cfg.logging.peak_tflops == 989.0
    assert (cfg.logging.wandb.project, cfg.logging.wandb.mode) == ("p", "offline")


def test_logging_section_in_a_file(tmp_path):
    (tmp_path / "model").symlink_to(SMOKE.parent / "model")  # for the smoke file's `model: tiny`
    path = tmp_path / "run.yaml"
    path.write_text(SMOKE.read_text() + "logging:\n  wandb: {project: p, mode: disabled}\n")
    assert load_config(path).logging.wandb.mode == "disabled"
    path.write_text(SMOKE.read_text() + "logging:\n  wandb: offline\n")
    with pytest.raises(ConfigError, match=r"logging.wandb='offline' must be a mapping of project"):
        load_config(path)


def test_logging_bad_input_is_one_line():
    assert "unknown key 'logging.tensorbord'" in _error("logging.tensorbord=true")
    assert "unknown key 'logging.wandb.projekt'" in _error("logging.wandb.projekt=p")
    assert "logging.wandb.mode='sometimes' is not one of online, offline, disabled" in _error(
        "logging.wandb.mode=sometimes")
    assert "logging.peak_tflops=-1.0 must be a finite number" in _error("logging.peak_tflops=-1")
    assert "logging.peak_tflops=nan" in _error("logging.peak_tflops=.nan")
    assert "logging.wandb.project is empty" in _error("logging.wandb.name=run1")
