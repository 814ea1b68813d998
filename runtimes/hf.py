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
- :func:`generate_batch`, batched ``generate`` with left padding (the local HF teacher labelling
  thousands of rows; :func:`load_causal_lm` opens the checkpoint for it, float32 on CPU).

Needs torch and transformers (``pip install 'edgedistill[distill,hf]'``), imported when one of them is used.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from edgedistill.runtimes.chat import CHATML
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
        ids = list(self.tok(text, add_special_tokens=False, split_special_tokens=not special)["input_ids"])
        if add_bos and self.add_bos and (not ids or ids[0] != self.tok.bos_token_id):
            ids.insert(0, self.tok.bos_token_id)
        return ids

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
        self.eos = eos if isinstance(eos, int) else (eos[0] if eos else None)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, *, ignore_eos: bool = False) -> list[int]:
        torch = self._torch
        with torch.inference_mode():
            ids = torch.tensor([prompt_ids], device=self.device)
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens if ignore_eos else 0,
                do_sample=False,
                pad_token_id=self.eos,
            )
        return out[0, len(prompt_ids) :].tolist()

    def close(self) -> None:
        self.model = None


# --- batched generation (the local HF teacher) -------------------------------------------------


@dataclass
class Generation:
    """One row of a batch: the answer text (cut at a stop string) and what it took."""

    text: str
    prompt_tokens: int
    completion_tokens: int  # the generated tokens kept, plus the end-of-sequence token when there was one
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


def load_causal_lm(path: Path) -> tuple[Any, Any]:
    """(tokenizer, model) of an HF checkpoint for :func:`generate_batch`: float32, eval mode, CPU; a
    tokenizer without a pad token pads with EOS. Errors are transformers' own (OSError, ValueError, KeyError)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to("cpu").eval()
    return tok, model


def eos_ids(model: Any, tok: Any) -> set[int]:
    """The generation config's and the tokenizer's EOS ids (what ends a row of :func:`generate_batch`)."""
    ids: set[int] = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), tok.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(x) for x in src)
    return ids


def truncate_at_stop(text: str, stop: list[str] | None) -> tuple[str, bool]:
    if not stop:
        return text, False
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def stop_criteria(tok: Any, stops: list[str], prompt_len: int) -> Any:
    """Stop a row once its generated text (the prompt excluded) contains a stop string."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    window = max(len(s) for s in stops) + 8  # tokens: enough to hold any stop string

    class _StopStrings(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            rows = input_ids[:, prompt_len:][:, -window:].tolist()
            done = [any(s in tok.decode(r, skip_special_tokens=True) for s in stops if s) for r in rows]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_StopStrings()])


def generate_batch(
    model: Any,
    tok: Any,
    texts: list[str],
    *,
    max_length: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    stop: list[str] | None,
    seed: int | None,
) -> list[Generation]:
    """Blocking: generate one batch of prompt texts with the same decoding settings, left-padded.

    Greedy when temperature is 0, sampled otherwise (``torch.manual_seed(seed)`` first). Prompts
    longer than ``max_length`` tokens keep their last ``max_length`` tokens.
    """
    import torch

    old_side = tok.truncation_side
    tok.truncation_side = "left"  # an overlong prompt keeps its end (the generation prompt)
    try:
        enc = tok(
            texts,
            add_special_tokens=False,
            padding=True,
            padding_side="left",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
    finally:
        tok.truncation_side = old_side
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "pad_token_id": tok.pad_token_id,
    }
    if temperature > 0:
        if seed is not None:
            torch.manual_seed(seed)
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if stop:
        # not generate(stop_strings=...): that also matches text of the prompt's tail
        kwargs["stopping_criteria"] = stop_criteria(tok, list(stop), enc["input_ids"].shape[1])
    with torch.inference_mode():
        out = model.generate(**enc, **kwargs)
    gen = out[:, enc["input_ids"].shape[1] :]
    eos = eos_ids(model, tok)
    results = []
    for row, mask in zip(gen.tolist(), enc["attention_mask"].tolist()):
        n, hit_eos = len(row), False
        for i, t in enumerate(row):
            if t in eos:
                n, hit_eos = i, True
                break
        ids = row[:n]
        if not hit_eos and tok.pad_token_id is not None:
            # generate() pads rows that finished early (e.g. on a stop string)
            while ids and ids[-1] == tok.pad_token_id:
                ids.pop()
        text = tok.decode(ids, skip_special_tokens=True)
        text, hit_stop = truncate_at_stop(text, stop)
        results.append(
            Generation(
                text=text,
                prompt_tokens=int(sum(mask)),
                completion_tokens=len(ids) + (1 if hit_eos else 0),
                finish_reason="stop" if (hit_eos or hit_stop) else "length",
            )
        )
    return results
