"""Model checkpoints for the distill stage: GGUF -> HF conversion, DistilBERT-style students built
from a teacher's layers, parameter counts.

Everything here works on plain Hugging Face checkpoint folders (config.json + safetensors +
tokenizer files incl. the chat template), which is what training reads and writes.
"""

from __future__ import annotations

import copy
import itertools
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgedistill.errors import UserError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def is_hf_checkpoint(folder: Path) -> bool:
    """A folder with config.json, model weights and tokenizer files (a finished save)."""
    folder = Path(folder)
    return (
        (folder / "config.json").is_file()
        and any((folder / f).is_file() for f in WEIGHT_FILES)
        and any((folder / f).is_file() for f in TOKENIZER_FILES)
    )


def gguf_to_hf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF file to a float32 HF checkpoint (model + tokenizer + chat template) in out_dir.

    Does nothing when out_dir already holds a complete checkpoint. The checkpoint is written to a
    temporary sibling folder and renamed, so a killed conversion never looks complete.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if is_hf_checkpoint(out_dir):
        return out_dir
    if not gguf_path.is_file():
        raise UserError(f"GGUF file {gguf_path} does not exist; fix the model path")
    if gguf_path.suffix.lower() != ".gguf":
        raise UserError(f"{gguf_path} is not a .gguf file; pass a .gguf file or an HF checkpoint folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot load GGUF {gguf_path} with transformers ({first[:200]}); use an HF checkpoint folder instead"
        ) from None
    # The weights are dequantised to float32 on load; drop the "this is a gguf model" state,
    # otherwise save_pretrained refuses ("quantized with gguf and is not serializable").
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.config.dtype = torch.float32
    model.config._name_or_path = str(out_dir)

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)  # an earlier, incomplete conversion
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_hf_checkpoint(path: Path, work_dir: Path) -> Path:
    """An HF checkpoint folder for a model path: a folder with config.json as is, a .gguf converted once."""
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        raise UserError(f"model folder {path} has no config.json; pass an HF checkpoint folder or a .gguf file")
    if path.is_file() and path.suffix.lower() == ".gguf":
        return gguf_to_hf(path, Path(work_dir) / f"{path.stem}-hf")
    if not path.exists():
        raise UserError(f"model path {path} does not exist; fix the path (an HF checkpoint folder or a .gguf file)")
    raise UserError(f"model path {path} is neither an HF checkpoint folder (with config.json) nor a .gguf file")


def count_params(model_or_dir: nn.Module | Path | str) -> int:
    """Number of parameters (tied weights once): of a model, or of a checkpoint folder (read from
    the safetensors headers, without loading the model)."""
    if isinstance(model_or_dir, nn.Module):
        return sum(p.numel() for p in model_or_dir.parameters())
    folder = Path(model_or_dir)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        total = 0
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():  # noqa: SIM118 (safe_open is not iterable)
                    n = 1
                    for d in sf.get_slice(key).get_shape():
                        n *= d
                    total += n
        return total
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} is not an HF checkpoint folder (no config.json)")
    from transformers import AutoModelForCausalLM

    return count_params(AutoModelForCausalLM.from_pretrained(folder))


def _decoder_layers_prefix(model: nn.Module, num_layers: int) -> str:
    """State-dict prefix of the decoder's layer list, e.g. ``model.layers``."""
    found = [name for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) == num_layers]
    named = [n for n in found if n.split(".")[-1] in ("layers", "h", "blocks", "layer")]
    if not (named or found):
        raise UserError(
            f"cannot find the {num_layers} decoder layers of {type(model).__name__}; init_from_teacher_layers does not support it"
        )
    return (named or found)[0]


# Config attributes that list layer *indices* (not one value per layer): remapped, not sliced.
_INDEX_LIST_ATTRS = ("mlp_only_layers",)


def _student_config(teacher_cfg: Any, layers: list[int]) -> Any:
    n_teacher = teacher_cfg.num_hidden_layers
    cfg = copy.deepcopy(teacher_cfg)
    cfg.num_hidden_layers = len(layers)
    for key, value in teacher_cfg.to_dict().items():
        if key in _INDEX_LIST_ATTRS and isinstance(value, list):
            setattr(cfg, key, [layers.index(j) for j in value if j in layers])
        elif isinstance(value, (list, tuple)) and len(value) == n_teacher and key not in ("architectures",):
            # one entry per layer (layer_types, no_rope_layers, sliding-window patterns ...)
            setattr(cfg, key, type(value)(value[j] for j in layers))
    return cfg


def init_from_layers(teacher_dir: Path, layers: list[int], out_dir: Path) -> dict:
    """Build a DistilBERT-style student: the teacher with only the given decoder layers.

    The student has the teacher's config with ``num_hidden_layers=len(layers)`` (per-layer config
    lists sliced), its embeddings, final norm and lm_head, and student layer i = teacher layer
    ``layers[i]``. It is built fresh from the new config (so attention modules get their own
    ``layer_idx`` for the KV cache) and loaded with the remapped state dict. Saved with the
    teacher's tokenizer and generation config.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    if not (teacher_dir / "config.json").is_file():
        raise UserError(f"teacher {teacher_dir} is not an HF checkpoint folder (no config.json)")
    teacher_cfg = AutoConfig.from_pretrained(teacher_dir)
    n = teacher_cfg.num_hidden_layers
    layers = list(layers)
    if not layers:
        raise UserError("student.init_from_teacher_layers is empty; list the teacher layers to keep, e.g. [0, 6, 12]")
    if any(not isinstance(i, int) or isinstance(i, bool) for i in layers):
        raise UserError(f"student.init_from_teacher_layers must be integers, got {layers}")
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise UserError(f"student.init_from_teacher_layers: layer {bad[0]} is out of range; the teacher has layers 0-{n - 1}")
    if any(b <= a for a, b in itertools.pairwise(layers)):
        raise UserError(f"student.init_from_teacher_layers must be strictly increasing, got {layers}")

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype="auto")
    prefix = _decoder_layers_prefix(teacher, n)
    new_index = {j: i for i, j in enumerate(layers)}
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    state: dict[str, torch.Tensor] = {}
    for key, tensor in teacher.state_dict().items():
        m = pat.match(key)
        if m is None:
            state[key] = tensor
        elif int(m.group(1)) in new_index:
            state[f"{prefix}.{new_index[int(m.group(1))]}.{m.group(2)}"] = tensor

    cfg = _student_config(teacher_cfg, layers)
    student = AutoModelForCausalLM.from_config(cfg, dtype=teacher.dtype)
    result = student.load_state_dict(state, strict=False)
    tied = set(getattr(student, "_tied_weights_keys", None) or [])
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"student state dict mismatch: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    if getattr(cfg, "tie_word_embeddings", False):
        student.tie_weights()
    student.generation_config = copy.deepcopy(teacher.generation_config)
    student.config._name_or_path = str(out_dir)

    out_dir.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out_dir)
    return {"params": count_params(student), "teacher_params": count_params(teacher), "layers": layers}
