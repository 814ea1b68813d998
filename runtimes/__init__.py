"""One runtime per model format (transformers, llama.cpp, ONNX Runtime GenAI) behind one contract.

Every stage that runs a model (distill's local teacher and evaluation, compress's FP reference and
quality gate, serve's engine, bench's ceiling) opens it through here.
"""
