"""GPTQ (Frantar et al. 2022) and round-to-nearest weight quantization in numpy, for ONNX Runtime's
MatMulNBits: the Hessians of each quantized MatMul's input from ONNX Runtime passes over the task's
calibration texts, the column-by-column GPTQ update, and the documented packing of codes and zero
points. ``compress.onnx`` rewrites the graph with what these return.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from edgedistill.errors import UserError

MODEL = "model.onnx"  # the exported graph's file name (compress.onnx writes it)
CALIB_MAX_SAMPLES = 128
CALIB_MAX_TOKENS = 512
GPTQ_DAMP = 0.01
GPTQ_BLOCK = 128


def group_params(w: np.ndarray, maxq: int) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric per-row scale and zero point of w [N, g] (the range always holds 0, as in GPTQ)."""
    lo = np.minimum(w.min(axis=1), 0.0)
    hi = np.maximum(w.max(axis=1), 0.0)
    scale = (hi - lo) / maxq
    scale[scale == 0] = 1.0
    zero = np.clip(np.round(-lo / scale), 0, maxq)
    return scale, zero


def padded(w: np.ndarray, block: int) -> np.ndarray:
    pad = (-w.shape[1]) % block
    return np.pad(w, ((0, 0), (0, pad))) if pad else w


def rtn(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round to nearest, per block of ``block`` input features: w [N, K] -> codes [N, Kp], scales/zeros [N, Kp/block]."""
    maxq = 2**bits - 1
    w = padded(w.astype(np.float32), block)
    n, kp = w.shape
    g = w.reshape(n, kp // block, block)
    lo = np.minimum(g.min(axis=2), 0.0)
    hi = np.maximum(g.max(axis=2), 0.0)
    scale = (hi - lo) / maxq
    scale[scale == 0] = 1.0
    zero = np.clip(np.round(-lo / scale), 0, maxq)
    codes = np.clip(np.round(g / scale[..., None]) + zero[..., None], 0, maxq)
    return codes.reshape(n, kp).astype(np.uint8), scale.astype(np.float32), zero.astype(np.uint8)


def padded_hessian(h: np.ndarray, block: int) -> np.ndarray:
    """H grown to whole blocks; padded (and never-active) input features get a unit diagonal."""
    k = h.shape[0]
    kp = k + (-k) % block
    hp = np.zeros((kp, kp))
    hp[:k, :k] = h
    dead = np.diag(hp) == 0
    hp[dead, dead] = 1.0
    return hp


def gptq(w: np.ndarray, hinv: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ (Frantar et al. 2022): quantize the input features of w [N, K] one by one, pushing each rounding
    error onto the not-yet-quantized features through ``hinv``, the upper Cholesky factor of the inverse
    Hessian of the layer's inputs. float32, as the reference implementation."""
    maxq = 2**bits - 1
    w = padded(w.astype(np.float32), block).copy()
    n, kp = w.shape
    hinv = hinv.astype(np.float32)
    codes = np.zeros((n, kp), np.uint8)
    scales = np.zeros((n, kp // block), np.float32)
    zeros = np.zeros((n, kp // block), np.float32)
    scale = zero = None
    step = max(GPTQ_BLOCK, block)  # a quantization group never straddles two GPTQ blocks
    for i1 in range(0, kp, step):
        i2 = min(i1 + step, kp)
        w1 = w[:, i1:i2].copy()
        err = np.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % block == 0:
                scale, zero = group_params(w1[:, i : i + block], maxq)
                scales[:, col // block], zeros[:, col // block] = scale, zero
            q = np.clip(np.round(w1[:, i] / scale) + zero, 0, maxq)
            codes[:, col] = q
            e = (w1[:, i] - (q - zero) * scale) / h1[i, i]
            if i + 1 < i2 - i1:
                w1[:, i + 1 :] -= e[:, None] * h1[i, i + 1 :][None, :]
            err[:, i] = e
        if i2 < kp:
            w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return codes, scales, zeros.astype(np.uint8)


def inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor of H^-1 after dampening (more dampening if H is too ill-conditioned)."""
    damp = GPTQ_DAMP * float(np.mean(np.diag(h)))
    eye = np.eye(h.shape[0])
    for _ in range(6):
        try:
            return np.linalg.cholesky(np.linalg.inv((h + damp * eye).astype(np.float32))).T
        except np.linalg.LinAlgError:
            damp *= 10
    raise UserError("GPTQ: the calibration Hessian is singular even after dampening; pass more calibration texts or use method=rtn")


def pack(codes: np.ndarray, zeros: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits layout: B uint8 [N, k_blocks, block*bits/8] (low nibble first), zero points [N, ceil(k_blocks*bits/8)]."""
    n, kp = codes.shape
    kb = kp // block
    if bits == 8:
        return codes.reshape(n, kb, block), zeros
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8).reshape(n, kb, block // 2)
    if kb % 2:
        zeros = np.concatenate([zeros, np.full((n, 1), 8, np.uint8)], axis=1)
    zp = (zeros[:, 0::2] | (zeros[:, 1::2] << 4)).astype(np.uint8)
    return packed, zp


def hessians(fp32: Path, targets: list, texts: list[str], tokenizer_dir: Path) -> tuple[dict[str, np.ndarray], int, int]:
    """H = 2/n * sum x x^T of every quantized MatMul's input, from one onnxruntime pass per calibration text."""
    import onnx
    import onnxruntime as ort
    from transformers import AutoTokenizer

    names = sorted({n.input[0] for n in targets})
    probe = onnx.load(str(fp32 / MODEL), load_external_data=False)
    for name in names:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    path = fp32 / f".calib-{os.getpid()}.onnx"  # beside model.onnx.data, whose weights it reads
    onnx.save(probe, str(path))
    try:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    finally:
        path.unlink(missing_ok=True)
    cfg = json.loads((fp32 / "genai_config.json").read_text())["model"]["decoder"]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    sums: dict[str, np.ndarray] = {}
    held: dict[str, list[np.ndarray]] = {name: [] for name in names}
    samples = tokens = pending = 0

    def flush() -> None:  # one X^T X over several texts: skinny per-text products waste most of BLAS's time
        for name in names:
            if held[name]:
                x = np.concatenate(held[name])
                sums[name] = sums.get(name, 0.0) + (x.T @ x).astype(np.float64)  # float32 product, float64 sum
                held[name] = []

    for text in texts[:CALIB_MAX_SAMPLES]:
        ids = list(tok(text, add_special_tokens=False)["input_ids"])[:CALIB_MAX_TOKENS]
        if not ids:
            continue
        for name, x in zip(names, sess.run(names, feeds(sess, cfg, ids))):
            held[name].append(x.reshape(-1, x.shape[-1]))
        samples += 1
        tokens += len(ids)
        pending += len(ids)
        if pending >= 1024:
            flush()
            pending = 0
    flush()
    if not samples:
        raise UserError("GPTQ: every calibration text tokenized to nothing; check the calibration data")
    return {name: sums[name] * (2.0 / tokens) for name in names}, samples, tokens


def feeds(sess, cfg: dict, ids: list[int]) -> dict[str, np.ndarray]:
    """Inputs of the builder's decoder for one prompt with an empty KV cache."""
    x = np.array([ids], np.int64)
    feeds: dict[str, np.ndarray] = {}
    for inp in sess.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = x
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones_like(x)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.arange(len(ids), dtype=np.int64)[None]
        elif inp.name.startswith("past_key_values."):
            feeds[inp.name] = np.zeros((1, cfg["num_key_value_heads"], 0, cfg["head_size"]), np.float32)
        else:
            raise UserError(f"GPTQ calibration: the exported decoder has an input {inp.name!r} this version does not feed")
    return feeds


def threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
