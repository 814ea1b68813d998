"""restaurant8k (PolyAI, CC BY 4.0) as edgedistill rows: each utterance with its slots as a JSON object.

The shared files (``../shared/data/restaurant8k/{train,dev}.json``) hold utterances with character
spans per slot (``labels[].valueSpan``, ``startIndex`` absent when it is 0, protobuf-JSON style).
:func:`slot_object` turns one into the extraction answer: ``{slot: the span's text}`` for the slots
present, ``{}`` when the utterance has none. :func:`write_jsonl` writes a split as JSONL rows
``{"text", "slots", "requested"}`` that a task spec reads (``input_field: text``, ``output_field: slots``);
``requested`` is the slots the booking system had just asked for (the dialogue context), kept for
examples that use it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SLOTS = ("date", "first_name", "last_name", "people", "time")


def data_root() -> Path:
    """The shared data folder (``$EDGEDISTILL_DATA``, default ``../shared/data`` beside the repository)."""
    return Path(os.environ.get("EDGEDISTILL_DATA") or Path(__file__).resolve().parents[3] / "shared" / "data")


def slot_object(row: dict[str, Any]) -> dict[str, str]:
    """The slots of one restaurant8k row as ``{slot: text}`` (the span's characters, stripped)."""
    text = row["userInput"]["text"]
    out: dict[str, str] = {}
    for lab in row.get("labels") or []:
        span = lab["valueSpan"]
        value = text[int(span.get("startIndex", 0)) : int(span["endIndex"])].strip()
        if lab["slot"] in SLOTS and value:
            out[lab["slot"]] = value
    return out


def read_split(split: str) -> list[dict[str, Any]]:
    """One split (``train`` or ``dev``) as rows ``{"text", "slots", "requested"}``, in file order."""
    path = data_root() / "restaurant8k" / f"{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; set EDGEDISTILL_DATA to the folder holding restaurant8k/")
    rows = json.loads(path.read_text(encoding="utf-8"))
    return [
        {
            "text": r["userInput"]["text"].strip(),
            "slots": slot_object(r),
            "requested": list(dict.fromkeys((r.get("context") or {}).get("requestedSlots") or [])),
        }
        for r in rows
        if r["userInput"]["text"].strip()
    ]


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write rows as JSON Lines (atomically: a killed run never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path
