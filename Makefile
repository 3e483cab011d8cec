# Quick start: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# Extra pip arguments for torch (e.g. an index URL for a CPU or CUDA build of your choice).
TORCH_PIP_ARGS ?=
NPROC ?= 2
STAMP := $(VENV)/.installed

.PHONY: venv test test-all test-gpu lint format demo bench-exit-overhead bench-server-load bench-inference bench-exit-agreement bench-projection-shapes perf-model bench-bubble-filling bench-ee-tuning bench-decode clean

venv: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import torch, megatron.core, megatron.early_exit; print('venv ready: torch', torch.__version__)"
	touch $(STAMP)

# Unit + distributed (gloo) tests; `slow` and `gpu` tiers are left out.
test: venv
	$(PY) -m pytest -q -m "not slow and not gpu" tests

test-all: venv
	$(PY) -m pytest -q tests

test-gpu: venv
	$(PY) -m pytest -q -m gpu tests

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

# Main job on an embedded default: tiny early-exit GPT, PP=2 on 2 CPU processes.
demo: venv
	PY=$(PY) bash examples/demo.sh

# Benchmarks write to outputs/benchmarks/; BENCH_ARGS=--write-results replaces the committed
# benchmarks/results/ files instead (e.g. `make bench-inference BENCH_ARGS=--write-results`).
BENCH_ARGS ?=
bench-exit-overhead: venv
	$(PY) benchmarks/exit_overhead.py $(BENCH_ARGS)

bench-bubble-filling: venv
	$(PY) benchmarks/bubble_filling.py $(BENCH_ARGS)

# EE-Tuning cost (partial vs full stage loading vs full training) + SmolLM2 tuning curves.
bench-ee-tuning: venv
	$(PY) benchmarks/ee_tuning.py --smollm2-metrics outputs/ee_tuning/metrics.jsonl $(BENCH_ARGS)

# Bubble fraction, exit overhead and bubble-filling gain of the paper's 1.3B-30B configs (math).
perf-model: venv
	$(PY) -W ignore benchmarks/perf_model.py $(BENCH_ARGS)

bench-server-load: venv
	$(PY) benchmarks/server_load.py $(BENCH_ARGS)

# Early-exit inference speed/agreement vs threshold; CKPT: a checkpoint with exits.
CKPT ?= outputs/demo/checkpoint
bench-inference: venv
	$(PY) benchmarks/inference_early_exit.py --load $(CKPT) $(BENCH_ARGS)

# Exit quality for early exit / self-speculation, with a cost-model speedup ceiling.
# Full-model decode speed vs transformers generate on SmolLM2 (the converted checkpoint and
# its HF folder; DECODE_ARGS=--compile also times the torch.compile'd step).
bench-decode: venv
	$(PY) benchmarks/decode_speed.py $(DECODE_ARGS) $(BENCH_ARGS)

bench-exit-agreement: venv
	$(PY) benchmarks/exit_agreement.py --load $(CKPT) $(BENCH_ARGS)

# Projection row-count curves (LM head, layer matmuls) and verification cost vs one decode
# step; VERIFY_CKPT: any checkpoint of the model to time (SmolLM2: /work/cache/smollm2/...).
VERIFY_CKPT ?= $(CKPT)
bench-projection-shapes: venv
	$(PY) benchmarks/projection_shapes.py --load $(VERIFY_CKPT) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache outputs
