"""restaurant8k (PolyAI, CC BY 4.0) as edgedistill rows: each utterance with its slots as a JSON object.

The shared files (``../shared/data/restaurant8k/{train,dev}.json``) hold utterances with character
spans per slot (``labels[].valueSpan``, ``startIndex`` absent when it is 0, protobuf-JSON style).
:func:`slot_object` turns one into the extraction answer: ``{slot: the span's text}`` for the slots
present, ``{}`` when the utterance has none. :func:`read_split` gives rows ``{"text", "slots",
"requested", "input"}``: ``requested`` is the slots the booking system had just asked for (the
dialogue context) and ``input`` the model's input, the utterance alone or, where the system had
asked, the conversation of its question (an assistant turn, :data:`QUESTIONS`) and the utterance
("8" answers "What time would you like the table?" with a time, not a party size).
:func:`write_jsonl` writes them as JSONL that a task spec reads (``input_field: input``,
``output_field: slots``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SLOTS = ("date", "first_name", "last_name", "people", "time")
# What the booking system asks for the slots it requests (restaurant8k gives the slots, not the words).
QUESTIONS = {
    "date": "What date would you like to book for?",
    "time": "What time would you like the table?",
    "people": "How many people will be joining you?",
    "first_name": "What name should I put the booking under?",
    "last_name": "What name should I put the booking under?",
}


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


def model_input(text: str, requested: list[str]) -> str | list[dict[str, str]]:
    """The utterance, or the conversation of the system's question for the requested slots and it."""
    asked = list(dict.fromkeys(QUESTIONS[s] for s in requested if s in QUESTIONS))
    return [{"role": "assistant", "content": " ".join(asked)}, {"role": "user", "content": text}] if asked else text


def read_split(split: str) -> list[dict[str, Any]]:
    """One split (``train`` or ``dev``) as rows ``{"text", "slots", "requested", "input"}``, in file order."""
    path = data_root() / "restaurant8k" / f"{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; set EDGEDISTILL_DATA to the folder holding restaurant8k/")
    rows = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for r in rows:
        text = r["userInput"]["text"].strip()
        if text:
            requested = list(dict.fromkeys((r.get("context") or {}).get("requestedSlots") or []))
            out.append({"text": text, "slots": slot_object(r), "requested": requested, "input": model_input(text, requested)})
    return out


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write rows as JSON Lines (atomically: a killed run never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path
