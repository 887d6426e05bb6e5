"""Global batches of packed samples, sliced for this data-parallel rank.

The sample order is a pure function of (source, seed, epoch): a seeded permutation of
sample indices per epoch. Global batch k is samples [k*B, (k+1)*B) of that order whatever
the layout, and data-parallel rank r takes the r-th contiguous slice of it, so changing the
number of ranks changes who computes a sample, never which samples form a step. TP and PP
peers share a data-parallel rank and therefore receive identical batches. The state is one
integer (samples consumed), saved with checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


class PackedTokens:
    """A token stream cut into samples of seq_length+1 tokens (inputs plus shifted labels)."""

    def __init__(self, tokens: np.ndarray, seq_length: int):
        self.tokens = tokens
        self.seq_length = seq_length
        self.num_samples = (len(tokens) - 1) // seq_length
        if self.num_samples < 1:
            raise ValueError(f"corpus of {len(tokens)} tokens is shorter than one sample of "
                             f"{seq_length + 1} tokens; lower train.seq_length")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> np.ndarray:
        start = index * self.seq_length
        return self.tokens[start:start + self.seq_length + 1]


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [b, s] int64 inputs
    labels: torch.Tensor  # [b, s] int64 targets (inputs shifted by one)
    loss_mask: torch.Tensor  # [b, s] float32, 1 where the label counts
    position_ids: torch.Tensor  # [b, s] int64


class GlobalBatchLoader:
    """Yields, per optimizer step, this rank's micro-batches of the next global batch."""

    def __init__(self, source: PackedTokens, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int, repeat_first_batch: bool = False):
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError("global batch must be a multiple of micro batch x data-parallel size")
        self.source = source
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.repeat_first_batch = repeat_first_batch
        self.consumed_samples = 0
        self._epoch_order: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._epoch_order = (epoch, rng.permutation(len(self.source)))
        return self._epoch_order[1]

    def sample_index(self, global_position: int) -> int:
        """Index into the source of the sample at this position of the global stream."""
        epoch, offset = divmod(global_position, len(self.source))
        return int(self._order(epoch)[offset])

    def next_step(self) -> list[MicroBatch]:
        per_rank = self.global_batch_size // self.dp_size
        start = self.consumed_samples + self.dp_rank * per_rank
        rows = np.stack([self.source[self.sample_index(start + i)] for i in range(per_rank)])
        if not self.repeat_first_batch:
            self.consumed_samples += self.global_batch_size
        rows_t = torch.from_numpy(rows.astype(np.int64))
        micro = []
        for first in range(0, per_rank, self.micro_batch_size):
            chunk = rows_t[first:first + self.micro_batch_size]
            tokens, labels = chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()
            positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens).contiguous()
            micro.append(MicroBatch(tokens, labels, torch.ones(tokens.shape, dtype=torch.float32),
                                    positions))
        return micro

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])
        self.seed = int(state["seed"])
        self._epoch_order = None  # the cached permutation belonged to the old seed
