"""Every layout trains the same model: per-step loss and grad norm of N-rank runs equal a
one-process fp32 reference, for 6 optimizer steps.

Why this can be tight: parameters are initialized from their global names (same model in
every layout), the global batch is the same samples in every layout, and the math is fp32.
Only the order of floating-point reductions differs (TP all-reduces, DP averaging, pipeline
accumulation), which moves results by ~1e-7 relative per step; RTOL = 1e-5 leaves room for
that to grow over 6 steps and is still 1000x tighter than any scaling, routing or
synchronization bug (those show up at >= 1e-2 on step 1 or 2).

Clipping is active throughout: optim.grad_clip=1.0 is below the grad norms of these steps
(2-3), so the global norm across TP, PP and DP must be right for the updates to agree.
"""

from __future__ import annotations

import pytest

from tests.launch_helpers import read_metrics, run_training

pytestmark = pytest.mark.multiprocess

RTOL = 1e-5
STEPS = 6
COMMON = [f"train.steps={STEPS}", "optim.warmup_steps=1", "optim.lr=1e-2", "optim.min_lr=5e-3",
          "train.micro_batch_size=2", "train.global_batch_size=8", "optim.grad_clip=1.0"]

WSD = ["optim.schedule=wsd", "optim.decay_steps=3", "optim.decay_shape=1-sqrt"]
QWEN = ["model.qk_norm=true", "model.qkv_bias=true", "model.head_dim=24"]

LAYOUTS = {
    # name: (ranks, overrides)
    "tp2": (2, ["parallel.tensor_parallel=2"]),
    "tp4_padded_vocab": (4, ["parallel.tensor_parallel=4"]),
    "pp2_1f1b_tied": (2, ["parallel.pipeline_parallel=2"]),
    "pp2_untied": (2, ["parallel.pipeline_parallel=2", "model.tie_embeddings=false"]),
    "pp2_interleaved": (2, ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline_chunks=2"]),
    "dp2_zero0": (2, ["parallel.zero_stage=0"]),
    "dp2_zero1": (2, ["parallel.zero_stage=1"]),
    "dp2_zero2": (2, ["parallel.zero_stage=2"]),
    "dp2_zero3": (2, ["parallel.zero_stage=3", "checkpoint.save_on_stop=false"]),
    "tp2_dp2_zero1": (4, ["parallel.tensor_parallel=2", "parallel.zero_stage=1"]),
    "pp2_dp2_zero1": (4, ["parallel.pipeline_parallel=2", "parallel.zero_stage=1"]),
    "tp2_pp2": (4, ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"]),
    "tp2_sequence_parallel": (2, ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"]),
    "tp2_recompute": (2, ["parallel.tensor_parallel=2", "parallel.recompute=full"]),
    "tp2_dp2_wsd": (4, ["parallel.tensor_parallel=2", "parallel.zero_stage=1", *WSD]),
    "tp2_z_loss": (2, ["parallel.tensor_parallel=2", "optim.z_loss=0.01"]),
    "tp2_sp_sinusoidal": (2, ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true",
                              "model.position_embedding=sinusoidal"]),
    # Qwen's decoder options: the q/k norm's weight is replicated over TP while each rank
    # normalizes its own heads (its gradient must be summed over TP), q/k/v biases are split
    # with their heads, and head_dim is not hidden/heads.
    "tp2_sp_qk_norm_qkv_bias": (2, ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true",
                                    *QWEN]),
}

# Variants of the model (untied embeddings, positions), the schedule or the loss get their
# own one-process reference.
REFERENCE_VARIANT = {"pp2_untied": ["model.tie_embeddings=false"], "tp2_dp2_wsd": WSD,
                     "tp2_z_loss": ["optim.z_loss=0.01"],
                     "tp2_sp_sinusoidal": ["model.position_embedding=sinusoidal"],
                     "tp2_sp_qk_norm_qkv_bias": QWEN}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    cache = {}

    def get(extra: tuple[str, ...]):
        if extra not in cache:
            run_dir = tmp_path_factory.mktemp("reference")
            run_training(run_dir, COMMON + list(extra))
            cache[extra] = read_metrics(run_dir)
        return cache[extra]

    return get


def _assert_same_trajectory(name, mine, reference):
    assert [m["step"] for m in mine] == [m["step"] for m in reference] == list(range(1, STEPS + 1))
    for a, b in zip(mine, reference):
        assert a["loss"] == pytest.approx(b["loss"], rel=RTOL), (name, a["step"], "loss")
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=RTOL), (name, a["step"], "norm")
    # clipping was active, so the global norm mattered for every update
    assert all(m["grad_norm"] > 1.0 for m in reference[:3])


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_matches_one_process(name, references, tmp_path):
    ranks, overrides = LAYOUTS[name]
    run_training(tmp_path, COMMON + overrides, nproc=ranks)
    reference = references(tuple(REFERENCE_VARIANT.get(name, [])))
    _assert_same_trajectory(name, read_metrics(tmp_path), reference)


def test_gradient_accumulation_equals_one_big_batch(references, tmp_path):
    """4 micro-batches of 2 (the reference) vs one micro-batch of 8, one process."""
    run_training(tmp_path, COMMON + ["train.micro_batch_size=8"])
    _assert_same_trajectory("one_big_batch", read_metrics(tmp_path), references(()))


@pytest.fixture(scope="module")
def staged_data(tmp_path_factory):
    """Two real shard datasets; the blend switches from the first to the second at step 3."""
    from tests.data.shard_writer import write_dataset

    root = tmp_path_factory.mktemp("stages")
    web = write_dataset(root / "web", 32, [40], salt=1)
    anneal = write_dataset(root / "anneal", 32, [40], salt=2)
    # the writer's manifests declare a 60000-token vocabulary
    return [f"data.train={web}", f"data.stages=[{{at_step: 3, train: {anneal}}}]",
            "model.vocab_size=60000"]


def test_data_stages_match_one_process(staged_data, tmp_path):
    """A stage switch under DP=2 (each rank reads its own part of the global batch) gives
    the one-process run's trajectory: both switch at the same global sample."""
    reference = tmp_path / "reference"
    run_training(reference, COMMON + staged_data)
    run_training(tmp_path / "dp2", COMMON + staged_data + ["parallel.zero_stage=1"], nproc=2)
    _assert_same_trajectory("dp2_stages", read_metrics(tmp_path / "dp2"), read_metrics(reference))
