"""Llama 3.x (llama3 RoPE scaling), Qwen2 (q/k/v biases, tied) and Qwen3 (q/k norms,
head_dim != hidden/heads) in and out: a random model of each, made here by transformers,
imports with `checkpoint.load_from=hf:DIR` to a first-batch loss equal to HF's under one
process (the training CLI), TP2 and PP2 (one launch per layout for all three); its export
gives HF's logits, and import -> export returns the very tensors."""

from __future__ import annotations

import json

import pytest
import torch

from tests.hf.families.models import BASE, FAMILIES, first_batch_loss, make, overrides
from tests.launch_helpers import launch, read_metrics, run_training


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """{family: (HF model, its directory)}, made once for this module."""
    root = tmp_path_factory.mktemp("families")
    return {family: (make(family, root / family), root / family) for family in FAMILIES}


@pytest.mark.parametrize("layout", [["parallel.tensor_parallel=2"],
                                    ["parallel.pipeline_parallel=2"]], ids=["tp2", "pp2"])
@pytest.mark.multiprocess
def test_layout_loss_equals_hf(layout, family_dirs):
    dirs = [str(path) for _, path in family_dirs.values()]
    out = launch(["-m", "tests.hf.families.layout_losses", *layout, "--hf", *dirs], 2, 300,
                 "layout_losses")
    line = next(line for line in out.stdout.splitlines() if line.startswith("LOSSES "))
    ours = json.loads(line[len("LOSSES "):])
    for family, (model, path) in family_dirs.items():
        want = first_batch_loss(model, BASE + overrides(path))
        assert ours[str(path)] == pytest.approx(want, rel=1e-4), family


@pytest.fixture(scope="module")
def imported_runs(family_dirs, tmp_path_factory):
    """{family: run directory} of a one-step run per family started from `hf:DIR` with an lr
    (1e-30) whose updates vanish in fp32 rounding, so its checkpoint holds the imported
    weights unchanged (lr 0 itself the schedule divides by)."""
    runs = {}
    for family, (_, path) in family_dirs.items():
        run_dir = tmp_path_factory.mktemp(family) / "run"
        out = run_training(run_dir, BASE + overrides(path) + [
            "optim.lr=1e-30", "optim.min_lr=0", f"checkpoint.load_from=hf:{path}"])
        assert "fresh optimizer, step 0" in out.stdout
        runs[family] = run_dir
    return runs


@pytest.mark.slow
def test_one_process_first_step_loss_equals_hf(family_dirs, imported_runs):
    for family, (model, path) in family_dirs.items():
        ours = read_metrics(imported_runs[family])[0]
        assert ours["step"] == 1
        want = first_batch_loss(model, BASE + overrides(path))
        assert ours["loss"] == pytest.approx(want, rel=1e-4), family


@pytest.mark.slow
def test_export_gives_hf_logits_and_the_same_tensors(family_dirs, imported_runs, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pretrain.hf.export import export

    tokens_bs = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(3))
    for family, (model, path) in family_dirs.items():
        out = tmp_path / family
        export(str(imported_runs[family]), out)
        config = json.loads((out / "config.json").read_text())
        original = json.loads((path / "config.json").read_text())
        for key in ("model_type", "architectures", "tie_word_embeddings", "rope_parameters"):
            assert config[key] == original[key], (family, key)
        assert config["head_dim"] == original.get("head_dim", 16), family
        assert config.get("attention_bias", False) == original.get("attention_bias", False)
        theirs = load_file(str(path / "model.safetensors"))
        exported = load_file(str(out / "model.safetensors"))
        assert sorted(exported) == sorted(theirs), family
        for name, tensor in theirs.items():
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                tensor = tensor[:257]  # the export keeps the data tokenizer's rows
            assert torch.equal(exported[name], tensor), (family, name)
        again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert type(again).__name__ == original["architectures"][0]
        with torch.no_grad():
            want, got = model(tokens_bs).logits[..., :257], again(tokens_bs).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
