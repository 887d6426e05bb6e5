"""A ladder to fit a law on your data: model sizes x WSD decay branches, as run configs and
SLURM array scripts; `python -m pretrain.plan fit` then reads the branches' run dirs."""

from __future__ import annotations

import math
import shlex
from pathlib import Path

import numpy as np
import yaml

from pretrain.files import write_atomic
from pretrain.config import validate
from pretrain.plan.budget import model_shape
from pretrain.plan.runs import PlanError, matmul_parameters
from pretrain.run_dir import RunDir

DECAY_FRACTION = 0.2  # of each branch's length (Hägele et al. 2024)


def ladder_configs(sizes: int, min_params: float, max_params: float, multiples: list[float],
                   vocab: int, seq_length: int, global_batch: int, data: str, out: Path,
                   lr: float) -> tuple[list[dict], list[dict]]:
    """(main runs, decay branches) as config dicts. Each size trains one WSD run to the
    largest token multiple (its own decay included); each smaller multiple m branches off
    its stable phase: train.steps = m N / batch tokens, decaying over the last 20%."""
    if sizes < 3:
        raise PlanError(f"--sizes {sizes}: a fit needs at least 3 points; use 5 or more sizes")
    if not 0 < min_params < max_params:
        raise PlanError(f"--min-params {min_params:g} must be positive and below --max-params "
                        f"{max_params:g}")
    mains, branches = [], []
    multiples = sorted(multiples)
    shapes = []
    for target in np.geomspace(min_params, max_params, sizes):
        cfg = model_shape(float(target), vocab, seq_length)
        if all(matmul_parameters(cfg, vocab) != matmul_parameters(c, vocab) for c in shapes):
            shapes.append(cfg)
    if len(shapes) < sizes:
        raise PlanError(f"only {len(shapes)} distinct model shapes between --min-params "
                        f"{min_params:g} and --max-params {max_params:g} for {sizes} sizes; "
                        f"widen the range or lower --sizes")
    for index, cfg in enumerate(shapes):
        n = matmul_parameters(cfg, vocab)
        steps = [max(5, math.ceil(m * n / (global_batch * seq_length))) for m in multiples]
        # Branch points on multiples of the first one, so the main run saves only those
        # (checkpoint.interval = keep_every = the first point): each decay is ~20%.
        first = steps[0] - max(1, round(DECAY_FRACTION * steps[0]))
        branch_points = [max(first, round((1 - DECAY_FRACTION) * s / first) * first)
                         for s in steps[:-1]]
        decays = [s - p for s, p in zip(steps[:-1], branch_points)]
        decays.append(max(1, round(DECAY_FRACTION * steps[-1])))
        name = f"size{index}_{cfg.model.num_layers}x{cfg.model.hidden_size}"
        c, t, o = cfg.checkpoint, cfg.train, cfg.optim
        t.steps, t.global_batch_size, t.micro_batch_size = steps[-1], global_batch, 1
        t.eval_interval, t.eval_batches, t.log_interval = steps[-1], 8, 10
        o.lr, o.min_lr, o.warmup_steps = lr, 0.0, max(1, min(steps[0] // 10, 1000))
        o.schedule, o.decay_steps = "wsd", decays[-1]
        cfg.parallel.zero_stage = 0
        cfg.data.train = [{"path": data, "weight": 1.0}]
        c.interval, c.keep_every, c.keep_last = first, first, 1
        cfg.run.dir = str(out / "runs" / f"{name}_main")
        validate(cfg)
        mains.append(cfg.to_dict())
        for m, s, d, point in zip(multiples, steps, decays, branch_points):
            if point <= o.warmup_steps or d < 1:
                raise PlanError(f"{name}: the {m:g} tokens/parameter branch ({s} steps) leaves "
                                f"no stable phase to branch from; raise --min-params or the "
                                f"smallest --multiples")
            branch = yaml.safe_load(yaml.safe_dump(cfg.to_dict()))
            branch["run"]["dir"] = str(out / "runs" / f"{name}_decay{m:g}")
            branch["train"].update(steps=s, eval_interval=s)
            branch["optim"]["decay_steps"] = d
            branch["checkpoint"].update(interval=0, keep_every=0, load_from=str(
                RunDir(cfg.run.dir).checkpoint(point)))
            branches.append(branch)
    return mains, branches


def _array_script(configs: list[Path], runs: list[str], gpus: int) -> str:
    names = " ".join(shlex.quote(str(c)) for c in configs)
    dirs = " ".join(shlex.quote(r) for r in runs)
    return f"""#!/bin/bash
#SBATCH --job-name=ladder
#SBATCH --nodes=1
#SBATCH --ntasks-per-node={gpus}
#SBATCH --gpus-per-node={gpus}
#SBATCH --array=0-{len(configs) - 1}
#SBATCH --output=slurm-%x-%A_%a.out
# Written by python -m pretrain.plan ladder: one run of the ladder per array task.
CONFIGS=({names})
RUNS=({dirs})
CONFIG=${{CONFIGS[$SLURM_ARRAY_TASK_ID]}} RUN_DIR=${{RUNS[$SLURM_ARRAY_TASK_ID]}} \\
    exec bash slurm/pretrain_1b.sh
"""


def write_ladder(mains: list[dict], branches: list[dict], out: Path, gpus: int) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for group, configs in (("main", mains), ("branch", branches)):
        paths = []
        for cfg in configs:
            path = out / f"{Path(cfg['run']['dir']).name}.yaml"
            write_atomic(path, yaml.safe_dump(cfg, sort_keys=False))
            paths.append(path)
        script = out / f"ladder_{group}.sbatch"
        write_atomic(script, _array_script(paths, [c["run"]["dir"] for c in configs], gpus))
        written += paths + [script]
    submit = out / "submit.sh"
    write_atomic(submit, "#!/bin/bash\n# the branches start from the main runs' checkpoints\n"
                      f"main=$(sbatch --parsable {shlex.quote(str(out / 'ladder_main.sbatch'))})\n"
                      f"sbatch --dependency=afterok:$main "
                      f"{shlex.quote(str(out / 'ladder_branch.sbatch'))}\n")
    return written + [submit]
