"""The runtimes' registry: one table for serve's backend choice and compress's format table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from edgedistill.compress.formats import KNOWN
from edgedistill.runtimes import registry
from edgedistill.runtimes.vocab import EOG_NAMES
from edgedistill.serve.artifact import BACKENDS, Artifact


def test_one_table_for_serve_and_compress():
    assert BACKENDS == {"gguf": "llama.cpp", "onnx": "onnxruntime", "hf": "transformers", "gptq": "transformers"}
    assert KNOWN == {
        "gguf": {"f16": 16, "q8_0": 8, "q6_k": 6, "q5_k_m": 5, "q4_k_m": 4, "q4_0": 4},
        "onnx": {"fp32": 32, "int8": 8, "int4": 4},
        "gptq": {"int4": 4, "int8": 8},
    }
    assert list(KNOWN) == ["gguf", "onnx", "gptq"]  # the order --formats errors list them in
    assert Artifact("a", "gguf", Path("m.gguf")).backend == "llama.cpp"
    assert registry.FORMATS["gptq"].runtime == "edgedistill.runtimes.hf"
    assert {f.builder for f in registry.FORMATS.values()} == {None, *(f"edgedistill.compress.{k}" for k in KNOWN)}


def test_end_of_generation_names_are_one_list():
    assert {"<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|end|>", "</s>", "<end_of_turn>"} == EOG_NAMES


@pytest.mark.parametrize(
    ("fmt", "cls", "gpu"),
    [("gguf", "LlamaRunner", True), ("onnx", "OnnxRunner", False), ("hf", "HFRunner", False), ("gptq", "HFRunner", False)],
)
def test_make_runner_picks_the_format_runtime(monkeypatch, fmt, cls, gpu):
    seen = {}

    def fake(path, **kw):
        seen.update(path=path, **kw)
        return "runner"

    module = registry.FORMATS[fmt].runtime
    monkeypatch.setattr(f"{module}.{cls}", fake)
    s = SimpleNamespace(n_slots=2, ctx_per_slot=64, n_batch=32, n_threads=1, n_gpu_layers=-1)
    assert registry.make_runner(Artifact("a", fmt, Path("m")), s) == "runner"
    assert seen.pop("path") == Path("m")
    assert seen == {"n_slots": 2, "ctx_per_slot": 64, "n_batch": 32, "n_threads": 1, **({"n_gpu_layers": -1} if gpu else {})}


def test_compress_format_table_imports_no_builder():
    code = "import sys, edgedistill.compress.formats; assert not any(m.startswith(('edgedistill.compress.gguf', 'edgedistill.compress.onnx', 'edgedistill.compress.gptq', 'torch')) for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_one_chat_rendering_for_every_stage(tiny_tokenizer_dir):
    """runtimes.hf.render_chat: what training, compress, the local teacher and serve's HF runner render."""
    pytest.importorskip("transformers")
    from edgedistill.runtimes.hf import render_chat
    from transformers import AutoTokenizer

    from edgedistill.errors import UserError

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    msgs = [{"role": "system", "content": "Classify."}, {"role": "user", "content": "hi"}]
    prompt, full = render_chat(tok, msgs), render_chat(tok, msgs, "card_arrival")
    assert prompt == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert full.startswith(prompt) and "card_arrival" in full[len(prompt):]
    tok.chat_template = None  # a base model
    with pytest.raises(UserError, match="no chat template"):
        render_chat(tok, msgs)
    assert render_chat(tok, msgs, no_template="transcript") == "system: Classify.\nuser: hi\nassistant:"
    assert render_chat(tok, msgs, no_template="chatml").endswith("<|im_start|>assistant\n")
