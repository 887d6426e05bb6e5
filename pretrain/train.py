"""Entry point: `python -m pretrain.train --config configs/X.yaml [section.key=value ...]`.

Reads as the list of builds it performs: config -> process groups -> model -> ZeRO engine ->
data -> checkpoint (resume) -> trainer.fit() -> sample. `build()` returns everything built,
for tests and tools that need a live model without training.

Exit status: 0 done; 2 a configuration, data or checkpoint problem (one line; also a
shard found corrupt during training, since a requeue would fail the same way) or too
many non-finite steps in a row (guards.py); 75 (EXIT_REQUEUE) stopped by SIGTERM/SIGUSR1
after saving a checkpoint, to be requeued; 76 (guards.EXIT_HUNG) a step hung past the
watchdog's budget; anything else is a crash.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.log import is_rank0, log, quiet_library_warnings

# Before the megatron imports below: they announce optional kernels that are missing here.
quiet_library_warnings()

from pretrain.checkpoint.signals import StopRequests
from pretrain.config import (Config, Layout, check_run_dir, load_config, megatron_flags,
                             save_config, validate)
from pretrain.data.build import build_loaders, build_tokenizer, open_data
from pretrain.errors import EXIT_OK, EXIT_REQUEUE, DataError, UserError, report
from pretrain.model.estimate import describe
from pretrain.model.spec import choose_backend
from pretrain.parallel import cpu, deepspeed_user, dist as pdist
from pretrain.run_dir import RunDir
from pretrain.trainer.trackers import check_wandb


def parse_args(argv=None):
    """Our arguments, with Megatron-LM's flag spellings turned into overrides first
    (config/megatron_flags.py; ConfigError on a flag that does not map or disagrees)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    argv, from_flags = megatron_flags.translate(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True,
                        help="run config: a YAML path or a bundled name (smoke, demo, 1b)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate, print the resolved config, parameter count and memory "
                             "estimate, then exit")
    parser.add_argument("--world-size", type=int, default=None,
                        help="with --dry-run: plan for this many ranks instead of the launcher's")
    # The deepspeed launcher appends --local_rank=N (it also exports LOCAL_RANK).
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="this process's rank on its node (set by the deepspeed launcher)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides "
                        "(model.preset=NAME swaps in configs/model/NAME.yaml); Megatron-LM "
                        "flags such as --num-layers 24 are accepted (docs/megatron-flags.md)")
    args = parser.parse_intermixed_args(argv)
    megatron_flags.check_agreement(from_flags, args.overrides)
    args.overrides = [item for _, item in from_flags] + args.overrides
    return args


@dataclass
class Built:
    """Everything `build()` creates for one rank."""

    cfg: Config
    layout: Layout
    data: object  # data.build.OpenedData
    device: torch.device
    chunks: list
    zero: object  # parallel.zero.ZeroEngine
    scheduler: object
    loader: object
    trainer: object  # trainer.Trainer (with its hooks, validation sets and checkpointer)


def process_age_s() -> float | None:
    """Seconds since this process started (Linux; None elsewhere)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat[stat.rindex(")") + 2:].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class StartupClock:
    """Where start-up time goes, as one log line (the 1b model's start-up is a target)."""

    def __init__(self):
        self.last, self.parts = time.perf_counter(), []
        age = process_age_s()
        if age is not None:
            self.parts.append(("imports, config and data", age))

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.parts.append((name, now - self.last))
        self.last = now

    def line(self) -> str:
        total = sum(seconds for _, seconds in self.parts)
        return (f"start-up: {total:.1f} s (" +
                ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.parts) + ")")


def build(cfg: Config, layout: Layout, data, env: pdist.ProcessEnv, bf16: bool,
          stops: StopRequests | None = None) -> Built:
    """Process groups, model chunks, optimizer, ZeRO engine, loaders, checkpointer, hooks and
    the trainer over them. `stops`: the stop-signal recorder the trainer polls (None: none)."""
    clock = StartupClock()
    cpu.enable()
    pdist.init_process_group(env, cfg.parallel.timeout_minutes)
    p = cfg.parallel
    pdist.init_model_parallel(p.tensor_parallel, p.pipeline_parallel, p.virtual_pipeline_chunks,
                              cfg.train.seed)
    clock.lap("process groups")
    from megatron.core import parallel_state

    from pretrain.checkpoint.manager import Checkpointer
    from pretrain.checkpoint.parts import training_parts
    from pretrain.checkpoint.tensor_parts import tensor_parts
    from pretrain.hf.importer import initial_weights
    from pretrain.trainer.trackers import build_hooks
    from pretrain.model.gpt import build_model_chunks
    from pretrain.trainer.optim import build_optimizer, build_scheduler
    from pretrain.parallel.schedule import ModelChunks, proxies
    from pretrain.parallel.deepspeed_user import deepspeed_config
    from pretrain.parallel.zero import build_engine
    from pretrain.trainer.loop import Trainer, TrainState

    run_dir = RunDir(cfg.run.dir)
    if is_rank0():
        run_dir.root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir.config)
        log(describe(cfg, data.vocab_size, env.world_size, bf16))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    dtype = torch.bfloat16 if bf16 else torch.float32

    chunks = build_model_chunks(cfg, layout.padded_vocab_size, dtype, device)
    clock.lap("model build and init")
    model = ModelChunks(chunks)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    zero = build_engine(model, optimizer, scheduler, deepspeed_config(
        p.zero_stage, layout.micro_batch_size, cfg.optim.grad_clip, bf16, p.deepspeed))
    if p.deepspeed and is_rank0():
        log(deepspeed_user.describe(zero.engine, p.deepspeed))
    # DeepSpeed runs torch-style backward hooks only for ZeRO optimizers; stage 0 calls the
    # chunks directly and reduces at engine.step().
    model_proxies = proxies(zero.engine, chunks, through_engine=p.zero_stage > 0)
    clock.lap("optimizer and ZeRO engine")

    loader, valid_sets = build_loaders(cfg, data, layout.micro_batch_size,
                                       parallel_state.get_data_parallel_rank(),
                                       layout.data_parallel)
    for source, weight in zip(data.train, data.train_weights):
        log(f"data: {source.name} weight {weight:g}: {source.num_samples:,} samples of "
            f"{source.seq_len} tokens in {len(source.shard_samples)} shards")
    for vs in valid_sets:
        if vs.bytes_per_token is None:
            log(f"validation: {vs.name} has no text_bytes in its manifest (made by an older "
                f"shard.py): bits-per-byte is omitted; re-shard to report it")
    clock.lap("loaders")
    state = TrainState()
    checkpointer = Checkpointer(
        cfg, layout, data, device, training_parts(scheduler, loader, state),
        tensor_parts(cfg, layout, zero.engine, chunks),
        initial_weights=initial_weights(cfg, layout.padded_vocab_size, data))
    trainer = Trainer(cfg, layout, zero, chunks, model_proxies, loader, device,
                      hooks=build_hooks(cfg, run_dir.root), valid_sets=valid_sets,
                      eval_proxies=proxies(zero.engine, chunks, through_engine=False),
                      checkpointer=checkpointer, stops=stops, state=state)
    clock.lap("checkpointer and hooks")
    log(clock.line())
    return Built(cfg, layout, data, device, chunks, zero, scheduler, loader, trainer)


def main(argv=None) -> int:
    # The imports left ~430k objects (torch, megatron-core, DeepSpeed, sympy) that are never
    # garbage. Freezing them keeps every later full collection, and the interpreter's own at
    # exit (1.3 s of each process's exit on a 2-core CPU), from scanning them again; the
    # model and optimizer built below are frozen the same way once start-up is done.
    gc.freeze()
    quiet_library_warnings()
    has_cuda = torch.cuda.is_available()
    try:
        args = parse_args(argv)
    except UserError as err:
        return report(err, rank=pdist.detect_env().rank)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    env = pdist.detect_env()
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.checkpoint.load_from.startswith("hf:"):  # the checkpoint defines the model
            from pretrain.config import model_keys_given
            from pretrain.hf.importer import adopt_architecture

            adopt_architecture(cfg, model_keys_given(args.config, args.overrides),
                               cfg.checkpoint.load_from)
        world = args.world_size if (args.dry_run and args.world_size) else env.world_size
        # A dry run plans the GPU run: bf16 is allowed and `auto` resolves to it.
        planning_cuda = has_cuda or args.dry_run
        validate(cfg, cuda=planning_cuda)  # config alone, before touching any data
        choose_backend(cfg.model.backend, document_masks=cfg.data.reset_attention)
        data = open_data(cfg)
        # Checked whenever one is named, so a wrong path fails at start-up (and in the SLURM
        # preflight), not after training when the sample is drawn.
        tokenizer = build_tokenizer(cfg, data) if (cfg.train.sample_tokens > 0
                                                    or cfg.data.tokenizer) else None
        layout = validate(cfg, world_size=world, vocab_size=data.vocab_size, cuda=planning_cuda)
        bf16 = cfg.parallel.precision == "bf16" or (cfg.parallel.precision == "auto"
                                                     and planning_cuda)
        deepspeed_user.check(cfg, layout.data_parallel, bf16)  # before any process group
        check_run_dir(cfg)
        check_wandb(cfg)
    except UserError as err:  # every rank met it alike: rank 0 says it
        return report(err, rank=env.rank)
    if args.dry_run:
        import yaml

        if env.rank == 0:
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
            print(describe(cfg, data.vocab_size, world, bf16))
        return EXIT_OK

    # From here a stop signal means "finish the step, save, exit EXIT_REQUEUE"; one that
    # comes during the build is acted on after the first step.
    stops = StopRequests()
    built = build(cfg, layout, data, env, bf16, stops)
    gc.freeze()
    trainer = built.trainer
    try:
        trainer.resume()
        reason = trainer.fit()
        if reason == "signal":
            return EXIT_REQUEUE
        _sample(built, tokenizer)
    except UserError as err:
        # A shard found corrupt or missing while training was read by this rank alone: it says
        # so with its number (the others stop with PeerStopped, quietly). Not requeued.
        return report(err, rank=env.rank, world_size=env.world_size,
                      every_rank=isinstance(err, DataError))
    finally:
        stops.restore()
        trainer.close()
    log(f"run directory: {Path(cfg.run.dir).resolve()}")
    pdist.destroy()
    return EXIT_OK


def _sample(built: Built, tokenizer) -> None:
    from pretrain.model.generate import sample
    from pretrain.parallel.schedule import proxies

    cfg = built.cfg
    if cfg.train.sample_tokens <= 0:
        return
    if tokenizer is None:
        log("no sample: the tokenizer named in the manifest is not readable here; "
            "set data.tokenizer=PATH.model")
        return
    prompt = tokenizer.encode("def ")
    out = sample(proxies(built.zero.engine, built.chunks, through_engine=False), prompt,
                 cfg.train.sample_tokens, cfg.train.seq_length, built.data.vocab_size,
                 cfg.train.seed, built.device)
    log("---- sample ----\n" + tokenizer.decode(prompt + out) + "\n----------------")


if __name__ == "__main__":
    sys.exit(main())
