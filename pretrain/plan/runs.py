"""Read a ladder of finished runs for the fit: model size from config.yaml, tokens and the
final validation loss from metrics.jsonl, the tokenizer from the newest checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pretrain.checkpoint.store import CheckpointDir
from pretrain.config import ConfigError, load_config
from pretrain.errors import PlanError
from pretrain.model.estimate import parameter_counts
from pretrain.run_dir import TRAIN_STATE, RunDir

MIN_RUNS = 3  # E, A, B, alpha, beta: fewer distinct runs leave the law undetermined


@dataclass(frozen=True)
class LadderRun:
    path: Path
    params: float  # matrix-multiply parameters (the N of C = 6 N D)
    tokens: float
    val_loss: float
    tokenizer_sha256: str
    data: str  # data.train and data.valid as written in config.yaml


def matmul_parameters(cfg, vocab_size: int) -> float:
    """N as pretrain.model.estimate.flops_per_token counts it: layers, final norm, output matrix."""
    counts = parameter_counts(cfg, vocab_size)
    return float(counts["non_embedding"] + counts["padded_vocab_size"] * cfg.model.hidden_size)


def read_run(path: Path) -> LadderRun:
    run = RunDir(path)
    try:
        cfg = load_config(run.config)
    except ConfigError as err:
        raise PlanError(f"{path}: not a run directory ({err})") from None
    records = []
    metrics = run.metrics
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
    evals = [r for r in records if isinstance(r.get("val_loss"), (int, float))]
    if not evals:
        raise PlanError(f"{path}/metrics.jsonl has no val_loss; train the run with "
                        f"train.eval_interval > 0 (it evaluates at the end too)")
    latest = CheckpointDir(run.checkpoints).latest_pointer()
    state_file = run.checkpoints / (latest or "") / TRAIN_STATE
    if not latest or not state_file.is_file():
        raise PlanError(f"{path}: no complete checkpoint to read the tokenizer from; finish the "
                        f"run with checkpoint.save_on_stop=true")
    state = json.loads(state_file.read_text())
    last = evals[-1]
    return LadderRun(path, matmul_parameters(cfg, int(state["tokenizer"]["vocab_size"])),
                     float(last.get("tokens") or records[-1]["tokens"]), float(last["val_loss"]),
                     state["tokenizer"]["sha256"],
                     json.dumps([cfg.data.train, cfg.data.stages, cfg.data.valid, cfg.train.seq_length]))


def read_ladder(paths: list[Path]) -> list[LadderRun]:
    if len(paths) < MIN_RUNS:
        raise PlanError(f"fitting L(N, D) needs at least {MIN_RUNS} runs of different sizes or "
                        f"token counts, got {len(paths)}; train a ladder of sizes (docs/planning.md) "
                        f"and pass its run directories")
    runs = [read_run(Path(p)) for p in paths]
    first = runs[0]
    for run in runs[1:]:
        if run.tokenizer_sha256 != first.tokenizer_sha256 or run.data != first.data:
            what = "tokenizer" if run.tokenizer_sha256 != first.tokenizer_sha256 else \
                "data (data.train, data.stages, data.valid, train.seq_length)"
            raise PlanError(f"{run.path} and {first.path} differ in {what}: a law fitted over "
                            f"different data means nothing; fit runs of one data set")
    if len({(r.params, r.tokens) for r in runs}) < MIN_RUNS:
        raise PlanError(f"the {len(runs)} runs have fewer than {MIN_RUNS} distinct (size, "
                        f"tokens) points; vary model size and token count")
    return runs
