"""Ask a served model for the task's calls the way any OpenAI client would, and score its tool_calls.

Run:  edgedistill serve runs/restaurant8k-tools/artifacts/gguf-q4_k_m --port 8000 &
      python examples/restaurant8k-tools/ask.py --base-url http://127.0.0.1:8000/v1 --rows 50

Each test row is sent as ``client.chat.completions.create(messages=[system: the task's instructions,
*the conversation], tools=<the spec's tools>, tool_choice="required")`` with the unmodified
``openai`` client; the first of ``message.tool_calls`` is the answer (``{"name", "arguments"}``),
scored with the task's metrics (exact_match, name_accuracy, argument_f1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from openai import OpenAI

from edgedistill.spec import load_spec

HERE = Path(__file__).resolve().parent


def ask(client: OpenAI, model: str, spec, conversation) -> dict | None:
    """The model's call for one input (a text or a conversation), or None when it made none."""
    turns = [{"role": "user", "content": conversation}] if isinstance(conversation, str) else conversation
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": spec.instructions.strip()}, *turns],
        tools=spec.tools,
        tool_choice=spec.tool_choice,
        temperature=0,
    )
    calls = r.choices[0].message.tool_calls
    if not calls:
        return None
    return {"name": calls[0].function.name, "arguments": json.loads(calls[0].function.arguments)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", type=Path, default=HERE / "task.yaml")
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--rows", type=int, default=50, help="the first N test rows")
    args = ap.parse_args()
    spec = load_spec(args.spec)
    client = OpenAI(base_url=args.base_url, api_key="unused")
    model = client.models.list().data[0].id
    rows = spec.load_test_set()[: args.rows]
    preds = []
    for i, r in enumerate(rows, 1):
        preds.append(ask(client, model, spec, r.input))
        print(f"{i}/{len(rows)}: {json.dumps(preds[-1])}  (gold {json.dumps(r.output)})", file=sys.stderr, flush=True)
    scores = spec.task.scores([r.output for r in rows], preds)
    print(json.dumps({k: scores[k] for k in ("exact_match", "name_accuracy", "argument_f1", "n") if k in scores}))


if __name__ == "__main__":
    main()
