"""GGUF artifacts: HF checkpoint -> F16 GGUF (llama.cpp's own converter) -> llama.cpp's quantizer.

Every llama.cpp piece comes from one source, the llama-cpp-python sdist of the installed runtime
version (``vendor/llama.cpp``), so converter, quantizer, importance-matrix tool and runtime agree on
the GGUF they read and write:

- the converter (``convert_hf_to_gguf.py`` + ``gguf-py``) needs transformers<5, so it runs in its own
  venv (``toolenv``) as a subprocess; the F16 it writes is cached in ``work`` keyed by the source's
  file hashes, so every variant of one run converts once;
- ``llama-quantize`` / ``llama-imatrix`` (``make llama-tools``) quantize with an importance matrix
  computed from the task's own calibration texts; without them ``llama_cpp.llama_model_quantize``
  (in llama-cpp-python, no importance matrix) quantizes and the artifact says so. Given compress's
  ``score``, a variant quantized with the matrix is quantized without it too and the better on the
  calibration split is kept (``build``).

Option: ``gguf:q4_k_m:imatrix_chunks=N`` caps the importance matrix at N chunks of (up to) 512 tokens.
Build logs go to ``work/gguf/`` (converter: ``f16-<key>/convert.log``; quantizer: ``gguf-<variant>.log``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from edgedistill.compress import toolenv
from edgedistill.compress.formats import Built, FormatSpec, Score
from edgedistill.runtimes.llama import LlamaCppRuntime

from edgedistill.errors import UserError

# variant -> llama.cpp file type name (llama-quantize's argument, LLAMA_FTYPE_MOSTLY_<name>)
FTYPES = {"f16": "F16", "q8_0": "Q8_0", "q6_k": "Q6_K", "q5_k_m": "Q5_K_M", "q4_k_m": "Q4_K_M", "q4_0": "Q4_0"}
# where an importance matrix changes the result (Q8_0 is near-lossless without one)
IMATRIX_VARIANTS = {"q6_k", "q5_k_m", "q4_k_m", "q4_0"}
TOOLS = ("llama-quantize", "llama-imatrix")
IMATRIX_MAX_CTX = 512
IMATRIX_MAX_CHUNKS = 32  # 16k tokens of task text; ~1-4 min for a 135M model on 2 cores (option imatrix_chunks=N)


def _threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def runtime_version() -> str:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        raise UserError("GGUF artifacts need llama-cpp-python: run `make install` (see README for build flags)") from None


# --- llama.cpp sources: the sdist of the installed llama-cpp-python --------------------------


def llama_cpp_source(version: str | None = None) -> Path:
    """The unpacked llama-cpp-python sdist of ``version`` (downloaded once into tools_home()/src)."""
    version = version or runtime_version()
    src_dir = toolenv.tools_home() / "src"
    root = src_dir / f"llama_cpp_python-{version}"
    if (root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
        return root
    archive = src_dir / f"llama_cpp_python-{version}.tar.gz"
    if not archive.is_file():
        src_dir.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps", "--no-binary", ":all:"]
        toolenv.run_tool(
            [*pip, f"llama-cpp-python=={version}", "-d", str(src_dir)],
            log_path=src_dir / "download.log",
            what=f"downloading the llama-cpp-python {version} sources (llama.cpp's converter)",
        )
    tmp = src_dir / f".unpack-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="tar")
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp / root.name, root)
    shutil.rmtree(tmp, ignore_errors=True)
    return root


def llama_cpp_commit(root: Path) -> str:
    """The llama.cpp commit the sdist vendors (its git HEAD, else the changelog's last update line)."""
    head = root / "vendor" / "llama.cpp" / ".git" / "HEAD"
    if head.is_file() and re.fullmatch(r"[0-9a-f]{40}", text := head.read_text().strip()):
        return text[:9]
    changelog = root / "CHANGELOG.md"
    if changelog.is_file() and (m := re.search(r"llama\.cpp@([0-9a-f]{7,40})", changelog.read_text(encoding="utf-8"))):
        return m.group(1)[:9]
    return "unknown"


def prepare() -> None:
    """Fetch llama.cpp's sources and make the converter's venv now (``edgedistill run`` does this in
    the background while it distills, so compress does not wait for pip)."""
    toolenv.ensure_venv("gguf-convert", converter_requirements(llama_cpp_source()))


def converter_requirements(root: Path) -> list[str]:
    """The converter's own pinned requirements, from the sdist, with torch pinned to the CPU wheel and
    the sdist's own gguf-py instead of PyPI's gguf."""
    reqs = [toolenv.TORCH_CPU]
    req_dir = root / "vendor" / "llama.cpp" / "requirements"
    for name in ("requirements-convert_legacy_llama.txt", "requirements-convert_hf_to_gguf.txt"):
        for line in (req_dir / name).read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if not line or line.startswith("-"):
                continue
            if re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0].lower() in ("torch", "gguf"):
                continue
            reqs.append(line)
    return [*reqs, str(root / "vendor" / "llama.cpp" / "gguf-py")]


# --- llama.cpp tools built by `make llama-tools` -------------------------------------------


def tools_bin() -> Path:
    return Path(os.environ.get("EDGEDISTILL_LLAMA_CPP_BIN") or toolenv.tools_home() / "llama.cpp" / "bin").expanduser()


def find_tools(version: str) -> tuple[dict[str, Path], str | None]:
    """(name -> binary) of llama-quantize and llama-imatrix, or ({}, why they are not used)."""
    d = tools_bin()
    found = {t: d / t for t in TOOLS if (d / t).is_file() and os.access(d / t, os.X_OK)}
    if len(found) < len(TOOLS):
        return {}, f"llama.cpp tools not found in {d} (run `make llama-tools`)"
    stamp = d / "VERSION"  # written by `make llama-tools`: the llama-cpp-python version they were built from
    if stamp.is_file() and (built := stamp.read_text().strip()) != version:
        return (
            {},
            f"llama.cpp tools in {d} were built from llama-cpp-python {built}, the runtime is {version} (run `make llama-tools`)",
        )
    return found, None


def build_key(fmt: FormatSpec) -> dict:
    """What decides the bytes beyond the request: the runtime version, and whether the importance
    matrix tools are there (an artifact built without them is rebuilt once they are)."""
    version = runtime_version()
    return {"llama_cpp_python": version, "imatrix_tools": bool(find_tools(version)[0])}


def tool_version(binary: Path) -> str:
    try:
        proc = subprocess.run([str(binary), "--version"], check=False, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    m = re.search(r"^version: (.+)$", proc.stdout + proc.stderr, re.MULTILINE)  # e.g. "0.5.0-dev (build 1, commit 0c1e570)"
    return m.group(1).strip() if m else "unknown"


# --- build -----------------------------------------------------------------------------------


def build(src: Path, fmt: FormatSpec, out: Path, calib: list[str], work: Path, score: Score | None = None) -> Built:
    """Convert ``src`` to GGUF (cached F16 in ``work``) and quantize it to ``fmt.variant`` in ``out``.

    With an importance matrix and ``score`` (the task's primary metric of an opened runtime on
    teacher-labelled rows outside the calibration split, ``compress.evaluate.choice_scorer``), the variant is quantized with and
    without the matrix and the better scoring file is kept (the matrix on a tie): on models whose
    widths are not multiples of 256 llama.cpp falls back from K-quants to legacy types, and there a
    matrix can hurt badly (the restaurant8k student: Q5_1 0.079 slot F1 with it, 0.667 without)."""
    src, out, work = Path(src), Path(out), Path(work)
    if fmt.variant not in FTYPES:
        raise UserError(f"gguf:{fmt.variant} is not a GGUF variant; use one of {', '.join(f'gguf:{v}' for v in FTYPES)}")
    _check_source(src)  # before fetching any tool: a wrong folder is the commonest mistake
    version = runtime_version()
    root = llama_cpp_source(version)
    f16, conv = convert_f16(src, root, work / "gguf", probes=calib[:5])
    model_file = f"model-{fmt.variant}.gguf"
    target = out / model_file
    tools: dict[str, str] = {
        "llama.cpp": llama_cpp_commit(root),
        "llama-cpp-python": version,
        **{f"{k} (converter)": v for k, v in conv["tools"].items()},
    }
    settings: dict = {
        "variant": fmt.variant,
        "ftype": FTYPES[fmt.variant],
        "convert_outtype": "f16",
        "tokenizer_check": conv["tokenizer_check"],
        # measured; "reused": the F16 conversion / importance matrix came from ``work`` (made for another variant)
        "timings_s": {"convert": conv["convert_s"], "convert_reused": conv["reused"]},
    }
    notes: list[str] = list(conv["notes"])
    out.mkdir(parents=True, exist_ok=True)
    log = work / "gguf" / f"{fmt.name}.log"

    if fmt.variant == "f16":
        shutil.copyfile(f16, target)
        settings["imatrix"] = False
        return Built(model_file, "llama.cpp convert_hf_to_gguf.py --outtype f16", tools, settings, notes)

    found, missing = find_tools(version)
    use_imatrix = fmt.variant in IMATRIX_VARIANTS and bool(found)
    imatrix = None
    if use_imatrix:
        tools["llama-imatrix"] = tool_version(found["llama-imatrix"])  # llama-quantize has no --version; one build
        imatrix, im_settings = compute_imatrix(found["llama-imatrix"], f16, conv["key"], src, calib, work / "gguf", fmt)
        settings["timings_s"].update(im_settings.pop("timings_s", {}))
        settings.update(im_settings)
        if imatrix is None:
            notes.append(f"no importance matrix: {im_settings['imatrix_skipped']}")
    elif fmt.variant in IMATRIX_VARIANTS:
        notes.append(f"quantized without an importance matrix: {missing}")
    settings["threads"] = _threads()
    if found:
        tools["llama-quantize"] = tools.get("llama-imatrix") or tool_version(found["llama-imatrix"])
    settings["quantizer"] = "llama-quantize" if found else "llama_cpp.llama_model_quantize"

    t0 = time.perf_counter()
    _quantize(found, f16, target, fmt, imatrix, log, src.name)
    settings["timings_s"]["quantize"] = round(time.perf_counter() - t0, 2)
    if imatrix is not None and score is not None:
        t0 = time.perf_counter()
        plain = work / "gguf" / f"{fmt.name}-without-imatrix.gguf"
        try:
            _quantize(found, f16, plain, fmt, None, work / "gguf" / f"{fmt.name}-without-imatrix.log", src.name)
            choice = {"with": _score_file(target, score), "without": _score_file(plain, score)}
            keep = choice["without"]["value"] > choice["with"]["value"]
            if keep:
                os.replace(plain, target)
                imatrix = None
        finally:
            plain.unlink(missing_ok=True)
        w, wo = choice["with"], choice["without"]
        settings["imatrix_choice"] = {"metric": w["metric"], "n": w["n"], "with": w["value"], "without": wo["value"],
                                      "kept": "without" if keep else "with"}
        settings["timings_s"]["imatrix_choice"] = round(time.perf_counter() - t0, 2)
        if keep:
            notes.append(f"quantized without the importance matrix: {w['metric']} {wo['value']:.3f} without it vs {w['value']:.3f} "
                         f"with it on {w['n']} distillation rows (not the calibration split)")
    settings["imatrix"] = imatrix is not None
    method = f"llama.cpp quantize {FTYPES[fmt.variant]}" + (" with importance matrix" if imatrix else "")
    return Built(model_file, method, tools, settings, notes)


def _quantize(found: dict[str, Path], f16: Path, target: Path, fmt: FormatSpec, imatrix: Path | None, log: Path, name: str) -> None:
    """Quantize ``f16`` to ``fmt.variant`` at ``target`` (written whole or not at all): llama-quantize
    (with ``imatrix`` if given) when the tools are there, else llama-cpp-python's quantizer."""
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    if found:
        im = ["--imatrix", str(imatrix)] if imatrix else []
        cmd = [str(found["llama-quantize"]), *im, str(f16), str(tmp), FTYPES[fmt.variant], str(_threads())]
    else:
        cmd = [sys.executable, "-c", _QUANTIZE_PY, str(f16), str(tmp), FTYPES[fmt.variant], str(_threads())]
    try:
        toolenv.run_tool(cmd, log_path=log, what=f"quantizing {name} to GGUF {FTYPES[fmt.variant]}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)  # the artifact folder holds the artifact only


def _score_file(path: Path, score: Score) -> dict[str, Any]:
    rt = LlamaCppRuntime(path)
    try:
        return score(rt)
    finally:
        rt.close()


# run in a subprocess: llama.cpp's logs go to the build log, and an abort cannot take the CLI down
_QUANTIZE_PY = """
import ctypes, sys, llama_cpp
inp, out, ftype, threads = sys.argv[1:]
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + ftype)
p.nthread = int(threads)
rc = llama_cpp.llama_model_quantize(inp.encode(), out.encode(), ctypes.byref(p))
sys.exit(f"llama_model_quantize returned {rc}" if rc else 0)
"""


def _source_key(src: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in src.rglob("*") if p.is_file() and "checkpoints" not in p.relative_to(src).parts)
    for p in files:
        h.update(str(p.relative_to(src)).encode() + b"\0")
        with p.open("rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def _check_source(src: Path) -> str:
    if not (src / "config.json").is_file():
        raise UserError(f"{src} is not an HF checkpoint (no config.json); pass the folder `edgedistill distill` wrote (student/)")
    try:
        arch = (json.loads((src / "config.json").read_text(encoding="utf-8")).get("architectures") or ["?"])[0]
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{src}/config.json is not valid JSON; the checkpoint is damaged") from None
    if not any((src / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise UserError(
            f"{src} has no tokenizer (tokenizer.json or tokenizer.model); a GGUF embeds its tokenizer, save it with the model"
        )
    if not any(src.glob("*.safetensors")) and not any(src.glob("*.bin")):
        raise UserError(f"{src} has no weights (*.safetensors); the checkpoint is incomplete")
    return arch


def _stage_for_converter(src: Path, stage: Path) -> Path:
    """A view of src the transformers-4 converter can read: links to every file, except a
    tokenizer_config.json written by transformers 5 ("TokenizersBackend" is unknown to 4.x; the
    tokenizer.json is the same tokenizer either way)."""
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_file():
            os.symlink(p.resolve(), stage / p.name)
    cfg_path = src / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        if cfg.get("tokenizer_class") == "TokenizersBackend" or cfg.get("backend") == "tokenizers":
            cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
            (stage / cfg_path.name).unlink()
            (stage / cfg_path.name).write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return stage


_CONVERTER_ERRORS = [
    (
        re.compile(r"Model (\S+) is not supported"),
        "llama.cpp's converter does not support architecture {0}; GGUF needs an architecture llama.cpp knows (e.g. LlamaForCausalLM)",
    ),
    (
        re.compile(r"BPE pre-tokenizer was not recognized"),
        "llama.cpp's converter does not recognise this tokenizer's pre-tokenizer (not a tokenizer of a model llama.cpp knows), so llama.cpp could not tokenize text like transformers does",
    ),
    (
        re.compile(
            r"(KeyError|ValueError|AssertionError|FileNotFoundError|RuntimeError|NotImplementedError)(: .*)?$", re.MULTILINE
        ),
        "llama.cpp's converter failed ({0}{1})",
    ),
]


def convert_f16(src: Path, root: Path, cache: Path, probes: list[str] | None = None) -> tuple[Path, dict]:
    """F16 GGUF of src, converted once per source content and converter version (cached under ``cache``)."""
    arch = _check_source(src)
    key = hashlib.sha256(f"{_source_key(src)}|{root.name}|f16".encode()).hexdigest()[:16]
    folder = cache / f"f16-{key}"
    f16 = folder / "model-f16.gguf"
    info_path = folder / "convert.json"
    if f16.is_file() and info_path.is_file():
        return f16, {**json.loads(info_path.read_text(encoding="utf-8")), "reused": True}

    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "convert.log"
    reqs = converter_requirements(root)
    py = toolenv.ensure_venv("gguf-convert", reqs, log_path=cache / "gguf-convert-venv.install.log")
    stage = _stage_for_converter(src, folder / "src")
    tmp = folder / f"model-f16.gguf.tmp-{os.getpid()}"
    script = root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    t0 = time.perf_counter()
    try:
        toolenv.run_tool(
            [str(py), str(script), str(stage), "--outtype", "f16", "--outfile", str(tmp)],
            log_path=log,
            what=f"converting {src} to GGUF",
            env={"PYTHONUNBUFFERED": "1"},
        )
    except UserError:
        raise UserError(_converter_error(log, arch)) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    os.replace(tmp, f16)
    convert_s = round(time.perf_counter() - t0, 2)
    versions = toolenv.package_versions(py, ["gguf", "transformers", "torch"])
    tools = {("gguf-py" if k == "gguf" else k): v for k, v in versions.items()}
    check, notes = tokenizer_check(src, f16, [*TOKENIZER_PROBES, *(probes or [])])
    info = {"key": key, "architecture": arch, "convert_s": convert_s, "tools": tools, "tokenizer_check": check, "notes": notes}
    info_path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return f16, {**info, "reused": False}


def _converter_error(log: Path, arch: str) -> str:
    text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
    for pattern, message in _CONVERTER_ERRORS:
        if m := next(reversed(list(pattern.finditer(text))), None):  # the last one: what ended the run
            groups = [g or "" for g in m.groups()] or [arch]
            return f"{message.format(*groups)[:300]}; full log: {log}"
    last = next((ln for ln in reversed(text.splitlines()) if ln.strip()), "")
    return f"llama.cpp's converter failed on {arch}: {last[:200]}; full log: {log}"


TOKENIZER_PROBES = [
    "Hello world! How are you today?",
    "<|im_start|>user\nWhere is my card? It's been 3 days...<|im_end|>\n<|im_start|>assistant\n",
    '{"intent": "card_arrival", "n": 1234.5}\n\n  indented\ttab',
]


def tokenizer_check(src: Path, f16: Path, texts: list[str] | None = None) -> tuple[str, list[str]]:
    """Does llama.cpp tokenize text as transformers does? (A served GGUF tokenizes with llama.cpp.)"""
    import llama_cpp
    from llama_cpp import _internals
    from transformers import AutoTokenizer

    texts = texts or TOKENIZER_PROBES
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    try:
        hf = AutoTokenizer.from_pretrained(src)
        ll = _internals.LlamaModel(path_model=str(f16), params=params, verbose=False)
    except (OSError, ValueError) as e:
        return "not checked", [f"tokenizer check skipped: {str(e).strip()[:200]}"]
    try:
        same = sum(hf(t, add_special_tokens=False)["input_ids"] == ll.tokenize(t.encode(), False, True) for t in texts)
    finally:
        ll.close()
    check = f"{same}/{len(texts)} texts tokenized identically by llama.cpp and transformers"
    return check, (
        [] if same == len(texts) else [f"tokenizer mismatch: only {check}; text served by llama.cpp may be tokenized differently"]
    )


def compute_imatrix(binary: Path, f16: Path, f16_key: str, src: Path, calib: list[str], cache: Path, fmt: FormatSpec):
    """Importance matrix of the F16 model over the calibration texts (cached per model and texts)."""
    texts = [t for t in calib if t.strip()]
    if not texts:
        return None, {"imatrix_skipped": "no calibration texts"}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    n_tokens = sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])
    n_ctx = IMATRIX_MAX_CTX
    while n_ctx > 32 and n_tokens < 2 * n_ctx:  # llama-imatrix needs at least two chunks
        n_ctx //= 2
    if n_tokens < 2 * n_ctx:
        return None, {"imatrix_skipped": f"calibration too small ({n_tokens} tokens, llama-imatrix needs {2 * n_ctx})"}
    opt = fmt.option("imatrix_chunks", str(IMATRIX_MAX_CHUNKS))
    if not opt.isdigit() or int(opt) < 1:
        raise UserError(f"--formats {fmt}: imatrix_chunks must be a positive integer (chunks of {n_ctx} tokens), not {opt!r}")
    chunks = min(int(opt), n_tokens // n_ctx)
    text = "\n".join(texts)
    key = hashlib.sha256(f"{f16_key}|{n_ctx}|{chunks}|{text}".encode()).hexdigest()[:16]
    out = cache / f"imatrix-{key}.gguf"
    settings = {
        "imatrix_ctx": n_ctx,
        "imatrix_chunks": chunks,
        "imatrix_tokens": min(n_tokens, chunks * n_ctx),
        "calibration_texts": len(texts),
    }
    if out.is_file():
        return out, {**settings, "timings_s": {"imatrix_reused": True}}
    calib_file = cache / f"imatrix-{key}.txt"
    calib_file.write_text(text, encoding="utf-8")
    tmp = cache / f"imatrix-{key}.tmp-{os.getpid()}.gguf"
    t0 = time.perf_counter()
    # --parse-special: the texts are chat-rendered, their <|im_start|> must be the special tokens the runtime sees
    args = ["-m", f16, "-f", calib_file, "-o", tmp, "-c", n_ctx, "--chunks", chunks, "--parse-special", "--no-ppl"]
    toolenv.run_tool(
        [str(binary), *map(str, args), "-t", str(_threads()), "-ofreq", str(chunks + 1)],
        log_path=cache / f"imatrix-{key}.log",
        what="computing the importance matrix (llama-imatrix)",
    )
    os.replace(tmp, out)
    return out, {**settings, "timings_s": {"imatrix": round(time.perf_counter() - t0, 2), "imatrix_reused": False}}


# --- load ------------------------------------------------------------------------------------


def load(folder: Path, manifest: dict) -> LlamaCppRuntime:
    """Open a GGUF artifact with the llama.cpp runtime (greedy decoding for the gate and the speed check)."""
    path = Path(folder) / manifest["model_file"]
    if not path.is_file():
        raise UserError(f"{folder}: model file {manifest['model_file']} is missing; rebuild the artifact")
    runtime_version()
    return LlamaCppRuntime(path)
