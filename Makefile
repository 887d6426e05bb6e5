# `make demo`, `make check` and `make test` each create .venv/ first when it is missing.
# On a machine without CUDA the CPU build of torch is installed first, so that no dependency
# can pull the multi-GB CUDA build; on GPU machines set TORCH_SPEC to your CUDA build.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0
NPROC ?= 2

.PHONY: demo check test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	DS_BUILD_OPS=0 $(VENV)/bin/pip install --quiet -e ".[test]"
	touch $(STAMP)

DEMO := runs/demo
PY := $(VENV)/bin/python

# The whole pipeline on the embedded corpus: export -> tokenizer -> shards -> training ->
# curves (PNG), TensorBoard events -> validation loss -> a Hugging Face directory (the last
# line printed says how to load it).
# shard.py reuses finished work; training resumes from runs/demo/run/checkpoints, so a
# second `make demo` finds the run finished (delete runs/demo/run to train again).
demo: $(STAMP)
	$(PY) data_tools/export_embedded_corpus.py --output $(DEMO)/corpus.jsonl
	$(PY) data_tools/train_tokenizer.py --input $(DEMO)/corpus.jsonl --vocab-size 4096 --output $(DEMO)/tokenizer
	$(PY) data_tools/shard.py --input $(DEMO)/corpus.jsonl --output $(DEMO)/data --tokenizer $(DEMO)/tokenizer.model --seq-len 256 --val-fraction 0.02 --num-workers $(NPROC)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) -m pretrain.train --config configs/demo.yaml
	$(PY) -m pretrain.plot $(DEMO)/run -o $(DEMO)/curves.png
	@echo "demo: curves in $(DEMO)/curves.png; TensorBoard: $(VENV)/bin/tensorboard --logdir $(DEMO)/run/tensorboard"
	OMP_NUM_THREADS=1 $(PY) -m pretrain.evaluate $(DEMO)/run --data $(DEMO)/data --max-batches 8
	rm -rf $(DEMO)/hf
	$(PY) -m pretrain.export_hf $(DEMO)/run --output $(DEMO)/hf

# Two lanes over one suite (docs/testing.md). `check`: the unit-level tests, <= 180 s on 2
# cores, for the inner loop; the tests it deselects (by marker) are counted in its last lines.
# `test`: everything, with each area's time against its budget in docs/testing.md.
CHECK_MARKERS := not slow and not multiprocess and not slurm and not install and not gpu

check: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=10 -m "$(CHECK_MARKERS)" tests

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=25 --budget-report tests

clean:
	rm -rf runs $(VENV)
