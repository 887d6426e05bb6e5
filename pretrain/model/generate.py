"""Sampling from the trained model through the same pipeline schedule (any TP/PP layout)."""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from pretrain.parallel.cpu import cpu_device_mode


def _forward_logits(chunks, tokens_bs: torch.Tensor) -> torch.Tensor | None:
    """Full-vocabulary logits of the last position, on the last pipeline stage (else None)."""
    positions = torch.arange(tokens_bs.shape[1], device=tokens_bs.device).unsqueeze(0)

    def step(data_iterator, model):
        next(data_iterator)
        out = model(input_ids=tokens_bs, position_ids=positions, attention_mask=None)
        return out, lambda logits, non_loss_data=True: logits

    func = get_forward_backward_func()
    iters = iter([None]) if len(chunks) == 1 else [iter([None]) for _ in chunks]
    with cpu_device_mode():
        outputs = func(forward_step_func=step, data_iterator=iters,
                       model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=1,
                       seq_length=tokens_bs.shape[1], micro_batch_size=1, forward_only=True,
                       collect_non_loss_data=True)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    # logits_bsv: [1, s, V/tp] -> gather the vocabulary shards, keep the last position
    logits_bsv = outputs[0]
    last_bv = logits_bsv[:, -1, :].contiguous()
    return tensor_parallel.gather_from_tensor_model_parallel_region(last_bv)


@torch.no_grad()
def sample(chunks, prompt: list[int], num_tokens: int, max_context: int, vocab_size: int,
           seed: int, device, temperature: float = 0.8, top_k: int = 40) -> list[int]:
    """Top-k sampling (greedy when temperature is 0); deterministic for a seed. Every rank
    returns the same tokens."""
    for chunk in chunks:
        chunk.eval()
    generator = torch.Generator().manual_seed(seed)
    tokens = list(prompt)
    last_rank = parallel_state.get_pipeline_model_parallel_last_rank()
    for _ in range(num_tokens):
        context = torch.tensor([tokens[-max_context:]], dtype=torch.long, device=device)
        logits = _forward_logits(chunks, context)
        choice = torch.zeros(1, dtype=torch.long, device=device)
        if logits is not None:
            scores = logits[0, :vocab_size].float().cpu()
            if temperature <= 0:
                choice[0] = int(torch.argmax(scores))
            else:
                values, indices = torch.topk(scores / temperature, min(top_k, vocab_size))
                probs = torch.softmax(values, dim=-1)
                choice[0] = indices[torch.multinomial(probs, 1, generator=generator)].item()
        torch.distributed.broadcast(choice, src=last_rank,
                                    group=parallel_state.get_pipeline_model_parallel_group())
        tokens.append(int(choice.item()))
    for chunk in chunks:
        chunk.train()
    return tokens[len(prompt):]
