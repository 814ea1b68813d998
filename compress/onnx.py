"""ONNX artifacts (``onnx:fp32|int8|int4``) that onnxruntime-genai loads: decoder with KV cache,
``genai_config.json``, tokenizer files.

Route, decided by trying both on this machine (onnxruntime-genai 0.18, transformers 5.23, torch 2.13 CPU):

- **Export: onnxruntime-genai's model builder** (``python -m onnxruntime_genai.models.builder``, HF
  folder -> ONNX). It runs in our own environment (it imports transformers 5.x model classes, so it
  needs no venv of its own) and writes exactly what onnxruntime-genai loads: GroupQueryAttention with
  past/present KV inputs, a ``genai_config.json`` and the tokenizer files. The fp32 export of a tiny
  Llama reproduces transformers' greedy tokens exactly (tests/test_compress_onnx.py). optimum-onnx
  was not used: it pins transformers<4.58 (a separate venv and a second torch) and writes a plain
  ``past_key_values`` graph without the genai config. The builder runs as a subprocess (its prints
  and memory stay out of ours, log in ``work``); its fp32 export is cached in ``work`` keyed by the
  hash of the source's files, so int8 and int4 quantize the same export and torch runs once.
- **INT4: GPTQ calibrated on ``calib``** into ``MatMulNBits`` (4 bits, block 32, asymmetric). The
  Hessians come from one onnxruntime pass per calibration text over the fp32 export (every MatMul
  input is an extra graph output of that pass). Measured on SmolLM2-135M, 128 train-split BANKING77
  texts to calibrate, 64 dev-split texts to compare with fp32 (teacher-forced, every position):
  GPTQ KL 0.12 / top-1 agreement 0.85, RTN 0.49 / 0.64, the builder's own ``-p int4`` (RTN,
  symmetric) 0.46 / 0.71. GPTQ took 45 s for the 6-layer demo-sized student (49.6M) and 4 min for
  SmolLM2-135M on 2 busy cores. onnxruntime's ``GPTQWeightOnlyQuantConfig`` was tried first and
  dropped: it runs a full forward per MatMul input per sample (121 x 64 forwards for SmolLM2-135M,
  still running after 10 CPU-minutes) and re-quantizes GPTQ's fake-quantized weights on a fresh min/max
  grid (with symmetric scales that grid is off by 15/16 or 16/15). Without calibration texts: RTN,
  and the artifact says so.
- **INT8: RTN** (round to nearest) into ``MatMulNBits`` with 8 bits, block 32, asymmetric: the
  builder's ``-p int8`` method; near-lossless already (KL 0.006 to fp32 on the test above), so
  calibration would buy nothing measurable (``onnx:int8:method=gptq`` runs it anyway).
- The tied embedding reads the quantized LM head through ``GatherBlockQuantized`` (4 or 8 bits), as
  the builder's own int4 does; an untied one is quantized on its own with RTN.
- ``accuracy_level=4`` (int8 activations in MatMulNBits, the builder's CPU default): on 2 cores,
  SmolLM2-135M decodes at 46 (int8) / 63 (int4) tokens/s with it, 2 / 41 without it (fp32: 17).

The quantizers are numpy code here (GPTQ as in Frantar et al. 2022, per-group asymmetric scales with
error feedback), writing the MatMulNBits layout onnxruntime documents (com.microsoft opset).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from edgedistill.compress import onnx_gptq, toolenv
from edgedistill.compress.formats import Built, FormatSpec
from edgedistill.runtimes.onnx import OnnxGenaiRuntime

from edgedistill.errors import UserError
from edgedistill.manifest import sha256_file

MODEL = onnx_gptq.MODEL
DATA = "model.onnx.data"
DEFAULT_BLOCK = 32
DEFAULT_ACCURACY_LEVEL = 4  # MatMulNBits on CPU: int8 activations (the builder's CPU default)
CALIB_MAX_TOKENS = 512
GPTQ_DAMP = 0.01
GPTQ_BLOCK = 128
OPTIONS = {"block_size", "accuracy_level", "method"}


# --- build ------------------------------------------------------------------------------------


def build(src: Path, fmt: FormatSpec, out: Path, calib: list[str], work: Path) -> Built:
    """Export ``src`` (HF Llama-family checkpoint) to ONNX for onnxruntime-genai, quantized per ``fmt.variant``."""
    src, out, work = Path(src), Path(out), Path(work)
    missing = [m for m in ("onnx", "onnxruntime", "onnxruntime_genai") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"ONNX artifacts need {', '.join(missing)}: pip install 'edgedistill[onnx]'")
    _check_checkpoint(src)
    opts = _options(fmt)
    started = time.perf_counter()
    fp32, reused = export_fp32(src, work)
    settings: dict[str, Any] = {"exporter": "onnxruntime_genai.models.builder -p fp32 -e cpu", "source_key": fp32.name.rsplit("-", 1)[-1]}
    notes = ["fp32 export reused from this run's work folder (same source files)" if reused else "fp32 export made by the model builder"]
    out.mkdir(parents=True, exist_ok=True)
    _copy_processing_files(fp32, out)
    if fmt.variant == "fp32":
        for name in (MODEL, DATA):
            if (fp32 / name).exists():
                shutil.copy2(fp32 / name, out / name)  # not a hard link: onnx refuses to load those
        method = "onnxruntime-genai model builder, fp32 (no quantization)"
    else:
        method = _build_quantized(fp32, out, fmt.bits, opts, calib, src, settings, notes)
    settings["build_s"] = round(time.perf_counter() - started, 1)
    return Built(model_file=".", method=method, tools=_tools(), settings=settings, notes=notes)


def _build_quantized(fp32: Path, out: Path, bits: int, opts: dict[str, Any], calib: list[str], src: Path,
                     settings: dict[str, Any], notes: list[str]) -> str:
    texts = [t for t in calib if t and t.strip()]
    use_gptq = opts["method"] == "gptq" and bool(texts)
    if opts["method"] == "gptq" and not texts:
        notes.append(f"no calibration texts were given: INT{bits} fell back to RTN (uncalibrated)")
    t0 = time.perf_counter()
    report = quantize(fp32, out, bits=bits, block=opts["block_size"], accuracy_level=opts["accuracy_level"],
                      calib=texts if use_gptq else None, tokenizer_dir=src)
    settings.update(
        bits=bits, block_size=opts["block_size"], accuracy_level=opts["accuracy_level"], symmetric=False,
        algorithm="gptq" if use_gptq else "rtn", quantized_matmuls=report["matmuls"], embedding=report["embedding"],
        quantize_s=round(time.perf_counter() - t0, 1),
    )
    notes.extend(report["notes"])
    if not use_gptq:
        return f"RTN INT{bits} (block {opts['block_size']}, asymmetric), MatMulNBits"
    settings.update(calibration_samples=report["samples"], calibration_tokens=report["tokens"],
                    calibration_max_tokens=CALIB_MAX_TOKENS, gptq_damp=GPTQ_DAMP, gptq_block=GPTQ_BLOCK)
    return f"GPTQ INT{bits} (block {opts['block_size']}, asymmetric) calibrated on {report['samples']} task texts, MatMulNBits"


def _tools() -> dict[str, str]:
    out = {}
    for pkg in ("onnxruntime-genai", "onnxruntime", "onnx", "transformers", "torch", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _options(fmt: FormatSpec) -> dict[str, Any]:
    unknown = sorted({k for k, _ in fmt.options} - OPTIONS)
    if unknown:
        raise UserError(f"--formats {fmt}: unknown option {unknown[0]!r}; ONNX takes {', '.join(sorted(OPTIONS))}")
    try:
        block = int(fmt.option("block_size", str(DEFAULT_BLOCK)))
        level = int(fmt.option("accuracy_level", str(DEFAULT_ACCURACY_LEVEL)))
    except ValueError:
        raise UserError(f"--formats {fmt}: block_size and accuracy_level must be integers") from None
    if block not in (16, 32, 64, 128, 256):
        raise UserError(f"--formats {fmt}: block_size must be one of 16, 32, 64, 128, 256 (MatMulNBits)")
    if level not in (0, 1, 2, 3, 4):
        raise UserError(f"--formats {fmt}: accuracy_level must be 0-4 (4 = int8 activations on CPU)")
    method = fmt.option("method", "gptq" if fmt.bits == 4 else "rtn")
    if method not in ("gptq", "rtn"):
        raise UserError(f"--formats {fmt}: method must be gptq or rtn")
    return {"block_size": block, "accuracy_level": level, "method": method}


def _check_checkpoint(src: Path) -> None:
    cfg_path = src / "config.json"
    if not src.is_dir() or not cfg_path.is_file():
        raise UserError(f"{src} is not an HF checkpoint folder (no config.json); pass the distill run's student/ folder")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_path} is not valid JSON ({e}); the checkpoint is damaged, re-run distill") from None
    if not isinstance(cfg, dict) or not cfg.get("architectures"):
        raise UserError(f"{cfg_path} names no architectures; the ONNX model builder needs e.g. LlamaForCausalLM")
    if not any(src.glob("*.safetensors")) and not any(src.glob("*.bin")):
        raise UserError(f"{src} has no weights (*.safetensors / *.bin); the checkpoint is incomplete")
    if not (src / "tokenizer.json").is_file() and not (src / "tokenizer.model").is_file():
        raise UserError(f"{src} has no tokenizer (tokenizer.json); onnxruntime-genai needs one beside the model")


# --- the fp32 export (cached) -----------------------------------------------------------------


def source_key(src: Path) -> str:
    """Hash of the checkpoint's files and the builder's version: an export is reused only for the same both."""
    h = hashlib.sha256()
    h.update(_tools().get("onnxruntime-genai", "?").encode())
    for p in sorted(q for q in src.rglob("*") if q.is_file() and not q.name.startswith(".")):
        h.update(str(p.relative_to(src)).encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()[:16]


def export_fp32(src: Path, work: Path) -> tuple[Path, bool]:
    """The builder's fp32 export of ``src`` in ``work`` (made once per source); True when reused."""
    folder = work / f"onnx-fp32-{source_key(src)}"
    if (folder / ".complete").is_file():
        return folder, True
    tmp = work / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(tmp), "-p", "fp32",
           "-e", "cpu", "-c", str(work / "onnx-builder-cache"), "--extra_options", "hf_token=false"]
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        toolenv.run_tool(cmd, log_path=work / "onnx-builder.log", what=f"exporting {src} to ONNX (onnxruntime-genai model builder)", env=env)
        if not (tmp / MODEL).is_file() or not (tmp / "genai_config.json").is_file():
            raise UserError(f"the ONNX model builder wrote no {MODEL}/genai_config.json for {src}; see {work / 'onnx-builder.log'}")
        (tmp / ".complete").write_text(str(src) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, False


def _copy_processing_files(fp32: Path, out: Path) -> None:
    for p in fp32.iterdir():
        if p.is_file() and p.name not in (MODEL, DATA) and not p.name.startswith("."):
            shutil.copy2(p, out / p.name)


# --- quantization -----------------------------------------------------------------------------


def quantize(fp32: Path, out: Path, *, bits: int, block: int, accuracy_level: int, calib: list[str] | None,
             tokenizer_dir: Path) -> dict[str, Any]:
    """Quantize every MatMul with a constant 2-D weight of the fp32 export into MatMulNBits (GPTQ when calib)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(fp32 / MODEL))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    targets = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2]
    if not targets:
        raise UserError(f"{fp32 / MODEL} has no MatMul with constant weights to quantize; is it a builder export?")
    report: dict[str, Any] = {"matmuls": len(targets), "notes": [], "samples": 0, "tokens": 0}
    hessians: dict[str, np.ndarray] = {}
    if calib:
        hessians, report["samples"], report["tokens"] = onnx_gptq.hessians(fp32, targets, calib, tokenizer_dir)
    quantized: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, int]] = {}  # weight name -> packed, scales, zp, K
    hinvs: dict[str, np.ndarray] = {}  # per MatMul input: gate/up (and fused qkv) share one
    new_nodes = {}  # by output name (unique in a graph)
    for node in targets:
        if node.input[1] not in quantized:
            w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)  # [K, N]
            if node.input[0] in hessians:
                if node.input[0] not in hinvs:
                    hinvs[node.input[0]] = onnx_gptq.inverse_cholesky(onnx_gptq.padded_hessian(hessians.pop(node.input[0]), block))
                codes, scales, zeros = onnx_gptq.gptq(w.T, hinvs[node.input[0]], bits, block)
            else:
                codes, scales, zeros = onnx_gptq.rtn(w.T, bits, block)
            quantized[node.input[1]] = (*onnx_gptq.pack(codes, zeros, bits, block), scales, w.shape[0])
        new_nodes[node.output[0]] = _matmul_nbits(node, quantized[node.input[1]], bits, block, accuracy_level)
    for name, (packed, zp, scales, _) in quantized.items():
        graph.initializer.extend([
            numpy_helper.from_array(packed, f"{name}_Q{bits}"),
            numpy_helper.from_array(scales, f"{name}_scales"),
            numpy_helper.from_array(zp, f"{name}_zp"),
        ])
    nodes = [new_nodes.get(n.output[0], n) for n in graph.node]
    report["embedding"] = _quantize_embedding(graph, nodes, quantized, bits, block)
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    _drop_unused_initializers(graph)
    if report["embedding"] == "fp32":
        report["notes"].append(f"the token embedding stays fp32 (none found to quantize, or its width is not a multiple of {block})")
    out.mkdir(parents=True, exist_ok=True)
    for p in (out / MODEL, out / DATA):
        p.unlink(missing_ok=True)
    onnx.save(model, str(out / MODEL), save_as_external_data=True, all_tensors_to_one_file=True, location=DATA, size_threshold=1024)
    return report


def _matmul_nbits(node, q, bits: int, block: int, accuracy_level: int):
    import onnx

    packed, _, _, k = q
    w = node.input[1]
    attrs = {"K": k, "N": packed.shape[0], "bits": bits, "block_size": block}
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    return onnx.helper.make_node(
        "MatMulNBits", [node.input[0], f"{w}_Q{bits}", f"{w}_scales", f"{w}_zp"], list(node.output),
        name=f"{node.name}_Q{bits}", domain="com.microsoft", **attrs,
    )


def _quantize_embedding(graph, nodes: list, quantized: dict, bits: int, block: int) -> str:
    """The token embedding as GatherBlockQuantized: tied (Transpose(lm_head weight) -> Gather) reads the
    quantized LM head, as the builder's own int4 does; an embedding table of its own is quantized with RTN."""
    import onnx
    from onnx import numpy_helper

    producers = {o: n for n in nodes for o in n.output}
    inits = {t.name: t for t in graph.initializer}
    for i, node in enumerate(nodes):
        if node.op_type != "Gather":
            continue
        tr = producers.get(node.input[0])
        if tr is not None and tr.op_type == "Transpose" and tr.input[0] in quantized:
            name, kind = tr.input[0], f"tied to the INT{bits} LM head"
        elif node.input[0] in inits and len(inits[node.input[0]].dims) == 2 and inits[node.input[0]].data_type == onnx.TensorProto.FLOAT:
            name, kind, tr = node.input[0], f"INT{bits} RTN", None
            table = numpy_helper.to_array(inits[name])
            if table.shape[1] % block:
                return "fp32"
            codes, scales, zeros = onnx_gptq.rtn(table, bits, block)
            quantized[name] = (*onnx_gptq.pack(codes, zeros, bits, block), scales, table.shape[1])
            packed, zp, scales, _ = quantized[name]
            graph.initializer.extend([numpy_helper.from_array(packed, f"{name}_Q{bits}"), numpy_helper.from_array(scales, f"{name}_scales"),
                                      numpy_helper.from_array(zp, f"{name}_zp")])
        else:
            continue
        packed, _, _, k = quantized[name]
        if k % block:  # padded rows would need a Slice after the gather; keep such an embedding fp32
            if tr is not None:
                emb = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(inits[name]).T), f"{name}_embedding")
                graph.initializer.append(emb)
                nodes[i] = onnx.helper.make_node("Gather", [emb.name, node.input[1]], list(node.output), name=node.name)
                nodes.remove(tr)
            return "fp32"
        shape = numpy_helper.from_array(np.array([packed.shape[0], k * bits // 8], np.int64), f"{name}_Q{bits}_2d_shape")
        graph.initializer.append(shape)
        flat = f"{name}_Q{bits}_2d"
        reshape = onnx.helper.make_node("Reshape", [f"{name}_Q{bits}", shape.name], [flat], name=f"{node.name}_Reshape")
        gbq = onnx.helper.make_node(
            "GatherBlockQuantized", [flat, node.input[1], f"{name}_scales", f"{name}_zp"], list(node.output),
            name=f"{node.name}BlockQuantized", domain="com.microsoft", bits=bits, block_size=block, gather_axis=0, quantize_axis=1,
        )
        nodes[i : i + 1] = [reshape, gbq]
        if tr is not None:
            nodes.remove(tr)
        return f"{kind} (GatherBlockQuantized)"
    return "fp32"


def _drop_unused_initializers(graph) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


# --- load -------------------------------------------------------------------------------------


def load(folder: Path, manifest: dict) -> OnnxGenaiRuntime:
    """Open an ONNX artifact with onnxruntime-genai (``manifest`` is not needed: genai_config.json says it all)."""
    return OnnxGenaiRuntime(Path(folder) / (manifest.get("model_file") or "."))
