"""Vocabulary facts shared by the runtimes: the end-of-generation token names, and token text -> bytes
helpers for the runners that rebuild pieces from a vocabulary (transformers and ONNX Runtime GenAI;
llama.cpp gives pieces itself)."""

from __future__ import annotations

import re
from functools import cache

# end-of-turn / end-of-text tokens by name that end a generation besides the configured EOS ids
# (llama.cpp recognises these as end-of-generation too)
EOG_NAMES = frozenset(
    {"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|end|>", "</s>", "<end_of_turn>"}
)

# SentencePiece-style raw-byte tokens
BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@cache
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}
