"""lm-evaluation-harness (`lm_eval --model hf`) runs on an exported directory with a tiny
local task shipped in tests/hf/lm_eval_tasks (no download), and the log-likelihoods it
reports are the ones our own model gives the same text."""

from __future__ import annotations

import json

import pytest
import torch

from tests.hf.conftest import our_model
from tests.launch_helpers import REPO, launch

# Every test here trains, exports or evaluates through the CLIs (tests/hf/conftest.py).
pytestmark = pytest.mark.slow

TASKS = REPO / "tests" / "hf" / "lm_eval_tasks"


def our_loglikelihood(model, processor, context: str, continuation: str) -> float:
    # lm-eval's split of a pair: trailing spaces of the context belong to the continuation,
    # and the continuation's ids are those of the whole string after the context's.
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = processor.encode(context + continuation)
    context_ids = processor.encode(context)
    target = whole[len(context_ids):]
    inputs = torch.tensor([(context_ids + target)[:-1]])
    with torch.no_grad():
        logits = model(input_ids=inputs, position_ids=torch.arange(inputs.shape[1]).unsqueeze(0),
                       attention_mask=None)[0, :, :processor.get_piece_size()].float()
    logprobs = torch.log_softmax(logits[len(context_ids) - 1:], dim=-1)
    return float(logprobs[torch.arange(len(target)), torch.tensor(target)].sum())


def test_lm_eval_runs_on_the_export(exported, trained_run, spm_data, tmp_path,
                                    single_rank_parallel):
    import sentencepiece

    from pretrain.checkpoint.weights import read_weights

    out_dir = tmp_path / "lm_eval"
    launch(["-m", "lm_eval", "--model", "hf", "--model_args",
            f"pretrained={exported('one_process')},dtype=float32", "--tasks",
            "tiny_python_choice", "--include_path", str(TASKS), "--device", "cpu",
            "--batch_size", "8", "--output_path", str(out_dir), "--log_samples"], 1, 300,
           "lm_eval", env_extra={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    results = json.loads(next(out_dir.rglob("results_*.json")).read_text())
    accuracy = results["results"]["tiny_python_choice"]["acc,none"]
    samples = [json.loads(line) for line in next(out_dir.rglob("samples_*.jsonl")).read_text().splitlines()]
    assert len(samples) == 8 and 0.0 <= accuracy <= 1.0

    model = our_model(read_weights(trained_run("one_process")))[0]
    processor = sentencepiece.SentencePieceProcessor(model_file=str(spm_data["tokenizer"]))
    correct = 0
    for sample in samples:
        ours = [our_loglikelihood(model, processor, args["arg_0"], args["arg_1"])
                for args in sample["arguments"].values()]
        theirs = [float(resp[0][0]) for resp in sample["resps"]]
        assert theirs == pytest.approx(ours, rel=1e-4, abs=1e-3), sample["doc"]
        correct += int(max(range(len(ours)), key=ours.__getitem__) == sample["doc"]["answer"])
    assert accuracy == pytest.approx(correct / len(samples))
