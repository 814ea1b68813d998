"""One runtime per model format (transformers, llama.cpp, ONNX Runtime GenAI) behind one contract.

Every stage that runs a model (distill's local teacher and evaluation, compress's FP reference and
quality gate, serve's engine, bench's ceiling) opens it through here.

- ``base``: the contracts (serve's ``Runner``, compress's greedy ``Runtime``);
- ``llama`` (GGUF), ``hf`` (HF checkpoints, GPTQ), ``onnx`` (ONNX): one module per format, each
  importing its libraries only when a model is opened;
- ``registry``: manifest format -> runtime, builder, bits, serve backend;
- ``vocab`` (end-of-generation names, byte pieces) and ``chat`` (chat templates), shared by the runtimes;
- ``gguf_meta``: a GGUF's header (chat template, end tokens, context) without llama.cpp (``serve.export``).
"""
