"""GlobalBatchLoader / PackedTokens: layout-independent global batches and exact resumption;
the embedded corpus."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.data.embedded import EOD_ID, embedded_tokens, stdlib_files
from pretrain.data.loader import GlobalBatchLoader, PackedTokens

SEQ = 8
GLOBAL = 8
MICRO = 2
N_TOKENS = 1001  # (1001 - 1) // 8 = 125 samples


@pytest.fixture
def source():
    return PackedTokens(np.arange(N_TOKENS, dtype=np.uint16), SEQ)


def _loader(source, dp_rank=0, dp_size=1, seed=1234, micro=MICRO):
    return GlobalBatchLoader(source, GLOBAL, micro, dp_rank, dp_size, seed)


def _step_rows(loader) -> torch.Tensor:
    """All inputs of this rank's next step, [samples, seq]."""
    return torch.cat([mb.tokens for mb in loader.next_step()])


def _sample_ids(rows: torch.Tensor) -> list[int]:
    # arange tokens: a sample's first token identifies it
    return [int(first) // SEQ for first in rows[:, 0]]


def test_packed_tokens(source):
    assert len(source) == 125
    assert np.array_equal(source[0], np.arange(0, SEQ + 1))
    assert np.array_equal(source[3], np.arange(3 * SEQ, 4 * SEQ + 1))
    assert np.array_equal(source[124], np.arange(124 * SEQ, 125 * SEQ + 1))
    with pytest.raises(ValueError):
        PackedTokens(np.arange(SEQ, dtype=np.uint16), SEQ)


def test_micro_batches_shapes_labels_masks(source):
    micro = _loader(source).next_step()
    assert len(micro) == GLOBAL // MICRO
    for mb in micro:
        assert mb.tokens.shape == mb.labels.shape == mb.loss_mask.shape == mb.position_ids.shape \
            == (MICRO, SEQ)
        assert mb.tokens.dtype == mb.labels.dtype == torch.int64
        assert torch.equal(mb.labels[:, :-1], mb.tokens[:, 1:])  # labels are inputs shifted
        assert torch.equal(mb.labels, mb.tokens + 1)  # arange corpus: the next token
        assert torch.equal(mb.loss_mask, torch.ones(MICRO, SEQ))
        assert torch.equal(mb.position_ids, torch.arange(SEQ).expand(MICRO, SEQ))


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_dp_ranks_partition_the_global_batch(source, dp):
    reference = _loader(source)
    ranks = [_loader(source, r, dp) for r in range(dp)]
    for _ in range(20):  # crosses the epoch boundary at sample 125
        expected = _step_rows(reference)
        got = torch.cat([_step_rows(rank) for rank in ranks])
        assert torch.equal(got, expected)


@pytest.mark.parametrize("micro", [1, 2, 4])
def test_micro_batch_size_does_not_change_the_batch(source, micro):
    assert torch.equal(_step_rows(_loader(source, micro=micro)), _step_rows(_loader(source)))


def test_no_repeats_within_an_epoch(source):
    loader = _loader(source)
    steps = len(source) // GLOBAL  # 15 full steps fit into the first epoch
    seen = [i for _ in range(steps) for i in _sample_ids(_step_rows(loader))]
    assert len(seen) == len(set(seen)) == steps * GLOBAL
    assert seen != sorted(seen)  # shuffled, not sequential


def test_epoch_is_a_permutation(source):
    loader = _loader(source)
    order = [loader.sample_index(i) for i in range(len(source))]
    assert sorted(order) == list(range(len(source)))
    second = [loader.sample_index(len(source) + i) for i in range(len(source))]
    assert sorted(second) == list(range(len(source)))
    assert second != order  # a fresh permutation per epoch


def test_resume_gives_identical_next_batches(source):
    original = _loader(source)
    for _ in range(3):
        original.next_step()
    state = original.state_dict()
    assert state["consumed_samples"] == 3 * GLOBAL
    expected = [_step_rows(original) for _ in range(16)]  # runs into the second epoch

    resumed = _loader(source, seed=999)  # the seed comes from the state
    resumed.load_state_dict(state)
    assert resumed.seed == 1234
    got = [_step_rows(resumed) for _ in range(16)]
    assert len(got) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_resume_on_a_data_parallel_rank(source):
    whole = _loader(source)
    rank1 = _loader(source, 1, 2)
    for _ in range(2):
        whole.next_step()
        rank1.next_step()
    resumed = _loader(source, 1, 2)
    resumed.load_state_dict(rank1.state_dict())
    assert torch.equal(_step_rows(resumed), _step_rows(whole)[GLOBAL // 2:])


def test_resume_into_a_loader_that_already_drew(source):
    original = _loader(source)
    original.next_step()
    state = original.state_dict()
    expected = _step_rows(original)

    other = _loader(source, seed=999)
    other.next_step()  # caches epoch 0's order for seed 999
    other.load_state_dict(state)
    assert torch.equal(_step_rows(other), expected)


def test_seed_controls_the_order(source):
    a, b, c = _loader(source, seed=1), _loader(source, seed=1), _loader(source, seed=2)
    rows_a = [_step_rows(a) for _ in range(3)]
    rows_b = [_step_rows(b) for _ in range(3)]
    rows_c = [_step_rows(c) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(rows_a, rows_b))
    assert not all(torch.equal(x, y) for x, y in zip(rows_a, rows_c))


def test_bad_global_batch_is_rejected(source):
    with pytest.raises(ValueError):
        GlobalBatchLoader(source, 6, 2, 0, 4, 0)


# ---------------------------------------------------------------- embedded corpus

MAX_BYTES = 300_000


def test_embedded_tokens_deterministic():
    embedded_tokens.cache_clear()
    tokens_1, sha_1 = embedded_tokens(MAX_BYTES)
    embedded_tokens.cache_clear()
    tokens_2, sha_2 = embedded_tokens(MAX_BYTES)
    assert tokens_1 is not tokens_2
    assert sha_1 == sha_2 and len(sha_1) == 64
    assert np.array_equal(tokens_1, tokens_2)


def test_embedded_tokens_content():
    tokens, _ = embedded_tokens(MAX_BYTES)
    files = stdlib_files(MAX_BYTES)
    assert tokens.dtype == np.uint16
    assert int(tokens.max()) == EOD_ID == 256
    # one EOD after each document, and the documents are the files' bytes
    assert int((tokens == EOD_ID).sum()) == len(files)
    first = files[0].read_bytes()
    assert np.array_equal(tokens[:len(first)], np.frombuffer(first, dtype=np.uint8))
    assert tokens[len(first)] == EOD_ID
    assert len(tokens) == sum(f.stat().st_size for f in files) + len(files)
    assert sum(f.stat().st_size for f in files) >= MAX_BYTES


def test_embedded_tokens_size_changes_the_sha():
    _, small = embedded_tokens(MAX_BYTES)
    _, large = embedded_tokens(2 * MAX_BYTES)
    assert small != large
