"""ONNX Runtime GenAI runtime (ONNX artifacts from ``edgedistill compress``), torch-free.

:class:`OnnxRunner` is serve's ``Runner``: one ``og.Generator`` per slot: each holds its own KV cache (``max_length = ctx_per_slot``), so a slot
keeps its cache between requests like a llama.cpp sequence does, ``seq_rm`` is ``rewind_to`` and a
prompt can be fed in chunks. ``decode`` runs the slots of a batch one after another (the Generator
API has no cross-generator batch); onnxruntime-genai's own ``Engine`` does batch, but it samples
inside, and our engine needs the logits (confidence, logprobs, label scoring).

Tokens come from onnxruntime-genai's tokenizer; the bytes of each token (what streaming decodes
incrementally) are read from ``tokenizer.json``; the chat template from the artifact's
``chat_template.jinja`` / ``tokenizer_config.json``, rendered with jinja2 as in ``runtimes.llama``.

:class:`OnnxGenaiRuntime` is compress's greedy ``Runtime`` (quality gate, speed check): one generator
per prompt, onnxruntime-genai's own greedy search; under a constraint, the argmax of each step's
masked logits (the same mask as every other runtime).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from edgedistill.runtimes.chat import CHATML, compile_template, raise_exception
from edgedistill.runtimes.constrain import Constraint
from edgedistill.runtimes.masking import pick
from edgedistill.runtimes.vocab import BYTE_TOKEN, EOG_NAMES, byte_decoder

from edgedistill.errors import UserError


class OnnxRunner:
    def __init__(self, model_dir: Path, *, n_slots: int = 4, ctx_per_slot: int = 2048, n_batch: int = 512, n_threads: int = 2):
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise UserError("serving an ONNX artifact needs onnxruntime-genai: pip install 'edgedistill[onnx]'") from None
        self._og = og
        model_dir = Path(model_dir)
        cfg_path = model_dir / "genai_config.json"
        if not cfg_path.is_file():
            raise UserError(f"{model_dir} has no genai_config.json; is it an ONNX artifact from `edgedistill compress`?")
        genai = json.loads(cfg_path.read_text(encoding="utf-8"))
        config = og.Config(str(model_dir))
        # our engine owns the threads: one onnxruntime session, n_threads intra-op threads
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": n_threads, "inter_op_num_threads": 1}}}}))
        try:
            self.model = og.Model(config)
        except RuntimeError as e:  # what onnxruntime-genai raises for a missing or broken file
            raise UserError(f"onnxruntime-genai could not load {model_dir} ({str(e).strip()[:200]}); rebuild the artifact") from None
        self.tokenizer = og.Tokenizer(self.model)
        context = int(genai["model"].get("context_length") or ctx_per_slot)
        self.n_slots = n_slots
        self.ctx_per_slot = min(ctx_per_slot, context)
        self.n_batch = n_batch
        self.n_vocab = int(genai["model"]["vocab_size"])
        tok_json = _read_json(model_dir / "tokenizer.json")
        tok_cfg = _read_json(model_dir / "tokenizer_config.json")
        self.pieces, special = token_pieces(tok_json, self.n_vocab)
        eos = genai["model"].get("eos_token_id")
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        eos_ids |= {int(t) for t in self.tokenizer.eos_token_ids}
        self.eog_tokens = frozenset(t for t in eos_ids | {t for t, name in special.items() if name in EOG_NAMES} if 0 <= t < self.n_vocab)
        bos = genai["model"].get("bos_token_id")
        probe = list(self.tokenizer.encode("a"))
        self._bos_added = bos is not None and len(probe) > 1 and probe[0] == bos
        self._bos = bos
        template = _chat_template(model_dir, tok_cfg)
        self._template = compile_template(template or CHATML)
        self._bos_text = _token_text(tok_cfg.get("bos_token"))
        self._eos_text = _token_text(tok_cfg.get("eos_token"))
        self.description = f"onnxruntime-genai {getattr(og, '__version__', '?')}: {model_dir.name}"
        self._gens: list[Any] = [self._new_generator() for _ in range(n_slots)]
        self._n: list[int] = [0] * n_slots  # tokens in each slot's KV cache

    def _new_generator(self):
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.ctx_per_slot)
        return self._og.Generator(self.model, params)

    def tokenize(self, text: str, *, special: bool, add_bos: bool) -> list[int]:
        # onnxruntime-genai always parses special tokens in text (``special`` cannot turn that off)
        ids = [int(t) for t in self.tokenizer.encode(text)] if text else []
        if self._bos_added and not add_bos and ids and ids[0] == self._bos:
            ids = ids[1:]
        return ids

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return self._template.render(
            messages=messages, add_generation_prompt=True, bos_token=self._bos_text, eos_token=self._eos_text, raise_exception=raise_exception
        )

    def seq_rm(self, seq: int, p0: int) -> None:
        p0 = max(0, p0)
        if self._n[seq] > p0:
            try:
                self._gens[seq].rewind_to(p0)
            except RuntimeError:  # a model that cannot rewind (not the builder's decoders): start the slot over
                self._gens[seq] = self._new_generator()
                p0 = 0
            self._n[seq] = p0

    def decode(self, tokens: list[int], pos: list[int], seqs: list[int], outputs: list[bool]) -> np.ndarray:
        rows: list[np.ndarray] = []
        i, n = 0, len(tokens)
        while i < n:
            j = i  # the run of this slot's tokens up to (and with) its next output row
            while j + 1 < n and seqs[j + 1] == seqs[i] and not outputs[j]:
                j += 1
            slot = seqs[i]
            if pos[i] != self._n[slot]:
                if pos[i] > self._n[slot]:
                    raise RuntimeError(f"slot {slot}: position {pos[i]} skips past the {self._n[slot]} cached tokens")
                self.seq_rm(slot, pos[i])
            try:
                self._gens[slot].append_tokens(tokens[i : j + 1])
            except RuntimeError:  # e.g. past max_length: the engine fails the batch; this slot starts clean
                self._gens[slot] = self._new_generator()
                self._n[slot] = 0
                raise
            self._n[slot] += j + 1 - i
            if outputs[j]:
                rows.append(np.asarray(self._gens[slot].get_logits(), dtype=np.float32).reshape(-1, self.n_vocab)[-1])
            i = j + 1
        if not rows:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        return np.stack(rows)

    def close(self) -> None:
        self._gens = []
        self.tokenizer = None
        self.model = None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON; rebuild the artifact") from None


def _token_text(tok: Any) -> str:
    if isinstance(tok, dict):
        return str(tok.get("content") or "")
    return str(tok or "")


def _chat_template(model_dir: Path, tok_cfg: dict[str, Any]) -> str | None:
    jinja = model_dir / "chat_template.jinja"  # transformers 5 saves the template beside the config
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    t = tok_cfg.get("chat_template")
    if isinstance(t, list):  # named templates: the default one
        t = next((x.get("template") for x in t if x.get("name") == "default"), None)
    return t if isinstance(t, str) else None


def token_pieces(tok_json: dict[str, Any], n_vocab: int) -> tuple[list[bytes], dict[int, str]]:
    """The bytes each token id stands for (special tokens: b"", as llama.cpp renders them) and the special tokens.

    Byte-level BPE (GPT-2, SmolLM, Llama 3) maps bytes to printable characters; SentencePiece-style
    vocabularies (Llama 2, Mistral) write spaces as U+2581 and raw bytes as ``<0xNN>``.
    """
    model = tok_json.get("model") or {}
    vocab = model.get("vocab") or {}
    items = [(p[0], i) for i, p in enumerate(vocab)] if isinstance(vocab, list) else list(vocab.items())
    dec = json.dumps(tok_json.get("decoder") or {})
    byte_level = '"ByteLevel"' in dec
    table = byte_decoder()
    pieces = [b""] * n_vocab
    for text, i in items:
        if not 0 <= i < n_vocab:
            continue
        if byte_level:
            try:
                pieces[i] = bytes(table[c] for c in text)
            except KeyError:
                pieces[i] = text.encode("utf-8")
        elif m := BYTE_TOKEN.match(text):
            pieces[i] = bytes([int(m.group(1), 16)])
        else:
            pieces[i] = text.replace("\u2581", " ").encode("utf-8")
    special: dict[int, str] = {}
    for a in tok_json.get("added_tokens") or []:
        i = int(a["id"])
        if not 0 <= i < n_vocab:
            continue
        if a.get("special"):
            special[i] = a["content"]
            pieces[i] = b""
        else:
            pieces[i] = str(a["content"]).encode("utf-8")
    return pieces, special


class OnnxGenaiRuntime:
    """An ONNX artifact under onnxruntime-genai: greedy decoding over the source tokenizer's ids."""

    def __init__(self, folder: Path):
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise UserError("loading an ONNX artifact needs onnxruntime-genai: pip install 'edgedistill[onnx]'") from None
        self._og = og
        try:
            self.model = og.Model(str(folder))
        except RuntimeError as e:  # what onnxruntime-genai raises for a missing or broken file
            raise UserError(f"onnxruntime-genai could not load {folder} ({str(e).strip()[:200]}); rebuild the artifact") from None
        cfg = json.loads((Path(folder) / "genai_config.json").read_text())
        self.context_length = int(cfg["model"].get("context_length") or cfg["search"].get("max_length") or 0)
        self.n_vocab = int(cfg["model"]["vocab_size"])
        eos = cfg["model"].get("eos_token_id")
        self.eog_tokens = frozenset(int(t) for t in (eos if isinstance(eos, list) else [eos] if eos is not None else []))

    def generate(
        self, prompt_ids: list[int], max_new_tokens: int, *, ignore_eos: bool = False, constraint: Constraint | None = None
    ) -> list[int]:
        """Greedy tokens after the prompt: onnxruntime-genai's own greedy search, or, with
        ``constraint``, the best allowed token of each step's logits (``get_logits``, then the token
        appended), until the constraint is complete (its end token, when it takes one, is returned)."""
        if not prompt_ids or max_new_tokens <= 0:
            return []
        total = len(prompt_ids) + max_new_tokens
        if self.context_length and total > self.context_length:
            raise UserError(f"prompt ({len(prompt_ids)}) + {max_new_tokens} new tokens exceed the model's context ({self.context_length})")
        params = self._og.GeneratorParams(self.model)
        opts: dict[str, Any] = {"max_length": total, "do_sample": False}
        if ignore_eos:
            opts["min_length"] = total  # EOS is masked until max_length
        params.set_search_options(**opts)
        gen = self._og.Generator(self.model, params)
        gen.append_tokens(list(map(int, prompt_ids)))
        if constraint is not None:
            return self._constrained(gen, constraint, max_new_tokens)
        out: list[int] = []
        while len(out) < max_new_tokens and not gen.is_done():
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        return out

    def _constrained(self, gen: Any, constraint: Constraint, max_new_tokens: int) -> list[int]:
        matcher = constraint.start()
        out: list[int] = []
        while len(out) < max_new_tokens:
            t = pick(np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1, self.n_vocab)[-1], matcher)
            if t in self.eog_tokens:
                break
            out.append(t)
            matcher.advance(t)
            if matcher.done or len(out) == max_new_tokens:
                break
            gen.append_tokens([t])
        return out

    def close(self) -> None:
        self.model = None
