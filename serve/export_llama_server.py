"""The llama-server bundle: ``llama-server.sh`` (llama.cpp's C++ server on the GGUF, with the task's
constraint as its default grammar), ``system_prompt.txt`` and a README.

- Chat template: ``--jinja`` renders the GGUF's own template (the one ``runtimes.llama`` renders);
  a GGUF without one gets ``--chat-template chatml``, our runners' fallback.
- Constraint: classification, ``labels.gbnf`` (exactly one of the labels, then the end of the
  answer, as ``runtimes.constrain.LabelSet``: the task's labels in order, each in the token ids of
  its tokenizer's own tokenization, so llama.cpp's grammar allows what ours allows, token for
  token); extraction and tool_call, ``answer.gbnf``: the answer's JSON schema (``Task.answer_schema``,
  also written as ``schema.json``) converted by llama.cpp's json-schema-to-grammar with the
  whitespace pinned to the spelling serve decodes. Either is the default grammar of every request
  that brings none. (Without llama-cpp-python: the labels' texts, and ``--json-schema-file``.)
- System prompt: llama-server has none of its own (removed in 2024, ggml-org/llama.cpp#9857):
  every client sends ``system_prompt.txt`` as the first message; the README says how.
"""

from __future__ import annotations

import json
import shlex

from edgedistill.runtimes.gbnf import labels_gbnf, schema_gbnf
from edgedistill.serve.export import Bundle, Source

SLOTS = 4  # parallel sequences, as serve's default n_slots: -c is their total context


def write(src: Source) -> Bundle:
    task, system = src.task, src.system_prompt
    files: dict[str, str] = {}
    args = [f'-m "$here"/{shlex.quote(src.model_ref)}', f"-c {src.ctx * SLOTS} -np {SLOTS}", '-t "${THREADS:-$(getconf _NPROCESSORS_ONLN)}"']
    args.append("--jinja" if src.gguf.chat_template else "--chat-template chatml")
    args.append("--temp 0")
    if src.max_tokens:
        args.append(f"-n {src.max_tokens}")
    constraint = None
    if task is not None and task.type == "classification" and task.labels:
        files["labels.gbnf"] = labels_gbnf(task.labels, src.label_tokens)
        args.append('--grammar-file "$here"/labels.gbnf')
        constraint = "labels.gbnf"
    elif task is not None and (schema := task.answer_schema()) is not None:
        files["schema.json"] = json.dumps(schema, indent=2, ensure_ascii=False) + "\n"
        if (gbnf := schema_gbnf(schema)) is not None:
            # not --json-schema-file: a llama-server started with one fails every request with "Failed
            # to initialize samplers" (ggml-org/llama.cpp#22396); a grammar file, or a request's own
            # response_format json_schema, works
            files["answer.gbnf"] = gbnf
            args.append('--grammar-file "$here"/answer.gbnf')
            constraint = "answer.gbnf"
        else:
            args.append('--json-schema-file "$here"/schema.json')
            constraint = "schema.json"
    if system is not None:
        files["system_prompt.txt"] = system  # verbatim: no trailing newline
    files["llama-server.sh"] = "\n".join(
        [
            "#!/bin/sh",
            f"# llama.cpp's llama-server for {src.artifact.name}, made by `edgedistill export --to llama-server` (see README.md).",
            "# Arguments go on to llama-server (e.g. --host 0.0.0.0 --port 8080); LLAMA_SERVER names its binary, THREADS its threads.",
            "# Every chat request starts with the system message in system_prompt.txt (llama-server has no system prompt of its own).",
            'here=$(cd "$(dirname "$0")" && pwd)',
            'exec "${LLAMA_SERVER:-llama-server}" \\',
            *[f"  {a} \\" for a in args],
            '  "$@"',
            "",
        ]
    )
    files["README.md"] = _readme(src, constraint)
    return Bundle(files, {"chat_template": "gguf" if src.gguf.chat_template else "chatml", "constraint": constraint, "parallel": SLOTS})


def _readme(src: Source, constraint: str | None) -> str:
    task = src.task
    out = [
        f"# {src.artifact.name} for llama.cpp's llama-server",
        "",
        "Made by `edgedistill export ... --to llama-server`; `export.json` names the artifact (its manifest's sha256) and the settings.",
        "",
        "```bash",
        "./llama-server.sh --port 8080      # LLAMA_SERVER=/path/to/llama-server THREADS=4 to override; -m is relative to this folder",
        "```",
        "",
    ]
    if task is not None:
        out += [
            "llama-server has no server-side system prompt (removed in 2024, ggml-org/llama.cpp#9857), so every chat request",
            "sends the task's: `system_prompt.txt`, verbatim (no trailing newline), as the first message, then the input as",
            "the user message. That is exactly the prompt `edgedistill serve` gives the student (`/v1/predict`):",
            "",
            "```python",
            "from pathlib import Path",
            "from openai import OpenAI",
            "",
            'client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="none")',
            'system = Path("system_prompt.txt").read_text(encoding="utf-8")',
            'r = client.chat.completions.create(model="student", temperature=0, messages=[',
            '    {"role": "system", "content": system}, {"role": "user", "content": "Where is my new card?"}])',
            "print(r.choices[0].message.content)",
            "```",
            "",
            f"Greedy (`--temp 0`), at most {src.max_tokens} tokens an answer (`-n`), as `/v1/predict` decodes.",
            "",
        ]
    if constraint == "labels.gbnf":
        out += [
            "Every request that brings no grammar of its own is decoded under `labels.gbnf`: exactly one of the labels.",
            *(
                [
                    "Each label is spelled in the token ids our server allows (GBNF `<[id]>` references: the tokenizer's own",
                    "tokenization), so the constraint is ours token for token and greedy answers are the same.",
                ]
                if src.label_tokens is not None
                else [
                    "llama.cpp's grammar admits every tokenization of a label where ours admits the tokenizer's own one, so a",
                    "trained student gives the same greedy label, with probabilities that differ.",
                ]
            ),
            "",
        ]
    elif constraint == "answer.gbnf":
        out += [
            "Every request that brings no grammar of its own is decoded under `answer.gbnf`: the answer's JSON schema",
            "(`schema.json`, the one `edgedistill serve` decodes under) converted by llama.cpp's json-schema-to-grammar,",
            "with JSON's free whitespace pinned to the spelling our server decodes (`{\"key\": \"value\", ...}`).",
            "(Not `--json-schema-file schema.json`: a llama-server started with it fails every request with",
            "\"Failed to initialize samplers\", ggml-org/llama.cpp#22396; a request's own `response_format` with",
            "`schema.json` works, with llama.cpp's free whitespace.) Compare answers as parsed JSON.",
            "",
        ]
    elif constraint == "schema.json":
        out += [
            "Every request that brings no grammar of its own is decoded under `schema.json` (the answer's JSON schema,",
            "the one `edgedistill serve` decodes under; llama-server compiles it with its own json-schema-to-grammar).",
            "That grammar allows JSON whitespace ours does not, and puts required properties before optional ones:",
            "compare answers as parsed JSON.",
            "",
        ]
    out += [
        "Not in this bundle: the calibrated confidence and the teacher fallback (the cascade of `edgedistill serve`).",
        "",
    ]
    return "\n".join(out)
