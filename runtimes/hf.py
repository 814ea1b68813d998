"""transformers runtime: HF checkpoints and GPTQ (compressed-tensors) artifacts.

Three ways to run one, each what its stage needs (kept apart: their arithmetic differs):

- :class:`HFRunner`, serve's ``Runner`` (the same contract as ``runtimes.llama``): each slot is one
  sequence with its own KV cache (a ``DynamicCache``; ``seq_rm`` crops it, or, for sliding-window
  caches that cannot go back, starts it again and prefills the kept prefix with the next step), and
  ``decode`` returns only the logits rows asked for. The engine's batch may hold tokens of several
  slots; this runner runs them slot after slot (one forward per slot per step) rather than padding
  them into one batch: simple and exact, and on a GPU a small model's step is launch-bound anyway.
  FP16 on a GPU, FP32 on CPU. A compressed-tensors checkpoint is dequantized on load (transformers
  has no INT4 kernels), so a GPTQ artifact is served with FP16/FP32 weights here; for INT4 speed
  and memory, serve it with vLLM.
- :class:`HFRuntime`, compress's greedy ``Runtime``: the FP student every artifact is measured
  against (float32 on CPU, ``generate`` one prompt at a time like the other runtimes).
- :func:`~edgedistill.runtimes.hf_generate.generate_batch` (its own module): batched ``generate``
  with left padding, the local HF teacher's and distill's evaluation.
- :func:`hf_vocab`: a tokenizer as ``runtimes.constrain``'s vocabulary (compress and distill decode
  under the task's constraint built on the source tokenizer).

Needs torch and transformers (``pip install 'edgedistill[distill,hf]'``), imported when one of them is used.
"""

from __future__ import annotations

import json
import warnings
import weakref
from pathlib import Path
from typing import Any

import numpy as np
from edgedistill.runtimes.chat import CHATML
from edgedistill.runtimes.constrain import Constraint
from edgedistill.runtimes.hf_constrain import constrained_kwargs
from edgedistill.runtimes.vocab import BYTE_TOKEN, EOG_NAMES, byte_decoder

from edgedistill.errors import UserError


def render_chat(tokenizer: Any, messages: list[dict[str, str]], answer: str | None = None, *, no_template: str = "error") -> str:
    """The one rendering of a conversation with a transformers tokenizer's chat template: the prompt
    ending in the assistant's turn, or (``answer``) the conversation with the assistant's answer.

    A tokenizer without a template: ``"error"`` (training and compress need the student's own),
    ``"chatml"`` (serve: as llama.cpp does), ``"transcript"`` (a base teacher: ``role: text`` lines)."""
    if answer is not None:
        messages = [*messages, {"role": "assistant", "content": answer}]
    template = None
    if not getattr(tokenizer, "chat_template", None):
        if no_template == "transcript":
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return text if answer is not None else text + "assistant:"
        if no_template != "chatml":
            name = getattr(tokenizer, "name_or_path", "") or "the model"
            raise UserError(f"tokenizer of {name} has no chat template; use an instruct/chat model as the student")
        template = CHATML
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=answer is None)


class HFRunner:
    def __init__(
        self,
        model_path: Path,
        *,
        n_slots: int = 4,
        ctx_per_slot: int = 2048,
        n_batch: int = 512,
        n_threads: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
    ):
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise UserError(
                "serving an HF/GPTQ artifact needs torch and transformers: pip install 'edgedistill[distill,hf]'"
            ) from None
        self._torch = torch
        path = Path(model_path)
        if not (path / "config.json").exists():
            raise UserError(f"{path} is not an HF checkpoint folder (no config.json); pass the artifact folder")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = getattr(torch, dtype) if dtype else (torch.float16 if self.device.startswith("cuda") else torch.float32)
        if n_threads and self.device == "cpu":
            torch.set_num_threads(n_threads)
        try:
            self.tok = AutoTokenizer.from_pretrained(path)
            with warnings.catch_warnings():  # "the quantization_config from the model will be used": we only add dequantize
                warnings.filterwarnings("ignore", message=".*quantization_config.*", category=UserWarning)
                model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype, **_quantization_kwargs(path))
        except (OSError, ValueError, ImportError) as e:
            raise UserError(f"transformers could not load {path} ({str(e)[:200]})") from None
        self.model = model.to(self.device).eval()
        cfg = self.model.config
        self.n_slots = n_slots
        self.ctx_per_slot = min(ctx_per_slot, int(getattr(cfg, "max_position_embeddings", None) or ctx_per_slot))
        self.n_batch = n_batch
        self.n_vocab = int(self.model.get_output_embeddings().weight.shape[0])
        self.pieces = token_pieces(self.tok, self.n_vocab)
        self.eog_tokens = frozenset(_eog_ids(self.tok, self.model.generation_config, self.n_vocab))
        self.add_bos = _adds_bos(self.tok)
        self._caches = [self._new_cache() for _ in range(n_slots)]
        self._tokens: list[list[int]] = [[] for _ in range(n_slots)]  # what each slot's cache holds
        self._refill: list[list[int]] = [[] for _ in range(n_slots)]  # kept tokens to prefill again (uncroppable caches)
        n_params = sum(p.numel() for p in self.model.parameters())
        self.description = (
            f"{cfg.model_type} {n_params / 1e6:.1f}M params, {str(self.dtype).removeprefix('torch.')} on {self.device}"
        )

    def _new_cache(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # transformers < 4.56
            return DynamicCache()

    def tokenize(self, text: str, *, special: bool, add_bos: bool) -> list[int]:
        return tokenize(self.tok, text, special=special, add_bos=add_bos and self.add_bos)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return render_chat(self.tok, messages, no_template="chatml")

    def seq_rm(self, seq: int, p0: int) -> None:
        cache = self._caches[seq]
        have = self._tokens[seq]
        p0 = max(0, min(p0, len(have)))
        if p0 == len(have):
            return
        if p0 > 0 and _exactly_croppable(cache):
            cache.crop(-(len(have) - p0))  # negative: "remove this many", in every transformers version
        else:  # nothing kept, or a sliding-window/recurrent cache that cannot go back: prefill the kept tokens again
            self._caches[seq] = self._new_cache()
            self._refill[seq] = have[:p0]
        self._tokens[seq] = have[:p0]

    def decode(self, tokens: list[int], pos: list[int], seqs: list[int], outputs: list[bool]) -> np.ndarray:
        torch = self._torch
        by_seq: dict[int, list[int]] = {}
        for i, s in enumerate(seqs):
            by_seq.setdefault(s, []).append(i)
        rows: dict[int, np.ndarray] = {}
        with torch.inference_mode():
            for s, idx in by_seq.items():
                p0 = pos[idx[0]]
                if any(pos[j] != p0 + k for k, j in enumerate(idx)):
                    raise RuntimeError(f"slot {s}: positions must be consecutive")
                have = len(self._tokens[s])
                if p0 != have:
                    raise RuntimeError(f"slot {s}: position {p0} but the cache holds {have} tokens")
                if p0 + len(idx) > self.ctx_per_slot:
                    raise RuntimeError(f"slot {s}: context of {self.ctx_per_slot} tokens is full")
                new = [tokens[j] for j in idx]
                refill = self._refill[s]
                want = [len(refill) + k for k, j in enumerate(idx) if outputs[j]]
                ids = torch.tensor([refill + new], dtype=torch.long, device=self.device)
                # only the rows asked for go through lm_head (a prompt chunk needs at most its last one)
                keep = torch.tensor(want, dtype=torch.long, device=self.device)
                try:
                    out = self.model(input_ids=ids, past_key_values=self._caches[s], use_cache=True, logits_to_keep=keep)
                except Exception as e:  # the cache may hold part of this step: forget the slot, fail its requests only
                    self._caches[s], self._tokens[s], self._refill[s] = self._new_cache(), [], []
                    raise RuntimeError(f"slot {s}: forward failed: {type(e).__name__}: {e}") from e
                self._refill[s] = []
                self._tokens[s].extend(new)
                logits = out.logits[0].float().cpu().numpy()
                for r, k in enumerate(want):
                    rows[idx[k - len(refill)]] = logits[r]
        if not rows:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        return np.stack([rows[i] for i in sorted(rows)]).astype(np.float32, copy=False)

    def close(self) -> None:
        self._caches = []
        self.model = None
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()


def tokenize(tok: Any, text: str, *, special: bool, add_bos: bool) -> list[int]:
    """Token ids of ``text`` as llama.cpp tokenizes it: special tokens parsed only when ``special``,
    BOS first when ``add_bos`` (and not already there)."""
    ids = list(tok(text, add_special_tokens=False, split_special_tokens=not special)["input_ids"])
    if add_bos and tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
        ids.insert(0, tok.bos_token_id)
    return ids


class HFVocab:
    """A transformers tokenizer as ``runtimes.constrain``'s vocabulary: the pieces and end-of-generation
    ids :class:`HFRunner` has, ``tokenize`` as it tokenizes. Make it with :func:`hf_vocab` (one per
    tokenizer and size, so llguidance's tokenizer, cached on it, is built once)."""

    def __init__(self, tok: Any, n_vocab: int, generation_config: Any = None):
        self.tok = weakref.proxy(tok)  # the cache below keys on the tokenizer: no strong cycle back to it
        self.n_vocab = int(n_vocab)
        self.pieces = token_pieces(tok, self.n_vocab)
        self.eog_tokens = frozenset(_eog_ids(tok, generation_config, self.n_vocab))
        self.add_bos = _adds_bos(tok)

    def tokenize(self, text: str, *, special: bool, add_bos: bool) -> list[int]:
        return tokenize(self.tok, text, special=special, add_bos=add_bos and self.add_bos)


_VOCABS: weakref.WeakKeyDictionary[Any, dict[tuple, HFVocab]] = weakref.WeakKeyDictionary()


def hf_vocab(tok: Any, n_vocab: int | None = None, generation_config: Any = None) -> HFVocab:
    """The vocabulary of ``tok`` padded to ``n_vocab`` (the model's logits width; default the
    tokenizer's size), one per tokenizer object for as long as it lives (kept beside it, not on it:
    the tokenizer stays copyable)."""
    n = int(n_vocab or len(tok))
    key = (n, tuple(sorted(_eog_ids(tok, generation_config, n))))
    cache = _VOCABS.setdefault(tok, {})
    if key not in cache:
        cache[key] = HFVocab(tok, n, generation_config)
    return cache[key]


def _exactly_croppable(cache: Any) -> bool:
    """Full-attention layers keep every past state and crop exactly; sliding-window ones do not."""
    layers = getattr(cache, "layers", None)
    if layers is None:  # transformers < 4.56: one full-attention DynamicCache
        return True
    return all(type(layer).__name__ == "DynamicLayer" for layer in layers)


def _quantization_kwargs(path: Path) -> dict[str, Any]:
    """A compressed-tensors checkpoint (our GPTQ artifacts) loads dequantized: transformers has no INT4 kernels."""
    try:
        qc = json.loads((path / "config.json").read_text(encoding="utf-8")).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError):
        return {}
    if qc.get("quant_method") != "compressed-tensors":
        return {}
    try:
        import compressed_tensors  # noqa: F401
        from transformers.utils.quantization_config import CompressedTensorsConfig
    except ImportError:
        raise UserError(f"{path} is a compressed-tensors (GPTQ) checkpoint: pip install 'edgedistill[hf]'") from None
    import inspect

    if "dequantize" in inspect.signature(CompressedTensorsConfig.__init__).parameters:
        return {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    return {"quantization_config": CompressedTensorsConfig(run_compressed=False)}


def token_pieces(tok: Any, n_vocab: int) -> list[bytes]:
    """The bytes each token id stands for (special tokens: none, as llama.cpp renders them), padded to n_vocab.

    Per-token ``tok.decode([i])`` is wrong for byte-level BPE (a multi-byte character split over two
    tokens decodes to U+FFFD each), so the pieces are rebuilt from the vocabulary and the decoder type.
    """
    n_tok = len(tok)
    names = tok.convert_ids_to_tokens(list(range(n_tok)))
    special = set(tok.all_special_ids)
    added = {}
    for i, t in getattr(tok, "added_tokens_decoder", {}).items():
        added[int(i)] = t
        if getattr(t, "special", False):
            special.add(int(i))
    kinds = _decoder_kinds(tok)
    if "ByteLevel" in kinds:
        byte_of = byte_decoder()

        def piece(name: str) -> bytes:
            return bytes(byte_of[c] for c in name) if all(c in byte_of for c in name) else name.encode("utf-8")
    elif kinds & {"Metaspace", "ByteFallback", "Replace"}:

        def piece(name: str) -> bytes:
            m = BYTE_TOKEN.match(name)
            return bytes([int(m.group(1), 16)]) if m else name.replace("\u2581", " ").encode("utf-8")
    else:
        piece = None
    out: list[bytes] = []
    for i, name in enumerate(names):
        if i in special or name is None:
            out.append(b"")
        elif i in added:
            out.append(str(added[i].content).encode("utf-8"))
        elif piece is not None:
            out.append(piece(name))
        else:  # WordPiece and the like: the decoder's own text, good enough for ASCII vocabularies
            out.append(tok.decode([i], clean_up_tokenization_spaces=False).encode("utf-8"))
    return out + [b""] * max(0, n_vocab - n_tok)


def _decoder_kinds(tok: Any) -> set[str]:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return set()
    try:
        dec = json.loads(backend.to_str()).get("decoder") or {}
    except (ValueError, AttributeError):
        return set()
    kinds = {dec.get("type")}
    for d in dec.get("decoders") or []:
        kinds.add(d.get("type"))
    return {k for k in kinds if k}


def _eog_ids(tok: Any, gen_config: Any, n_vocab: int) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(gen_config, "eos_token_id", None), tok.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(x) for x in src)
    vocab = tok.get_vocab()
    ids.update(vocab[name] for name in EOG_NAMES if name in vocab)
    return {i for i in ids if 0 <= i < n_vocab}


def _adds_bos(tok: Any) -> bool:
    """Whether the tokenizer's own encoding starts with BOS (Llama 3 yes, SmolLM2/Qwen no)."""
    if tok.bos_token_id is None:
        return False
    ids = tok("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tok.bos_token_id


# --- greedy decoding, one prompt at a time (compress's FP reference) --------------------------


class HFRuntime:
    """Greedy decoding of an HF checkpoint on CPU (float32), one prompt at a time like the others."""

    device = "cpu"

    def __init__(self, folder: Path):
        import torch
        from transformers import AutoModelForCausalLM

        self._torch = torch
        self._set_model(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval())

    def _set_model(self, model) -> None:
        self.model = model
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos = self.eos_ids[0] if self.eos_ids else None

    def generate(
        self, prompt_ids: list[int], max_new_tokens: int, *, ignore_eos: bool = False, constraint: Constraint | None = None
    ) -> list[int]:
        """Greedy tokens after the prompt; with ``constraint`` (built on the checkpoint's tokenizer),
        the best token it allows at each step (``runtimes.hf_constrain``)."""
        torch = self._torch
        extra: dict[str, Any] = {}
        if constraint is not None:
            extra = constrained_kwargs(constraint, 1, len(prompt_ids), self.eos_ids)
        with torch.inference_mode():
            ids = torch.tensor([prompt_ids], device=self.device)
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens if ignore_eos else 0,
                do_sample=False,
                pad_token_id=self.eos,
                **extra,
            )
        return out[0, len(prompt_ids) :].tolist()

    def close(self) -> None:
        self.model = None
