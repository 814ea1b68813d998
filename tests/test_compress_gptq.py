"""GPTQ format: a tiny random Llama quantized for real in the llm-compressor tool venv, opened in our
main environment (transformers + compressed-tensors) and checked against the FP weights.

Random weights make "same greedy answers as FP" a coin toss, so the checks are about the numbers:
the file holds packed 4-bit integers, the weights the runtime computes with are exactly those
integers times their group scales, and GPTQ's calibrated rounding beats plain round-to-nearest on
the calibration texts (the error GPTQ minimises).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from edgedistill.compress.calibration import prompt_ids
from edgedistill.compress.formats import FormatSpec, parse_formats

from edgedistill.errors import UserError
from tests.conftest import CHATML, CORPUS

pytestmark = pytest.mark.slow
GROUP = 32  # the tiny model's widths are 32 and 64


def _calib_texts() -> list[str]:
    from jinja2 import Template

    answers = ["card_arrival", "exchange_rate", "top_up_failed"]
    return [
        Template(CHATML).render(messages=[{"role": "user", "content": c}, {"role": "assistant", "content": answers[i % 3]}])
        for i, c in enumerate(CORPUS * 2)
    ]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir):
    pytest.importorskip("compressed_tensors")
    from edgedistill.compress import gptq

    root = tmp_path_factory.mktemp("gptq")
    out = root / "gptq-int4"
    out.mkdir()
    info = gptq.build(tiny_model_dir, parse_formats(f"gptq:int4:group_size={GROUP}")[0], out, _calib_texts(), root / "work")
    return out, info


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _unpack(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """compressed-tensors pack-quantized: 32/bits values per int32, lowest bits first, offset by 2**(bits-1)."""
    words = packed.astype(np.int64) & 0xFFFFFFFF
    per = 32 // bits
    vals = np.stack([(words >> (bits * j)) & ((1 << bits) - 1) for j in range(per)], axis=-1)
    return vals.reshape(packed.shape[0], -1)[:, :cols] - (1 << (bits - 1))


def test_build_reports_what_it_did(built):
    out, info = built
    assert info.model_file == "."
    assert info.settings["bits"] == 4 and info.settings["group_size"] == GROUP
    assert info.settings["n_calibration_samples"] == len(_calib_texts()) and info.settings["calibration_tokens"] > 0
    assert info.settings["quantized_layers"] == 4 * 7  # q, k, v, o, gate, up, down per layer
    assert {"llmcompressor", "compressed-tensors", "transformers", "torch"} <= set(info.tools)
    assert "GPTQ" in info.method and "W4A16" in info.method
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        assert (out / name).exists(), name


def test_checkpoint_is_4bit_packed_compressed_tensors(built, tiny_model_dir):
    out, _ = built
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    w = qc["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["type"], w["strategy"], w["group_size"], w["symmetric"]) == (4, "int", "group", GROUP, True)
    assert qc["ignore"] == ["lm_head"]

    t = _tensors(out)
    fp = _tensors(tiny_model_dir)
    packed = [k for k in t if k.endswith(".weight_packed")]
    assert len(packed) == 28
    for k in packed:
        base = k.removesuffix("_packed")
        rows, cols = fp[base].shape
        assert t[k].dtype == np.int32 and t[k].shape == (rows, cols // 8)  # eight 4-bit values per int32
        assert t[base + "_scale"].shape == (rows, cols // GROUP)
        assert base not in t  # no dense copy of a quantized weight
    # the quantized weights take about a quarter of the bytes of the FP ones (plus one scale per group)
    q_bytes = sum(t[k].nbytes + t[k.replace("_packed", "_scale")].nbytes for k in packed)
    fp_bytes = sum(fp[k.removesuffix("_packed")].nbytes for k in packed)
    assert q_bytes < 0.2 * fp_bytes  # float32 source: 4 bits + a float16 scale per 32 weights = 1/7


def test_runtime_weights_are_the_packed_integers_times_scales(built, tiny_model_dir):
    import torch
    from edgedistill.compress import gptq

    out, _ = built
    t = _tensors(out)
    fp = _tensors(tiny_model_dir)
    rt = gptq.load(out, {})
    try:
        params = dict(rt.model.named_parameters())
        for k in (k for k in t if k.endswith(".weight_packed")):
            base = k.removesuffix("_packed")
            cols = fp[base].shape[1]
            q = _unpack(t[k], 4, cols)
            assert q.min() >= -8 and q.max() <= 7
            scale = np.repeat(t[base + "_scale"].astype(np.float32), GROUP, axis=1)
            dense = params[base].detach().to(torch.float32).numpy()
            np.testing.assert_allclose(dense, q * scale, rtol=1e-3, atol=1e-6)  # what the runtime computes with
            # and it is a quantization of the original: each weight within a few grid steps of its FP value
            err = np.abs(dense - fp[base]) / scale
            assert np.median(err) <= 0.5 and err.max() <= 8, base
            rel = np.linalg.norm(dense - fp[base]) / np.linalg.norm(fp[base])
            assert rel < 0.3, (base, rel)
    finally:
        rt.close()


def test_gptq_beats_round_to_nearest_on_calibration_texts(built, tiny_model_dir):
    import torch
    from edgedistill.compress import gptq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = built
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rtn = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():  # same grid as the artifact: symmetric INT4, absmax / 7.5 per group of GROUP
        for name, mod in rtn.named_modules():
            if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head"):
                o, i = mod.weight.shape
                w = mod.weight.reshape(o, i // GROUP, GROUP)
                s = w.abs().amax(-1, keepdim=True) / 7.5
                mod.weight.copy_((torch.clamp(torch.round(w / s), -8, 7) * s).reshape(o, i))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rt = gptq.load(out, {})
    err_gptq = err_rtn = 0.0
    try:
        with torch.no_grad():
            for text in _calib_texts():
                ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
                fp = ref(ids).logits
                err_gptq += float(((rt.model(ids).logits - fp) ** 2).mean())
                err_rtn += float(((rtn(ids).logits - fp) ** 2).mean())
            ids = tok(_calib_texts()[0], add_special_tokens=False, return_tensors="pt").input_ids
            cos = torch.nn.functional.cosine_similarity(rt.model(ids).logits.flatten(), ref(ids).logits.flatten(), dim=0)
    finally:
        rt.close()
    assert err_gptq < 0.5 * err_rtn, (err_gptq, err_rtn)  # measured: ~0.16x on this model
    assert cos > 0.98


def test_runtime_generates_greedy_token_ids(built, tiny_model_dir):
    from edgedistill.compress import gptq
    from transformers import AutoTokenizer

    out, _ = built
    tok = AutoTokenizer.from_pretrained(out)
    prompt = prompt_ids(tok, [{"role": "user", "content": "Where is my card?"}])
    rt = gptq.load(out, {})
    try:
        a = rt.generate(prompt, 6, ignore_eos=True)
        b = rt.generate(prompt, 6, ignore_eos=True)
        c = rt.generate(prompt, 3)
    finally:
        rt.close()
    assert len(a) == 6 and a == b and all(0 <= t < len(tok) for t in a)
    # without ignore_eos it may stop early (on the end token); up to there it is the same greedy path
    k = next((i for i, t in enumerate(c) if t == tok.eos_token_id), len(c))
    assert 1 <= len(c) <= 3 and c[:k] == a[:k]


def test_int8_and_default_group_size_fallback(tmp_path, tiny_model_dir):
    """gptq:int8 with no group size: 128 does not divide the tiny widths (32, 64), so 32 is used and noted."""
    pytest.importorskip("compressed_tensors")
    from edgedistill.compress import gptq

    out = tmp_path / "gptq-int8"
    out.mkdir()
    info = gptq.build(tiny_model_dir, FormatSpec("gptq", "int8"), out, _calib_texts()[:4], tmp_path / "work")
    assert info.settings["bits"] == 8 and info.settings["group_size"] == 32 and info.settings["group_size_requested"] == 128
    assert any("used 32" in n for n in info.notes)
    t = _tensors(out)
    k = "model.layers.0.mlp.down_proj.weight_packed"
    assert t[k].shape == (32, 64 // 4)  # four 8-bit values per int32
    rt = gptq.load(out, {})
    try:
        assert len(rt.generate([2, 10, 20], 4, ignore_eos=True)) == 4
    finally:
        rt.close()


def test_bad_options_fail_with_one_line(tmp_path, tiny_model_dir):
    from edgedistill.compress import gptq

    with pytest.raises(UserError, match="unknown option 'groupsize'"):
        gptq.build(tiny_model_dir, parse_formats("gptq:int4:groupsize=64")[0], tmp_path, ["x"], tmp_path / "w")
    with pytest.raises(UserError, match="group_size must be an integer"):
        gptq.build(tiny_model_dir, parse_formats("gptq:int4:group_size=big")[0], tmp_path, ["x"], tmp_path / "w")
    with pytest.raises(UserError, match="needs calibration texts"):
        gptq.build(tiny_model_dir, parse_formats("gptq:int4")[0], tmp_path, [], tmp_path / "w")
    # explicit group size that does not divide the widths: the worker's reason, in one line
    out = tmp_path / "o"
    out.mkdir()
    with pytest.raises(UserError, match=r"group size 128 does not divide .*group_size=32"):
        gptq.build(tiny_model_dir, parse_formats("gptq:int4:group_size=128")[0], out, _calib_texts()[:2], tmp_path / "w")


def test_load_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    pytest.importorskip("compressed_tensors")
    from edgedistill.compress import gptq

    with pytest.raises(UserError, match="not a loadable compressed-tensors checkpoint"):
        gptq.load(tmp_path, {})
