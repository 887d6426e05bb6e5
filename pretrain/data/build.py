"""From `cfg.data` to opened sources, the train/validation loaders and the tokenizer.

Sources are opened (manifests read and checked against each other) before any process
group exists, so a missing directory, an unknown format version or a blend of corpora made
with different tokenizers fails in one line at start-up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pretrain.config import Config
from pretrain.data.tokenizers import TextTokenizer, TokenizerError, open_tokenizer
from pretrain.data.loader import BlendedLoader
from pretrain.data.sources import DataError, open_source


@dataclass
class ValidSet:
    """One validation source with its own loader, so each is reported on its own."""

    name: str
    loader: BlendedLoader  # over this source alone
    weight: float  # its weight in the blend, for the combined numbers
    bytes_per_token: float | None  # None: no bits-per-byte (manifest without text_bytes)


@dataclass
class OpenedData:
    train: list  # sources: data.train's, then those only data.stages name
    train_weights: list[float]  # data.train's blend over `train` (0 for stage-only sources)
    valid: list
    valid_weights: list[float]
    stages: list = field(default_factory=list)  # (at_step, weights over `train`)

    @property
    def vocab_size(self) -> int:
        return self.train[0].vocab_size


def _open(items, split, seq_len, verify, optional=False):
    sources, weights = [], []
    for item in items:
        try:
            sources.append(open_source(item["path"], split, seq_len, verify))
            weights.append(item["weight"])
        except DataError as err:
            if optional and "split with shards" in str(err):
                continue
            raise
    return sources, weights


def open_data(cfg: Config) -> OpenedData:
    seq = cfg.train.seq_length
    verify = cfg.data.verify_checksums
    train, train_weights = _open(cfg.data.train, "train", seq, verify)
    if cfg.data.valid:
        valid, valid_weights = _open(cfg.data.valid, "val", seq, verify)
    else:
        valid, valid_weights = _open(cfg.data.train, "val", seq, verify, optional=True)
    train_weights, stages = _stage_blends(cfg, train, train_weights, seq, verify)
    first = train[0]
    for source in train[1:] + valid:
        if source.tokenizer_sha256 != first.tokenizer_sha256:
            raise DataError(f"{source.name} was tokenized with a different tokenizer "
                            f"(sha256 {source.tokenizer_sha256[:12]}) than {first.name} "
                            f"({first.tokenizer_sha256[:12]}); re-shard both with the same "
                            f"--tokenizer before blending them")
    for source in train + valid:
        if source.seq_len < seq:
            raise DataError(f"{source.name} holds samples of seq_len={source.seq_len}, shorter "
                            f"than train.seq_length={seq}; re-shard with --seq-len {seq} or lower "
                            f"train.seq_length")
    return OpenedData(train, train_weights, valid, valid_weights, stages)


def _stage_blends(cfg: Config, train: list, weights: list[float], seq: int, verify: bool):
    """Open the sources only data.stages name (appended to `train`) and express every blend
    as weights over the one list of sources, so the loader keeps one count per source."""
    paths = [item["path"] for item in cfg.data.train]
    weights = list(weights)
    stages = []
    for stage in cfg.data.stages:
        stage_weights = [0.0] * len(paths)
        for item in stage["train"]:
            if item["path"] not in paths:
                paths.append(item["path"])
                train.append(open_source(item["path"], "train", seq, verify))
                weights.append(0.0)
                for other in stages:
                    other[1].append(0.0)
                stage_weights.append(0.0)
            stage_weights[paths.index(item["path"])] += item["weight"]
        stages.append((stage["at_step"], stage_weights))
    return weights, stages


def build_loaders(cfg: Config, data: OpenedData, micro_batch_size: int, dp_rank: int,
                  dp_size: int):
    common = dict(seq_length=cfg.train.seq_length, global_batch_size=cfg.train.global_batch_size,
                  micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                  seed=cfg.train.seed, reset_attention=cfg.data.reset_attention)
    stages = [(step * cfg.train.global_batch_size, weights) for step, weights in data.stages]
    train = BlendedLoader(data.train, data.train_weights, shuffle=True,
                          num_workers=cfg.data.num_workers,
                          repeat_first_batch=cfg.data.repeat_first_batch, stages=stages, **common)
    valid = []
    if data.valid and cfg.train.eval_interval > 0:
        # One unshuffled loader per source, so each is reported on its own; the trainer
        # rewinds them before every evaluation, so each one scores the same samples and the
        # curve is comparable across steps and runs.
        for name, source, weight in zip(source_names(data.valid), data.valid,
                                        data.valid_weights):
            loader = BlendedLoader([source], [1.0], shuffle=False, num_workers=0, **common)
            valid.append(ValidSet(name, loader, weight, source.bytes_per_token))
    return train, valid


def source_names(sources) -> list[str]:
    """Short metric names: each source's last path component (`web` for data/web), the full
    path where two would share one."""
    short = [re.sub(r"[^A-Za-z0-9_.-]+", "_",
                    s.path.replace("{name}", "").rstrip("/").rsplit("/", 1)[-1] or s.path)
             if hasattr(s, "path") else "embedded" for s in sources]
    if len(set(short)) == len(short):
        return short
    return [re.sub(r"[^A-Za-z0-9_.-]+", "_", getattr(s, "path", "embedded")).strip("_")
            for s in sources]


def build_tokenizer(cfg: Config, data: OpenedData):
    """The tokenizer that made the data (for sampling text), or None when it is unavailable."""
    from pathlib import Path

    from pretrain.data.embedded import ByteTokenizer

    source = data.train[0]
    if cfg.data.tokenizer and not Path(cfg.data.tokenizer).is_file():
        raise DataError(f"data.tokenizer={cfg.data.tokenizer}: no such file; point it at the "
                        f"PREFIX.model the shards were made with, or leave it empty")
    if source.tokenizer_sha256 == "byte-level":
        return ByteTokenizer()
    path = cfg.data.tokenizer or source.tokenizer_path
    if not path or not Path(path).is_file():
        return None
    try:
        return TextTokenizer(open_tokenizer(path, sha256=source.tokenizer_sha256))
    except TokenizerError as err:
        raise DataError(f"{source.name}: {err}; point data.tokenizer at the right .model (or "
                        f"tokenizer.json)") from None
