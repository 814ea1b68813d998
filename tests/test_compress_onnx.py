"""ONNX artifacts on a tiny random Llama: the builder's fp32 export round-trips transformers' greedy
tokens; INT8 (RTN) and INT4 (GPTQ on calibration texts) build from the same cached export, load in
onnxruntime-genai and generate; the packed weights are what onnxruntime's kernels dequantize."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime_genai")

from edgedistill.compress import onnx as connx
from edgedistill.compress import onnx_gptq
from edgedistill.compress.formats import FormatSpec, parse_formats

from edgedistill.errors import UserError
from tests.conftest import build_tiny_llama

PROMPTS = ["When will my card arrive?", "What is the exchange rate for euros today?", "My top up failed, please help me."]


def build_onnx_llama(out: Path, tokenizer_dir: Path) -> Path:
    """A 2-layer random Llama the builder can export: GroupQueryAttention on CPU needs head_size % 16 == 0."""
    from transformers import AutoTokenizer

    build_tiny_llama(
        out, AutoTokenizer.from_pretrained(tokenizer_dir), num_layers=2, hidden_size=64, intermediate_size=128, max_position_embeddings=256,
        initializer_range=0.2,  # larger than the default, so greedy tokens vary instead of repeating one token
    )  # fmt: skip
    return out


def shared_work(tmp_path_factory) -> Path:
    """One work folder for the session: the same tiny source (same seed, same bytes) is exported once."""
    return tmp_path_factory.getbasetemp() / "onnx-work"


def chat_ids(tok, text: str) -> list[int]:
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    return list(tok(rendered, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def src(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return build_onnx_llama(tmp_path_factory.mktemp("onnx_src"), tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def tok(src):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(src)


@pytest.fixture(scope="module")
def calib(tok) -> list[str]:
    return [
        tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": "card_arrival"}], tokenize=False)
        for p in PROMPTS * 4
    ]


@pytest.fixture(scope="module")
def built(tmp_path_factory, src, calib):
    """fp32, int8, int4 artifacts of one source, sharing one work folder (one builder run)."""
    root = tmp_path_factory.mktemp("onnx_out")
    work = shared_work(tmp_path_factory)
    out = {}
    for variant in ("fp32", "int8", "int4"):
        folder = root / f"onnx-{variant}"
        folder.mkdir()
        out[variant] = (folder, connx.build(src, FormatSpec("onnx", variant), folder, calib, work))
    return out


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))


def test_fp32_export_greedy_tokens_equal_transformers(built, src, tok):
    import torch
    from transformers import AutoModelForCausalLM

    folder, b = built["fp32"]
    assert {"model.onnx", "genai_config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    assert b.model_file == "." and "builder" in b.method and b.tools["onnxruntime-genai"]
    hf = AutoModelForCausalLM.from_pretrained(src).eval()
    rt = connx.load(folder, {"model_file": "."})
    try:
        for p in PROMPTS:
            ids = chat_ids(tok, p)
            with torch.no_grad():
                ref = hf.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, len(ids) :].tolist()
            assert rt.generate(ids, 16, ignore_eos=True) == ref
            assert len(set(ref)) > 3  # a real test: the random model does not just repeat one token
    finally:
        rt.close()


def test_int8_and_int4_build_from_one_export_load_and_generate(built, tok, tmp_path_factory):
    fp32 = weights_bytes(built["fp32"][0])
    assert len(list(shared_work(tmp_path_factory).glob("onnx-fp32-*"))) == 1
    for variant in ("int8", "int4"):
        folder, b = built[variant]
        assert "reused" in b.notes[0]  # quantized from the cached fp32 export: the builder ran once
        assert b.settings["embedding"].startswith("tied to the INT")
        rt = connx.load(folder, {"model_file": "."})
        try:
            out = rt.generate(chat_ids(tok, PROMPTS[0]), 12, ignore_eos=True)
        finally:
            rt.close()
        assert len(out) == 12 and all(0 <= t < len(tok) for t in out)
    b4, b8 = built["int4"][1], built["int8"][1]
    assert b4.settings["algorithm"] == "gptq" and b4.settings["calibration_samples"] == 12 and "GPTQ INT4" in b4.method
    assert b8.settings["algorithm"] == "rtn" and "RTN INT8" in b8.method
    assert weights_bytes(built["int4"][0]) < weights_bytes(built["int8"][0]) < fp32


def test_eos_stops_unless_ignored(built, tok, tmp_path):
    folder = tmp_path / "a"
    shutil.copytree(built["fp32"][0], folder)
    ids = chat_ids(tok, PROMPTS[1])
    full = connx.load(folder, {}).generate(ids, 10, ignore_eos=True)
    eos = full[3]
    first = full.index(eos)
    cfg = json.loads((folder / "genai_config.json").read_text())
    cfg["model"]["eos_token_id"] = eos  # make the 4th greedy token the end of generation
    (folder / "genai_config.json").write_text(json.dumps(cfg))
    rt = connx.load(folder, {})
    assert rt.generate(ids, 10) == full[: first + 1]  # stops on EOS, EOS included (as transformers' generate)
    ignored = rt.generate(ids, 10, ignore_eos=True)  # EOS is masked (as llama.cpp's ignore_eos, HF's min_new_tokens)
    assert len(ignored) == 10 and eos not in ignored and ignored[:first] == full[:first]


def test_int4_without_calibration_is_rtn_and_says_so(built, src, tmp_path, tmp_path_factory):
    b = connx.build(src, FormatSpec("onnx", "int4"), tmp_path / "rtn", [], shared_work(tmp_path_factory))
    assert b.settings["algorithm"] == "rtn" and "RTN INT4" in b.method
    assert any("fell back to RTN" in n for n in b.notes)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [64, 96])  # an even and an odd number of blocks
def test_packed_weights_are_what_onnxruntime_dequantizes(bits, k):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(bits + k)
    n, block = 40, 32
    w = rng.normal(size=(n, k)).astype(np.float32)
    codes, scales, zeros = onnx_gptq.rtn(w, bits, block)
    packed, zp = onnx_gptq.pack(codes, zeros, bits, block)
    deq = ((codes.reshape(n, -1, block).astype(np.float32) - zeros[..., None]) * scales[..., None]).reshape(n, -1)[:, :k]
    assert np.abs(deq - w).max() <= scales.max() / 2 + 1e-6  # rounding error of round-to-nearest
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S"), numpy_helper.from_array(zp, "Z"),
             numpy_helper.from_array(np.array([n, k * bits // 8], np.int64), "shape")]
    nodes = [
        helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits, block_size=block),
        helper.make_node("Reshape", ["B", "shape"], ["B2"]),
        helper.make_node("GatherBlockQuantized", ["B2", "ids", "S", "Z"], ["E"], domain="com.microsoft",
                         bits=bits, block_size=block, gather_axis=0, quantize_axis=1),
    ]
    graph = helper.make_graph(
        nodes, "t",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k]), helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n]), helper.make_tensor_value_info("E", TensorProto.FLOAT, [None, k])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = rng.normal(size=(3, k)).astype(np.float32)
    ids = np.array([0, 7, n - 1])
    y, e = sess.run(None, {"A": a, "ids": ids})
    np.testing.assert_allclose(y, a @ deq.T, atol=1e-4)
    np.testing.assert_array_equal(e, deq[ids])


def test_gptq_beats_round_to_nearest_on_the_layer_output():
    rng = np.random.default_rng(0)
    k, n = 128, 48
    mix = rng.normal(size=(k, k)) / np.sqrt(k)
    x = (rng.normal(size=(2048, k)) @ mix * rng.uniform(0.2, 3, size=k)).astype(np.float32)  # correlated, uneven inputs
    w = rng.normal(size=(n, k)).astype(np.float32)
    h = 2 * (x.T.astype(np.float64) @ x) / len(x)
    hinv = onnx_gptq.inverse_cholesky(onnx_gptq.padded_hessian(h, 32))

    def err(codes, scales, zeros):
        deq = ((codes.reshape(n, -1, 32).astype(np.float32) - zeros[..., None]) * scales[..., None]).reshape(n, k)
        return float(np.mean((x @ w.T - x @ deq.T) ** 2))

    assert err(*onnx_gptq.gptq(w, hinv, 4, 32)) < 0.8 * err(*onnx_gptq.rtn(w, 4, 32))


def test_bad_checkpoints_and_options_are_user_errors(tmp_path, src):
    fmt = FormatSpec("onnx", "int4")
    with pytest.raises(UserError, match="no config.json"):
        connx.build(tmp_path / "nothing", fmt, tmp_path / "o1", [], tmp_path / "w")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        connx.build(bad, fmt, tmp_path / "o2", [], tmp_path / "w")
    with pytest.raises(UserError, match="block_size"):
        connx.build(src, parse_formats("onnx:int4:block_size=48")[0], tmp_path / "o3", [], tmp_path / "w")
    # damaged weights get past the checks: the builder itself fails, as a one-line error naming its log
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(UserError, match="onnx-builder.log"):
        connx.build(broken, FormatSpec("onnx", "fp32"), tmp_path / "o4", [], tmp_path / "w")
    assert not list((tmp_path / "w").glob("onnx-fp32-*"))  # nothing half-made is left to be reused
