"""The typed configuration tree: one dataclass per section of a run config, with the defaults
a YAML file or an override may change. Every config check raises ConfigError (errors.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class RunConfig:
    dir: str = "runs/default"


@dataclass
class ModelConfig:
    name: str = "custom"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 0  # 0: one group per head (multi-head attention)
    ffn_hidden_size: int = 0  # 0: 4h for gelu, 8h/3 rounded up to a multiple of 64 for swiglu
    max_seq_length: int = 128  # positions the embedding (or RoPE cache) covers
    position_embedding: Literal["rope", "learned", "sinusoidal"] = "rope"
    rotary_base: int = 10000
    normalization: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    activation: Literal["swiglu", "gelu"] = "swiglu"
    tie_embeddings: bool = True
    head_dim: int = 0  # per-head q/k/v width (megatron's kv_channels); 0: hidden_size / heads
    init_std: float = 0.02
    norm_eps: float = 1e-5
    bias: bool = False  # biases on every linear (attention and MLP)
    qkv_bias: bool = False  # biases on the q/k/v projection only (Qwen2); implied by bias
    qk_norm: bool = False  # per-head norm (model.normalization) of q and k before RoPE (Qwen3)
    # {} : plain RoPE. Llama 3.x's frequency scaling: {type: llama3, factor: 8,
    # low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192}
    rope_scaling: dict = field(default_factory=dict)
    dropout: float = 0.0
    vocab_size: int = 0  # 0: the tokenizer's; larger reserves rows (must be >= the tokenizer's)
    make_vocab_size_divisible_by: int = 128
    backend: Literal["auto", "te", "local"] = "auto"
    # Compiled RoPE/norm/SwiGLU/residual/cross-entropy regions (model/fused.py); auto: with
    # CUDA. Same model and checkpoints either way.
    compile: Literal["auto", "on", "off"] = "auto"

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.activation == "swiglu":
            return 64 * math.ceil(8 * self.hidden_size / 3 / 64)
        return 4 * self.hidden_size


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline_chunks: int = 1  # >1: interleaved 1F1B with this many chunks per stage
    sequence_parallel: bool = False
    zero_stage: int = 1
    # Activation recomputation in the backward pass: "full" keeps only each layer's input (a
    # third more compute); "selective" recomputes only `recompute_modules` (megatron-core's
    # names: core_attn, mlp, layernorm), what long-sequence runs use.
    recompute: Literal["none", "selective", "full"] = "none"
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn"])
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    timeout_minutes: int = 30  # a collective waiting longer than this fails the run
    # DeepSpeed config keys deep-merged over ours (parallel/zero.py): a mapping, or a path to
    # a JSON file; e.g. {zero_optimization: {offload_optimizer: {device: cpu}}}. Keys the
    # batch/precision/optimizer contract owns are refused (parallel/deepspeed_user.py).
    deepspeed: dict = field(default_factory=dict)


@dataclass
class TrainConfig:
    steps: int = 100  # length of the LR schedule
    exit_at_step: int = 0  # >0: stop cleanly after this step; the schedule is unchanged
    seed: int = 1234
    micro_batch_size: int = 1
    global_batch_size: int = 8
    seq_length: int = 128
    log_interval: int = 1
    sample_tokens: int = 0  # >0: print a sampled continuation of this many tokens at the end
    eval_interval: int = 0  # >0: validation loss every this many steps (and at the end)
    eval_batches: int = 4  # global batches per validation (the same ones every time)
    # A step whose loss or gradient norm is not finite is skipped (no update); this many in
    # a row stop the run with exit 2, which the SLURM script does not requeue.
    max_bad_steps: int = 3
    loss_spike_zscore: float = 0.0  # >0: flag a loss this many std devs above the recent mean
    loss_spike_window: int = 100  # steps the spike detector averages over
    # What a spike does: warn (the step is kept), skip (its update is dropped, as DeepSpeed
    # drops an overflowing one), or rewind (reload the last checkpoint and move the data past
    # the batches up to the spike); more than max_rewinds rewinds stop the run with exit 2.
    loss_spike_action: Literal["warn", "skip", "rewind"] = "warn"
    max_rewinds: int = 3
    # Straggler report: a rank whose compute time per logged step (CPU busy time of forward,
    # backward and optimizer, so time blocked in collectives is left out) is over
    # straggler_factor x the median rank's for straggler_steps logged steps in a row is named
    # in the log and the metrics. 0 turns it off.
    straggler_factor: float = 1.5
    straggler_steps: int = 5
    # Hang watchdog: a step longer than max(watchdog_min_s, watchdog_factor x the median
    # step) dumps every rank's Python stacks and exits 76 (requeued). 0 turns it off.
    watchdog_factor: float = 10.0
    watchdog_min_s: float = 600.0


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5  # where the decay ends
    warmup_steps: int = 10
    # After the linear warmup: cosine or linear decay to min_lr at train.steps, constant lr,
    # or wsd (warmup-stable-decay: MiniCPM 2024, Hägele et al. 2024): lr until the last
    # decay_steps (or decay_fraction x train.steps) steps, then decay_shape down to min_lr.
    schedule: Literal["cosine", "wsd", "linear", "constant"] = "cosine"
    decay_steps: int = 0  # wsd only; 0: decay_fraction x train.steps
    decay_fraction: float = 0.2  # wsd only
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = "1-sqrt"  # wsd only

    def wsd_decay_length(self, total_steps: int) -> int:
        """Steps of the WSD decay at the end of the run: decay_steps, else the fraction."""
        return self.decay_steps or max(1, round(self.decay_fraction * total_steps))
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    # PaLM's auxiliary z-loss weight (1e-4 there): z * log(Z)^2 per token, Z the softmax
    # normalizer; only the gradients see it, the logged loss is the cross entropy. 0: off.
    z_loss: float = 0.0


@dataclass
class DataConfig:
    # Training data: a shard directory written by data_tools/shard.py (or a URL prefix or a
    # `{name}` template for `pipe:` commands), a list of them, or a weighted blend
    # `[{path: A, weight: 0.7}, {path: B, weight: 0.3}]`. "embedded" is the built-in corpus.
    train: list = field(default_factory=lambda: [{"path": "embedded", "weight": 1.0}])
    # Validation data in the same forms; empty: the `val` split of the training sources.
    valid: list = field(default_factory=list)
    # Data stages: [{at_step: S, train: BLEND}, ...]; after step S the training blend is
    # BLEND (e.g. an anneal on a better mix), keeping optimizer, schedule and data position.
    stages: list[dict] = field(default_factory=list)
    tokenizer: str = ""  # sentencepiece model for decoding samples; "": the manifest's
    num_workers: int = 2  # threads reading and verifying shards ahead of use
    verify_checksums: bool = True  # check each shard's size and sha256 against the manifest
    # Per-document attention (block-diagonal causal mask) and positions restarting at each
    # document, from the boundaries stored with every sample.
    reset_attention: bool = False
    # How the per-document mask reaches attention: "flex" builds a block mask from the segment
    # ids for torch's flex attention (no s x s tensor; CUDA only: its backward is compiled),
    # "dense" a [b, 1, s, s] boolean mask for SDPA (leaves the flash kernel; the CPU
    # reference). auto: flex on CUDA, dense otherwise.
    document_mask: Literal["auto", "flex", "dense"] = "auto"
    # Debugging aid (nanoGPT/llm.c "overfit one batch"): every step trains on the first global
    # batch again; a correct setup drives its loss towards zero.
    repeat_first_batch: bool = False


@dataclass
class CheckpointConfig:
    # Save every this many steps (0: only when the run stops: at train.exit_at_step, at the
    # last step, or on SIGTERM/SIGUSR1). Saves go to RUN/checkpoints/step_{N:08d}/.
    interval: int = 0
    keep_last: int = 2  # retention: the newest k complete checkpoints ...
    keep_every: int = 0  # ... plus every one whose step is a multiple of this (0: none)
    # Start from another run's checkpoint (a step_N directory, a checkpoints/ directory or a
    # run directory: its newest complete one) when RUN/checkpoints holds none yet.
    load_from: str = ""
    weights_only: bool = False  # with load_from: weights only, fresh optimizer, step 0
    save_on_stop: bool = True  # save when the run stops (exit_at_step, last step, signal)
    # Write the files in a background process while training continues (GPU); "auto": on
    # when CUDA is available. On CPU a synchronous save is simple and fast enough.
    async_save: Literal["auto", "on", "off"] = "auto"
    verify: bool = True  # check every file's sha256 on load (spread over ranks)
    # A save (or the wait for a background one) that runs longer is abandoned: one line, every
    # thread's stack, exit 76 (requeued like a hang). Generous: a stuck writer, not a slow disk.
    save_timeout_s: float = 3600.0


@dataclass
class WandbConfig:
    # Weights & Biases: off unless a project is named. `offline` needs no account or network
    # (sync later with `wandb sync RUN/wandb/offline-run-*`); `online` needs `wandb login` or
    # WANDB_API_KEY. The run id is kept in RUN/wandb_run_id, so a resumed or requeued job
    # continues the same W&B run.
    project: str = ""
    entity: str = ""
    name: str = ""  # "": the run directory's name
    mode: Literal["online", "offline", "disabled"] = "online"


@dataclass
class ProfileConfig:
    # torch.profiler over steps start_step .. start_step + steps - 1 (start_step 0: off), as
    # Megatron-LM's --profile-step-start/-end: a Chrome trace per listed rank in RUN/profile/
    # (open it in chrome://tracing or Perfetto), the top ops by self time in the log, and with
    # `memory` a CUDA memory snapshot beside it (pytorch.org/memory_viz).
    start_step: int = 0
    steps: int = 3
    memory: bool = False
    ranks: list[int] = field(default_factory=lambda: [0])  # global ranks (--profile-ranks)


@dataclass
class LoggingConfig:
    tensorboard: bool = False  # event files under RUN/tensorboard/ (rank 0)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # Peak dense bf16 TFLOP/s of one accelerator for MFU; 0: from the GPU's name (H100, H200,
    # A100, ...). On CPU, MFU is reported only when this is set.
    peak_tflops: float = 0.0
    profile: ProfileConfig = field(default_factory=ProfileConfig)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

