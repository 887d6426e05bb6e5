"""The streaming loader over real tar shards: a layout-independent global order, exact
resume (also under another data-parallel size and worker count), weighted blending, bounded
memory, per-document masks, and clear errors for bad shards. Sample order is compared as
ordered sample ids, never sorted."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pretrain.data.loader import BlendedLoader, document_causal_mask
from pretrain.data.sources import DataError, ShardSource
from tests.data.shard_writer import write_dataset

SEQ = 16
GLOBAL = 8
SIZES = [13, 7, 20, 9, 11]  # uneven shards: 60 samples


@pytest.fixture
def dataset(tmp_path):
    return write_dataset(tmp_path / "ds", SEQ, SIZES)


def _loader(paths, weights=None, dp_rank=0, dp_size=1, seed=7, workers=0, micro=2, **kw):
    sources = [ShardSource(str(p)) for p in paths]
    return BlendedLoader(sources, weights or [1.0] * len(sources), SEQ, GLOBAL, micro, dp_rank,
                         dp_size, seed, num_workers=workers, **kw)


def _ids(micro_batches, salt_of=None) -> list[int]:
    """Sample keys (the first input token encodes the key) of one rank's step, in order."""
    firsts = torch.cat([mb.tokens[:, 0] for mb in micro_batches]).tolist()
    return [first // 7 for first in firsts]


def _global_ids(paths, steps, dp_size, workers=0, state=None, **kw):
    """The ordered ids of `steps` global batches, reassembled from every DP rank."""
    loaders = [_loader(paths, dp_rank=r, dp_size=dp_size, workers=workers, **kw)
               for r in range(dp_size)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    out = []
    for _ in range(steps):
        for loader in loaders:
            out.extend(_ids(loader.next_step()))
    return out, loaders[0].state_dict()


def test_reads_samples_and_keys(dataset):
    source = ShardSource(str(dataset))
    assert source.num_samples == sum(SIZES) and source.seq_len == SEQ
    shard = source.load_shard(2)
    assert shard.keys.tolist() == list(range(20, 40))
    assert shard.tokens.shape == (20, SEQ + 1)
    assert int(shard.tokens[0, 0]) == 20 * 7


def test_each_epoch_is_a_permutation_and_epochs_differ(dataset):
    ids, _ = _global_ids([dataset], steps=15, dp_size=1)  # 120 samples = 2 epochs
    first, second = ids[:60], ids[60:]
    assert sorted(first) == list(range(60)) and sorted(second) == list(range(60))
    assert first != second  # reshuffled per epoch
    assert first != sorted(first)  # shuffled at all


def test_order_is_a_function_of_the_seed(dataset):
    a, _ = _global_ids([dataset], steps=4, dp_size=1, seed=7)
    b, _ = _global_ids([dataset], steps=4, dp_size=1, seed=7)
    c, _ = _global_ids([dataset], steps=4, dp_size=1, seed=8)
    assert a == b and a != c


@pytest.mark.parametrize("dp_size", [2, 4])
def test_data_parallel_ranks_split_the_same_global_batches(dataset, dp_size):
    single, _ = _global_ids([dataset], steps=10, dp_size=1)
    split, _ = _global_ids([dataset], steps=10, dp_size=dp_size)
    assert split == single


@pytest.mark.parametrize("dp_before,dp_after,workers_before,workers_after",
                         [(1, 1, 0, 0), (2, 4, 0, 2), (4, 1, 3, 0), (2, 2, 1, 4)])
def test_resume_continues_the_exact_sequence(dataset, dp_before, dp_after, workers_before,
                                             workers_after):
    # 11 steps x 8 = 88 samples: crosses the epoch boundary at 60, resume point at 5 steps.
    uninterrupted, _ = _global_ids([dataset], steps=11, dp_size=1)
    head, state = _global_ids([dataset], steps=5, dp_size=dp_before, workers=workers_before)
    state = json.loads(json.dumps(state))  # what a checkpoint stores: plain JSON
    tail, _ = _global_ids([dataset], steps=6, dp_size=dp_after, workers=workers_after,
                          state=state)
    assert head + tail == uninterrupted


def test_blend_follows_weights_exactly_and_resumes(tmp_path):
    a = write_dataset(tmp_path / "a", SEQ, [30, 30], salt=0)
    b = write_dataset(tmp_path / "b", SEQ, [25], salt=1)
    loader = _loader([a, b], weights=[3.0, 1.0])
    which, *_ = loader._assign(200)
    counts = np.cumsum(np.stack([which == 0, which == 1], axis=1), axis=0)
    expected = np.arange(1, 201)[:, None] * np.array([0.75, 0.25])
    assert np.abs(counts - expected).max() < 1.0  # exact share at every prefix
    first = _loader([a, b], weights=[3.0, 1.0])
    reference = [first.next_step() for _ in range(6)]
    resumed = _loader([a, b], weights=[3.0, 1.0])
    for _ in range(3):
        resumed.next_step()
    state = resumed.state_dict()
    assert state["consumed"] == [18, 6]  # 24 samples drawn, per source
    again = _loader([a, b], weights=[3.0, 1.0])
    again.load_state_dict(state)
    for expected_step in reference[3:]:
        got = again.next_step()
        for x, y in zip(expected_step, got):
            assert torch.equal(x.tokens, y.tokens)


def test_state_from_other_sources_or_seed_is_refused(dataset, tmp_path):
    other = write_dataset(tmp_path / "other", SEQ, [10], salt=2)
    state = _loader([dataset]).state_dict()
    with pytest.raises(ValueError, match="different data sources"):
        _loader([other]).load_state_dict(state)
    with pytest.raises(ValueError, match="train.seed=7"):
        _loader([dataset], seed=8).load_state_dict(state)


def test_memory_is_bounded_to_the_shards_in_flight(dataset):
    loader = _loader([dataset], workers=2)
    for _ in range(12):
        loader.next_step()
        assert len(loader._caches[0]._futures) <= 3  # current + 2 prefetched
    loader.close()


def test_corrupt_shard_is_named(dataset):
    path = dataset / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[600] ^= 0xFF
    path.write_bytes(bytes(data))
    source = ShardSource(str(dataset))
    with pytest.raises(DataError, match=r"train-000001\.tar: sha256 .* does not match"):
        source.load_shard(1)


def test_truncated_shard_is_named_even_without_checksums(dataset):
    # Truncated while training (after the start-up size check passed).
    checked, unchecked = ShardSource(str(dataset)), ShardSource(str(dataset), verify=False)
    path = dataset / "train-000002.tar"
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(DataError, match=r"train-000002\.tar: .*bytes, manifest says"):
        checked.load_shard(2)
    with pytest.raises(DataError, match=r"train-000002\.tar: .*(unreadable|samples)"):
        unchecked.load_shard(2)


def test_unknown_format_version_names_the_tool(dataset):
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["format_version"] = 99
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"format_version 99 .*data_tools/shard\.py"):
        ShardSource(str(dataset))


def test_missing_dataset_is_named(tmp_path):
    with pytest.raises(DataError, match=r"nowhere/manifest\.json: no such file"):
        ShardSource(str(tmp_path / "nowhere"))


def test_pipe_urls_read_through_webdataset(dataset):
    source = ShardSource(f"pipe:cat {dataset}/{{name}}")
    assert source.load_shard(0).keys.tolist() == list(range(13))


def test_reset_attention_masks_across_documents(tmp_path):
    # every sample: a document boundary at position 5
    ds = write_dataset(tmp_path / "docs", SEQ, [8], doc_starts={k: [5] for k in range(8)})
    loader = _loader([ds], reset_attention=True)
    micro = loader.next_step()[0]
    mask = document_causal_mask(micro.segment_ids)[0, 0]  # True = may not attend
    assert mask[4, :5].logical_not().all() and mask[4, 5:].all()  # doc 1: causal
    assert mask[6, :5].all()  # doc 2 does not see doc 1
    assert not mask[6, 5] and not mask[6, 6] and mask[6, 7]  # ...but is causal within itself
    assert micro.position_ids[0].tolist() == list(range(5)) + list(range(SEQ - 5))


def test_samples_within_a_shard_are_reshuffled_every_epoch(tmp_path):
    one_shard = write_dataset(tmp_path / "one", SEQ, [16])
    ids, _ = _global_ids([one_shard], steps=4, dp_size=1)  # 32 samples = 2 epochs
    assert sorted(ids[:16]) == sorted(ids[16:]) == list(range(16))
    assert ids[:16] != ids[16:]


def test_reset_attention_with_several_documents_in_a_sample(tmp_path):
    ds = write_dataset(tmp_path / "docs3", SEQ, [4], doc_starts={k: [5, 11, SEQ] for k in range(4)})
    micro = _loader([ds], reset_attention=True, seed=1).next_step()[0]
    assert micro.segment_ids[0].tolist() == [0] * 5 + [1] * 6 + [2] * 5
    assert micro.position_ids[0].tolist() == list(range(5)) + list(range(6)) + list(range(5))
    mask = document_causal_mask(micro.segment_ids)[0, 0]
    assert mask[12, :11].all() and not mask[12, 11:13].any() and mask[12, 13:].all()


def test_skip_steps_lands_where_reading_them_would(tmp_path):
    """A rewind past a loss spike moves the loader without reading (skip_steps): the state
    and the next batches are those after reading the skipped steps, across a data stage."""
    a = write_dataset(tmp_path / "a", SEQ, [30, 30], salt=0)
    b = write_dataset(tmp_path / "b", SEQ, [25], salt=1)
    stages = [(2 * GLOBAL + 3, [1.0, 1.0])]  # the blend changes inside the skipped steps
    read = _loader([a, b], weights=[3.0, 1.0], stages=stages)
    for _ in range(4):
        read.next_step()
    skipped = _loader([a, b], weights=[3.0, 1.0], stages=stages)
    skipped.next_step()
    skipped.skip_steps(3)
    assert skipped.state_dict() == read.state_dict()
    for _ in range(2):
        assert _ids(skipped.next_step()) == _ids(read.next_step())
