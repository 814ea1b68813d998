"""The task's constraint as llama.cpp GBNF text, for llama.cpp's own server: what ``edgedistill
export --to llama-server`` writes and what ``bench.vs_llama_server`` sends it (one rule, two users).

- ``labels_gbnf``: exactly one label; with the labels' token ids (``runtimes.llama.answer_token_ids``)
  each in that tokenization, ``<[id]>`` references -- ``runtimes.constrain.LabelSet`` token for token.
- ``schema_gbnf``: a JSON schema through llama.cpp's json-schema-to-grammar (llama-cpp-python's port)
  with the whitespace pinned to the compact spelling ``runtimes.constrain.json_schema_grammar`` decodes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any


def gbnf_literal(text: str) -> str:
    """``text`` as a GBNF string literal (llama.cpp's grammar parser: ``\\"``, ``\\\\``, ``\\xHH``;
    any other character, UTF-8 included, as itself)."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def label_tokens(task: Any, gguf: Path) -> list[list[int]] | None:
    """A classification task's labels as the token ids our server constrains its answer to
    (``runtimes.constrain.LabelSet``: the GGUF tokenizer's own tokenization of each); None for
    another type, or without llama-cpp-python (``labels_gbnf`` then writes the labels' texts)."""
    if task is None or task.type != "classification" or not task.labels:
        return None
    try:
        from edgedistill.runtimes.llama import answer_token_ids
    except ImportError:
        return None
    return answer_token_ids(gguf, list(task.labels))


def labels_gbnf(labels: list[str], tokens: list[list[int]] | None = None) -> str:
    """Exactly one of ``labels``; the end of generation follows (llama.cpp allows only end tokens
    once the grammar is complete). With ``tokens`` (each label's token ids), each label in exactly
    that tokenization (GBNF's ``<[id]>`` token references): the constraint our server decodes under,
    token for token. Without, the labels' texts, in any tokenization."""
    if tokens is None:
        alternatives = [gbnf_literal(lab) for lab in labels]
        head = f"# exactly one of the task's {len(labels)} labels (edgedistill export)\n"
    else:
        alternatives = [" ".join(f"<[{t}]>" for t in ids) for ids in tokens]
        head = (
            f"# exactly one of the task's {len(labels)} labels, each as the tokenizer spells it (edgedistill export):\n"
            + "".join(f"#   {alt}  =  {gbnf_literal(lab)}\n" for lab, alt in zip(labels, alternatives, strict=True))
        )
    return head + "root ::=\n    " + " |\n    ".join(alternatives) + "\n"


def schema_gbnf(schema: dict) -> str | None:
    """The answer's JSON schema as GBNF: llama.cpp's json-schema-to-grammar (llama-cpp-python's
    port, ``json_schema_to_gbnf``), its free whitespace pinned to ``json.dumps``'s spelling (``", "``
    between items, ``": "`` after a key, nothing else) -- the spelling serve decodes under
    (``runtimes.constrain.json_schema_grammar``, compact). None without llama-cpp-python."""
    try:
        from llama_cpp.llama_grammar import json_schema_to_gbnf
    except ImportError:
        return None
    gbnf = json_schema_to_gbnf(json.dumps(schema))
    gbnf = re.sub(r'"([,:])" space\b', r'"\1 "', gbnf)
    gbnf = re.sub(r"^space ::= .*$", 'space ::= ""', gbnf, flags=re.MULTILINE)
    return "# the answer's JSON schema (schema.json), spelled as json.dumps spells it (edgedistill export)\n" + gbnf
