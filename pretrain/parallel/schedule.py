"""Drive megatron-core's pipeline schedules (no pipelining, 1F1B, interleaved 1F1B) over
model chunks that live inside one DeepSpeed engine.

megatron's schedule sees a `ChunkProxy` per chunk: calling it runs the chunk through the
engine's forward (so DeepSpeed's torch-style backward hooks see megatron's autograd calls),
while `set_input_tensor`, `config` and the rest go straight to the chunk.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from pretrain.data.loader import document_causal_mask
from pretrain.parallel.cpu import cpu_device_mode


class ModelChunks(torch.nn.Module):
    """All chunks of this rank as one module, so a single engine (and optimizer) owns them."""

    def __init__(self, chunks):
        super().__init__()
        self.chunks = torch.nn.ModuleList(chunks)

    def forward(self, chunk_index: int, **kwargs):
        return self.chunks[chunk_index](**kwargs)


class ChunkProxy(torch.nn.Module):
    """A module (the interleaved schedule checks) that owns nothing: the engine and chunk are
    stored outside nn.Module's registry so their parameters are not listed twice."""

    def __init__(self, call, chunk_index: int, chunk: torch.nn.Module):
        super().__init__()
        object.__setattr__(self, "_call", call)
        object.__setattr__(self, "_index", chunk_index)
        object.__setattr__(self, "_chunk", chunk)

    def forward(self, **kwargs):
        return self._call(self._index, **kwargs)

    def set_input_tensor(self, tensor):
        self._chunk.set_input_tensor(tensor)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._chunk, name)


def proxies(engine, chunks, through_engine: bool) -> list[ChunkProxy]:
    call = engine if through_engine else engine.module
    return [ChunkProxy(call, i, chunk) for i, chunk in enumerate(chunks)]


def _loss_func(loss_mask: torch.Tensor, z_loss_bs: torch.Tensor | None,
               per_token_loss_bs: torch.Tensor):
    """Sum of token losses and token count; megatron divides by both count and micro-batches.
    The z-loss term joins the loss that is backpropagated, not the one reported."""
    loss_sum = (per_token_loss_bs.float() * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    report = {"loss_sum": loss_sum.detach().clone(), "num_tokens": num_tokens.detach().clone()}
    if z_loss_bs is not None:
        loss_sum = loss_sum + (z_loss_bs * loss_mask).sum()
    # megatron divides the returned loss in place; report copies, not aliases.
    return loss_sum, num_tokens, report


def log_partition_sb(logits_sbv: torch.Tensor) -> torch.Tensor:
    """log sum_v exp(logit_v) over the whole vocabulary, split over tensor-parallel ranks.
    The sum is all-reduced forward and passed through backward (megatron's reduce region),
    which gives each rank's logits their exact softmax gradient."""
    logits = logits_sbv.float()
    top_sb = logits.max(dim=-1).values.detach()
    torch.distributed.all_reduce(top_sb, op=torch.distributed.ReduceOp.MAX,
                                 group=parallel_state.get_tensor_model_parallel_group())
    sum_sb = torch.exp(logits - top_sb.unsqueeze(-1)).sum(dim=-1)
    return top_sb + torch.log(tensor_parallel.reduce_from_tensor_model_parallel_region(sum_sb))


def flex_masks(data_cfg, device: torch.device) -> bool:
    """Whether per-document masks go to attention as flex BlockMasks (config/schema.py
    data.document_mask): flex explicitly, or auto on CUDA."""
    return data_cfg.reset_attention and (data_cfg.document_mask == "flex" or (
        data_cfg.document_mask == "auto" and device.type == "cuda"))


def _forward_step(data_iterator, model, z_loss: float = 0.0, flex: bool = False):
    micro = next(data_iterator)
    mask = None
    if micro.segment_ids is not None:
        # flex: the [b, s] segment ids themselves; the attention turns them into a block mask
        # (model/layers.py). A tensor, so megatron's recompute can save it like any argument.
        mask = micro.segment_ids if flex else document_causal_mask(micro.segment_ids)
    if not (z_loss and model.post_process):
        output = model(input_ids=micro.tokens, position_ids=micro.position_ids,
                       attention_mask=mask, labels=micro.labels)
        return output, partial(_loss_func, micro.loss_mask, None)
    # PaLM's z-loss (Chowdhery et al. 2022): z * log(Z)^2 per token keeps the softmax
    # normalizer near 1. It needs the logits, so the cross entropy is taken here, with the
    # same vocab-parallel function megatron's GPTModel uses.
    logits_bsv = model(input_ids=micro.tokens, position_ids=micro.position_ids,
                       attention_mask=mask, labels=None)
    logits_sbv = logits_bsv.transpose(0, 1)
    z_loss_bs = z_loss * log_partition_sb(logits_sbv).square().transpose(0, 1)
    # a copy: megatron's cross entropy subtracts the max from its input in place
    loss_sb = tensor_parallel.vocab_parallel_cross_entropy(
        logits_sbv.contiguous(), micro.labels.transpose(0, 1).contiguous())
    return loss_sb.transpose(0, 1), partial(_loss_func, micro.loss_mask, z_loss_bs)


def _data_iterators(micro_batches, num_chunks):
    # Interleaved schedules pull from one iterator per chunk; every chunk sees the same list.
    if num_chunks == 1:
        return iter(micro_batches)
    return [iter(micro_batches) for _ in range(num_chunks)]


def forward_backward(model_proxies, micro_batches, seq_length: int, micro_batch_size: int,
                     forward_only: bool = False, z_loss: float = 0.0,
                     flex: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one global batch. Returns (loss_sum, num_tokens) over this rank's micro-batches;
    both are zero except on the last pipeline stage. The loss is the cross entropy, without
    the z-loss term (which only the gradients see)."""
    func = get_forward_backward_func()
    with cpu_device_mode():
        outputs = func(forward_step_func=partial(_forward_step, z_loss=z_loss, flex=flex),
                       data_iterator=_data_iterators(micro_batches, len(model_proxies)),
                       model=model_proxies if len(model_proxies) > 1 else model_proxies[0],
                       num_microbatches=len(micro_batches), seq_length=seq_length,
                       micro_batch_size=micro_batch_size, forward_only=forward_only)
    loss_sum = torch.zeros((), dtype=torch.float64)
    num_tokens = torch.zeros((), dtype=torch.float64)
    for item in outputs:
        loss_sum += item["loss_sum"].double().cpu()
        num_tokens += item["num_tokens"].double().cpu()
    return loss_sum, num_tokens


def global_mean_loss(loss_sum: torch.Tensor, num_tokens: torch.Tensor, device) -> float:
    """Token-weighted mean loss of the global batch, known on every rank."""
    stats = torch.stack([loss_sum, num_tokens]).to(device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        torch.distributed.all_reduce(stats, group=parallel_state.get_data_parallel_group())
    # The last stage holds the answer; share it along the pipeline so rank 0 can log it.
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    torch.distributed.broadcast(stats, src=last,
                                group=parallel_state.get_pipeline_model_parallel_group())
    return float(stats[0] / stats[1].clamp(min=1))


def allreduce_tied_embedding_grads(chunks) -> None:
    """With tied embeddings split over the first and last pipeline stage, each stage holds a
    copy of the word embedding and a partial gradient; summing them keeps the copies equal."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return
    if not parallel_state.is_rank_in_embedding_group(ignore_virtual=True):
        return
    for chunk in chunks:
        if not chunk.share_embeddings_and_output_weights:
            continue
        if not (chunk.pre_process or chunk.post_process):
            continue
        weight = chunk.shared_embedding_or_output_weight()
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        torch.distributed.all_reduce(weight.grad, group=parallel_state.get_embedding_group())
