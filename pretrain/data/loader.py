"""Global batches from blended, shuffled shard sets, sliced for this data-parallel rank.

The global sample sequence is a pure function of (manifests, weights, seed): position p of
the stream is assigned to a source by a deterministic weighted schedule, and source s's
k-th sample comes from its epoch e = k // N_s, where shards are visited in a seeded
permutation and samples within a shard in another (memory: the shards in flight, never
the dataset). Data stages change the weights from a given position on. Global batch b is positions [b*B, (b+1)*B); data-parallel rank r takes the
r-th contiguous slice. Nothing depends on the number of ranks or loader workers, so the
state (samples consumed per source) resumes the exact sequence under any layout.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [b, s] int64 inputs
    labels: torch.Tensor  # [b, s] int64 targets (inputs shifted by one)
    loss_mask: torch.Tensor  # [b, s] float32, 1 where the label counts
    position_ids: torch.Tensor  # [b, s] int64
    # [b, s] int32 document index within each sample, with data.reset_attention; the
    # [b, 1, s, s] mask is built from it on the device (document_causal_mask).
    segment_ids: torch.Tensor | None = None


def _rng(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([int(w) & 0xFFFFFFFF for w in words]))


class SourceOrder:
    """Where the k-th sample of one source lives: (shard index, row within the shard)."""

    def __init__(self, source, seed: int, shuffle: bool):
        self.source = source
        self.seed = seed
        self.shuffle = shuffle
        self._digest_word = int(source.digest[:8], 16)
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def _epoch(self, epoch: int):
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            n = len(self.source.shard_samples)
            order = _rng(self.seed, epoch, self._digest_word).permutation(n) if self.shuffle \
                else np.arange(n)
            ends = np.cumsum(self.source.shard_samples[order])
            self._epoch_cache = (epoch, order, ends)
        return self._epoch_cache[1], self._epoch_cache[2]

    def locate(self, k: int) -> tuple[int, int, int]:
        """(epoch, shard index, row) of the source's k-th sample."""
        epoch, offset = divmod(k, self.source.num_samples)
        order, ends = self._epoch(epoch)
        j = int(np.searchsorted(ends, offset, side="right"))
        within = offset - (int(ends[j - 1]) if j else 0)
        shard = int(order[j])
        if self.shuffle:
            rows = _rng(self.seed, epoch, self._digest_word, shard).permutation(
                int(self.source.shard_samples[shard]))
            within = int(rows[within])
        return epoch, shard, within

    def upcoming_shards(self, k: int, count: int) -> list[int]:
        """The shards the source will read next, starting at its k-th sample."""
        out, position = [], k
        while len(out) < count:
            epoch, offset = divmod(position, self.source.num_samples)
            order, ends = self._epoch(epoch)
            j = int(np.searchsorted(ends, offset, side="right"))
            out.append(int(order[j]))
            position = (epoch * self.source.num_samples) + int(ends[j])
        return out


class ShardCache:
    """Decoded shards of one source: the current ones plus `prefetch` read ahead in threads.
    Bounded: shards not needed any more are evicted."""

    def __init__(self, source, prefetch: int, pool: ThreadPoolExecutor | None):
        self.source = source
        self.prefetch = prefetch
        self.pool = pool
        self._futures: dict[int, object] = {}
        self._lock = threading.Lock()

    def get(self, shard: int):
        with self._lock:
            future = self._futures.get(shard)
        if future is None:
            return self._store(shard, self.source.load_shard(shard))
        return future.result() if hasattr(future, "result") else future

    def _store(self, shard, data):
        with self._lock:
            self._futures[shard] = data
        return data

    def keep_only(self, wanted: list[int]) -> None:
        with self._lock:
            for shard in list(self._futures):
                if shard not in wanted:
                    del self._futures[shard]
            if self.pool is not None:
                for shard in wanted:
                    if shard not in self._futures:
                        self._futures[shard] = self.pool.submit(self.source.load_shard, shard)


def document_causal_mask(segment_ids_bs: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] bool, True where attention is forbidden: later positions, or another
    document of the same packed sample."""
    s = segment_ids_bs.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids_bs.device).triu_(1)
    other_doc = segment_ids_bs.unsqueeze(2) != segment_ids_bs.unsqueeze(1)
    return (other_doc | causal).unsqueeze(1)


class BlendedLoader:
    """Per optimizer step, this rank's micro-batches of the next global batch."""

    def __init__(self, sources: list, weights: list[float], seq_length: int, global_batch_size: int,
                 micro_batch_size: int, dp_rank: int, dp_size: int, seed: int, shuffle: bool = True,
                 num_workers: int = 0, reset_attention: bool = False,
                 repeat_first_batch: bool = False, stages: list = ()):
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError("global batch must be a multiple of micro batch x data-parallel size")
        if len(sources) != len(weights) or not sources:
            raise ValueError("need one weight per source")
        if any(w < 0 for w in weights) or not sum(weights) > 0:
            raise ValueError(f"blend weights must be >= 0 with a positive sum, got {weights}")
        # Data stages: from global position `start` on, the blend is `weights` (zeros for
        # sources that stage leaves out). The first stage starts at 0.
        self.stages = [(0, self._normalized(weights))] + [
            (int(start), self._normalized(stage_weights)) for start, stage_weights in stages]
        if any(b[0] <= a[0] for a, b in zip(self.stages, self.stages[1:])):
            raise ValueError(f"stage starts must increase, got {[st for st, _ in self.stages]}")
        self.sources = sources
        self.orders = [SourceOrder(s, seed, shuffle) for s in sources]
        self.seq_length = seq_length
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.reset_attention = reset_attention
        self.repeat_first_batch = repeat_first_batch
        self.num_workers = num_workers
        self._pool = ThreadPoolExecutor(num_workers, thread_name_prefix="shards") if num_workers else None
        self._caches = [ShardCache(s, num_workers, self._pool) for s in sources]
        self.consumed = np.zeros(len(sources), dtype=np.int64)  # samples drawn per source
        self.position = 0  # global samples consumed
        # Samples drawn per source since the current stage began: the blend's deficits are
        # counted within a stage, so each stage has its exact proportions from its start.
        self.stage_consumed = np.zeros(len(sources), dtype=np.int64)

    @staticmethod
    def _normalized(weights) -> np.ndarray:
        total = float(sum(weights))
        return np.array([w / total for w in weights], dtype=np.float64)

    def _stage_at(self, position: int) -> tuple[int, np.ndarray]:
        return [stage for stage in self.stages if stage[0] <= position][-1]

    # -- the global sequence -------------------------------------------------------------

    def _assign(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Sources and per-source indices of the next `count` global positions.

        Largest-deficit schedule: position p goes to the source furthest below its share
        w_s * (p + 1). Deterministic, exact proportions at every prefix, and resumable from
        the per-source counts alone.
        """
        counts = self.consumed.copy()
        in_stage = self.stage_consumed.copy()
        which = np.empty(count, dtype=np.int64)
        index = np.empty(count, dtype=np.int64)
        for i in range(count):
            p = self.position + i
            start, weights = self._stage_at(p)
            if p == start:
                in_stage[:] = 0
            # A zero-weight source never wins: the deficits sum to 1 > 0 within a stage.
            s = int(np.argmax(weights * (p - start + 1) - in_stage))
            which[i], index[i] = s, counts[s]
            counts[s] += 1
            in_stage[s] += 1
        return which, index, in_stage

    def sample_ids(self, count: int) -> list[tuple[int, int, int]]:
        """(source, epoch, key) of the next `count` global positions, without consuming."""
        which, index, _ = self._assign(count)
        out = []
        for s, k in zip(which, index):
            epoch, shard, row = self.orders[s].locate(int(k))
            first_key = int(self.sources[s].shard_samples[:shard].sum())
            out.append((int(s), epoch, first_key + row))
        return out

    # -- one step --------------------------------------------------------------------------

    def next_step(self) -> list[MicroBatch]:
        which, index, in_stage = self._assign(self.global_batch_size)
        per_rank = self.global_batch_size // self.dp_size
        mine = slice(self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank)
        rows, starts = [], []
        for s, k in zip(which[mine], index[mine]):
            _, shard, row = self.orders[s].locate(int(k))
            data = self._caches[s].get(shard)
            rows.append(data.tokens[row])
            starts.append(data.doc_starts[row])
        self._advance(which, in_stage)
        self._prefetch()
        return self._micro_batches(np.stack(rows), starts)

    def _advance(self, which: np.ndarray, in_stage: np.ndarray) -> None:
        if not self.repeat_first_batch:
            np.add.at(self.consumed, which, 1)
            self.stage_consumed = in_stage
            self.position += self.global_batch_size

    def skip_steps(self, count: int) -> None:
        """Move past the next `count` steps' global batches without reading them (a rewind
        past a loss spike): the position afterwards is the one `count` next_step() calls
        would leave, since a step's batch depends only on the position."""
        for _ in range(count):
            which, _, in_stage = self._assign(self.global_batch_size)
            self._advance(which, in_stage)
        self._prefetch()

    def _prefetch(self) -> None:
        for order, cache, k in zip(self.orders, self._caches, self.consumed):
            cache.keep_only(order.upcoming_shards(int(k), 1 + self.num_workers))

    def _micro_batches(self, rows: np.ndarray, starts: list[np.ndarray]) -> list[MicroBatch]:
        s = self.seq_length
        rows_t = torch.from_numpy(rows[:, :s + 1].astype(np.int64))
        out = []
        for first in range(0, len(rows), self.micro_batch_size):
            chunk = rows_t[first:first + self.micro_batch_size]
            tokens, labels = chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()
            positions = torch.arange(s).unsqueeze(0).repeat(len(chunk), 1)
            segments = None
            if self.reset_attention:
                # starts_bs: 1 where a new document begins inside the sample
                starts_bs = torch.zeros(len(chunk), s, dtype=torch.int64)
                for b, doc_starts in enumerate(starts[first:first + self.micro_batch_size]):
                    inside = doc_starts[doc_starts < s].astype(np.int64)
                    starts_bs[b, torch.from_numpy(inside)] = 1
                segments = starts_bs.cumsum(dim=1).to(torch.int32)
                # positions restart at each document: p - (start of p's document)
                doc_start_bs = torch.cummax(positions * starts_bs, dim=1).values
                positions = positions - doc_start_bs
            out.append(MicroBatch(tokens, labels, torch.ones(tokens.shape, dtype=torch.float32),
                                  positions, segments))
        return out

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"position": int(self.position), "consumed": [int(c) for c in self.consumed],
                "stage_consumed": [int(c) for c in self.stage_consumed],
                "sources": [s.digest for s in self.sources], "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if list(state["sources"]) != [s.digest for s in self.sources]:
            raise ValueError("loader state belongs to different data sources (the blend or the "
                             "shards changed); start a new run or restore the original data.train")
        if int(state["seed"]) != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this run uses "
                             f"{self.seed}; set train.seed={state['seed']}")
        self.position = int(state["position"])
        self.consumed = np.array(state["consumed"], dtype=np.int64)
        # Saved before data stages existed: one stage, so its counts are the totals.
        self.stage_consumed = np.array(state.get("stage_consumed", state["consumed"]),
                                       dtype=np.int64)
        self._prefetch()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
