"""Pick the runner for an artifact from its manifest's format: llama.cpp (GGUF; CPU or GPU
offload), ONNX Runtime GenAI (ONNX; CPU), transformers (HF FP16/FP32 and GPTQ/compressed-tensors;
one GPU or CPU, optional extra). Each is imported only when used, so the edge install carries only
the runtime it serves.
"""

from __future__ import annotations

from edgedistill.serve.artifact import Artifact
from edgedistill.serve.engine import Runner
from edgedistill.serve.settings import Settings


def make_runner(artifact: Artifact, s: Settings) -> Runner:
    common = {"n_slots": s.n_slots, "ctx_per_slot": s.ctx_per_slot, "n_batch": s.n_batch, "n_threads": s.n_threads}
    if artifact.backend == "llama.cpp":
        from edgedistill.serve.engine_llama import LlamaRunner

        return LlamaRunner(artifact.model_path, n_gpu_layers=s.n_gpu_layers, **common)
    if artifact.backend == "onnxruntime":
        from edgedistill.serve.engine_onnx import OnnxRunner

        return OnnxRunner(artifact.model_path, **common)
    from edgedistill.serve.engine_hf import HFRunner  # transformers: hf, gptq

    return HFRunner(artifact.model_path, **common)
