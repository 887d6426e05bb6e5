"""`python -m pretrain.plan fit RUN...` fits L(N, D) to a ladder of runs; `... budget` turns
a compute budget into model size, tokens, shape, layout, time, loss and a ready config;
`... ladder` writes the configs and SLURM arrays of a ladder to fit on your own data."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import yaml

from pretrain.errors import PlanError, UserError, report
from pretrain.files import write_atomic
from pretrain.model.estimate import describe, peak_tflops
from pretrain.plan.budget import MEASURED_MFU, GPUS_PER_NODE, gpu_memory_gib, make_plan
from pretrain.plan.law import DEFAULT_LAW, PUBLISHED, ScalingLaw, bootstrap, fit_law
from pretrain.plan.runs import read_ladder


def _law_from(value: str) -> ScalingLaw:
    if value in PUBLISHED:
        return PUBLISHED[value]
    path = Path(value)
    if not path.is_file():
        raise PlanError(f"--law {value}: neither a published law ({', '.join(PUBLISHED)}) nor a "
                        f"YAML file written by `python -m pretrain.plan fit --output`")
    data = yaml.safe_load(path.read_text()) or {}
    try:
        law = ScalingLaw(**{k: float(data[k]) for k in ("E", "A", "B", "alpha", "beta")},
                         source=f"fitted, {path}")
    except (KeyError, TypeError, ValueError, AttributeError):
        raise PlanError(f"--law {path}: needs numbers E, A, B, alpha, beta") from None
    if law.problem():
        raise PlanError(f"--law {path}: {law.problem()}; refit on more runs (plan fit)")
    return law


def _check_numbers(args, names: tuple[str, ...]) -> None:
    """Each of these arguments, when given, a positive finite number (argparse took the
    type): zero, negative, NaN or infinite budgets once ended in a traceback or a plan."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            flag = "--" + name.replace("_", "-")
            raise PlanError(f"{flag} {value}: must be a positive finite number")


def _describe_law(law: ScalingLaw) -> str:
    return (f"L(N, D) = {law.E:.4g} + {law.A:.4g} / N^{law.alpha:.4f} + {law.B:.4g} / "
            f"D^{law.beta:.4f}   [{law.source}]")


def cmd_fit(args) -> int:
    runs = read_ladder(args.runs)
    n, d, loss = ([getattr(r, k) for r in runs] for k in ("params", "tokens", "val_loss"))
    law = fit_law(n, d, loss, source=f"fitted on {len(runs)} runs")
    print(_describe_law(law))
    if law.problem():
        raise PlanError(f"the fit on {len(runs)} runs is unusable ({law.problem()}); add runs "
                        f"of other sizes and token counts to the ladder")
    intervals = bootstrap(n, d, loss, samples=args.bootstrap, level=0.8)
    for name in ("E", "A", "B", "alpha", "beta"):
        low, high = intervals[name]
        print(f"  {name:<5} {getattr(law, name):10.4g}   80% bootstrap interval "
              f"[{low:.4g}, {high:.4g}] ({args.bootstrap} resamples of the runs)")
    for run in runs:
        print(f"  {run.path}: N={run.params:.3g} D={run.tokens:.3g} val_loss={run.val_loss:.4f} "
              f"fit={law.loss(run.params, run.tokens):.4f}")
    a, b = law.alpha, law.beta
    g = (a * law.A / (b * law.B)) ** (1 / (a + b))
    print(f"compute-optimal: N(C) = {g:.4g} (C/6)^{b / (a + b):.4f}, "
          f"D(C) = {1 / g:.4g} (C/6)^{a / (a + b):.4f}")
    for flops in (1e18, 1e20, 1e22, 1e24):
        pn, pd = law.optimal(flops)
        print(f"  C={flops:.0e}: N={pn:.3g} D={pd:.3g} ({pd / pn:.1f} tokens/parameter), "
              f"loss {law.loss(pn, pd):.4f}")
    if args.output:
        write_atomic(args.output, yaml.safe_dump(
            {"E": law.E, "A": law.A, "B": law.B, "alpha": float(a), "beta": float(b),
             "runs": [str(r.path) for r in runs]}, sort_keys=False))
        print(f"wrote {args.output} (use it with: python -m pretrain.plan budget --law "
              f"{args.output} ...)")
    return 0


def cmd_budget(args) -> int:
    _check_numbers(args, ("gpus", "gpu_memory", "days", "flops", "params", "tokens", "vocab",
                          "seq_length"))
    law = _law_from(args.law)
    memory = args.gpu_memory or gpu_memory_gib(args.gpu)
    if memory is None:
        raise PlanError(f"--gpu {args.gpu}: memory size unknown; pass --gpu-memory GIB")
    if peak_tflops(args.gpu.upper()) is None:
        raise PlanError(f"--gpu {args.gpu}: peak bf16 TFLOP/s unknown; name one of H100, H200, "
                        f"A100, B200, MI300X, ... (pretrain/model/estimate.py PEAK_BF16_TFLOPS)")
    if not 0 < args.mfu <= 1:
        raise PlanError(f"--mfu {args.mfu} must be a fraction in (0, 1], e.g. {MEASURED_MFU}")
    flops = args.flops
    if flops is None and args.days:
        flops = args.gpus * peak_tflops(args.gpu.upper()) * 1e12 * args.mfu * args.days * 86400
    plan = make_plan(law, args.gpus, args.gpu, args.mfu, args.vocab, args.seq_length, memory,
                     flops=flops, params=args.params, tokens=args.tokens)
    cfg, m = plan.cfg, plan.cfg.model
    cfg.run.dir = f"runs/{args.name}"
    cfg.data.train = [{"path": args.data, "weight": 1.0}]
    print(_describe_law(law))
    print(f"budget: {plan.flops:.3g} FLOPs -> {plan.params:.3g} parameters (matmul) on "
          f"{plan.tokens:.3g} tokens ({plan.tokens / plan.params:.1f} per parameter)")
    print(f"shape: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads, "
          f"{m.query_groups} KV groups, FFN {m.ffn_size}, vocab {plan.vocab}, seq "
          f"{cfg.train.seq_length}")
    print(describe(cfg, plan.vocab, plan.gpus, bf16=True))
    print(f"batch: micro {cfg.train.micro_batch_size} x global {cfg.train.global_batch_size} "
          f"sequences, {cfg.train.steps:,} steps, WSD lr {cfg.optim.lr:g} "
          f"(DeepSeek LLM 2024 batch and lr fits)")
    hours = plan.wall_seconds / 3600
    print(f"throughput: {plan.tokens_per_second:,.0f} tokens/s at MFU {plan.mfu:.1%} on "
          f"{plan.gpus} x {plan.gpu} -> {hours:,.1f} h ({hours / 24:.1f} days)")
    print(f"predicted final loss: {plan.predicted_loss:.3f} (the law's data and tokenizer; "
          f"fit your own with a ladder for yours)")
    write_atomic(args.output, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    nodes = math.ceil(plan.gpus / GPUS_PER_NODE)
    per_node = min(plan.gpus, GPUS_PER_NODE)
    print(f"wrote {args.output}\nsbatch: CONFIG={args.output} RUN_DIR={cfg.run.dir} sbatch "
          f"--nodes={nodes} --ntasks-per-node={per_node} --gpus-per-node={per_node} "
          f"slurm/pretrain_1b.sh")
    return 0


def cmd_ladder(args) -> int:
    from pretrain.plan.ladder import ladder_configs, write_ladder

    _check_numbers(args, ("vocab", "sizes", "min_params", "max_params", "seq_length",
                          "global_batch", "lr", "gpus_per_run"))
    for multiple in args.multiples:
        if not (math.isfinite(multiple) and multiple > 0):
            raise PlanError(f"--multiples {multiple}: must be a positive finite number")
    mains, branches = ladder_configs(args.sizes, args.min_params, args.max_params,
                                     args.multiples, args.vocab, args.seq_length,
                                     args.global_batch, args.data, args.output_dir, args.lr)
    for cfg in mains + branches:
        m, start = cfg["model"], cfg["checkpoint"]["load_from"]
        print(f"{cfg['run']['dir']}: {m['num_layers']} layers x {m['hidden_size']}, "
              f"{cfg['train']['steps']} steps, decay {cfg['optim']['decay_steps']}"
              + (f", from {Path(start).name}" if start else ""))
    written = write_ladder(mains, branches, args.output_dir, args.gpus_per_run)
    print(f"wrote {len(written)} files to {args.output_dir}; submit with bash "
          f"{args.output_dir / 'submit.sh'}, then: python -m pretrain.plan fit "
          f"{args.output_dir}/runs/*")
    return 0


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m pretrain.plan",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit L(N, D) to the final val_loss of a ladder of runs")
    fit.add_argument("runs", nargs="+", type=Path, help="run directories (train.eval_interval>0)")
    fit.add_argument("--bootstrap", type=int, default=100, help="resamples for the intervals")
    fit.add_argument("--output", type=Path, help="write the fitted constants (YAML) here")
    budget = sub.add_parser("budget", help="compute-optimal run for a budget")
    budget.add_argument("--gpus", type=int, default=8)
    budget.add_argument("--gpu", default="H100", help="accelerator name (H100, H200, A100, ...)")
    budget.add_argument("--gpu-memory", type=float, help="GiB per GPU (default: from --gpu)")
    budget.add_argument("--days", type=float, help="wall-clock budget")
    budget.add_argument("--flops", type=float, help="compute budget in FLOPs (instead of --days)")
    budget.add_argument("--params", type=float, help="fix the model size (parameters)")
    budget.add_argument("--tokens", type=float, help="fix the training tokens")
    budget.add_argument("--mfu", type=float, default=MEASURED_MFU,
                        help=f"model FLOPs utilisation (default {MEASURED_MFU}: measured, 1b on "
                             f"an H200)")
    budget.add_argument("--law", default=DEFAULT_LAW,
                        help=f"{' | '.join(PUBLISHED)} or a YAML from `fit --output`")
    budget.add_argument("--vocab", type=int, default=32000)
    budget.add_argument("--seq-length", type=int, default=2048)
    budget.add_argument("--data", default="data/shards", help="data.train of the written config")
    budget.add_argument("--name", default="planned", help="run name (run.dir=runs/NAME)")
    budget.add_argument("--output", type=Path, default=Path("configs/planned.yaml"))
    ladder = sub.add_parser("ladder", help="configs + SLURM arrays for a ladder of small runs")
    ladder.add_argument("--data", required=True, help="data.train of every run")
    ladder.add_argument("--vocab", type=int, required=True, help="the tokenizer's vocabulary")
    ladder.add_argument("--sizes", type=int, default=5)
    ladder.add_argument("--min-params", type=float, default=20e6)
    ladder.add_argument("--max-params", type=float, default=300e6)
    ladder.add_argument("--multiples", type=float, nargs="+", default=[5.0, 10.0, 20.0, 40.0],
                        help="tokens per parameter of the decay branches (the largest: main)")
    ladder.add_argument("--seq-length", type=int, default=2048)
    ladder.add_argument("--global-batch", type=int, default=64, help="sequences per step")
    ladder.add_argument("--lr", type=float, default=1e-3)
    ladder.add_argument("--gpus-per-run", type=int, default=1)
    ladder.add_argument("--output-dir", type=Path, default=Path("ladder"))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return {"fit": cmd_fit, "budget": cmd_budget, "ladder": cmd_ladder}[args.command](args)
    except UserError as err:
        return report(err, label="plan error")


if __name__ == "__main__":
    sys.exit(main())
