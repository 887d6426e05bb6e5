"""The driver of data_tools/shard.py: plan read units, tokenize the ones not cached on Ray
(read tasks -> tokenizer actor pool, order preserved), then dedup, split, pack and write in
document order on the driver, and write manifest.json last.

Everything that decides the output happens on the driver in document order or is a pure
function of one piece, so the shards and manifest are byte-identical for any worker count,
and for a run resumed from DIR/.work after a kill.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from data_tools.shard_lib.atomic import DirLock, remove_stale_temps
from data_tools.shard_lib.cache import TokenizedPiece, WorkCache
from data_tools.shard_lib.errors import ShardError
from data_tools.shard_lib.inputs import (FIRST, LAST, REJECT_REASONS, plan_units, read_batch,
                                         resolve_inputs)
from data_tools.shard_lib.pack import ShardCounter, SplitWriter, default_shard_samples
from data_tools.shard_lib import replace
from data_tools.shard_lib.tokenize import TokenizeWorker, token_dtype
from pretrain.data import formats
from pretrain.data import tokenizers
from pretrain.data.tokenizers import EOS_CANDIDATES, TokenizerError, is_hf_tokenizer
from pretrain.reaper import start_reaper

NORMALIZATION = "ascii-whitespace-collapsed, stripped; blake2b-128"
TXT_MODES = ("file", "paragraph")


@dataclass
class Options:
    inputs: list[str]
    output: str
    tokenizer: str
    seq_len: int
    text_key: str = "text"
    val_fraction: float = 0.01
    num_workers: int | None = None  # None: every CPU of the machine (or the cluster)
    ray_address: str | None = None
    txt_mode: str = "file"
    dedup: bool = True
    shard_samples: int | None = None  # None: about 64 MB per shard
    skip_bad_records: bool = False
    chunk_bytes: int = 1 << 20
    keep_work: bool = False
    progress: bool = True
    overwrite: bool = False  # replace a finished dataset of other settings/inputs in OUTPUT
    # Granularity only (not in the manifest, no effect on the output bytes): read tasks of
    # about unit_bytes of input, tokenized and cached in pieces of about piece_bytes of text.
    unit_bytes: int = 64 << 20
    piece_bytes: int = 4 << 20
    log: object = field(default=None, repr=False)  # where summary lines go (default stdout)


def _validate(opts: Options) -> None:
    if opts.seq_len < 1:
        raise ShardError(f"--seq-len {opts.seq_len} must be at least 1")
    if not 0.0 <= opts.val_fraction < 1.0:
        raise ShardError(f"--val-fraction {opts.val_fraction} must be in [0, 1)")
    if opts.num_workers is not None and opts.num_workers < 1:
        raise ShardError(f"--num-workers {opts.num_workers} must be at least 1")
    if opts.shard_samples is not None and opts.shard_samples < 1:
        raise ShardError(f"--shard-samples {opts.shard_samples} must be at least 1")
    if opts.chunk_bytes < 1024:
        raise ShardError(f"--chunk-bytes {opts.chunk_bytes} must be at least 1024")
    if opts.txt_mode not in TXT_MODES:
        raise ShardError(f"--txt-mode {opts.txt_mode!r} is not one of {', '.join(TXT_MODES)}")
    if not opts.text_key:
        raise ShardError("--text-key must not be empty")
    if opts.unit_bytes < 1 or opts.piece_bytes < 1:
        raise ShardError("--unit-bytes and --piece-bytes must be at least 1")


@dataclass
class Tokenizer:
    path: str
    sha256: str
    vocab_size: int
    eos_id: int
    prefix: list[int]  # a family tokenizer's BOS before each document (tokenizers.document_affixes)
    suffix: list[int]  # ids before the EOD after each document


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer through the data layer (its card checked when it has one), plus the
    checks that matter to shard.py: an end-of-text piece to put after every document."""
    if not os.path.isfile(path):
        raise ShardError(f"--tokenizer {path}: no such file; pass the PREFIX.model written by "
                         f"data_tools/train_tokenizer.py (or a Hugging Face tokenizer.json)")
    try:
        processor, _card, sha256 = tokenizers.load_tokenizer(path)
    except TokenizerError as err:
        raise ShardError(f"--tokenizer {err}") from None
    if processor.eos_id() < 0 and is_hf_tokenizer(path):
        raise ShardError(f"--tokenizer {path}: no end-of-text token ({', '.join(EOS_CANDIDATES)}"
                         f" or tokenizer_config.json's eos_token), which shard.py appends "
                         f"after every document; put a tokenizer_config.json naming it beside")
    if processor.eos_id() < 0:
        raise ShardError(f"--tokenizer {path}: the model has no eos piece, which shard.py "
                         f"appends after every document; retrain it with eos_id=3")
    prefix, suffix = tokenizers.document_affixes(processor)
    return Tokenizer(os.path.abspath(path), sha256, processor.get_piece_size(), processor.eos_id(),
                     prefix, suffix)


class Progress:
    """A tqdm bar over input bytes with documents/s and tokens/s on a terminal; a line every
    30 s otherwise (batch logs), so a long run always shows it is alive."""

    LINE_INTERVAL_S = 30.0

    def __init__(self, total_bytes: int, enabled: bool):
        self.enabled, self.total = enabled, total_bytes
        self.start = self.last_line = time.monotonic()
        self.docs = self.tokens = self.bytes = 0
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="shard",
                            file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    def rates(self) -> tuple[float, float]:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        return self.docs / elapsed, self.tokens / elapsed

    def update(self, nbytes: int, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        self.bytes += nbytes
        if not self.enabled:
            return
        docs_s, tokens_s = self.rates()
        if self.bar is not None:
            self.bar.set_postfix_str(f"{docs_s:,.0f} docs/s, {tokens_s:,.0f} tokens/s", refresh=False)
            self.bar.update(nbytes)
        elif time.monotonic() - self.last_line >= self.LINE_INTERVAL_S:
            self.last_line = time.monotonic()
            print(f"shard: {self.bytes / max(self.total, 1):.0%} of input, {self.docs:,} docs, "
                  f"{self.tokens:,} tokens, {docs_s:,.0f} docs/s, {tokens_s:,.0f} tokens/s",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _bad_record_message(bad: dict) -> str:
    path = bad["path"]
    if "row" in bad:
        where = f"{path}: row {bad['row']}"
    else:
        line = bad["line"]
        if bad.get("start"):  # a byte range of a large file: count the lines before it
            with open(path, "rb") as f:
                remaining, before = bad["start"], 0
                while remaining > 0:
                    block = f.read(min(remaining, 1 << 24))
                    if not block:
                        break
                    before += block.count(b"\n")
                    remaining -= len(block)
            line += before
        where = f"{path}:{line}"
    if bad["reason"] == "missing_text_key":
        fix = ("pass --text-key with the field that holds the text, or --skip-bad-records to "
               "skip and count such records")
    else:
        fix = "fix the record, or pass --skip-bad-records to skip and count such records"
    return f"{where}: {bad['detail']}; {fix}"


REPO = Path(__file__).resolve().parents[2]
_LOCAL_TOKEN = secrets.token_hex(32)


def init_ray(num_cpus: int | None = None, address: str | None = None) -> None:
    """Start a local Ray (or join `address`) whose workers can import data_tools."""
    import ray

    if address:
        try:
            # Ship the code: a cluster's nodes need not have this checkout.
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False,
                     runtime_env={"py_modules": [str(REPO / "data_tools")]})
        except Exception as err:  # noqa: BLE001 - ConnectionError, auth errors, bad addresses
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ShardError(f"--ray-address {address}: cannot join the Ray cluster ({reason}); "
                             f"check the address with `ray status` on the head node") from None
        return
    # Local workers are children of the raylet this starts and inherit the environment.
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if str(REPO) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, paths)])
    # Ray's servers listen on every interface (2.60 has no setting to bind them to loopback,
    # and maps a 127.0.0.1 node address to the host's own): token authentication, with a
    # fresh random token per process that is never written to disk, keeps anyone else who
    # can reach them from running code. An explicit RAY_AUTH_MODE of the user's wins.
    if "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = _LOCAL_TOKEN
        # Ray reads its config once, at import; ray.init's own token set-up refreshes it so.
        from ray._raylet import Config

        Config.initialize("")
    # Ray's agents outlive a SIGKILLed driver (and then hold the job's output open).
    start_reaper()
    # log_to_driver=False: workers print nothing useful; their failures reach the driver as
    # exceptions, which build() turns into one error line.
    ray.init(num_cpus=num_cpus or local_cpus(), include_dashboard=False,
             logging_level=logging.ERROR, log_to_driver=False)


def local_cpus() -> int:
    """CPUs this process may run on (the affinity mask SLURM or taskset set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def start_ray(opts, tool: str | None = "shard") -> tuple[int, bool]:
    """(worker count, whether this call started Ray and must shut it down) for a tool's
    options (`num_workers`, `ray_address`, `log`); shard.py's and curate.py's. More workers
    than local CPUs are cut to the CPUs, said in one line when `tool` names the tool."""
    import ray

    owned = False
    if not opts.ray_address and opts.num_workers and opts.num_workers > local_cpus():
        # One single-threaded worker per CPU: more only compete for the same cores.
        if tool:
            print(f"{tool}: --num-workers {opts.num_workers} is more than the {local_cpus()} "
                  f"CPUs here; using {local_cpus()}", file=opts.log or sys.stdout, flush=True)
        opts.num_workers = local_cpus()
    if not ray.is_initialized():
        init_ray(opts.num_workers, opts.ray_address)
        owned = True
    cpus = int(ray.cluster_resources().get("CPU", 0))
    workers = opts.num_workers or max(cpus, 1)
    if workers > cpus:
        if owned:
            ray.shutdown()
        raise ShardError(f"--num-workers {workers} exceeds the {cpus} CPUs of the Ray cluster; "
                         f"lower --num-workers")
    return workers, owned


def _actor_args() -> dict:
    # No actor restarts: a crashed actor fails the run, and re-running resumes from the cache.
    # (Restartable actors also make Ray log a warning about their constructor arguments.)
    return {"max_restarts": 0, "max_task_retries": 0}


def _ray_pieces(units: list[dict], opts: Options, tok: Tokenizer, workers: int,
                dtype: np.dtype) -> Iterator[TokenizedPiece]:
    import ray.data

    # Ray Data logs a failed task's traceback before raising it; build() reports it instead.
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    # Ray Data warns when a small input cannot keep every actor busy; expected for tiny jobs.
    warnings.filterwarnings("ignore", message=".*minimum number of concurrent actors.*")
    ctx = ray.data.DataContext.get_current()
    # Ray Data may otherwise emit blocks in completion order; the output depends on order.
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # One block per piece: merged blocks would hand one actor several pieces at once and
    # leave the others idle.
    ctx.target_max_block_size = 1
    ds = ray.data.from_items([{"unit": json.dumps(u)} for u in units], override_num_blocks=len(units))
    # Reading and JSON parsing cost ~5% of tokenizing: a few tasks feed many actors. They ask
    # for no CPU so that the actors can hold every CPU (--num-workers of them).
    ds = ds.map_batches(read_batch, fn_kwargs={"text_key": opts.text_key, "piece_bytes": opts.piece_bytes,
                                               "chunk_bytes": opts.chunk_bytes},
                        batch_size=1, batch_format="pyarrow", num_cpus=0,
                        compute=ray.data.TaskPoolStrategy(size=max(1, min(len(units), math.ceil(workers / 8)))))
    tokenize_args = dict(
        fn_constructor_kwargs={"model_path": tok.path, "model_sha256": tok.sha256,
                               "chunk_bytes": opts.chunk_bytes, "eod_id": tok.eos_id,
                               "prefix": tok.prefix, "suffix": tok.suffix},
        batch_size=None, batch_format="pyarrow", num_cpus=1,
        # Two pieces per actor: the next one is queued when one finishes (with one, each
        # waited ~0.2 s for dispatch on a busy 2-core machine), yet the tail stays short.
        compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=2))
    try:
        with warnings.catch_warnings():
            # Ray 2.60 deprecates ray_remote_args_fn with no replacement for max_restarts yet.
            warnings.simplefilter("ignore")
            ds = ds.map_batches(TokenizeWorker, ray_remote_args_fn=_actor_args, **tokenize_args)
    except TypeError:  # a Ray that dropped the argument: keep its default restarts
        ds = ds.map_batches(TokenizeWorker, **tokenize_args)
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
        for i in range(table.num_rows):
            yield TokenizedPiece.from_arrow(table, i, dtype)


def _next_from_ray(pieces: Iterator[TokenizedPiece], output: Path) -> TokenizedPiece:
    import ray.exceptions

    try:
        return next(pieces)
    except StopIteration:
        raise RuntimeError("Ray returned fewer pieces than planned") from None
    except ray.exceptions.RayError as err:  # a worker died (out of memory, node lost, ...)
        reason = (str(err).strip().splitlines() or [""])[0][:300]
        raise ShardError(f"the Ray pipeline failed ({type(err).__name__}: {reason}); finished "
                         f"work is cached in {output / '.work'}: re-run the same command to "
                         f"resume") from err


class _Stats:
    def __init__(self):
        self.read = self.kept = self.repaired = 0
        self.rejected = Counter({reason: 0 for reason in REJECT_REASONS})


def build(opts: Options) -> dict:
    """Run the whole pipeline; returns the manifest written to OUTPUT/manifest.json."""
    log = opts.log or sys.stdout
    started = time.monotonic()
    _validate(opts)
    tok = load_tokenizer(opts.tokenizer)
    dtype = token_dtype(tok.vocab_size)
    files = resolve_inputs(opts.inputs)
    output = Path(opts.output)
    if output.exists() and not output.is_dir():
        raise ShardError(f"--output {output}: exists and is not a directory")
    try:
        output.mkdir(parents=True, exist_ok=True)
        lock = DirLock(output)
    except OSError as err:
        raise ShardError(f"--output {output}: cannot create or lock it ({err.strerror or err}); "
                         f"choose a writable directory") from None
    writers: dict[str, SplitWriter] = {}
    ray_owned = False
    progress = None
    pieces_from_ray: Iterator[TokenizedPiece] = iter(())
    try:
        remove_stale_temps(output)
        shard_samples = opts.shard_samples or default_shard_samples(opts.seq_len, dtype.itemsize)
        settings = {"val_fraction": opts.val_fraction, "dedup": opts.dedup,
                    "text_key": opts.text_key, "txt_mode": opts.txt_mode,
                    "skip_bad_records": opts.skip_bad_records, "shard_samples": shard_samples,
                    "chunk_bytes": opts.chunk_bytes, "normalization": NORMALIZATION,
                    "split_rule": "val if blake2b(normalized)[:8] / 2^64 < val_fraction"}
        # Only when a tokenizer has them (a family's BOS), so that the identity of datasets
        # made with sentencepiece models stays what it was.
        settings.update({key: ids for key, ids in (("document_prefix", tok.prefix),
                                                   ("document_suffix", tok.suffix)) if ids})
        inputs = [{"path": path, "bytes": os.path.getsize(path)} for path in files]
        identity = {"seq_len": opts.seq_len, "token_dtype": dtype.name, "eod_id": tok.eos_id,
                    "tokenizer": {"sha256": tok.sha256}, "settings": settings, "inputs": inputs}
        # A finished dataset in OUTPUT stays whole until the new one replaces it (replace.py).
        staged = replace.check_replace(output, replace.existing_dataset(output), identity,
                                       opts.overwrite)
        shard_dir = replace.staging_dir(output) if staged else output
        if not staged:
            replace.remove_staging(output)
        units = plan_units(files, opts.txt_mode, opts.text_key, opts.unit_bytes)
        cache = WorkCache(output, salt={
            "tokenizer": tok.sha256, "text_key": opts.text_key, "chunk_bytes": opts.chunk_bytes,
            "piece_bytes": opts.piece_bytes, **{k: v for k, v in settings.items()
                                                if k.startswith("document_")}})
        keys = [cache.unit_key(u) for u in units]
        cached = [cache.complete(k) for k in keys]
        todo = [u for u, n in zip(units, cached) if not n]
        counter = ShardCounter()
        writers = {split: SplitWriter(shard_dir, split, opts.seq_len, dtype, tok.eos_id,
                                      shard_samples, counter) for split in formats.SPLITS}
        total_bytes = sum(s["weight"] for u in units for s in u["segments"])
        workers = opts.num_workers
        if todo:
            workers, ray_owned = start_ray(opts)
            pieces_from_ray = _ray_pieces(todo, opts, tok, workers, dtype)
        print(f"shard: {len(files)} files, {total_bytes:,} bytes in {len(units)} read units "
              f"({len(units) - len(todo)} cached), {workers or 0} workers", file=log, flush=True)
        progress = Progress(total_bytes, opts.progress)
        stats = _Stats()
        router = _Router(opts.dedup, opts.val_fraction)

        for unit, key, count in zip(units, keys, cached):
            index = 0
            while True:
                if count:
                    piece = cache.load(key, index, count, dtype)
                else:
                    piece = _next_from_ray(pieces_from_ray, output)
                    if (piece.unit, piece.piece) != (unit["index"], index):
                        raise RuntimeError(f"Ray returned piece {piece.unit}/{piece.piece}, "
                                           f"expected {unit['index']}/{index}: order lost")
                if piece.fatal:
                    raise ShardError(piece.fatal)
                if piece.bad and not opts.skip_bad_records:
                    raise ShardError(_bad_record_message(piece.bad))
                if not count:
                    cache.save(key, piece)
                router.route(piece, stats, writers)
                progress.update(piece.progress, len(piece.ntok), len(piece.tokens))
                index += 1
                if piece.last:
                    break
        if router.open is not None:
            raise RuntimeError("the input ended inside a document split over pieces")
        progress.close()
        tails = {split: writer.finish() for split, writer in writers.items()}
        if stats.kept == 0:
            rejected = ", ".join(f"{n} {r}" for r, n in stats.rejected.items() if n) or "none"
            raise ShardError(f"no documents left after cleaning ({stats.read} read; rejected: "
                             f"{rejected}); check --input, --text-key and --txt-mode")
        splits = {split: dict(writer.summary(), text_bytes=router.text_bytes[split])
                  for split, writer in writers.items()}
        if splits["train"]["samples"] == 0:
            raise ShardError(f"the train split has {tails['train']} tokens, less than one sample "
                             f"of seq_len+1 = {opts.seq_len + 1}; lower --seq-len or add input")
        manifest = formats.build_manifest(
            seq_len=opts.seq_len, token_dtype=dtype.name, eod_id=tok.eos_id,
            tokenizer={"sha256": tok.sha256, "vocab_size": tok.vocab_size, "path": tok.path},
            splits=splits,
            documents={"read": stats.read, "kept": stats.kept, "utf8_repaired": stats.repaired,
                       "rejected": dict(stats.rejected)},
            tokens_dropped_tail=tails,
            settings=settings, inputs=inputs)
        replace.publish(output, shard_dir, formats.dumps_manifest(manifest),
                        {s["name"] for sp in splits.values() for s in sp["shards"]})
        if not opts.keep_work:
            cache.remove()
        elapsed = time.monotonic() - started
        print(f"shard: {stats.read:,} documents read, {stats.kept:,} kept "
              f"({stats.rejected['duplicate']:,} duplicates); train {splits['train']['samples']:,} "
              f"samples in {len(splits['train']['shards'])} shards, val {splits['val']['samples']:,} "
              f"samples in {len(splits['val']['shards'])} shards; {progress.tokens:,} tokens "
              f"tokenized in {elapsed:.1f} s ({progress.tokens / max(elapsed, 1e-9):,.0f} tokens/s)"
              f" -> {output}", file=log, flush=True)
        return manifest
    except OSError as err:  # a full, read-only or vanished OUTPUT (inputs are checked earlier)
        where = err.filename or output
        raise ShardError(f"cannot write {where}: {err.strerror or err}; free space or fix the "
                         f"permissions of --output {output}, then re-run the same command to "
                         f"resume") from None
    finally:
        # Each step on its own: a failing one (a full disk fails the abort's close too) must
        # not skip ray.shutdown() or the lock release.
        cleanups = [pieces_from_ray.close if hasattr(pieces_from_ray, "close") else None,
                    progress.close if progress is not None else None,
                    *[writer.abort for writer in writers.values()],
                    shutdown_ray if ray_owned else None, lock.release]
        for cleanup in filter(None, cleanups):
            try:
                cleanup()
            except Exception:  # noqa: BLE001 - the error that got us here is the one to report
                pass


def shutdown_ray() -> None:
    import ray

    ray.shutdown()


class _Router:
    """Dedup and train/val decisions in document order. A document split over pieces is
    decided at its first part; its later parts follow that decision."""

    def __init__(self, dedup: bool, val_fraction: float):
        self.dedup = dedup
        # Val when the digest's first 8 bytes, as a fraction of 2^64, are below val_fraction.
        self.threshold = math.ceil(val_fraction * 2.0 ** 64)
        self.seen: set[bytes] = set()
        self.open: int | None = None  # destination of a document whose last part is to come
        self.text_bytes = {"train": 0, "val": 0}  # UTF-8 text routed to each split (for bpb)

    def route(self, piece: TokenizedPiece, stats: _Stats, writers: dict[str, SplitWriter]) -> None:
        stats.read += piece.read
        for reason, count in piece.rejected.items():
            stats.rejected[reason] += count
        n = len(piece.ntok)
        if not n:
            return
        dest = np.empty(n, dtype=np.int8)  # 0 train, 1 val, -1 dropped
        digests, flags = piece.digests, piece.flags.tolist()
        for i in range(n):
            if flags[i] & FIRST:
                digest = digests[16 * i:16 * i + 16]
                if self.dedup and digest in self.seen:
                    stats.rejected["duplicate"] += 1
                    choice = -1
                else:
                    self.seen.add(digest)
                    stats.kept += 1
                    stats.repaired += int(piece.repaired[i])
                    choice = int(int.from_bytes(digest[:8], "big") < self.threshold)
            elif self.open is None:
                raise RuntimeError(f"piece {piece.unit}/{piece.piece} continues no document")
            else:
                choice = self.open
            self.open = None if flags[i] & LAST else choice
            dest[i] = choice
        for value, split in ((0, "train"), (1, "val")):
            mask = dest == value
            self.text_bytes[split] += int(piece.nbytes[mask].sum())
            if mask.all():
                writers[split].add(piece.tokens)
            elif mask.any():
                writers[split].add(piece.tokens[np.repeat(mask, piece.ntok)])
