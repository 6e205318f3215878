# trt_dm — set-up and main jobs. Every target creates .venv when it is missing.
#   make test      run the test suite (CPU; tests/gpu are skipped without CUDA)
#   make sample    draw a grid of images from the embedded default model -> out/sample_grid.png
#   make eval      FD-EffNet / KID of the default model (N=$(N)) -> reports/
#   make bench     CPU benchmark matrix (profile + pipeline cost) -> BENCHMARKS.md, docs/bench/
#   make serve-bench  trt-dm serve: step-level vs request-level vs no batching -> BENCHMARKS.md
#   make engine    calibrate -> Q/DQ ONNX -> checks -> int8 + FP16 engines (MODEL=default|<dir>, RECIPE=<recipe>
#                  (default: ptq4dm-g4 in one engine; ptq4dm for ort-cpu),
#                  TARGET=tensorrt|ort-cpu|openvino)
# Choose your torch build with TORCH_SPEC / TORCH_PIP_ARGS, e.g. on a CUDA machine:
#   make test TORCH_SPEC='torch==2.11.0' TORCH_PIP_ARGS='--index-url https://download.pytorch.org/whl/cu130'
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.trt_dm-installed
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
PYTEST_ARGS ?=
# test processes (pytest-xdist; whole files per process); 0: one process
TEST_WORKERS ?= 2
N ?= 2000
STEPS ?= 100
SAMPLER ?= ddim
MODEL ?= default
RECIPE ?=
ENGINE_ARGS ?=

.PHONY: venv test sample eval engine bench serve-bench data clean-venv

venv: $(STAMP)

# torch goes in first and pinned: an unpinned torch would pull a multi-GB CUDA build on CPU machines.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install -q -e '.[test,rtx,serve,ray,text,openvino]'
	touch $@

# Real Fashion-MNIST from Debian's dataset-fashion-mnist (or point TRT_DM_FASHION_MNIST at the IDX files).
data:
	@if [ -n "$$TRT_DM_FASHION_MNIST" ] || [ -f $(FMNIST) ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist'" >&2; exit 1; fi

test: venv data
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

sample: venv
	$(BIN)/trt-dm sample --model default --sampler ddim --steps 50 --n 64 --seed 0 --out out/sample_grid.png

eval: venv data
	$(BIN)/trt-dm eval --model default --sampler $(SAMPLER) --steps $(STEPS) --n $(N) \
		--out-dir reports/fp-$(SAMPLER)$(STEPS)-n$(N)

TARGET ?= tensorrt
engine: venv
	$(BIN)/trt-dm engine --model $(MODEL) $(if $(RECIPE),--recipe $(RECIPE)) --target $(TARGET) $(ENGINE_ARGS)

bench: venv
	$(BIN)/python tools/bench.py --threads 2

# step-level vs request-level vs no batching in `trt-dm serve`, loopback, ONNX Runtime int8: efficiency against the
# runner's saturated throughput, latency and admission latency, closed- and open-loop loads -> BENCHMARKS.md
serve-bench: venv
	$(BIN)/python tools/serve_bench.py --threads 2 --section uniform --steps 20 --n 1 --loads 0.5 0.8 1 1.25
	$(BIN)/python tools/serve_bench.py --threads 2 --section mixed --steps 10 50 20 --n 1 2 --loads 0.5 0.8 1 1.25

clean-venv:
	rm -rf $(VENV)
