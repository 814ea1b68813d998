"""GPTQ worker: runs inside the gptq tool venv (llm-compressor), never imported by edgedistill.

    python gptq_worker.py --src CKPT --out DIR --calib calib.jsonl --bits 4 --group-size 128 --seed 0 --report r.json

Reads the calibration texts (one JSON object with a ``text`` field per line, already chat-rendered),
tokenizes them with the checkpoint's own tokenizer (no extra special tokens: the template holds
them), runs llm-compressor's ``oneshot`` with one ``GPTQModifier`` (symmetric INT weights, one
scale per ``group_size`` input columns, activations untouched, ``lm_head`` kept in full
precision), and saves the compressed-tensors checkpoint (``pack-quantized``: the INT4/INT8 values
packed into int32 words, plus scales) with the tokenizer into ``--out``. A JSON report of what
happened goes to ``--report``. Only the standard library and the venv's packages are used.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--calib", type=Path, required=True)
    ap.add_argument("--bits", type=int, default=4, choices=(4, 8))
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--auto-group", action="store_true", help="fall back to the largest group size that divides every width")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--dampening", type=float, default=0.01)
    ap.add_argument(
        "--dtype", default="float16", choices=("float16", "bfloat16", "float32"), help="of the unquantized tensors and scales"
    )
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--report", type=Path, required=True)
    a = ap.parse_args(argv)

    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(a.src)
    model = AutoModelForCausalLM.from_pretrained(a.src, dtype="auto")
    model.eval()

    # group quantization needs every quantized layer's input width to be a multiple of the group
    # (compressed-tensors and vLLM's kernels refuse a ragged last group)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}
    widths = sorted({m.in_features for m in linears.values()})
    group_size = a.group_size
    if any(w % group_size for w in widths):
        fallback = _largest_divisor(widths, group_size)
        if not a.auto_group or fallback is None:
            hint = f"e.g. gptq:int{a.bits}:group_size={fallback}" if fallback else "this model has no power-of-two group size"
            return _fail(
                a.report, f"group size {group_size} does not divide the input widths of the linear layers {widths}; {hint}"
            )
        group_size = fallback

    texts = [json.loads(line)["text"] for line in a.calib.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        return _fail(a.report, f"{a.calib}: no calibration texts")
    enc = [tok(t, add_special_tokens=False, truncation=True, max_length=a.max_seq_len) for t in texts]
    ds = Dataset.from_dict({"input_ids": [e["input_ids"] for e in enc], "attention_mask": [e["attention_mask"] for e in enc]})
    n_tokens = sum(len(e["input_ids"]) for e in enc)

    weights = QuantizationArgs(num_bits=a.bits, type="int", symmetric=True, strategy="group", group_size=group_size)
    recipe = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=["lm_head"],
        dampening_frac=a.dampening,
    )
    t1 = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=tok,
        dataset=ds,
        recipe=recipe,
        num_calibration_samples=len(texts),
        max_seq_length=a.max_seq_len,
        shuffle_calibration_samples=False,  # the caller already sampled (seeded) the rows
    )
    t2 = time.perf_counter()
    # calibrate in the checkpoint's precision, store scales and the unquantized tensors (embeddings,
    # norms) in 16 bits: what vLLM's INT4 kernels compute in, and half the size of float32
    model.to(getattr(torch, a.dtype))
    a.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(a.out, save_compressed=True)
    tok.save_pretrained(a.out)
    report = {
        "ok": True,
        "bits": a.bits,
        "group_size": group_size,
        "group_size_requested": a.group_size,
        "input_widths": widths,
        "n_samples": len(texts),
        "n_tokens": n_tokens,
        "max_seq_len": a.max_seq_len,
        "dampening_frac": a.dampening,
        "dtype": a.dtype,
        "quantized_layers": len(linears),
        "rtn_fallback_layers": list(getattr(recipe, "_rtn_fallback_module_names", []) or []),
        "load_s": round(t1 - t0, 2),
        "quantize_s": round(t2 - t1, 2),
        "save_s": round(time.perf_counter() - t2, 2),
        "quantization_config": json.loads((a.out / "config.json").read_text()).get("quantization_config"),
    }
    a.report.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def _largest_divisor(widths: list[int], below: int) -> int | None:
    """The largest power-of-two group size (>= 16, <= ``below``) that divides every width."""
    g = 1 << (below.bit_length() - 1)
    while g >= 16:
        if all(w % g == 0 for w in widths):
            return g
        g //= 2
    return None


def _fail(report: Path, message: str) -> int:
    report.write_text(json.dumps({"ok": False, "error": message}) + "\n")
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
