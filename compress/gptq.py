"""GPTQ artifacts: INT4 (or INT8) weights calibrated on the task's own data, saved as a
compressed-tensors checkpoint that vLLM serves and transformers loads.

Why llm-compressor (and its compressed-tensors format), not GPTQModel:

- **Where the artifact runs.** llm-compressor is the vLLM project's own quantizer; its output
  (``quant_method: compressed-tensors``, ``format: pack-quantized``, scheme W4A16) is what vLLM's
  INT4 kernels are written for, and transformers loads it with the small pure-Python
  ``compressed-tensors`` package, which installs into our main environment (torch 2.13 CPU,
  transformers 5.23) next to everything else (``pip install 'edgedistill[hf]'``). A GPTQModel
  checkpoint (GPTQ v1 layout: qweight/qzeros/g_idx) loads in vLLM too, but transformers then needs
  ``optimum`` and ``gptqmodel`` installed at *load* time, and gptqmodel cannot live in our
  environment (below).
- **Installing it.** llm-compressor 0.14 is a pure-Python wheel that runs GPTQ on CPU with the CPU
  torch we already pin. GPTQModel 7.7 is source-only on PyPI (a compile step on every machine) and
  needs torch>=2.14.1 and transformers>=5.20: the only torch 2.14.1 on hand is a 5.5 GB CUDA build,
  for a step that runs fine on CPU. auto-gptq, the older option, is unmaintained (last release
  March 2024, CUDA kernels for torch 2.2).
- **The cost.** llm-compressor 0.14 pins transformers 5.15-5.17 and compressed-tensors 0.19, so it
  cannot share our environment (transformers 5.23); like llama.cpp's converter it gets its own
  virtual environment (``edgedistill.compress.toolenv``, created on first use, ~1.5 min and 1.5 GB here; or
  ahead of time with ``make gptq-env``) and runs as a subprocess (``compress/gptq_worker.py``).
  Only *making* the artifact needs it; loading it needs compressed-tensors >= 0.10 in the main
  environment (0.20 tested with transformers 5.23 and torch 2.13).

The recipe: one ``GPTQModifier`` on every ``Linear`` except ``lm_head`` (and so the tied
embeddings), symmetric INT weights with one scale per ``group_size`` input columns (128 unless set
with ``gptq:int4:group_size=64``; when unset and 128 does not divide a layer's width, e.g. the 576
of SmolLM2-135M, the largest power of two that does, noted in the manifest), static activation
ordering, activations left in 16 bits (W4A16 / W8A16). Scales and the unquantized tensors are saved
in float16 (``dtype=bfloat16|float32`` to change). On CPU, transformers dequantizes the weights to
dense float32 on load (``dequantize=True``): the quality gate then measures exactly the
quantized values, but not INT4 speed or memory, which need vLLM on a GPU.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

from edgedistill.compress import toolenv
from edgedistill.compress.formats import Built, FormatSpec
from edgedistill.runtimes.hf import HFRuntime

from edgedistill.errors import UserError

REQUIREMENTS = [toolenv.TORCH_CPU, "transformers==5.17.0", "llmcompressor==0.14.0.1", "compressed-tensors==0.19.0"]
TOOL_PACKAGES = ["llmcompressor", "compressed-tensors", "transformers", "torch"]
WORKER = Path(__file__).with_name("gptq_worker.py")
DEFAULT_GROUP_SIZE = 128
OPTIONS = {"group_size", "dtype", "max_seq_len"}
DTYPES = ("float16", "bfloat16", "float32")
SEED = 0
# GPTQ on CPU is a Python loop over weight columns of small torch ops: more threads only add
# synchronisation (measured on 2 cores, hidden 576 / 1536: 1 thread 10.7 s, 2 threads 75 s)
THREADS = 1


def tool_python() -> Path:
    """The python of the llm-compressor venv (created on first use)."""
    return toolenv.ensure_venv("gptq", REQUIREMENTS)


def prepare() -> None:
    """Make the llm-compressor venv now (``edgedistill run`` does this in the background while it distills)."""
    tool_python()


def build(src: Path, fmt: FormatSpec, out: Path, calib: list[str], work: Path) -> Built:
    """Quantize the HF checkpoint ``src`` with GPTQ into the empty folder ``out`` (HF layout + tokenizer)."""
    bits = fmt.bits
    unknown = sorted(k for k, _ in fmt.options if k not in OPTIONS)
    if unknown:
        raise UserError(f"--formats {fmt}: unknown option {unknown[0]!r}; gptq takes {', '.join(sorted(OPTIONS))}")
    explicit = fmt.option("group_size") is not None
    group_size = _int_option(fmt, "group_size", DEFAULT_GROUP_SIZE, minimum=8)
    max_seq_len = _int_option(fmt, "max_seq_len", 512, minimum=16)
    dtype = fmt.option("dtype", "float16")
    if dtype not in DTYPES:
        raise UserError(f"--formats {fmt}: dtype must be one of {', '.join(DTYPES)}")
    texts = [t for t in calib if t.strip()]
    if not texts:
        raise UserError(f"{fmt}: GPTQ needs calibration texts; pass --calibration (the distill run's data/ folder)")

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    calib_file = work / f"gptq-{fmt.variant}-calibration.jsonl"
    calib_file.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    report_file = work / f"gptq-{fmt.variant}-report.json"
    report_file.unlink(missing_ok=True)
    log = work / f"gptq-{fmt.variant}.log"

    py = tool_python()
    cmd = [
        str(py), str(WORKER), "--src", str(src), "--out", str(out), "--calib", str(calib_file), "--bits", str(bits),
        "--group-size", str(group_size), "--seed", str(SEED), "--max-seq-len", str(max_seq_len), "--dtype", dtype,
        "--threads", str(THREADS), "--report", str(report_file),
    ]  # fmt: skip
    if not explicit:
        cmd.append("--auto-group")
    try:
        toolenv.run_tool(cmd, log_path=log, what=f"GPTQ {fmt}", env={"TOKENIZERS_PARALLELISM": "false"})
    except UserError:
        report = _read_report(report_file)
        if report and report.get("error"):  # the worker's own one-line reason beats the log's last line
            raise UserError(f"{fmt}: {report['error']}; full log: {log}") from None
        raise
    report = _read_report(report_file)
    if not report or not report.get("ok"):
        raise UserError(f"{fmt}: the GPTQ worker wrote no report; see {log}")

    g = report["group_size"]
    notes = []
    if g != group_size:
        notes.append(f"group size {group_size} does not divide the layer widths {report['input_widths']}; used {g}")
    if report.get("rtn_fallback_layers"):
        bad = report["rtn_fallback_layers"]
        notes.append(f"{len(bad)} layer(s) fell back to round-to-nearest (Hessian not invertible): {', '.join(bad[:5])}")
    notes.append(
        f"compressed-tensors W{bits}A16 checkpoint: for vLLM's INT{bits} kernels (GPU); transformers with compressed-tensors "
        "loads it dequantized to dense weights (the quality gate's numbers are the quantized model's, its speed is not INT4's)"
    )
    return Built(
        model_file=".",
        method=f"GPTQ (llm-compressor oneshot) W{bits}A16, symmetric INT{bits}, group size {g}, lm_head unquantized; "
        "compressed-tensors pack-quantized",
        tools=toolenv.package_versions(py, TOOL_PACKAGES),
        settings={
            "bits": bits,
            "group_size": g,
            "group_size_requested": group_size,
            "symmetric": True,
            "actorder": "static",
            "dampening_frac": report["dampening_frac"],
            "ignore": ["lm_head"],
            "n_calibration_samples": report["n_samples"],
            "calibration_tokens": report["n_tokens"],
            "max_seq_len": max_seq_len,
            "dtype": dtype,
            "checkpoint_format": "compressed-tensors pack-quantized",
            "quantized_layers": report["quantized_layers"],
            "quantize_s": report["quantize_s"],
            "threads": THREADS,
        },
        notes=notes,
    )


def load(folder: Path, manifest: dict[str, Any]) -> GPTQRuntime:
    """Open a GPTQ artifact with transformers + compressed-tensors (dequantized to float32 on CPU)."""
    return GPTQRuntime(Path(folder))


class GPTQRuntime(HFRuntime):
    """A compressed-tensors checkpoint, dequantized on load, decoded like the FP reference."""

    def __init__(self, folder: Path, *, device: str = "cpu"):
        torch, model_cls, ct_config = _import_hf()
        self._torch = torch
        self.device = device
        dtype = torch.float32 if device == "cpu" else torch.float16
        try:
            with warnings.catch_warnings():  # "the quantization_config from the model will be used": we only add dequantize
                warnings.filterwarnings("ignore", message=".*quantization_config.*", category=UserWarning)
                model = model_cls.from_pretrained(folder, dtype=dtype, quantization_config=dequantize_config(ct_config))
        except (OSError, ValueError) as e:
            raise UserError(
                f"{folder}: not a loadable compressed-tensors checkpoint ({str(e)[:200]}); rebuild the artifact"
            ) from None
        self._set_model(model.to(device).eval())


def _import_hf():
    try:
        import compressed_tensors  # noqa: F401
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils.quantization_config import CompressedTensorsConfig
    except ImportError as e:
        raise UserError(
            f"opening a GPTQ artifact needs transformers and compressed-tensors ({e.name} missing): pip install 'edgedistill[distill,hf]'"
        ) from None
    return torch, AutoModelForCausalLM, CompressedTensorsConfig


def dequantize_config(ct_config: Any) -> Any:
    """Ask transformers to dequantize on load (it has no INT4 kernels: a compressed layer would be
    decompressed on the first forward anyway); ``dequantize`` since transformers 5.x, ``run_compressed`` before."""
    import inspect

    if "dequantize" in inspect.signature(ct_config.__init__).parameters:
        return ct_config(dequantize=True)
    return ct_config(run_compressed=False)


def _int_option(fmt: FormatSpec, key: str, default: int, *, minimum: int) -> int:
    raw = fmt.option(key, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise UserError(f"--formats {fmt}: {key} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise UserError(f"--formats {fmt}: {key} must be at least {minimum}, got {value}")
    return value


def _read_report(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def main(argv: list[str] | None = None) -> int:
    """``python -m edgedistill.compress.gptq --prepare``: create the llm-compressor venv ahead of time (make gptq-env)."""
    import argparse
    import time

    ap = argparse.ArgumentParser(prog="python -m edgedistill.compress.gptq", description=main.__doc__)
    ap.add_argument("--prepare", action="store_true", help="create (or find) the GPTQ tool venv and print its versions")
    args = ap.parse_args(argv)
    if not args.prepare:
        ap.print_help()
        return 2
    t = time.perf_counter()
    try:
        py = tool_python()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    versions = toolenv.package_versions(py, TOOL_PACKAGES)
    print(f"GPTQ tool environment ready in {time.perf_counter() - t:.0f} s: {py.parent.parent}")
    print(", ".join(f"{k} {v}" for k, v in versions.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
