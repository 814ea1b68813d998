"""One training step with and without the shared prefix (``distill.shared_prefix``).

A batch of a task's rows (``--data`` JSONL ``{input, output}``, rendered as training renders them:
``Task.student_messages`` and ``Task.format_answer``) goes through ``DistillTrainer.compute_loss``
and its backward pass, once with the rows' common prefix (the system turn) run once and once as the
plain full pass; the two alternate for ``--rounds`` rounds (the first of each is a warm-up and not
counted); every figure is the best and the median. The losses are printed too: they agree up to
float rounding. A benchmark, not a test; it lives in distill because it times distill's own trainer
(bench measures served endpoints and imports no stage's internals).

    python -m edgedistill.distill.step_benchmark --spec examples/restaurant8k-tools/task.yaml \\
        --model runs/restaurant8k-tools/student --data runs/restaurant8k-tools/data/train.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True, help="an HF checkpoint folder (the student or the teacher)")
    ap.add_argument("--data", type=Path, required=True, help="JSONL rows {input, output}, e.g. a run's data/train.jsonl")
    ap.add_argument("--rows", type=int, default=16, help="the batch (training.batch_size)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--precision", choices=["auto", "bf16", "float32"], default="auto")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    import torch
    from edgedistill.distill.encode import Collator, encode_example
    from edgedistill.distill.precision import fast_bf16
    from edgedistill.distill.shared_prefix import common_prefix_len
    from edgedistill.distill.train import DistillTrainer
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from edgedistill.spec import load_spec

    spec = load_spec(args.spec)
    tok = AutoTokenizer.from_pretrained(args.model)
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()][: args.rows]
    enc = [encode_example(tok, spec.task.student_messages(r["input"]), spec.task.format_answer(r["output"]), args.max_length) for r in rows]
    batch = Collator(tok.pad_token_id)(enc)
    bf16 = fast_bf16() if args.precision == "auto" else args.precision == "bf16"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).train()
    trainer = DistillTrainer(model=model, args=TrainingArguments(output_dir="/tmp/edgedistill-train-step", use_cpu=True, report_to="none"))
    times: dict[str, list[float]] = {"shared": [], "full": []}
    losses: dict[str, float] = {}
    for r in range(args.rounds + 1):
        for mode in ("shared", "full") if r % 2 == 0 else ("full", "shared"):
            trainer._share_prefix = mode == "shared"
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
                loss = trainer.compute_loss(model, dict(batch))
            loss.backward()
            model.zero_grad(set_to_none=True)
            if r:  # round 0 warms up
                times[mode].append(time.perf_counter() - t)
            losses[mode] = float(loss.detach())
    out = {
        "model": str(args.model),
        "params": sum(p.numel() for p in model.parameters()),
        "rows": len(enc),
        "padded_length": int(batch["input_ids"].shape[1]),
        "common_prefix_tokens": common_prefix_len(batch["input_ids"], batch["attention_mask"]),
        "answer_tokens": int((batch["labels"] != -100).sum()),
        "precision": "bf16" if bf16 else "float32",
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        **{f"{m}_s": {"best": min(v), "median": statistics.median(v)} for m, v in times.items()},
        "speedup_median": statistics.median(times["full"]) / statistics.median(times["shared"]),
        "loss": losses,
    }
    print(json.dumps(out, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
