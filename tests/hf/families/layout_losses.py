"""Run under torchrun: import each HF directory given (`hf:` loading, as a run does) into
this layout's model chunks and print, from rank 0, one JSON line {DIR: loss of the first
global batch}. One launch covers every family, so a layout costs one start-up."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    from megatron.core import parallel_state as ps

    from pretrain.checkpoint.weights import install
    from pretrain.config import load_config, validate
    from pretrain.data.build import build_loaders, open_data
    from pretrain.hf.importer import load_state
    from pretrain.model.gpt import build_model_chunks
    from pretrain.parallel import cpu, dist as pdist
    from pretrain.parallel.schedule import ChunkProxy, ModelChunks, forward_backward, global_mean_loss
    from tests.conftest import SMOKE
    from tests.hf.families.models import BASE, overrides

    parser = argparse.ArgumentParser()
    parser.add_argument("layout", nargs="*", help="parallel.* overrides")
    parser.add_argument("--hf", nargs="+", required=True)
    args = parser.parse_args()
    env = pdist.detect_env()
    cpu.enable()
    pdist.init_process_group(env)
    losses = {}
    for hf in args.hf:
        cfg = load_config(SMOKE, BASE + overrides(Path(hf)) + args.layout)
        layout = validate(cfg, world_size=env.world_size, vocab_size=257)
        if not ps.model_parallel_is_initialized():
            pdist.init_model_parallel(layout.tensor_parallel, layout.pipeline_parallel, 1,
                                      cfg.train.seed)
        state = load_state(f"hf:{hf}", cfg, layout.padded_vocab_size, 257)
        chunks = build_model_chunks(cfg, layout.padded_vocab_size, torch.float32,
                                    torch.device("cpu"))
        install(chunks, state, ps.get_tensor_model_parallel_rank(), layout.tensor_parallel,
                True, hf)
        for chunk in chunks:
            chunk.eval()
        proxies = [ChunkProxy(ModelChunks(chunks), i, chunk) for i, chunk in enumerate(chunks)]
        loader, _ = build_loaders(cfg, open_data(cfg), layout.micro_batch_size,
                                  ps.get_data_parallel_rank(), layout.data_parallel)
        with torch.no_grad():
            loss_sum, tokens = forward_backward(proxies, loader.next_step(), cfg.train.seq_length,
                                                layout.micro_batch_size, forward_only=True)
        loader.close()
        losses[hf] = global_mean_loss(loss_sum, tokens, torch.device("cpu"))
    if env.rank == 0:
        print("LOSSES " + json.dumps(losses), flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
