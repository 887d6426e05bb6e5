#!/usr/bin/env bash
# The GPU checks of issue #12 as one prepared script, for a lent GPU machine with a short
# budget (../shared/notes/gpu-facts.md: no network there, a few packages missing).
#
#   bash benchmarks/gpu_session.sh prepare   # here, on the CPU machine: wheels, peer, shards
#   bash benchmarks/gpu_session.sh run       # there, with $OUT set; carry .whl .gpu
#
# `run` goes in order of importance, each stage under `timeout -k 10`, logs in $OUT:
# the GPU tests (compiled vs eager in bf16, exact resume of a compiled run through the
# pinned checkpoint staging), then benchmarks/bench_gpu.py (ours vs peer_gpt.py --compile,
# checkpoint stalls, start-up).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}

case "$mode" in
prepare)
    bash ../shared/gpu/prepare_wheels.sh
    mkdir -p .gpu
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    cp ../shared/gpu/peer_gpt.py .gpu/
    # 1b shards: seq 2048 with a 32000-piece tokenizer, from the embedded corpus.
    py=.venv/bin/python
    $py data_tools/export_embedded_corpus.py --output .gpu/corpus.jsonl
    $py data_tools/train_tokenizer.py --input .gpu/corpus.jsonl --vocab-size 32000 --output .gpu/tokenizer
    $py data_tools/shard.py --input .gpu/corpus.jsonl --output .gpu/shards \
        --tokenizer .gpu/tokenizer.model --seq-len 2048 --val-fraction 0.02 --num-workers 2
    du -sh .whl .gpu
    ;;
run)
    : "${OUT:?set OUT to the folder whose files come back}"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl > "$OUT/pip.log" 2>&1
    export PYTHONPATH=/tmp/site:$PWD
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
    timeout -k 10 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py \
        > "$OUT/test_gpu.log" 2>&1 || echo "test_gpu: exit $?" >> "$OUT/test_gpu.log"
    timeout -k 10 420 python3 benchmarks/bench_gpu.py --data .gpu/shards --peer .gpu/peer_gpt.py \
        --out "$OUT/bench_gpu" > "$OUT/bench_gpu.log" 2>&1 || echo "bench_gpu: exit $?" >> "$OUT/bench_gpu.log"
    tail -n 5 "$OUT"/*.log
    ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh prepare|run" >&2
    exit 2
    ;;
esac
