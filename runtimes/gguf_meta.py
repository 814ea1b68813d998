"""A GGUF file's metadata (its key-value header), read without llama.cpp or the ``gguf`` package.

``export`` needs only a few keys of the artifact's GGUF (the chat template, the end tokens, the
trained context) and must run where neither llama-cpp-python nor the distill extras are installed;
the header is a flat list of typed values (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md),
read here in one pass up to the tensor infos. Torch-free, dependency-free.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

from edgedistill.errors import UserError

# value type -> struct format (scalars); 8 string, 9 array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
TOKEN_CONTROL = 3  # tokenizer.ggml.token_type of a special (control) token
TOKEN_USER_DEFINED = 4


def read_metadata(path: Path) -> dict[str, Any]:
    """Every key of ``path``'s header (arrays as lists). A file that is not GGUF v2/v3 is a UserError."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise UserError(f"{path} is not a GGUF file (bad magic); re-export or re-download it")
            (version,) = _read(f, "<I")
            if version not in (2, 3):
                raise UserError(f"{path}: GGUF version {version} is not supported here (2 or 3); re-export it with a current llama.cpp")
            _read(f, "<Q")  # tensor count
            (n_kv,) = _read(f, "<Q")
            return {_string(f): _value(f, _read(f, "<I")[0]) for _ in range(n_kv)}
    except (struct.error, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: the GGUF header is damaged ({e}); rebuild the artifact") from None


class GGUFInfo:
    """What a deploy bundle needs from a GGUF's metadata."""

    def __init__(self, meta: dict[str, Any]):
        self.meta = meta
        self.architecture = str(meta.get("general.architecture") or "")
        self.chat_template: str | None = meta.get("tokenizer.chat_template") or None
        self.tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
        self.token_types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [])

    @property
    def context_length(self) -> int | None:
        n = self.meta.get(f"{self.architecture}.context_length")
        return int(n) if n else None

    def token_text(self, key: str) -> str | None:
        """The text of the special token ``tokenizer.ggml.<key>_token_id`` (None: not set)."""
        i = self.meta.get(f"tokenizer.ggml.{key}_token_id")
        return self.tokens[i] if isinstance(i, int) and 0 <= i < len(self.tokens) else None

    def end_tokens(self, names: frozenset[str]) -> list[str]:
        """The texts of the tokens that end a generation, as llama.cpp's ``llama_vocab_is_eog`` finds
        them: the EOS/EOT/EOM ids, and control or user-defined tokens named like an end token."""
        out = [t for k in ("eos", "eot", "eom") if (t := self.token_text(k))]
        for i, tok in enumerate(self.tokens):
            kind = self.token_types[i] if i < len(self.token_types) else None
            if tok in names and kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
                out.append(tok)
        return list(dict.fromkeys(out))


def _read(f: BinaryIO, fmt: str) -> tuple:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("unexpected end of file")
    return struct.unpack(fmt, data)


def _string(f: BinaryIO) -> str:
    (n,) = _read(f, "<Q")
    data = f.read(n)
    if len(data) != n:
        raise ValueError("unexpected end of file")
    return data.decode("utf-8")


def _value(f: BinaryIO, kind: int) -> Any:
    if kind in _SCALARS:
        return _read(f, _SCALARS[kind])[0]
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        item, n = _read(f, "<IQ")
        if item in _SCALARS:  # one read for the whole array (token types, scores)
            fmt = _SCALARS[item]
            size = struct.calcsize(fmt)
            data = f.read(size * n)
            if len(data) != size * n:
                raise ValueError("unexpected end of file")
            return list(struct.unpack(f"<{n}{fmt[1]}", data))
        return [_value(f, item) for _ in range(n)]
    raise ValueError(f"unknown value type {kind}")
