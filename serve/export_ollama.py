"""The Ollama bundle: a ``Modelfile`` (FROM the GGUF, SYSTEM the task's system prompt, TEMPLATE the
chat template in Ollama's Go-template syntax, the end tokens as stops, greedy, the context and the
answer budget), ``schema.json`` for a structured task (Ollama constrains per call, with ``format``)
and a README.

The TEMPLATE is written only where it is faithful: when the GGUF's own chat template renders every
conversation our server sends (a system message first) exactly as ChatML does
(``Source.chatml_faithful``), it becomes the ChatML Go template below; any other template is left
to Ollama (a comment in the Modelfile says so).

Ollama's chat (and, in current versions, generate) puts the Modelfile's SYSTEM first as a system
message when the request's first message is not one, and a template that ranges over ``.Messages``
sees it there, so the prompt is ours: ``<|im_start|>system\\n{SYSTEM}<|im_end|>\\n<|im_start|>user\\n...``.
"""

from __future__ import annotations

import json
import re

from edgedistill.serve.export import Bundle, Source

from edgedistill.errors import UserError

# ChatML in Ollama's Go template: each message as its role, then the generation prompt
CHATML_GO = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"


def model_name(name: str) -> str:
    """An Ollama model name for the artifact (lower case; letters, digits, ``._-``)."""
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._") or "student"


def write(src: Source) -> Bundle:
    task, system = src.task, src.system_prompt
    faithful, why = src.chatml_faithful()
    lines = [
        f"# Ollama Modelfile for {src.artifact.name}, made by `edgedistill export --to ollama` (see README.md and export.json).",
        f"#   ollama create {model_name(src.artifact.name)} -f Modelfile",
        f"FROM {src.model_ref}",
    ]
    if system is not None:
        lines.append(f'SYSTEM """{_triple_quoted(system, "SYSTEM")}"""')
    if faithful:
        lines.append(f'TEMPLATE """{CHATML_GO}"""')
    else:
        lines += [
            f"# TEMPLATE not written: {why}, and only ChatML is translated to Ollama's Go",
            "# template faithfully here. Ollama picks its own template for this GGUF (its match of the GGUF's",
            "# tokenizer.chat_template, else {{ .Prompt }}): compare `ollama show NAME --template` with it.",
        ]
    lines += [f'PARAMETER stop "{t}"' for t in src.end_tokens if '"' not in t and "\n" not in t]
    lines += ["PARAMETER temperature 0", f"PARAMETER num_ctx {src.ctx}"]
    if src.max_tokens:
        lines.append(f"PARAMETER num_predict {src.max_tokens}")
    files = {"Modelfile": "\n".join(lines) + "\n"}
    schema = task.answer_schema() if task is not None else None
    if schema is not None:
        files["schema.json"] = json.dumps(schema, indent=2, ensure_ascii=False) + "\n"
    files["README.md"] = _readme(src, faithful, why, schema is not None)
    return Bundle(files, {"chat_template": "chatml" if faithful else "ollama-default", "format": "schema.json" if schema else None})


def _triple_quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise UserError(f'the task\'s {what} text contains """, which a Modelfile cannot quote; rephrase the task\'s instructions')
    return text


def _readme(src: Source, faithful: bool, why: str, structured: bool) -> str:
    task, name = src.task, model_name(src.artifact.name)
    out = [
        f"# {src.artifact.name} for Ollama",
        "",
        "Made by `edgedistill export ... --to ollama`; `export.json` names the artifact (its manifest's sha256) and the settings.",
        "",
        "```bash",
        f"ollama create {name} -f Modelfile     # FROM is relative to this folder: keep it beside the artifact",
        f'ollama run {name} "Where is my new card?"',
        "```",
        "",
    ]
    if task is not None:
        out += [
            "The Modelfile carries the task's system prompt (`SYSTEM`, exactly what `edgedistill serve` sends the student),",
            "so a client sends only the input, as the user message, and no system message of its own (one would",
            f"replace the task's). Greedy (`temperature 0`), at most {src.max_tokens} tokens an answer, as `/v1/predict` decodes.",
            "",
        ]
    if not faithful:
        out += [f"The chat template was not translated ({why}); see the comment in the Modelfile.", ""]
    if task is not None and task.type == "classification":
        out += [
            "A Modelfile cannot constrain an answer to the labels, and Ollama's per-call `format` takes JSON (a label would",
            "come back quoted): the answer is the student's unconstrained greedy text. Check it is one of the labels",
            "(`export.json`: `task.labels`); `edgedistill serve` and the llama-server bundle decode under the labels.",
            "",
        ]
    if structured:
        out += [
            "A Modelfile has no grammar either: structured output is requested per call with Ollama's `format`, the",
            "answer's JSON schema in `schema.json` (the schema `edgedistill serve` decodes under):",
            "",
            "```python",
            "import json, httpx",
            'schema = json.load(open("schema.json"))',
            f'r = httpx.post("http://localhost:11434/api/chat", json={{"model": "{name}", "stream": False, "format": schema,',
            '                "messages": [{"role": "user", "content": "..."}]})',
            'print(json.loads(r.json()["message"]["content"]))',
            "```",
            "",
            "or, with the OpenAI client on Ollama's `/v1`: `response_format={\"type\": \"json_schema\", \"json_schema\":",
            '{"name": "answer", "schema": <schema.json>}}`. Ollama\'s grammar allows JSON whitespace ours does not;',
            "compare answers as parsed JSON.",
            "",
        ]
    out += [
        "Not in this bundle: the calibrated confidence and the teacher fallback (the cascade of `edgedistill serve`).",
        "",
    ]
    return "\n".join(out)
